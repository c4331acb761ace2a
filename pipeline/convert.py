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
at 4 channels against ~1.2 ms of decoding (docs/performance.md, "Converter"). In one process `--threads`
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

Faults (docs/converter.md, "Faults and interruptions"): SIGTERM and SIGHUP (Slurm's time limit or
preemption, a closed terminal) take Ctrl-C's path: the signal sets a flag polled between files and chunks,
the temporary file is removed, the workers stopped and joined, one line says what was interrupted and the
exit status is 128 + the signal's number. After pass 1 the output's size is known and checked against the
free space of its file system, before the file is created; a write that fails later (ENOSPC, EIO, a
vanished directory) is one ConvertError naming the output, the bytes written and the errno, and the partial
file is removed.

The converter is four files, each importing only those before it: `pipeline.parquet` (inputs, footers,
decoding and checking a chunk, float16 rounding, ConvertError), `pipeline.cuts` (presets, the --cut grammar,
pass 1), `pipeline.parallel` (reader threads, the worker pool, shards, `read_parquet_chunks`) and this module
(configuration, plan, HDF5 writing, summary, CLI).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, suppress
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import click
import h5py
import numpy as np
from tqdm import tqdm

from pipeline import __version__, layout
from pipeline.cli import command, force_option, user_errors
from pipeline.cuts import CUT_PRESETS, CUT_SYNTAX, Cut, Scan, parse_cut, resolve_cuts, scan_file
from pipeline.files import check_new_output, os_cause
from pipeline.parallel import ordered_results, parse_shard, shard_ranges, start_pool, stop_pool
from pipeline.parquet import (PIXELS, Chunk, ConvertError, Source, cached_parquet, file_chunks, inspect_file,
                              parse_channels, resolve_inputs)
from pipeline.signals import STOP_SIGNALS, StopFlag, exit_on_interrupt

EXECUTION_ONLY = ("threads", "workers", "force", "progress")   # config fields that cannot change the output
PARALLEL_SCAN_BYTES = 1 << 30   # inputs above this size (and of 2+ files) are scanned in the worker pool
# Free space asked for beyond the data: HDF5's object headers and the root attributes take well under a MB;
# the 1 % also covers a file system's own metadata for the new blocks.
SPACE_MARGIN_FRACTION, SPACE_MARGIN_BYTES = 0.01, 4 << 20

# Workers are forked from a forkserver that preloads this module (`start_pool`); under `python -m
# pipeline.convert` each then re-runs the parent's main module as __mp_main__ and runpy warns that the module
# is imported already. Expected and harmless; the filter is inherited by the forked workers.
warnings.filterwarnings("ignore", message="'pipeline.convert' found in sys.modules", category=RuntimeWarning)


# ----------------------------------------------------------------------------------------------------------
# Configuration, summary
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
    check_new_output(output, config.force)
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
    sources: list[Source]
    ranges: list[tuple[int, int]]      # row-group range of each file in this shard
    cuts: list[Cut]
    skipped: list[Cut]
    scans: list[Scan]
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


def _checked(items: Iterable, check: Callable[[], None]) -> Iterator:
    """`items`, calling `check` (a stop signal's poll) after each."""
    for item in items:
        check()
        yield item


def _plan(config: ConvertConfig, shard: tuple[int, int] | None, bar_off: bool | None,
          pool: ProcessPoolExecutor | None = None, check: Callable[[], None] = lambda: None) -> _Plan:
    """Pass 0 (footers: schemas, row groups) and pass 1 (scalar columns: cuts, split). A real 150,000-row file
    costs ~1 s of footer and ~5 s of scalars, so large inputs are read file by file in the pool; small ones
    here. `check` polls the stop flag after each file."""
    files = resolve_inputs(config.inputs)
    big = len(files) > 1 and sum(f.stat().st_size for f in files) > PARALLEL_SCAN_BYTES
    mapper = pool.map if pool is not None and big else map
    sources = list(tqdm(_checked(mapper(inspect_file, files), check), total=len(files), desc="footers",
                        unit="file", disable=bar_off, leave=False))
    first = sources[0]
    for s in sources[1:]:
        if list(s.scalars) != list(first.scalars):
            raise ConvertError(f"{s.path}: scalar columns {', '.join(s.scalars)} differ from those of "
                               f"{first.path} ({', '.join(first.scalars)}); convert them separately")
    if "m" not in first.scalars:
        raise ConvertError(f"{first.path}: no mass column ({' or '.join(layout.COLUMN_ALIASES['m'])}); "
                           f"columns present: {', '.join(first.scalars)}")
    cuts, skipped = resolve_cuts(config.cuts, config.extra_cuts, sources)
    ranges = shard_ranges(sources, int(config.chunk_size), shard)
    scans = list(tqdm(_checked(mapper(scan_file, sources, *zip(*ranges), [cuts] * len(sources)), check),
                      total=len(sources), desc="scan", unit="file", disable=bar_off, leave=False))
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


def convert(config: ConvertConfig, *, stop: StopFlag | None = None) -> ConvertSummary:
    """Convert `config.inputs` into `config.output` (see the module docstring); return a summary.

    Raises ConvertError for bad options or input, for too little free space on the output's file system
    (checked after pass 1, before the file is created) and for a failed write (ENOSPC, EIO, a vanished
    directory), and UserError (`check_new_output`) for an existing output without `force`: every one a
    `pipeline.errors.UserError` of one line. Nothing is written then (nor on any other exception or
    interruption): the file is built under a temporary name beside the output and renamed at the end. The
    workers are stopped on every way out.

    `stop` (what the CLI passes) is polled after each file of passes 0-1, each chunk of pass 2 and before the
    rename; once a signal has set it, `stop.check()` raises KeyboardInterrupt or `Terminated` there."""
    t0 = time.perf_counter()
    check = stop.check if stop is not None else (lambda: None)
    channels, shard, output = _validate(config)
    created = _created()
    bar_off = None if config.progress is None else not config.progress
    workers = int(config.workers)
    pool = None
    try:
        pool = start_pool(workers, ["pipeline.convert"]) if workers > 1 else None
        check()
        plan = _plan(config, shard, bar_off, pool, check)
        size = _output_bytes(plan, channels)
        _check_space(output, size)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConvertError(f"{output.parent}: cannot create the output's directory "
                               f"({exc.strerror})") from None
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        written = _Tally()
        try:
            clipped = _write_file(tmp, plan, config, channels, shard, created, pool, bar_off, written, check)
            stop_pool(pool)          # before the rename: once OUT exists, nothing may fail or be interrupted
            check()
            file_bytes = tmp.stat().st_size
            # OUT is whole from the rename on, so a stop signal then is too late to lose anything: it is held
            # until the summary is made and then dropped, and the run ends as it would have.
            with StopFlag((signal.SIGINT, *STOP_SIGNALS)):
                os.replace(tmp, output)
                return _summary(output, plan, channels, shard, clipped, file_bytes, time.perf_counter() - t0,
                                workers)
        except BaseException as exc:
            with suppress(OSError):       # an EIO can refuse the unlink too; then the message says so
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise ConvertError(_write_failure(output, tmp, written.bytes, size, exc)) from None
            raise
    except BaseException:
        stop_pool(pool)
        raise
    finally:
        cached_parquet.cache_clear()


def _write_file(tmp: Path, plan: _Plan, config: ConvertConfig, channels: tuple[int, ...],
                shard: tuple[int, int] | None, created: str, pool: ProcessPoolExecutor | None,
                bar_off: bool | None, written: _Tally, check: Callable[[], None]) -> int:
    """The whole HDF5 file under its temporary name: /labels and /split, /images (pass 2), /stats and the
    root attributes. Returns the number of values clipped."""
    with h5py.File(tmp, "w", libver=("v108", "v108")) as h5:
        _write_labels(h5, plan, channels, written)
        stats, clipped = _write_images(h5["images"], plan, config, channels, pool, bar_off, written,
                                       check)   # pass 2
        group = h5.create_group("stats")
        for key, value in stats.items():
            group.create_dataset(key, data=value)
        _write_attrs(h5, plan, config, channels, shard, created, clipped)
    return clipped


def _summary(output: Path, plan: _Plan, channels: tuple[int, ...], shard: tuple[int, int] | None,
             clipped: int, file_bytes: int, seconds: float, workers: int) -> ConvertSummary:
    """What `convert` returns (and the CLI prints), once the output is in place."""
    return ConvertSummary(
        output=str(output), files=len(plan.sources), rows_read=plan.rows_read, rows_kept=plan.n,
        rejected=plan.rejected, skipped_cuts=[cut.text for cut in plan.skipped],
        split_sizes={s: int((plan.codes == i).sum()) for i, s in enumerate(layout.SPLITS)},
        channels=[layout.CHANNEL_NAMES[c] for c in channels], columns_used=plan.columns_used,
        clipped=clipped, bytes=file_bytes, seconds=seconds,
        shard=None if shard is None else f"{shard[0]}/{shard[1]}", workers=workers)


# ----------------------------------------------------------------------------------------------------------
# Disk space and write errors
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Tally:
    """Bytes handed to HDF5 so far, for the message of a failed write."""
    bytes: int = 0


def format_size(n: float) -> str:
    """Bytes as the messages write them: '812 kB', '3.4 MB', '1.2 GB'."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _output_bytes(plan: _Plan, channels: tuple[int, ...]) -> int:
    """The output's data, known after pass 1: the float16 images and the per-row labels (`_label_bytes`);
    the statistics and attributes are a few kB."""
    return plan.n * (len(channels) * layout.IMAGE_SIZE * layout.IMAGE_SIZE * 2 + _label_bytes(plan))


def _label_bytes(plan: _Plan) -> int:
    """Per row: the labels (float64), /labels/source_file (int32) and source_row (int64), a split index."""
    return 8 * len(plan.labels) + 4 + 8 + 8


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (which must exist), as the space message names it."""
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _check_space(output: Path, size: int) -> None:
    """Refuse before the file is created (and before the hours of pass 2) when `size` bytes of data and the
    margin cannot fit. With --force the old OUT stays until the new one is whole, so its space is not free."""
    needed = int(size * (1 + SPACE_MARGIN_FRACTION)) + SPACE_MARGIN_BYTES
    probe = output.parent.resolve()
    while not probe.exists():          # the directory is made later, and only if the file fits
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise ConvertError(f"{output} needs {format_size(needed)} on {mount_point(probe)} (the output's file "
                           f"system), {format_size(free)} free; free space or choose another OUTPUT")


def _write_failure(output: Path, tmp: Path, written: int, size: int, exc: OSError) -> str:
    """One line for a failed write. h5py raises a second OSError when it closes the file after a failed
    write, and HDF5's text is a paragraph of buffer addresses, so the cause is the first error's errno."""
    first = exc
    while isinstance(first.__context__, OSError):
        first = first.__context__
    cause = os_cause(first)
    left = f"remove the partial file {tmp} by hand" if tmp.exists() else "the partial file was removed"
    return f"{output}: write failed after {format_size(written)} of {format_size(size)} ({cause}); {left}"


def _strings(values) -> np.ndarray:
    return np.array(list(values), dtype=h5py.string_dtype())


def _write_labels(h5: h5py.File, plan: _Plan, channels: tuple[int, ...], written: _Tally) -> None:
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
    written.bytes += plan.n * _label_bytes(plan)


def _write_images(images: h5py.Dataset, plan: _Plan, config: ConvertConfig, channels: tuple[int, ...],
                  pool: ProcessPoolExecutor | None, bar_off: bool | None, written: _Tally,
                  check: Callable[[], None] = lambda: None) -> tuple[dict, int]:
    """Pass 2: decode every chunk (here or in the pool), write it in order, sum the statistics.
    Returns (/stats, clipped count)."""
    c = len(channels)
    sums, sumsqs, maxes, n_train, clipped, offset = np.zeros(c), np.zeros(c), np.full(c, -np.inf), 0, 0, 0
    train = plan.codes == 0
    chunks = _all_chunks(plan.sources, plan.scans, train, int(config.chunk_size), channels, config.clip)
    buffer = np.zeros((0, c, PIXELS), np.float16)
    with tqdm(total=plan.n, desc="convert", unit="row", disable=bar_off) as bar, \
            closing(ordered_results(chunks, pool, int(config.workers), int(config.threads))) as results:
        for result in results:
            check()
            if len(buffer) < result.n:
                buffer = np.zeros((result.n, c, PIXELS), np.float16)
            block = result.dense(buffer)
            write_rows(images, offset, block)
            written.bytes += block.nbytes
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


def write_rows(images: h5py.Dataset, offset: int, block: np.ndarray) -> None:
    """images[offset:offset + n] = block through the low-level API (h5py's slicing costs ~30 % on top of the
    copy into the page cache). Pass 2's one write of image data: the fault tests slow it down or make it fail
    (a slow disk, ENOSPC, EIO)."""
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


def _all_chunks(sources: list[Source], scans: list[Scan], train: np.ndarray, chunk_size: int,
                channels: tuple[int, ...], clip: bool) -> Iterator[Chunk]:
    """Pass 2's chunks, lazily (a 150,000-row file has ~19,000 of them), files in order."""
    start = 0
    for src, scan in zip(sources, scans):
        k = len(scan.rows)
        if k:
            for _, chunk in file_chunks(src, scan.rows, train[start:start + k], chunk_size, channels, clip):
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

OUTPUT is written under a temporary name beside it and renamed when whole. Its size is checked against the
free space of its file system after the scan. Ctrl-C, SIGTERM and SIGHUP stop the run with one line, the
temporary file removed and the workers stopped; the exit status is 128 + the signal's number (143 for
SIGTERM).

\b
Examples:
  python -m pipeline.convert data/raw data/top.h5 --cuts top --channels 0,1,2,3,4,5,6,7
  python -m pipeline.convert data/raw data/top.h5 --cuts top --workers 8
  python -m pipeline.convert data/raw part_03.h5 --cuts top --shard 3/16
"""


@command(help=_HELP)
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
@force_option("Replace OUTPUT if it exists.")
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
    # SIGTERM (Slurm's time limit, preemption) and SIGHUP end the run as Ctrl-C does: one line, 128 + signum.
    # The signal sets a flag that the conversion polls between chunks (StopFlag.check says why); a second
    # signal raises at once.
    with exit_on_interrupt(f"conversion to {output}", "nothing was written and no temporary file is left"), \
            StopFlag((signal.SIGINT, *STOP_SIGNALS)) as stop, user_errors():
        config.channels = parse_channels(channels)
        summary = convert(config, stop=stop)
    click.echo(summary.describe())


if __name__ == "__main__":
    main()
