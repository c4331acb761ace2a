"""Synthetic CMS end-to-end jet images, written in exactly the Parquet schema of the real Task 3a files.

Usage: python -m pipeline.synth OUT_DIR --process top --rows 1000 --files 2 --seed 1

The real data cannot be downloaded, so every test, benchmark and the demo run on what this module writes.

This module holds the configuration (`SynthConfig`), the writing (`to_table`, `write_file`, `generate`) and
the CLI. `pipeline.synth_physics` holds what is simulated and how (`simulate`: geometry, the `top` and `a2gg`
processes, pileup, secondary interactions, detector response) and `pipeline.synth_report` the comparison with
the real data's statistics (`report`, `--report`) and the calibration it guided; their public functions are
importable from here too.

Schema (as the real files): `X_jet` list<list<list<double>>> (8 x 125 x 125 nested lists), then float64
scalars `m`, `pt`, `ieta`, `iphi` (`a2gg` adds `eta` after `iphi`); one row per row group by default,
snappy compression. `--dtype float32` writes list<list<list<float>>> and `--legacy-names` the aliases
`X_jets`, `am`, `apt` seen in some write-ups, so that the converter's handling of both can be tested.

Channels (`pipeline.layout.CHANNEL_NAMES`): 0 track pT (GeV), 1 dz (cm, signed), 2 d0 (cm, signed), 3 ECAL
energy (GeV), 4 HCAL energy (GeV, uniform over each 5 x 5 tower), 5-7 barrel pixel layers 1-3 (hit counts).

Determinism: chunk i_chunk (of `chunk_rows` rows) of file i_file is simulated with
`np.random.default_rng([seed, i_file, i_chunk])` (`chunk_rng`), so the data depend on (process, seed, rows,
chunk_rows) and not on `rows_per_group`, `dtype` (beyond rounding) or `legacy_names`. Memory peaks at about
2 MB per chunk row (0.5 GB for the default 256), whatever the number of rows per file.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.core import ParameterSource
from tqdm import tqdm

from pipeline.cli import command, force_option, user_errors
from pipeline.files import atomic_write_text, os_cause
from pipeline.signals import STOP_SIGNALS, StopFlag, exit_on_interrupt
from pipeline.synth_physics import PROCESSES, SynthError, simulate
# re-exported: the public names of the physics and the report, importable from pipeline.synth as before
from pipeline.synth_physics import (eta_phi, four_vector, pileup, render, secondaries,  # noqa: F401
                                    shower, simulate_a2gg, simulate_top, soft_pt, tower_labels,
                                    truncated_breit_wigner, two_body, underlying_event, with_environment,
                                    wrap)
from pipeline.synth_report import format_report, report

DTYPES = ("float64", "float32")
MAX_CHUNK_ROWS = 16384  # 16384 * 125,000 values stays under the int32 offsets of a pyarrow list
MAX_FILES = 1000        # file names carry a 3-digit index
LEGACY_NAMES = {"X_jet": "X_jets", "m": "am", "pt": "apt"}  # pipeline.layout.COLUMN_ALIASES, other spelling


@dataclass
class SynthConfig:
    process: str = "top"          # "top" | "a2gg"
    rows: int = 1000              # rows PER FILE
    files: int = 1
    rows_per_group: int = 1       # the real files hold one row per row group
    seed: int = 0
    chunk_rows: int = 256         # rows simulated + written at a time (bounded memory: ~1 MB per row)
    dtype: str = "float64"        # "float64" | "float32" for the image lists (the converter must accept both)
    legacy_names: bool = False    # write the aliases X_jets / am / apt instead of X_jet / m / pt

    def validate(self) -> None:
        """Raise SynthError for an impossible configuration, before any work starts."""
        if self.process not in PROCESSES:
            raise SynthError(f"unknown process {self.process!r}: use one of {', '.join(PROCESSES)}")
        if self.dtype not in DTYPES:
            raise SynthError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        for name in ("rows", "files", "rows_per_group", "chunk_rows"):
            if int(getattr(self, name)) < 1:
                raise SynthError(f"{name} is {getattr(self, name)}: it must be at least 1")
        if self.files > MAX_FILES:
            raise SynthError(f"files {self.files} is over {MAX_FILES}: write several directories instead")
        if self.chunk_rows > MAX_CHUNK_ROWS:
            raise SynthError(f"chunk_rows {self.chunk_rows} is over {MAX_CHUNK_ROWS}: use a smaller chunk")


def chunk_rng(seed: int, i_file: int, i_chunk: int) -> np.random.Generator:
    """The generator of chunk `i_chunk` of file `i_file`: independent streams, reproducible per chunk."""
    return np.random.default_rng([seed, i_file, i_chunk])


# ----------------------------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------------------------

def to_table(events: dict[str, np.ndarray], *, dtype: str = "float64",
             legacy_names: bool = False) -> pa.Table:
    """Events from `simulate` -> a pyarrow Table in the real schema. The nested list column is built from one
    flat values array and three offset arrays, never from Python lists."""
    images = events["X_jet"]                                            # (n, C, H, W)
    n, c, h, w = images.shape
    flat = np.ascontiguousarray(images, dtype=dtype).reshape(-1)      # a view for float64: no copy
    values = pa.array(flat, type=pa.from_numpy_dtype(flat.dtype))
    rows = pa.ListArray.from_arrays(pa.array(np.arange(n * c * h + 1, dtype=np.int32) * w), values)
    planes = pa.ListArray.from_arrays(pa.array(np.arange(n * c + 1, dtype=np.int32) * h), rows)
    jets = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * c), planes)
    columns = [jets] + [pa.array(np.asarray(v, dtype=np.float64)) for k, v in events.items() if k != "X_jet"]
    names = [LEGACY_NAMES.get(k, k) if legacy_names else k for k in events]   # `simulate` gives file order
    return pa.Table.from_arrays(columns, names=names)


def file_name(process: str, i_file: int) -> str:
    return f"{process}_synth_{i_file:03d}.parquet"


def write_file(path: Path, config: SynthConfig, i_file: int, bar: tqdm | None = None,
               stop: StopFlag | None = None) -> None:
    """Write file `i_file` of `config` to `path` (via a temp file beside it), chunk by chunk; `stop` is
    polled before each chunk (`StopFlag.check`).

    Row groups never straddle two write_table calls, so rows left over after the last full group of a
    chunk are carried into the next one: the file has exactly ceil(rows / rows_per_group) groups."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    k = config.rows_per_group
    writer = None
    pending = None
    try:
        for i_chunk, start in enumerate(range(0, config.rows, config.chunk_rows)):
            if stop is not None:
                stop.check()
            n = min(config.chunk_rows, config.rows - start)
            events = simulate(config.process, n, chunk_rng(config.seed, i_file, i_chunk))
            table = to_table(events, dtype=config.dtype, legacy_names=config.legacy_names)  # shares memory
            del events
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="snappy")
            if pending is not None:
                table = pa.concat_tables([pending, table])
            last = start + n >= config.rows
            full = table.num_rows if last else table.num_rows // k * k
            if full:
                writer.write_table(table.slice(0, full), row_group_size=k)
            # take() copies the few leftover rows, so that the chunk's ~1 MB per row is freed now
            pending = table.take(np.arange(full, table.num_rows)) if full < table.num_rows else None
            del table
            if bar is not None:
                bar.update(n)
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)


def generate(out_dir, config: SynthConfig, force: bool = False, *, progress: bool = False,
             stop: StopFlag | None = None) -> list[Path]:
    """Write config.files Parquet files `{process}_synth_{i:03d}.parquet` into out_dir and return their paths;
    `synth_config.json` (asdict(config)) goes beside them.

    Refuses (SynthError) an out_dir that already holds `{process}_synth_NNN.parquet` files unless force=True,
    in which case those not rewritten now are removed too, so that the directory holds one data set.

    Each file is written under a temporary name and renamed when whole, and synth_config.json last. On a
    write error (SynthError, one line) or an interruption, the files finished before it stay, the one in
    progress is discarded and synth_config.json is not written; with force=True the old files not yet
    replaced and the old synth_config.json are removed then too, once one new file is in place, so that no mix
    of two data sets remains. `stop` (what the CLI passes) is polled before each chunk of rows.
    """
    config.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a directory: choose another OUT_DIR")
    existing = sorted(out.glob(f"{config.process}_synth_[0-9][0-9][0-9].parquet")) if out.is_dir() else []
    if existing and not force:
        raise SynthError(f"{out} already holds {len(existing)} {config.process}_synth_*.parquet file(s): "
                         f"use --force (force=True) to replace them or choose another directory")
    paths = [out / file_name(config.process, i) for i in range(config.files)]
    done: list[Path] = []
    target = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tqdm(total=config.rows * config.files, unit="row", desc=f"synth {config.process}",
                  disable=None if progress else True) as bar:
            for i_file, target in enumerate(paths):
                write_file(target, config, i_file, bar, stop)
                done.append(target)
        target = out
        for stale in set(existing) - set(paths):
            stale.unlink(missing_ok=True)
        target = out / "synth_config.json"
        atomic_write_text(target, json.dumps(asdict(config), indent=2) + "\n")
    except BaseException as exc:
        if force and done:
            for old in [*set(existing) - set(done), out / "synth_config.json"]:
                old.unlink(missing_ok=True)
        if isinstance(exc, OSError):      # os_cause: the errno's text, not pyarrow's paragraph
            raise SynthError(f"cannot write {target}: {os_cause(exc)}; {len(done)} of {config.files} file(s) "
                             f"were finished before it, synth_config.json was not written") from None
        raise
    return paths


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------

_DEFAULTS = {f.name: f.default for f in fields(SynthConfig)}


@command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--process", type=click.Choice(PROCESSES), default=_DEFAULTS["process"], show_default=True,
              help="top: boosted t -> bqq' jets (m 85-500, pT 400-1000 GeV); a2gg: A -> gamma gamma "
                   "(m 0-2, pT 10-150 GeV, |eta| < 2).")
@click.option("--rows", type=click.IntRange(min=1), default=_DEFAULTS["rows"], show_default=True,
              help="Rows per file (about 7 kB each on disk for top).")
@click.option("--files", type=click.IntRange(min=1, max=MAX_FILES), default=_DEFAULTS["files"],
              show_default=True, help="Number of files, {process}_synth_000.parquet, ...")
@click.option("--rows-per-group", type=click.IntRange(min=1), default=_DEFAULTS["rows_per_group"],
              show_default=True, help="Rows per Parquet row group (the real files have 1).")
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True,
              help="Random seed; chunk c of file f uses default_rng([seed, f, c]).")
@click.option("--chunk-rows", type=click.IntRange(min=1, max=MAX_CHUNK_ROWS), default=_DEFAULTS["chunk_rows"],
              show_default=True, help="Rows simulated and written at a time (memory ~2 MB per row).")
@click.option("--dtype", type=click.Choice(DTYPES), default=_DEFAULTS["dtype"], show_default=True,
              help="Element type of the image lists.")
@click.option("--legacy-names", is_flag=True,
              help="Name the columns X_jets / am / apt instead of X_jet / m / pt.")
@force_option("Replace existing {process}_synth_*.parquet files in OUT_DIR.")
@click.option("--report", "show_report", is_flag=True,
              help="After writing, print per-channel statistics of the files beside the real data's "
                   "(occupancy, nonzero and all-pixel mean/std, bytes per row).")
@click.option("--report-only", is_flag=True,
              help="Write nothing: print that report for the *.parquet files already in OUT_DIR (generated "
                   "or real). Takes no generation option.")
def main(out_dir, process, rows, files, rows_per_group, seed, chunk_rows, dtype, legacy_names, force,
         show_report, report_only):
    """Write synthetic CMS end-to-end jet images to OUT_DIR as Parquet files in the real schema.

    X_jet (8 x 125 x 125 nested lists: track pT, dz, d0, ECAL, HCAL, pixel layers 1-3), then m, pt, ieta,
    iphi (and eta for a2gg) as float64. Also writes synth_config.json, last. Stopped by Ctrl-C, SIGTERM or
    SIGHUP, it keeps the files already finished, discards the one in progress and exits with 128 + the
    signal's number (143 for SIGTERM). Examples:

    \b
        python -m pipeline.synth data/raw --process top --rows 2000 --files 2 --seed 1
        python -m pipeline.synth /tmp/check --rows 500 --seed 1 --report   # write, then compare with real
        python -m pipeline.synth data/raw --report-only                    # compare existing files
    """
    ctx = click.get_current_context()
    if report_only:
        given = [f"--{name.replace('_', '-')}" for name in (*_DEFAULTS, "force")
                 if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--report-only writes nothing: drop {', '.join(given)}")
        paths = sorted(out_dir.glob("*.parquet")) if out_dir.is_dir() else []
        with user_errors():
            if not paths:
                raise SynthError(f"{out_dir} holds no *.parquet files to report on")
            _echo_report(paths)
        return
    config = SynthConfig(process=process, rows=rows, files=files, rows_per_group=rows_per_group, seed=seed,
                         chunk_rows=chunk_rows, dtype=dtype, legacy_names=legacy_names)
    start = time.perf_counter()
    # SIGTERM (Slurm's time limit, preemption) and SIGHUP end the run as Ctrl-C does: one line, 128 + signum;
    # the signal sets a flag polled between chunks (StopFlag.check says why), a second one raises at once
    with exit_on_interrupt(f"generation of {files} {process} file(s) in {out_dir}",
                           "the files finished before it are whole, the one in progress was discarded, "
                           "synth_config.json was not written"), \
            StopFlag((signal.SIGINT, *STOP_SIGNALS)) as stop, user_errors():
        paths = generate(out_dir, config, force=force, progress=True, stop=stop)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in paths)
    total = rows * files
    click.echo(f"wrote {len(paths)} file(s), {total} rows, {size / 1e6:.1f} MB in {seconds:.1f} s "
               f"({total / seconds:.0f} rows/s) to {out_dir}")
    if show_report:
        with user_errors():
            _echo_report(paths)


def _echo_report(paths: list[Path]) -> None:
    """Print the report of `paths`; a file pyarrow cannot read is a SynthError of pyarrow's first line."""
    try:
        text = format_report(report(paths))
    except pa.ArrowException as exc:
        raise SynthError(str(exc).splitlines()[0]) from exc
    click.echo(text)


if __name__ == "__main__":
    main()
