"""Reading the converter's Parquet inputs: its lowest layer, importing only `pipeline.layout` (and
`pipeline.errors`, for the base of ConvertError).

It holds the input list and the footers (pass 0: `expand_inputs`, `resolve_inputs`, `inspect_file` ->
`Source`, the column aliases), the decoding and checking of one chunk of row groups into float16
(`file_chunks` -> `Chunk`, `read_chunk`, `decode_chunk` -> `DecodedChunk`: nulls, list lengths, finite
values, float16 range, statistics of the stored values), `ConvertError`, which every converter file raises,
and `parse_channels`. Above it: `pipeline.cuts` (pass 1), `pipeline.parallel` (threads, worker pool, shards,
`read_parquet_chunks`) and `pipeline.convert` (plan, HDF5 writing, CLI). Every name without a leading
underscore is used by one of them, or by `benchmarks/bench_convert.py`, which times the stages of
`decode_chunk` one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.errors import UserError

IMAGE_SHAPE = (len(layout.CHANNEL_NAMES), layout.IMAGE_SIZE, layout.IMAGE_SIZE)   # (8, 125, 125) per row
PIXELS = layout.IMAGE_SIZE * layout.IMAGE_SIZE


class ConvertError(UserError):
    """Bad input or options; the message is one line naming the file / row / column and what to do."""


def parse_channels(channels: Sequence[int | str] | str) -> tuple[int, ...]:
    """'0,1,2,3' / (3, 0) / ('ecal', 'hcal') -> indices into the 8 raw channels; ConvertError if bad."""
    items = channels.split(",") if isinstance(channels, str) else list(channels)
    out = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        if isinstance(item, str) and item in layout.CHANNEL_NAMES:
            out.append(layout.CHANNEL_NAMES.index(item))
            continue
        try:
            index = int(item)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(layout.CHANNEL_NAMES):
            raise ConvertError(f"unknown channel {item!r}: use indices 0-7 or names "
                               f"{', '.join(layout.CHANNEL_NAMES)}")
        out.append(index)
    if not out or len(set(out)) != len(out):
        raise ConvertError(f"channels {channels!r}: give each channel once, at least one (e.g. 0,1,2,3)")
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Pass 0: inputs and schemas
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """What the footer of one input file says."""
    path: str
    name: str
    size: int
    image_column: str
    scalars: dict[str, str]          # canonical name -> source column, in file order
    ignored: list[str]               # columns neither image nor numeric scalar (or a losing alias)
    group_starts: np.ndarray         # (G + 1,) int64: first row of each row group, then the row count

    @property
    def num_rows(self) -> int:
        return int(self.group_starts[-1])

    @property
    def num_groups(self) -> int:
        return len(self.group_starts) - 1


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files and directories (each standing for its *.parquet, sorted by name) -> files, in the order given
    and as given; ConvertError for a missing path, a directory without *.parquet, or a file given twice.
    `massreg.predict` expands its inputs with it too."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.parquet") if p.is_file())
            if not found:
                raise ConvertError(f"{path}: directory holds no *.parquet files; check the path")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConvertError(f"{path}: no such file or directory")
    seen: dict[Path, Path] = {}
    for path in files:
        real = path.resolve()
        if real in seen:
            raise ConvertError(f"{path}: given twice (as {seen[real]} too, directly and/or through a "
                               f"directory); give each file once")
        seen[real] = path
    return files


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """The converter's inputs: `expand_inputs`, resolved and sorted by file name (then path)."""
    if not inputs:
        raise ConvertError("no input given: pass Parquet files or directories holding *.parquet files")
    return sorted((p.resolve() for p in expand_inputs(inputs)), key=lambda p: (p.name, str(p)))


def one_line(exc: BaseException) -> str:
    """A library's error text as one line of at most 300 characters, for the parenthesis of a ConvertError."""
    return " ".join(str(exc).split())[:300]


def _open_parquet(path: str) -> pq.ParquetFile:
    """The parsed footer of `path`; ConvertError (one line) when it is not a readable Parquet file."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConvertError(f"{path}: not a readable Parquet file ({one_line(exc)}); check that it is a "
                           f"complete Parquet file") from None


@lru_cache(maxsize=1)
def cached_parquet(path: str) -> pq.ParquetFile:
    """The open file, one per process: a 150,000-row-group footer takes ~1 s and hundreds of MB to parse, so
    passes 0, 1 and 2 share it when there is one input (else each pass opens each file once) and only one is
    held at a time. `convert` clears it at the end, so a file rewritten between two calls is read anew."""
    return _open_parquet(path)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _image_type_ok(t: pa.DataType) -> bool:
    for _ in range(3):
        if not _is_list(t):
            return False
        t = t.value_type
    return pa.types.is_float64(t) or pa.types.is_float32(t)


def _columns(path: str, schema: pa.Schema) -> tuple[str, dict[str, str], list[str]]:
    """Image column, scalar columns (canonical -> source) and ignored columns of one schema."""
    names = schema.names
    image = next((a for a in layout.COLUMN_ALIASES["X_jet"] if a in names), None)
    if image is None:
        raise ConvertError(f"{path}: no image column ({' or '.join(layout.COLUMN_ALIASES['X_jet'])}); "
                           f"columns present: {', '.join(names)}")
    if not _image_type_ok(schema.field(image).type):
        raise ConvertError(f"{path}: image column {image} has type {schema.field(image).type}; expected "
                           f"list<list<list<double or float>>> (8 x 125 x 125 per row)")
    # canonical name of each source column: its own, or for an alias the canonical name when it is the first
    # alias present (`m` beats `am` wherever each sits in the file); a losing alias is ignored
    canonical = {}
    for canon, aliases in layout.COLUMN_ALIASES.items():
        chosen = next((a for a in aliases if a in names), None)
        canonical.update({a: (canon if a == chosen else None) for a in aliases})
    scalars, ignored = {}, []
    for f in schema:
        if f.name == image:
            continue
        numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        canon = canonical.get(f.name, f.name)
        if not numeric or canon is None or canon == "X_jet":
            ignored.append(f.name)
            continue
        if "/" in canon or canon in layout.LABEL_META or canon in (".", ""):
            raise ConvertError(f"{path}: column name {f.name!r} cannot be stored as /labels/{canon}; "
                               f"rename it")
        scalars[canon] = f.name
    return image, scalars, ignored


def inspect_file(path: Path) -> Source:
    """Pass 0 for one file: schema and row-group sizes from the footer."""
    pf = cached_parquet(str(path))
    image, scalars, ignored = _columns(str(path), pf.schema_arrow)
    md = pf.metadata
    # metadata only (a few microseconds per row group), not data
    counts = np.fromiter((md.row_group(i).num_rows for i in range(md.num_row_groups)), np.int64,
                         md.num_row_groups)
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return Source(str(path), path.name, path.stat().st_size, image, scalars, ignored, starts)


# ----------------------------------------------------------------------------------------------------------
# Decoding one chunk of row groups (shared by pass 2, the workers and read_parquet_chunks)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """One read: row groups `groups` of `path`, of which the rows `select` are kept."""
    path: str
    image_column: str
    groups: np.ndarray                 # row-group indices, ascending
    table_rows: np.ndarray             # (n_read,) source row of each row the read returns
    select: np.ndarray | None          # positions within those rows to keep; None = all
    train: np.ndarray | None           # (n_kept,) bool: rows that enter /stats; None = no statistics
    channels: tuple[int, ...]
    clip: bool
    scalars: dict[str, str] = field(default_factory=dict)   # canonical -> source columns to return too


@dataclass
class DecodedChunk:
    """One decoded chunk, sparse: what a worker sends back is ~100x smaller than the dense float16 images."""
    n: int                             # rows kept
    parts: list = field(default_factory=list)   # per channel: (positions in (n, 15625) | None, values)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    clipped: int = 0
    n_train: int = 0
    sums: np.ndarray | None = None     # (C,) float64 sums over the train rows' stored values
    sumsqs: np.ndarray | None = None
    maxes: np.ndarray | None = None

    def dense(self, out: np.ndarray | None = None) -> np.ndarray:
        """(n, C, 125, 125) float16, into `out` ((>= n, C, 15625), all zeros) when given."""
        out = np.zeros((self.n, len(self.parts), PIXELS), np.float16) if out is None else out[:self.n]
        for j, (positions, values) in enumerate(self.parts):
            if positions is None:
                out[:, j] = values.reshape(self.n, PIXELS)
            else:
                r, p = np.divmod(positions, PIXELS)
                out[r, j, p] = values
        return out.reshape(self.n, len(self.parts), layout.IMAGE_SIZE, layout.IMAGE_SIZE)

    def clear(self, out: np.ndarray) -> None:
        """Zero again what `dense(out)` wrote: reusing the buffer is cheaper than fresh zero pages."""
        for j, (positions, _) in enumerate(self.parts):
            if positions is None:
                out[:self.n, j] = 0
            else:
                r, p = np.divmod(positions, PIXELS)
                out[r, j, p] = 0


def read_row_groups(pf: pq.ParquetFile, path: str, groups: np.ndarray, columns: list[str],
                    use_threads: bool = True) -> pa.Table:
    """`columns` of row groups `groups` of the open file `pf` (`path`); ConvertError (one line) when the data
    cannot be read (a corrupt or truncated file)."""
    try:
        return pf.read_row_groups(groups.tolist(), columns=columns, use_threads=use_threads)
    except (pa.ArrowException, OSError) as exc:
        raise ConvertError(f"{path}: cannot read row groups {groups[0]}-{groups[-1]} ({one_line(exc)}); the "
                           f"file is corrupt or truncated") from None


def flat_images(column: pa.ChunkedArray, path: str, name: str, table_rows: np.ndarray) -> np.ndarray:
    """The image column of a chunk -> one flat float64/float32 numpy array (n * 8 * 125 * 125), zero copy.
    Nulls (Arrow's counts) and list lengths (numpy on the offsets) are checked level by level, vectorised;
    only a failure looks for the first offending row."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    per_item = 1  # elements of the current level per row: 1, 8, 8 * 125, then 8 * 125 * 125 values
    for depth, expected in enumerate(IMAGE_SHAPE):
        if arr.null_count:
            i = int(np.flatnonzero(np.asarray(pc.is_null(arr)))[0])
            raise ConvertError(_where(path, table_rows, i, per_item, depth) + f": {name} holds a null "
                               f"{'row' if depth == 0 else 'list'}; drop or repair it")
        lens = _list_lengths(arr)
        wrong = np.flatnonzero(lens != expected)
        if wrong.size:
            i = int(wrong[0])
            raise ConvertError(_where(path, table_rows, i, per_item, depth) + f": {name} has {lens[i]} "
                               f"entries at depth {depth + 1} where {expected} are expected; images must be "
                               f"{' x '.join(map(str, IMAGE_SHAPE))}")
        # the children of exactly the lists checked: .values sliced at the first offset (flatten() costs 5x)
        arr = arr.values.slice(_first_offset(arr), len(arr) * expected)
        per_item *= expected
    if arr.null_count:
        i = int(np.flatnonzero(np.asarray(pc.is_null(arr)))[0])
        raise ConvertError(_where(path, table_rows, i, per_item, 3) + ": null pixel value; drop or repair it")
    # zero copy; np.frombuffer rather than arr.to_numpy(), whose first call costs ~0.6 s of imports
    dtype = np.dtype(np.float64 if pa.types.is_float64(arr.type) else np.float32)
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _first_offset(arr: pa.Array) -> int:
    if pa.types.is_fixed_size_list(arr.type):
        return arr.offset * arr.type.list_size
    dtype = np.dtype(np.int64 if pa.types.is_large_list(arr.type) else np.int32)
    return int(np.frombuffer(arr.buffers()[1], dtype=dtype, count=1, offset=arr.offset * dtype.itemsize)[0])


def _list_lengths(arr: pa.Array) -> np.ndarray:
    """Lengths of the lists of a list array, from its offsets buffer (a few microseconds; a pyarrow compute
    call costs ~50)."""
    if pa.types.is_fixed_size_list(arr.type):
        return np.full(len(arr), arr.type.list_size)
    dtype = np.dtype(np.int64 if pa.types.is_large_list(arr.type) else np.int32)
    offsets = np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr) + 1,
                            offset=arr.offset * dtype.itemsize)
    return np.diff(offsets)


def _where(path: str, table_rows: np.ndarray, i: int, per_row: int, depth: int) -> str:
    """'file: row r, channel c (name)' for element i of nesting depth `depth` (0 = rows)."""
    row = int(table_rows[i // per_row])
    if depth == 0:
        return f"{path}: row {row}"
    c = (i // (per_row // IMAGE_SHAPE[0])) % IMAGE_SHAPE[0]
    return f"{path}: row {row}, channel {c} ({layout.CHANNEL_NAMES[c]})"


def to_float16(values: np.ndarray) -> np.ndarray:
    """float64 or float32 values -> float16 rounded once, correctly (numpy's cast); overflow becomes inf and
    NaN stays NaN (`bad_values` looks for both afterwards).

    numpy's cast is a scalar loop (2-4 ns a value) and torch's F16C cast is ~5x faster, but torch rounds
    float64 through float32, and rounding twice differs from rounding once in about 1 value in 8192 (those
    whose float32 lands exactly on a float16 midpoint). Since only the nonzero values are cast
    (`round_channel`), the cast is no longer where the time goes (docs/performance.md, "Converter": the
    profile)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float16)


def read_chunk(chunk: Chunk, pf: pq.ParquetFile | None = None) -> pa.Table:
    """Decode the chunk's row groups (pyarrow, which releases the GIL): the image column and any scalars.
    pyarrow's own threads stay off: a single column is decoded on one thread anyway, and with two readers they
    cost 15-20 % more CPU; the parallelism is ours, over chunks (`pipeline.parallel`: reader threads,
    `--workers`)."""
    columns = [chunk.image_column] + [c for c in chunk.scalars.values() if c != chunk.image_column]
    return read_row_groups(pf or cached_parquet(chunk.path), chunk.path, chunk.groups, columns,
                           use_threads=False)


def decode_chunk(chunk: Chunk, table: pa.Table) -> DecodedChunk:
    """Check, round and (for the train rows) sum one decoded chunk."""
    n_read = table.num_rows
    if n_read != len(chunk.table_rows):
        raise ConvertError(f"{chunk.path}: row groups {chunk.groups[0]}-{chunk.groups[-1]} hold {n_read} "
                           f"rows, the footer says {len(chunk.table_rows)}; the file is corrupt")
    flat = flat_images(table.column(0), chunk.path, chunk.image_column, chunk.table_rows)
    raw = flat.reshape(n_read, IMAGE_SHAPE[0], PIXELS)                      # (n_read, 8, 15625), zero copy
    source_rows = chunk.table_rows
    if chunk.select is not None:       # row groups of several rows, some cut: copy the kept rows (rare)
        raw, source_rows = raw[chunk.select], chunk.table_rows[chunk.select]
    n, channels = len(raw), chunk.channels
    result = DecodedChunk(n)
    if chunk.train is not None:
        result.n_train = int(chunk.train.sum())
        result.sums, result.sumsqs, result.maxes = np.zeros(len(channels)), np.zeros(len(channels)), \
            np.full(len(channels), -np.inf)
    bad = []
    for j, c in enumerate(channels):
        # (n, 15625) strided views: the unused channels are never copied
        positions, values = round_channel(raw[:, c])
        result.parts.append((positions, values))
        found = bad_values(values, positions, raw[:, c])
        if found is not None:
            bad.append((j, *found))
            if not chunk.clip or not found[3].all():
                continue                     # an error is raised below, once every channel has been looked at
            values[found[0]] = np.where(found[2] > 0, layout.FLOAT16_MAX, -layout.FLOAT16_MAX)
            result.clipped += int(found[0].size)
        if chunk.train is not None:
            add_stats(result, j, values, positions, chunk.train)
    if bad and (not chunk.clip or not all(b[4].all() for b in bad)):
        _raise_bad(bad, chunk, source_rows)
    for canon, source in chunk.scalars.items():
        values = scalar_values(table.column(source), chunk.path, source, chunk.table_rows)
        result.scalars[canon] = values if chunk.select is None else values[chunk.select]
    return result


def round_channel(src: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Round one channel, src (n, 15625) float64/32 (a strided view) -> (positions, float16 values).

    The images are sparse (> 95 % zeros), so only the nonzero source values are found (one integer compare:
    -0.0 and NaN count as nonzero), cast and kept with their flat positions in (n, 15625); range checks,
    statistics and the transfer from a worker then handle these few values only. A channel over a quarter
    nonzero is cast whole: (None, (n * 15625,) values)."""
    # compare first: np.nonzero on bools is ~10x faster than on the float bits, and ravels no strided view
    positions = np.flatnonzero(src.view(np.uint64 if src.dtype == np.float64 else np.uint32) != 0)
    if positions.size * 4 > src.size:
        return None, to_float16(src).reshape(-1)
    r, p = np.divmod(positions, PIXELS)
    return positions, to_float16(src[r, p])


def bad_values(values: np.ndarray, positions: np.ndarray | None, src: np.ndarray):
    """NaN and inf survive the cast and overflow becomes inf, so one integer test on the float16 exponent bits
    finds every bad value. None if all is well, else (indices into values, flat positions, source values,
    overflow mask: finite sources beyond float16's range)."""
    bad = (values.view(np.uint16) & np.uint16(0x7C00)) == np.uint16(0x7C00)
    if not bad.any():
        return None
    idx = np.flatnonzero(bad)
    where = idx if positions is None else positions[idx]
    r, p = np.divmod(where, PIXELS)
    source = np.asarray(src[r, p], np.float64)
    return idx, where, source, np.isfinite(source)


def _raise_bad(bad: list, chunk: Chunk, source_rows: np.ndarray) -> None:
    """The error for the first bad value in row order (NaN / inf first under --clip)."""
    best = None
    for j, _, where, source, overflow in bad:
        fatal = np.flatnonzero(~overflow) if chunk.clip else np.arange(where.size)
        if fatal.size:
            k = fatal[0]
            key = (int(where[k] // PIXELS), j)
            if best is None or key < best[0]:
                best = (key, source[k])
    (r, j), value = best
    c = chunk.channels[j]
    where = f"{chunk.path}: row {int(source_rows[r])}, channel {c} ({layout.CHANNEL_NAMES[c]})"
    if not np.isfinite(value):
        raise ConvertError(f"{where}: pixel value is {value}; drop or repair this row (NaN and inf are "
                           f"always errors)")
    raise ConvertError(f"{where}: value {value:.4g} exceeds float16 max {layout.FLOAT16_MAX:.0f}; rescale "
                       f"the input or pass --clip")


def add_stats(result: DecodedChunk, j: int, values: np.ndarray, positions: np.ndarray | None,
              train: np.ndarray) -> None:
    """Sum, sum of squares and max of channel j's STORED float16 values over the train rows, in float64
    (float16 -> float64 and the squares are exact; only the sums round). Unlisted entries are zeros."""
    if positions is None:
        v = values.reshape(len(train), PIXELS)[train].reshape(-1)
    else:
        v = values[train[positions // PIXELS]]
    x = v.astype(np.float64)
    result.sums[j] = x.sum()
    result.sumsqs[j] = np.square(x).sum()
    top = x.max() if x.size else -np.inf
    result.maxes[j] = max(top, 0.0) if x.size < result.n_train * PIXELS else top


def scalar_values(column: pa.ChunkedArray, path: str, name: str, table_rows: np.ndarray) -> np.ndarray:
    """A scalar column -> float64 numpy; nulls, NaN and inf are errors naming the first bad row."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        i = int(np.flatnonzero(np.asarray(pc.is_null(column)))[0])
        raise ConvertError(f"{path}: row {int(table_rows[i])}: column {name} is null; drop or repair the row")
    # cast in Arrow, then view the buffer: pyarrow's to_numpy() imports pandas on its first call (~0.5 s)
    column = pc.cast(column, pa.float64())
    values = np.frombuffer(column.buffers()[1], np.float64, count=len(column), offset=column.offset * 8)
    if values.size and not np.isfinite(values).all():
        i = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ConvertError(f"{path}: row {int(table_rows[i])}: column {name} is {values[i]}; drop or repair "
                           f"the row")
    return values


def file_chunks(src: Source, kept: np.ndarray, train: np.ndarray | None, chunk_size: int,
                channels: tuple[int, ...], clip: bool, scalars: dict[str, str] | None = None
                ) -> Iterator[tuple[int, Chunk]]:
    """Chunks of `chunk_size` row groups holding the (sorted) rows `kept` of one file, with the position of
    each chunk's first kept row. Row groups without a kept row are not read."""
    group_of = np.searchsorted(src.group_starts, kept, side="right") - 1        # (n_kept,)
    needed, first_kept = np.unique(group_of, return_index=True)
    bounds = np.append(first_kept, len(kept))
    for a in range(0, len(needed), chunk_size):
        groups = needed[a:a + chunk_size]
        lo, hi = int(bounds[a]), int(bounds[min(a + chunk_size, len(needed))])
        counts = src.group_starts[groups + 1] - src.group_starts[groups]
        # source rows of everything the read returns: each group's rows, groups back to back
        table_rows = np.repeat(src.group_starts[groups] - (np.cumsum(counts) - counts), counts) \
            + np.arange(int(counts.sum()))
        mine = kept[lo:hi]
        select = None if len(mine) == len(table_rows) else np.searchsorted(table_rows, mine)
        yield lo, Chunk(src.path, src.image_column, groups, table_rows, select,
                        None if train is None else train[lo:hi], channels, clip, dict(scalars or {}))
