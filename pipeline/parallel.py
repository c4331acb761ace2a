"""Parallel decoding for the converter: reader threads, the worker pool, shards and `read_parquet_chunks`.

In one process `ordered_results` runs `threads` reader threads, each through its own reader over the one
parsed footer; with a pool from `start_pool` (stopped by `stop_pool`) it sends chunks (TASK_CHUNKS per task)
to worker processes and hands the results back in order; `parse_shard` / `shard_ranges` cut the inputs'
chunks into N parts.
`read_parquet_chunks` is the public reader (`massreg.predict` uses it): the converter's decoding and checks,
without writing. It sits above `pipeline.parquet`, the only converter file it imports, and below
`pipeline.convert`. (It also imports `pipeline.signals`: only the parent reacts to stop signals.)
"""
from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
from collections import deque
from contextlib import closing, contextmanager
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.parquet import (Chunk, ConvertError, DecodedChunk, Source, cached_parquet, decode_chunk,
                              file_chunks, inspect_file, one_line, parse_channels, read_chunk)
from pipeline.signals import STOP_SIGNALS, StopFlag, ignore_stop_signals

TASK_CHUNKS = 4                 # chunks per task sent to a worker process


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """'3/16' -> (3, 16), 1-based; ConvertError if malformed."""
    if shard is None or shard == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise ConvertError(f"shard {shard!r}: write I/N with 1 <= I <= N (e.g. 3/16 for the third of 16 "
                           f"parts)")
    return int(match[1]), int(match[2])


def shard_ranges(sources: list[Source], chunk_size: int,
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


def _run_chunk(chunk: Chunk) -> DecodedChunk:
    """Everything for one chunk, in one thread (what a worker process does)."""
    return decode_chunk(chunk, read_chunk(chunk))


def _worker_ready() -> int:
    """A no-op task: one per worker makes the pool start them all at once."""
    return os.getpid()


def _worker_init(booted) -> None:
    """Each worker's first act: stop signals are the parent's to handle, then say it has booted."""
    ignore_stop_signals()
    booted.release()


def start_pool(workers: int, preload: Sequence[str]) -> ProcessPoolExecutor:
    """`workers` processes, started now (a no-op task each). Never fork the parent: it will hold an open HDF5
    file, which a child must not inherit. forkserver (POSIX) forks the workers from a clean server that
    imported the modules `preload` once (the caller's, so ~0.4 s of imports, instead of once per worker with
    spawn); spawn elsewhere.

    Only the parent reacts to Ctrl-C, SIGTERM and SIGHUP, which a terminal and Slurm send to the whole process
    group: it removes its temporary file and stops the workers (`stop_pool`). The processes started here (the
    workers, and the forkserver and multiprocessing's resource tracker when they start with the pool) are
    started with those signals blocked, a mask they inherit and keep: a worker would print a traceback of its
    own, a killed forkserver leaves its workers unreaped, and a killed tracker (it ignores SIGTERM, not
    SIGHUP) makes the parent print warnings and tracebacks. The parent's own signal is held until every
    worker has booted, then delivered: a pool stopped while a worker was still unpickling its queues made
    that worker fail on their semaphores, with a traceback. (Blocking the signal in this thread does not hold
    it: the kernel hands it to another thread, and Python runs the handler in the main thread all the same.)
    The whole start, the forkserver's imports included, takes ~0.4 s, as it did before the wait."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
    else:
        context = multiprocessing.get_context("spawn")
    pool = None
    signals = (signal.SIGINT, *STOP_SIGNALS)
    try:
        with StopFlag(signals) as held, _blocked(signals):
            booted = context.Semaphore(0)
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                       initargs=(booted,))
            for _ in range(workers):
                pool.submit(_worker_ready)
            for _ in range(workers):
                # a worker that dies while booting breaks the pool, which the first task then reports
                booted.acquire(timeout=60)
        if held.requested:
            signal.raise_signal(held.signum)       # now, to the caller's handler: it raises here, as a rule
        return pool
    except BaseException:        # the held signal, or an error: the caller never gets the pool
        stop_pool(pool)
        raise


@contextmanager
def _blocked(signals) -> Iterator[None]:
    """Block `signals` in this thread and in the threads and processes it starts meanwhile (both inherit the
    mask); one that arrives is delivered when the block ends. A no-op where POSIX masks do not exist.

    multiprocessing's resource tracker, started with the first pool, blocks SIGINT and SIGTERM around its
    own start and then unblocks them, which undid this block for the forkserver and the workers (they were
    then killed, or raised KeyboardInterrupt while booting): so it is started first, and the block renewed."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_pool(pool: ProcessPoolExecutor | None) -> None:
    """Stop the workers and wait for them, so that none outlives the parent: the tasks not yet started are
    cancelled and each worker finishes the one it holds (TASK_CHUNKS chunks: ~0.1 s at the default chunk
    size). Not killed: a worker killed while it sends a result leaves half a message in the pipe that the
    pool's thread reads, and that thread then waits forever, the parent holding the pipe's other end (seen
    once in a dozen stopped runs). Idempotent."""
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


class _ThreadReaders:
    """Per reader thread, its own `ParquetFile` of the current file, opened over the footer this process
    parsed once (`cached_parquet`): an Arrow file reader must not be used by two threads at once, and
    reopening with a parsed footer costs ~50 us where parsing a real one costs ~1 s and hundreds of MB.
    `forget()` drops them all (only while no read is in flight), so that an old footer dies with its file."""

    def __init__(self):
        self.files: dict[int, tuple[str, pq.ParquetFile]] = {}    # reader thread id -> (path, its reader)

    def read(self, chunk: Chunk, metadata: pq.FileMetaData) -> pa.Table:
        me = threading.get_ident()
        mine = self.files.get(me)
        if mine is None or mine[0] != chunk.path:
            try:
                mine = self.files[me] = (chunk.path, pq.ParquetFile(chunk.path, metadata=metadata))
            except (pa.ArrowException, OSError) as exc:
                raise ConvertError(f"{chunk.path}: cannot reopen for reading ({one_line(exc)})") from None
        return read_chunk(chunk, mine[1])

    def forget(self) -> None:
        self.files.clear()


def _prefetched(chunks: Iterator[Chunk], threads: int = 2) -> Iterator[DecodedChunk]:
    """One process, results in chunk order: `threads` reader threads decode the next chunks (pyarrow releases
    the GIL) while this thread checks, rounds and hands out the chunk before them. Decoding is ~85 % of the
    work; on 2 cores 2 readers convert ~1.4x faster than one (docs/performance.md, "Converter"). `threads`
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
                        yield decode_chunk(done, table.result())
                    readers.forget()
                metadata = cached_parquet(chunk.path).metadata
                pending.append((chunk, pool.submit(readers.read, chunk, metadata)))
                if len(pending) > threads:
                    chunk, table = pending.popleft()
                    yield decode_chunk(chunk, table.result())
            while pending:
                chunk, table = pending.popleft()
                yield decode_chunk(chunk, table.result())
        finally:
            for _, table in pending:
                table.cancel()


def _run_chunks(chunks: list[Chunk]) -> list[DecodedChunk]:
    """A worker's task: a few chunks one after the other (the first error stops it, as in one process)."""
    return [_run_chunk(chunk) for chunk in chunks]


def _batches(chunks: Iterator[Chunk], size: int) -> Iterator[list[Chunk]]:
    batch = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_results(chunks: Iterator[Chunk], pool: ProcessPoolExecutor | None, workers: int, threads: int
                    ) -> Iterator[DecodedChunk]:
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
        raise ConvertError(f"a worker process died ({one_line(exc)}); out of memory? Retry with fewer "
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
    src = inspect_file(Path(path))
    if rows is None:
        wanted = np.arange(src.num_rows, dtype=np.int64)
    else:
        wanted = np.asarray(rows, dtype=np.int64)
        if wanted.ndim != 1 or (wanted.size and (np.any(np.diff(wanted) <= 0) or wanted[0] < 0
                                                 or wanted[-1] >= src.num_rows)):
            raise ConvertError(f"{path}: rows must be sorted, unique row numbers in 0..{src.num_rows - 1}")
    chunks = list(file_chunks(src, wanted, None, chunk_size, channels, clip, src.scalars))
    try:
        with closing(_prefetched((chunk for _, chunk in chunks), threads)) as results:   # readers stop first
            for (first, _), result in zip(chunks, results):
                yield first, result.dense(), result.scalars
    finally:
        cached_parquet.cache_clear()
