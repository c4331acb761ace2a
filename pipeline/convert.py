"""Convert CMS end-to-end Parquet files into one training-ready HDF5 file.

Usage: python -m pipeline.convert RAW... OUT.h5 [--cuts paper|top|none] [--cut '|eta| < 1.4']
       [--channels 0,1,2,3] [--threads 2] [--workers N] [--shard I/N] [--clip] [--force]

RAW is a directory (its `*.parquet`) or a Parquet file, any number of them; all files are taken in order of
their names, then in row order, and the rows that pass the cuts are written in that order.

Pass 0 opens every file's footer (schema, row groups). Pass 1 reads only the scalar columns of every row
group, applies the cuts and fixes N and the split. Pass 2 reads the image column of the row groups that hold
kept rows, `chunk_size` row groups per call, decodes each chunk with pyarrow into one flat numpy array
(no per-row Python), checks it (nulls and list lengths at every level, finite values, float16 range),
rounds it to float16 and writes it into a contiguous, memory-mappable `/images`. The layout, the split hash
and the statistics are those of `pipeline.layout` (read its docstring).

Sparsity: the images are > 95 % zeros, so each channel's nonzero values are found with one integer compare
and only they are rounded (numpy's exact cast), range-checked, summed into the statistics and sent back by a
worker; a channel over a quarter nonzero is rounded whole. Everything beyond decoding costs ~0.3 ms a row
at 4 channels against ~1.2 ms of decoding (README, "Converter performance"). In one process `--threads`
reader threads (default 2) decode the next chunks, each through its own reader over the one parsed footer
(pyarrow releases the GIL, and a reader must not be shared between threads), while this thread checks,
rounds and writes the chunk before them.

Parallel (`--workers N`): N worker processes (forked from a forkserver, never from the parent, which holds
the HDF5 file) decode, check and round chunks, 2 per worker in flight; the parent alone writes them, in
order, so the file is byte-for-byte that of one process (the stored config leaves out the settings that do
not change the result: workers, force, progress; set SOURCE_DATE_EPOCH to fix `created`). Inputs over 1 GB
also have their footers and scalar columns (passes 0-1) read file by file in the pool.
Sharded (`--shard I/N`, I from 1 to N): the global list of chunks of `chunk_size` row groups (all files, in
order) is cut into N contiguous parts of nearly equal size and part I is converted; concatenating the
shards 1..N gives the rows of one conversion in the same order, each with the same split (the split of a
row is a hash of seed, file name and row number), and `layout.combine_stats` of their /stats gives the
statistics of one conversion.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import threading
import time
import warnings
from collections import deque
from contextlib import closing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import click
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import __version__, layout

IMAGE_SHAPE = (len(layout.CHANNEL_NAMES), layout.IMAGE_SIZE, layout.IMAGE_SIZE)   # (8, 125, 125) per row
PIXELS = layout.IMAGE_SIZE * layout.IMAGE_SIZE

# Cut presets. `paper` is the A -> gamma gamma paper's kinematic selection used by the original write-up
# (and therefore our default); `top` is the generated range of the top-quark data set.
CUT_PRESETS = {
    "paper": ("20 <= pt <= 100", "0 <= m <= 1.6", "|eta| < 1.4"),
    "top": ("85 <= m <= 500", "400 <= pt <= 1000"),
    "none": (),
}
EXECUTION_ONLY = ("threads", "workers", "force", "progress")   # config fields that cannot change the output
PARALLEL_SCAN_BYTES = 1 << 30   # inputs above this size (and of 2+ files) are scanned in the worker pool
TASK_CHUNKS = 4                 # chunks per task sent to a worker process

# Workers are forked from a forkserver that preloads this module (`_start_pool`); under `python -m
# pipeline.convert` each then re-runs the parent's main module as __mp_main__ and runpy warns that the module
# is imported already. Expected and harmless; the filter is inherited by the forked workers.
warnings.filterwarnings("ignore", message="'pipeline.convert' found in sys.modules", category=RuntimeWarning)


class ConvertError(Exception):
    """Bad input or options; the message is one line naming the file / row / column and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Configuration, cuts, summary
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ConvertConfig:
    inputs: list[str]
    output: str
    channels: tuple[int, ...] = (0, 1, 2, 3)   # indices (or names) of the raw channels to keep, in this order
    cuts: str = "paper"                        # preset: paper | top | none
    extra_cuts: tuple[str, ...] = ()           # more cuts, e.g. "20 <= pt <= 100", "|eta| < 1.4", "m > 0"
    chunk_size: int = 8                        # row groups per read
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 42
    clip: bool = False                         # saturate values beyond float16's range instead of failing
    force: bool = False                        # replace an existing output
    threads: int = 2                           # decoding threads in this process (with workers = 1)
    workers: int = 1                           # decoding processes (1 = in this process)
    shard: str | None = None                   # "I/N": convert the I-th (1-based) of N parts of the inputs
    progress: bool | None = None               # tqdm bars; None = only when stderr is a terminal


@dataclass(frozen=True)
class Cut:
    """A range cut `lo <(=) column <(=) hi` on a scalar column or its absolute value."""
    text: str
    column: str
    absolute: bool = False
    lo: float = -math.inf
    hi: float = math.inf
    lo_inclusive: bool = True
    hi_inclusive: bool = True
    source: str = "--cut"   # the preset it comes from, or "--cut"

    def passes(self, values: np.ndarray) -> np.ndarray:
        x = np.abs(values) if self.absolute else values
        ok = (x >= self.lo) if self.lo_inclusive else (x > self.lo)
        return ok & ((x <= self.hi) if self.hi_inclusive else (x < self.hi))


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf"
_COL = r"\|\s*(?P<abs1>[A-Za-z_]\w*)\s*\||abs\(\s*(?P<abs2>[A-Za-z_]\w*)\s*\)|(?P<plain>[A-Za-z_]\w*)"
_CUT_LT = re.compile(rf"^\s*(?:(?P<lo>{_NUM})\s*(?P<lop><=|<)\s*)?(?:{_COL})"
                     rf"\s*(?:(?P<hop><=|<)\s*(?P<hi>{_NUM}))?\s*$")
_CUT_GT = re.compile(rf"^\s*(?:{_COL})\s*(?P<op>>=|>)\s*(?P<lo>{_NUM})\s*$")
CUT_SYNTAX = ("'LO <= COL <= HI', 'COL < HI', 'COL >= LO', '|COL| < HI' or 'abs(COL) < HI' "
              "(< and <= allowed on either side)")


def parse_cut(text: str, source: str = "--cut") -> Cut:
    """'20 <= pt <= 100', '|eta| < 1.4', 'm > 0' ... -> Cut; ConvertError for anything else."""
    for pattern in (_CUT_LT, _CUT_GT):
        match = pattern.match(text)
        if match is None:
            continue
        g = match.groupdict()
        column = g["abs1"] or g["abs2"] or g["plain"]
        absolute = column != g["plain"]
        if pattern is _CUT_GT:
            cut = Cut(text, column, absolute, lo=float(g["lo"]), lo_inclusive=g["op"] == ">=", source=source)
        else:
            if g["lo"] is None and g["hi"] is None:
                break
            cut = Cut(text, column, absolute,
                      lo=float(g["lo"]) if g["lo"] is not None else -math.inf,
                      hi=float(g["hi"]) if g["hi"] is not None else math.inf,
                      lo_inclusive=g["lop"] != "<", hi_inclusive=g["hop"] != "<", source=source)
        if cut.lo > cut.hi:
            raise ConvertError(f"cut {text!r} selects nothing (lower bound above upper bound)")
        return cut
    raise ConvertError(f"cannot read cut {text!r}: write it as {CUT_SYNTAX}")


@dataclass
class ConvertSummary:
    output: str
    files: int
    rows_read: int
    rows_kept: int
    rejected: dict[str, int]          # cut text -> rows failing it (a row may fail several cuts)
    skipped_cuts: list[str]           # preset cuts on columns the files lack
    split_sizes: dict[str, int]
    channels: list[str]
    columns_used: dict[str, str]
    clipped: int                      # values saturated to +-65504 (--clip)
    bytes: int                        # size of the output file
    seconds: float
    shard: str | None = None
    workers: int = 1

    def describe(self) -> str:
        """The one-paragraph summary the CLI prints."""
        pct = 100.0 * self.rows_kept / max(self.rows_read, 1)
        rejected = "; ".join(f"{text}: {n:,}" for text, n in self.rejected.items()) or "no cuts"
        skipped = (f" Skipped cuts (column absent): {', '.join(self.skipped_cuts)}."
                   if self.skipped_cuts else "")
        split = " / ".join(f"{k} {v:,}" for k, v in self.split_sizes.items())
        shard = f" (shard {self.shard})" if self.shard else ""
        return (f"Read {self.rows_read:,} rows from {self.files} file(s){shard}, kept {self.rows_kept:,} "
                f"({pct:.1f}%). Rows failing each cut: {rejected}.{skipped} Wrote {self.output}: "
                f"{self.rows_kept:,} x {len(self.channels)} x {layout.IMAGE_SIZE} x {layout.IMAGE_SIZE} "
                f"float16 "
                f"({', '.join(self.channels)}), {self.bytes / 1e6:,.1f} MB; split {split}; "
                f"{self.clipped:,} values clipped. Columns used: "
                f"{', '.join(f'{k}={v}' for k, v in self.columns_used.items())}. "
                f"{self.seconds:.1f} s ({self.rows_kept / max(self.seconds, 1e-9):,.0f} rows/s, "
                f"{self.workers} worker(s)).")


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


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """'3/16' -> (3, 16), 1-based; ConvertError if malformed."""
    if shard is None or shard == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise ConvertError(f"shard {shard!r}: write I/N with 1 <= I <= N (e.g. 3/16 for the third of 16 "
                           f"parts)")
    return int(match[1]), int(match[2])


# ----------------------------------------------------------------------------------------------------------
# Pass 0: inputs and schemas
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Source:
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConvertError(f"{path}: not a readable Parquet file ({_one_line(exc)}); check that it is a "
                           f"complete Parquet file") from None


@lru_cache(maxsize=1)
def _cached_parquet(path: str) -> pq.ParquetFile:
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


def _inspect(path: Path) -> _Source:
    """Pass 0 for one file: schema and row-group sizes from the footer."""
    pf = _cached_parquet(str(path))
    image, scalars, ignored = _columns(str(path), pf.schema_arrow)
    md = pf.metadata
    # metadata only (a few microseconds per row group), not data
    counts = np.fromiter((md.row_group(i).num_rows for i in range(md.num_row_groups)), np.int64,
                         md.num_row_groups)
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return _Source(str(path), path.name, path.stat().st_size, image, scalars, ignored, starts)


def _shard_ranges(sources: list[_Source], chunk_size: int,
                  shard: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Row-group range [lo, hi) of each file inside this shard. The global list of chunks (chunk_size row
    groups, files in order) is cut into N contiguous parts; part I (1-based) is ours."""
    if shard is None:
        return [(0, s.num_groups) for s in sources]
    index, count = shard
    per_file = np.array([-(-s.num_groups // chunk_size) for s in sources], np.int64)   # ceil
    first = np.concatenate([[0], np.cumsum(per_file)])                  # first chunk of each file
    total = int(first[-1])
    if total < count:
        raise ConvertError(f"shard {index}/{count}: the inputs hold only {total} chunks of {chunk_size} row "
                           f"groups; use at most {total} shards or a smaller --chunk-size")
    c_lo, c_hi = (index - 1) * total // count, index * total // count
    ranges = []
    for s, f0, f1 in zip(sources, first[:-1], first[1:]):
        lo, hi = max(c_lo, f0) - f0, min(c_hi, f1) - f0
        ranges.append((int(lo * chunk_size), int(min(hi * chunk_size, s.num_groups))) if hi > lo else (0, 0))
    return ranges


# ----------------------------------------------------------------------------------------------------------
# Decoding one chunk of row groups (shared by pass 2, the workers and read_parquet_chunks)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Chunk:
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
class _Result:
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


def _read(pf: pq.ParquetFile, path: str, groups: np.ndarray, columns: list[str], use_threads: bool = True
          ) -> pa.Table:
    try:
        return pf.read_row_groups(groups.tolist(), columns=columns, use_threads=use_threads)
    except (pa.ArrowException, OSError) as exc:
        raise ConvertError(f"{path}: cannot read row groups {groups[0]}-{groups[-1]} ({_one_line(exc)}); the "
                           f"file is corrupt or truncated") from None


def _flat_images(column: pa.ChunkedArray, path: str, name: str, table_rows: np.ndarray) -> np.ndarray:
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
    NaN stays NaN (`_bad_values` looks for both afterwards).

    numpy's cast is a scalar loop (2-4 ns a value) and torch's F16C cast is ~5x faster, but torch rounds
    float64 through float32, and rounding twice differs from rounding once in about 1 value in 8192 (those
    whose float32 lands exactly on a float16 midpoint). Since only the nonzero values are cast
    (`_round_channel`), the cast is no longer where the time goes (see the README's profile)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float16)


def _read_chunk(chunk: _Chunk, pf: pq.ParquetFile | None = None) -> pa.Table:
    """Decode the chunk's row groups (pyarrow, which releases the GIL): the image column and any scalars.
    pyarrow's own threads stay off: a single column is decoded on one thread anyway, and with two readers they
    cost 15-20 % more CPU; the parallelism is ours, over chunks (`_prefetched`, `--workers`)."""
    columns = [chunk.image_column] + [c for c in chunk.scalars.values() if c != chunk.image_column]
    return _read(pf or _cached_parquet(chunk.path), chunk.path, chunk.groups, columns, use_threads=False)


def _decode(chunk: _Chunk, table: pa.Table) -> _Result:
    """Check, round and (for the train rows) sum one decoded chunk."""
    n_read = table.num_rows
    if n_read != len(chunk.table_rows):
        raise ConvertError(f"{chunk.path}: row groups {chunk.groups[0]}-{chunk.groups[-1]} hold {n_read} "
                           f"rows, the footer says {len(chunk.table_rows)}; the file is corrupt")
    flat = _flat_images(table.column(0), chunk.path, chunk.image_column, chunk.table_rows)
    raw = flat.reshape(n_read, IMAGE_SHAPE[0], PIXELS)                      # (n_read, 8, 15625), zero copy
    source_rows = chunk.table_rows
    if chunk.select is not None:       # row groups of several rows, some cut: copy the kept rows (rare)
        raw, source_rows = raw[chunk.select], chunk.table_rows[chunk.select]
    n, channels = len(raw), chunk.channels
    result = _Result(n)
    if chunk.train is not None:
        result.n_train = int(chunk.train.sum())
        result.sums, result.sumsqs, result.maxes = np.zeros(len(channels)), np.zeros(len(channels)), \
            np.full(len(channels), -np.inf)
    bad = []
    for j, c in enumerate(channels):
        # (n, 15625) strided views: the unused channels are never copied
        positions, values = _round_channel(raw[:, c])
        result.parts.append((positions, values))
        found = _bad_values(values, positions, raw[:, c])
        if found is not None:
            bad.append((j, *found))
            if not chunk.clip or not found[3].all():
                continue                     # an error is raised below, once every channel has been looked at
            values[found[0]] = np.where(found[2] > 0, layout.FLOAT16_MAX, -layout.FLOAT16_MAX)
            result.clipped += int(found[0].size)
        if chunk.train is not None:
            _add_stats(result, j, values, positions, chunk.train)
    if bad and (not chunk.clip or not all(b[4].all() for b in bad)):
        _raise_bad(bad, chunk, source_rows)
    for canon, source in chunk.scalars.items():
        values = _scalar_values(table.column(source), chunk.path, source, chunk.table_rows)
        result.scalars[canon] = values if chunk.select is None else values[chunk.select]
    return result


def _round_channel(src: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
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


def _bad_values(values: np.ndarray, positions: np.ndarray | None, src: np.ndarray):
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


def _raise_bad(bad: list, chunk: _Chunk, source_rows: np.ndarray) -> None:
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


def _add_stats(result: _Result, j: int, values: np.ndarray, positions: np.ndarray | None,
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


def _scalar_values(column: pa.ChunkedArray, path: str, name: str, table_rows: np.ndarray) -> np.ndarray:
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


def _run_chunk(chunk: _Chunk) -> _Result:
    """Everything for one chunk, in one thread (what a worker process does)."""
    return _decode(chunk, _read_chunk(chunk))


def _worker_ready() -> int:
    """A no-op task: submitted first, it makes the pool start its workers while the parent runs pass 1."""
    return os.getpid()


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes, started now (a no-op task each) so that they boot while the parent runs passes 0
    and 1. Never fork the parent: it will hold an open HDF5 file, which a child must not inherit. forkserver
    (POSIX) forks the workers from a clean server that imported this module once (~0.4 s of imports, instead
    of once per worker with spawn); spawn elsewhere."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["pipeline.convert"])
    else:
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    for _ in range(workers):
        pool.submit(_worker_ready)
    return pool


class _ThreadReaders:
    """Per reader thread, its own `ParquetFile` of the current file, opened over the footer this process
    parsed once (`_cached_parquet`): an Arrow file reader must not be used by two threads at once, and
    reopening with a parsed footer costs ~50 us where parsing a real one costs ~1 s and hundreds of MB.
    `forget()` drops them all (only while no read is in flight), so that an old footer dies with its file."""

    def __init__(self):
        self.files: dict[int, tuple[str, pq.ParquetFile]] = {}    # reader thread id -> (path, its reader)

    def read(self, chunk: _Chunk, metadata: pq.FileMetaData) -> pa.Table:
        me = threading.get_ident()
        mine = self.files.get(me)
        if mine is None or mine[0] != chunk.path:
            try:
                mine = self.files[me] = (chunk.path, pq.ParquetFile(chunk.path, metadata=metadata))
            except (pa.ArrowException, OSError) as exc:
                raise ConvertError(f"{chunk.path}: cannot reopen for reading ({_one_line(exc)})") from None
        return _read_chunk(chunk, mine[1])

    def forget(self) -> None:
        self.files.clear()


def _prefetched(chunks: Iterator[_Chunk], threads: int = 2) -> Iterator[_Result]:
    """One process, results in chunk order: `threads` reader threads decode the next chunks (pyarrow releases
    the GIL) while this thread checks, rounds and hands out the chunk before them. Decoding is ~85 % of the
    work; on 2 cores 2 readers convert ~1.4x faster than one (README, "Converter performance"). `threads`
    chunks are in flight, each ~1 MB a row decoded."""
    readers = _ThreadReaders()
    with ThreadPoolExecutor(threads, thread_name_prefix="parquet-reader") as pool:
        pending: deque = deque()
        try:
            for chunk in chunks:
                if pending and chunk.path != pending[-1][0].path:
                    # a new file: finish the old one, then parse the footer here, so that only one footer is
                    # ever held and its many small allocations land in this thread's malloc arena every time
                    while pending:
                        done, table = pending.popleft()
                        yield _decode(done, table.result())
                    readers.forget()
                metadata = _cached_parquet(chunk.path).metadata
                pending.append((chunk, pool.submit(readers.read, chunk, metadata)))
                if len(pending) > threads:
                    chunk, table = pending.popleft()
                    yield _decode(chunk, table.result())
            while pending:
                chunk, table = pending.popleft()
                yield _decode(chunk, table.result())
        finally:
            for _, table in pending:
                table.cancel()


def _run_chunks(chunks: list[_Chunk]) -> list[_Result]:
    """A worker's task: a few chunks one after the other (the first error stops it, as in one process)."""
    return [_run_chunk(chunk) for chunk in chunks]


def _batches(chunks: Iterator[_Chunk], size: int) -> Iterator[list[_Chunk]]:
    batch = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _results(chunks: Iterator[_Chunk], pool: ProcessPoolExecutor | None, workers: int, threads: int
             ) -> Iterator[_Result]:
    """Results in chunk order: from this process's `threads` readers, or from the pool, TASK_CHUNKS chunks per
    task (pickling a task and its result costs ~0.5 ms; per chunk of 8 rows that was 10 % of the work) and 2
    tasks per worker in flight, so that memory stays flat while the parent writes. A worker decodes on one
    thread: it has one core."""
    if pool is None:
        yield from _prefetched(chunks, threads)
        return
    pending: deque = deque()
    try:
        for batch in _batches(chunks, TASK_CHUNKS):
            pending.append(pool.submit(_run_chunks, batch))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BrokenProcessPool as exc:
        raise ConvertError(f"a worker process died ({_one_line(exc)}); out of memory? Retry with fewer "
                           f"--workers (each holds one file's footer in memory)") from None
    finally:
        for future in pending:
            future.cancel()


def read_parquet_chunks(path, *, channels: Sequence[int | str] = (0, 1, 2, 3), chunk_size: int = 8,
                        clip: bool = False, rows: np.ndarray | None = None, threads: int = 2
                        ) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
    """Decode one Parquet file chunk by chunk, with the converter's checks, without writing anything.

    Yields (first, images float16 (n, C, 125, 125), {canonical scalar name: (n,) float64}), `first` being the
    position of the chunk's first row in the sequence read: the file's rows (then it is the row number), or
    `rows` (sorted, unique row numbers) when given. No cuts. Raises ConvertError like the converter."""
    channels = parse_channels(channels)
    if chunk_size < 1:
        raise ConvertError(f"chunk_size {chunk_size}: it must be at least 1")
    if threads < 1:
        raise ConvertError(f"threads {threads}: it must be at least 1")
    src = _inspect(Path(path))
    starts = src.group_starts
    if rows is None:
        wanted = np.arange(src.num_rows, dtype=np.int64)
    else:
        wanted = np.asarray(rows, dtype=np.int64)
        if wanted.ndim != 1 or (wanted.size and (np.any(np.diff(wanted) <= 0) or wanted[0] < 0
                                                 or wanted[-1] >= src.num_rows)):
            raise ConvertError(f"{path}: rows must be sorted, unique row numbers in 0..{src.num_rows - 1}")
    chunks = list(_file_chunks(src, wanted, None, chunk_size, channels, clip, src.scalars))
    try:
        with closing(_prefetched((chunk for _, chunk in chunks), threads)) as results:   # readers stop first
            for (first, _), result in zip(chunks, results):
                yield first, result.dense(), result.scalars
    finally:
        _cached_parquet.cache_clear()


def _file_chunks(src: _Source, kept: np.ndarray, train: np.ndarray | None, chunk_size: int,
                 channels: tuple[int, ...], clip: bool, scalars: dict[str, str] | None = None
                 ) -> Iterator[tuple[int, _Chunk]]:
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
        yield lo, _Chunk(src.path, src.image_column, groups, table_rows, select,
                         None if train is None else train[lo:hi], channels, clip, dict(scalars or {}))


# ----------------------------------------------------------------------------------------------------------
# Pass 1: scalars, cuts, split
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Scan:
    rows_read: int
    rows: np.ndarray                  # (n_kept,) int64 source rows kept
    labels: dict[str, np.ndarray]     # canonical -> (n_kept,) float64
    failed: dict[str, int]            # cut text -> rows failing
    observed: dict[str, tuple[float, float]]   # cut text -> (min, max) of what it looked at


def _scan(src: _Source, lo: int, hi: int, cuts: list[Cut]) -> _Scan:
    """Read the scalar columns of row groups [lo, hi) of one file and apply the cuts."""
    first, last = int(src.group_starts[lo]), int(src.group_starts[hi])
    rows = np.arange(first, last, dtype=np.int64)
    values = {}
    if hi > lo:
        table = _read(_cached_parquet(src.path), src.path, np.arange(lo, hi), list(src.scalars.values()))
        for canon, source in src.scalars.items():
            values[canon] = _scalar_values(table.column(source), src.path, source, rows)
    else:
        values = {canon: np.zeros(0) for canon in src.scalars}
    keep = np.ones(len(rows), bool)
    failed, observed = {}, {}
    for cut in cuts:
        x = values[cut.column]
        ok = cut.passes(x)
        failed[cut.text] = int((~ok).sum())
        if x.size:
            seen = np.abs(x) if cut.absolute else x
            observed[cut.text] = (float(seen.min()), float(seen.max()))
        keep &= ok
    return _Scan(len(rows), rows[keep], {k: v[keep] for k, v in values.items()}, failed, observed)


def _resolve_cuts(config: ConvertConfig, sources: list[_Source]) -> tuple[list[Cut], list[Cut]]:
    """(cuts to apply, preset cuts skipped because the files lack their column)."""
    if config.cuts not in CUT_PRESETS:
        raise ConvertError(f"unknown cut preset {config.cuts!r}: use one of {', '.join(CUT_PRESETS)}")
    cuts = [parse_cut(t, config.cuts) for t in CUT_PRESETS[config.cuts]]
    cuts += [parse_cut(t) for t in config.extra_cuts]
    aliases = {a: canon for canon, names in layout.COLUMN_ALIASES.items() for a in names}
    present = sources[0].scalars if sources else {}
    apply, skipped = [], []
    for cut in cuts:
        column = aliases.get(cut.column, cut.column)
        if column not in present:
            if cut.source != "--cut":
                skipped.append(cut)
                continue
            raise ConvertError(f"cut {cut.text!r}: column {cut.column} is not in {sources[0].path}; "
                               f"columns present: {', '.join(present)}")
        apply.append(Cut(cut.text, column, cut.absolute, cut.lo, cut.hi, cut.lo_inclusive, cut.hi_inclusive,
                         cut.source))
    return apply, skipped


# ----------------------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------------------

def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        raise ConvertError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in seconds; unset or fix "
                           f"it") from None


def _validate(config: ConvertConfig) -> tuple[tuple[int, ...], tuple[int, int] | None, Path]:
    """Check option combinations before any work starts."""
    channels = parse_channels(config.channels)
    shard = parse_shard(config.shard)
    if int(config.chunk_size) < 1:
        raise ConvertError(f"chunk size {config.chunk_size}: it must be at least 1")
    if int(config.workers) < 1:
        raise ConvertError(f"workers {config.workers}: it must be at least 1")
    if int(config.threads) < 1:
        raise ConvertError(f"threads {config.threads}: it must be at least 1")
    try:
        layout.split_codes("x", np.zeros(0), seed=config.seed, val_fraction=config.val_fraction,
                           test_fraction=config.test_fraction)
    except ValueError as exc:
        raise ConvertError(f"{exc}; e.g. --val-fraction 0.1 --test-fraction 0.2") from None
    for text in config.extra_cuts:
        parse_cut(text)
    if config.cuts not in CUT_PRESETS:
        raise ConvertError(f"unknown cut preset {config.cuts!r}: use one of {', '.join(CUT_PRESETS)}")
    output = Path(config.output)
    if output.is_dir():
        raise ConvertError(f"{output}: is a directory; give the path of the .h5 file to write")
    if output.exists() and not config.force:
        raise ConvertError(f"{output}: already exists; pass --force to replace it")
    return channels, shard, output


def _label_stats(labels: dict[str, np.ndarray], train: np.ndarray) -> dict[str, np.ndarray]:
    stats = {}
    for name, values in labels.items():
        x = values[train]
        count, total, sumsq = float(x.size), float(x.sum()), float(np.square(x).sum())
        mean, std = layout.finish_stats(np.float64(count), np.float64(total), np.float64(sumsq))
        stats.update({f"{name}_count": count, f"{name}_sum": total, f"{name}_sumsq": sumsq,
                      f"{name}_mean": float(mean), f"{name}_std": float(std),
                      f"{name}_min": float(x.min()) if x.size else math.inf,
                      f"{name}_max": float(x.max()) if x.size else -math.inf})
    return stats


@dataclass
class _Plan:
    """What passes 0 and 1 decide: the files, cuts, kept rows, labels and split."""
    sources: list[_Source]
    ranges: list[tuple[int, int]]      # row-group range of each file in this shard
    cuts: list[Cut]
    skipped: list[Cut]
    scans: list[_Scan]
    codes: np.ndarray                  # (N,) int8 split codes, 0 train, 1 val, 2 test
    labels: dict[str, np.ndarray]      # canonical -> (N,) float64
    columns_used: dict[str, str]

    @property
    def n(self) -> int:
        return len(self.codes)

    @property
    def rows_read(self) -> int:
        return sum(scan.rows_read for scan in self.scans)

    @property
    def rejected(self) -> dict[str, int]:
        return {cut.text: sum(scan.failed[cut.text] for scan in self.scans) for cut in self.cuts}


def _plan(config: ConvertConfig, shard: tuple[int, int] | None, bar_off: bool | None,
          pool: ProcessPoolExecutor | None = None) -> _Plan:
    """Pass 0 (footers: schemas, row groups) and pass 1 (scalar columns: cuts, split). A real 150,000-row file
    costs ~1 s of footer and ~5 s of scalars, so large inputs are read file by file in the pool; small ones
    here, while the pool's processes start (~1 s)."""
    files = resolve_inputs(config.inputs)
    big = len(files) > 1 and sum(f.stat().st_size for f in files) > PARALLEL_SCAN_BYTES
    mapper = pool.map if pool is not None and big else map
    sources = list(tqdm(mapper(_inspect, files), total=len(files), desc="footers", unit="file",
                        disable=bar_off, leave=False))
    first = sources[0]
    for s in sources[1:]:
        if list(s.scalars) != list(first.scalars):
            raise ConvertError(f"{s.path}: scalar columns {', '.join(s.scalars)} differ from those of "
                               f"{first.path} ({', '.join(first.scalars)}); convert them separately")
    if "m" not in first.scalars:
        raise ConvertError(f"{first.path}: no mass column ({' or '.join(layout.COLUMN_ALIASES['m'])}); "
                           f"columns present: {', '.join(first.scalars)}")
    cuts, skipped = _resolve_cuts(config, sources)
    ranges = _shard_ranges(sources, int(config.chunk_size), shard)
    scans = list(tqdm(mapper(_scan, sources, *zip(*ranges), [cuts] * len(sources)), total=len(sources),
                      desc="scan", unit="file", disable=bar_off, leave=False))
    if sum(len(scan.rows) for scan in scans) == 0:
        seen = {}
        for scan in scans:
            for text, (a, b) in scan.observed.items():
                lo, hi = seen.get(text, (math.inf, -math.inf))
                seen[text] = (min(lo, a), max(hi, b))
        observed = "; ".join(f"{c.text}: observed {seen[c.text][0]:.4g} to {seen[c.text][1]:.4g}"
                             for c in cuts if c.text in seen)
        rows_read = sum(scan.rows_read for scan in scans)
        raise ConvertError(f"no row of {rows_read:,} passes the cuts ({observed or 'no rows read'}); choose "
                           f"other cuts (--cuts top, --cuts none or --cut) or other inputs")
    codes = np.concatenate([layout.split_codes(s.name, scan.rows, seed=config.seed,
                                               val_fraction=config.val_fraction,
                                               test_fraction=config.test_fraction)
                            for s, scan in zip(sources, scans)])
    labels = {name: np.concatenate([scan.labels[name] for scan in scans]) for name in first.scalars}
    columns_used = {"image": ",".join(dict.fromkeys(s.image_column for s in sources))}
    for canon in first.scalars:
        columns_used[canon] = ",".join(dict.fromkeys(s.scalars[canon] for s in sources))
    return _Plan(sources, ranges, cuts, skipped, scans, codes, labels, columns_used)


def convert(config: ConvertConfig) -> ConvertSummary:
    """Convert `config.inputs` into `config.output` (see the module docstring); return a summary.

    Raises ConvertError for bad options or input; nothing is written then (nor on any other exception or
    interruption): the file is built under a temporary name beside the output and renamed at the end."""
    t0 = time.perf_counter()
    channels, shard, output = _validate(config)
    created = _created()
    bar_off = None if config.progress is None else not config.progress
    workers = int(config.workers)
    pool = _start_pool(workers) if workers > 1 else None
    try:
        plan = _plan(config, shard, bar_off, pool)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            with h5py.File(tmp, "w", libver=("v108", "v108")) as h5:
                _write_labels(h5, plan, channels)
                stats, clipped = _write_images(h5["images"], plan, config, channels, pool, bar_off)   # pass 2
                group = h5.create_group("stats")
                for key, value in stats.items():
                    group.create_dataset(key, data=value)
                _write_attrs(h5, plan, config, channels, shard, created, clipped)
            os.replace(tmp, output)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        _cached_parquet.cache_clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return ConvertSummary(
        output=str(output), files=len(plan.sources), rows_read=plan.rows_read, rows_kept=plan.n,
        rejected=plan.rejected, skipped_cuts=[cut.text for cut in plan.skipped],
        split_sizes={s: int((plan.codes == i).sum()) for i, s in enumerate(layout.SPLITS)},
        channels=[layout.CHANNEL_NAMES[c] for c in channels], columns_used=plan.columns_used, clipped=clipped,
        bytes=output.stat().st_size, seconds=time.perf_counter() - t0,
        shard=None if shard is None else f"{shard[0]}/{shard[1]}", workers=workers)


def _strings(values) -> np.ndarray:
    return np.array(list(values), dtype=h5py.string_dtype())


def _write_labels(h5: h5py.File, plan: _Plan, channels: tuple[int, ...]) -> None:
    """Allocate /images and write /labels and /split (all known after pass 1)."""
    # contiguous, no filters, allocated now and never filled: memory-mappable, then written once, in order
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    images = h5.create_dataset("images", shape=(plan.n, len(channels), layout.IMAGE_SIZE, layout.IMAGE_SIZE),
                               dtype=np.float16, dcpl=dcpl)
    images.attrs["channels"] = _strings(layout.CHANNEL_NAMES[c] for c in channels)
    images.attrs["units"] = _strings(layout.CHANNEL_UNITS[c] for c in channels)
    images.attrs["source_channels"] = np.asarray(channels, np.int64)
    group = h5.create_group("labels")
    for name, values in plan.labels.items():
        group.create_dataset(name, data=values.astype(np.float64))
    group.create_dataset("source_file", data=np.concatenate(
        [np.full(len(scan.rows), i, np.int32) for i, scan in enumerate(plan.scans)]))
    group.create_dataset("source_row", data=np.concatenate([scan.rows for scan in plan.scans]))
    group = h5.create_group("split")
    for code, split in enumerate(layout.SPLITS):
        group.create_dataset(split, data=np.flatnonzero(plan.codes == code).astype(np.int64))


def _write_images(images: h5py.Dataset, plan: _Plan, config: ConvertConfig, channels: tuple[int, ...],
                  pool: ProcessPoolExecutor | None, bar_off: bool | None) -> tuple[dict, int]:
    """Pass 2: decode every chunk (here or in the pool), write it in order, sum the statistics.
    Returns (/stats, clipped count)."""
    c = len(channels)
    sums, sumsqs, maxes, n_train, clipped, offset = np.zeros(c), np.zeros(c), np.full(c, -np.inf), 0, 0, 0
    train = plan.codes == 0
    chunks = _all_chunks(plan.sources, plan.scans, train, int(config.chunk_size), channels, config.clip)
    buffer = np.zeros((0, c, PIXELS), np.float16)
    with tqdm(total=plan.n, desc="convert", unit="row", disable=bar_off) as bar, \
            closing(_results(chunks, pool, int(config.workers), int(config.threads))) as results:
        for result in results:
            if len(buffer) < result.n:
                buffer = np.zeros((result.n, c, PIXELS), np.float16)
            _write_rows(images, offset, result.dense(buffer))
            result.clear(buffer)
            offset += result.n
            clipped += result.clipped
            n_train += result.n_train
            sums += result.sums          # chunk by chunk, in order: the same sums for any number of workers
            sumsqs += result.sumsqs
            np.maximum(maxes, result.maxes, out=maxes)
            bar.update(result.n)
    if offset != plan.n:
        raise ConvertError(f"wrote {offset} rows instead of {plan.n}; did an input change during the "
                           f"conversion?")
    count = np.full(c, float(n_train) * PIXELS)
    mean, std = layout.finish_stats(count, sums, sumsqs)
    scales = np.array([layout.REFERENCE_SCALES[layout.CHANNEL_NAMES[i]] for i in channels])
    stats = {"n_train": np.int64(n_train), "channel_count": count, "channel_sum": sums,
             "channel_sumsq": sumsqs, "channel_mean": mean, "channel_std": std, "channel_max": maxes,
             "reference_scale": scales}
    stats.update(_label_stats(plan.labels, train))
    return stats, clipped


def _write_rows(images: h5py.Dataset, offset: int, block: np.ndarray) -> None:
    """images[offset:offset + n] = block through the low-level API (h5py's slicing costs ~30 % on top of the
    copy into the page cache)."""
    file_space = images.id.get_space()
    file_space.select_hyperslab((offset, 0, 0, 0), block.shape)
    images.id.write(h5py.h5s.create_simple(block.shape), file_space, block)


def _write_attrs(h5: h5py.File, plan: _Plan, config: ConvertConfig, channels: tuple[int, ...],
                 shard: tuple[int, int] | None, created: str, clipped: int) -> None:
    """Root attributes: provenance of the file (see pipeline.layout)."""
    stored = {k: v for k, v in asdict(config).items() if k not in EXECUTION_ONLY}
    stored["channels"] = list(channels)
    source_files = [{"name": s.name, "path": s.path, "size": s.size, "rows_read": scan.rows_read,
                     "rows_kept": len(scan.rows), "row_groups": [lo, hi],
                     "columns": {"image": s.image_column, **s.scalars}, "ignored": s.ignored}
                    for s, scan, (lo, hi) in zip(plan.sources, plan.scans, plan.ranges)]
    rejected = plan.rejected
    cuts = ([{"cut": cut.text, "column": cut.column, "abs": cut.absolute, "lo": cut.lo, "hi": cut.hi,
              "lo_inclusive": cut.lo_inclusive, "hi_inclusive": cut.hi_inclusive, "from": cut.source,
              "applied": True, "rejected": rejected[cut.text]} for cut in plan.cuts]
            + [{"cut": cut.text, "column": cut.column, "from": cut.source, "applied": False,
                "reason": "column absent"} for cut in plan.skipped])
    attrs = h5.attrs
    attrs["format"] = layout.FORMAT_NAME
    attrs["format_version"] = layout.FORMAT_VERSION
    attrs["tool_version"] = __version__
    attrs["created"] = created
    attrs["config"] = json.dumps(stored, default=list)
    attrs["source_files"] = json.dumps(source_files)
    attrs["columns_used"] = json.dumps(plan.columns_used)
    attrs["cuts"] = json.dumps(cuts)
    attrs["channels"] = _strings(layout.CHANNEL_NAMES[c] for c in channels)
    attrs["chunk_size"] = int(config.chunk_size)
    attrs["seed"] = int(config.seed)
    attrs["val_fraction"] = float(config.val_fraction)
    attrs["test_fraction"] = float(config.test_fraction)
    attrs["shard"] = "" if shard is None else f"{shard[0]}/{shard[1]}"
    attrs["rows_read"] = int(plan.rows_read)
    attrs["rows_kept"] = int(plan.n)
    attrs["clipped"] = int(clipped)


def _all_chunks(sources: list[_Source], scans: list[_Scan], train: np.ndarray, chunk_size: int,
                channels: tuple[int, ...], clip: bool) -> Iterator[_Chunk]:
    """Pass 2's chunks, lazily (a 150,000-row file has ~19,000 of them), files in order."""
    start = 0
    for src, scan in zip(sources, scans):
        k = len(scan.rows)
        if k:
            for _, chunk in _file_chunks(src, scan.rows, train[start:start + k], chunk_size, channels, clip):
                yield chunk
        start += k


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------

_HELP = f"""Convert CMS end-to-end Parquet files (RAW: files and/or directories of *.parquet) into one
HDF5 file OUTPUT for training.

\b
Cuts keep the rows inside every range. Presets (--cuts):
  paper  {', '.join(CUT_PRESETS['paper'])}  (the default: the A -> gamma gamma
         paper's selection used by the original write-up; on top-quark data use --cuts top)
  top    {', '.join(CUT_PRESETS['top'])}
  none   keep every row

A preset cut on a column the files lack is skipped and reported. --cut adds cuts, repeatable, on any scalar
column or its absolute value: {CUT_SYNTAX}; e.g. --cut '|eta| < 1.4' --cut 'pt >= 30'.

\b
Examples:
  python -m pipeline.convert data/raw data/top.h5 --cuts top --channels 0,1,2,3,4,5,6,7
  python -m pipeline.convert data/raw data/top.h5 --cuts top --workers 8
  python -m pipeline.convert data/raw part_03.h5 --cuts top --shard 3/16
"""


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("inputs", nargs=-1, required=True, metavar="RAW...")
@click.argument("output", metavar="OUTPUT.h5")
@click.option("--channels", default="0,1,2,3", show_default=True,
              help="Raw channels to keep, in this order: indices 0-7 or names "
                   f"({','.join(layout.CHANNEL_NAMES)}).")
@click.option("--cuts", type=click.Choice(list(CUT_PRESETS)), default="paper", show_default=True,
              help="Cut preset (see above).")
@click.option("--cut", "extra_cuts", multiple=True, metavar="EXPR", help="Extra range cut, repeatable.")
@click.option("--chunk-size", type=int, default=8, show_default=True, help="Row groups per read.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--test-fraction", type=float, default=0.2, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the per-row split hash.")
@click.option("--clip", is_flag=True, help="Saturate values beyond float16's range (+-65504) and count them, "
                                           "instead of failing. NaN and inf are always errors.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--threads", type=int, default=2, show_default=True,
              help="Threads decoding chunks in this process (with --workers 1); the output is identical for "
                   "any number.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes decoding chunks, one thread each; the output is identical for any number.")
@click.option("--shard", default=None, metavar="I/N",
              help="Convert only the I-th (1-based) of N contiguous parts of the inputs' row-group chunks.")
def main(inputs, output, channels, cuts, extra_cuts, chunk_size, val_fraction, test_fraction, seed, clip,
         force, threads, workers, shard):
    config = ConvertConfig(inputs=list(inputs), output=output, channels=channels, cuts=cuts,
                           extra_cuts=tuple(extra_cuts), chunk_size=chunk_size, val_fraction=val_fraction,
                           test_fraction=test_fraction, seed=seed, clip=clip, force=force, threads=threads,
                           workers=workers, shard=shard)
    try:
        config.channels = parse_channels(channels)
        summary = convert(config)
    except ConvertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary.describe())


if __name__ == "__main__":
    main()
