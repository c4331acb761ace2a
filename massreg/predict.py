"""Predict the mass of every row of raw Parquet files or converted HDF5 files with a trained checkpoint,
or with an exported ONNX file run by ONNX Runtime (no torch model is built).

Usage: python -m massreg.predict CHECKPOINT INPUT... --out FILE.csv|FILE.parquet [--split test] [--cuts top]
       python -m massreg.predict --onnx MODEL.onnx INPUT... --out FILE.csv     (a file of massreg.export)

INPUT is a Parquet file in the raw schema (or a directory of *.parquet), decoded in memory chunk by chunk by
`pipeline.parallel.read_parquet_chunks` (the converter's own decoding, float16 rounding and checks) with the
model's channels; no cuts unless --cuts / --cut are given. Or INPUT is one of our HDF5 files: every row,
or the rows of --split. The kind of each input is read from its first bytes, not its name.

The output (CSV or Parquet, by the suffix of --out; written atomically, an existing file only with --force)
has one row per prediction: source (the input as given), row (the row number in that input: the Parquet row,
or the HDF5 row of /images), m_pred (GeV); for a model with quantiles m_q16, m_q84 (its 16 % and 84 %
quantiles) and m_res = (m_q84 - m_q16) / 2 (the per-jet resolution, one sigma), GeV; and m_true (GeV, the
file's mass where it has one, else empty); then the columns named by --keep (input columns copied row for
row). --tta averages the model over the four eta/phi flips of each jet. The PredictConfig and model details
go beside it in FILE.<suffix>.json (and, for Parquet, in its schema metadata).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import click
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from massreg import engine
from massreg.checkpoint import check_channels, load_for_inference
from massreg.cli import amp_option, batch_size_option, command, device_option, force_option, user_errors, \
    workers_option
from massreg.dataset import H5Images
from massreg.distributed import DEVICES, resolve_device
from massreg.deploy import OnnxRegressor
from massreg.sampling import make_loader
from pipeline.cuts import CUT_PRESETS, rows_passing
from pipeline.errors import UserError
from pipeline.files import atomic_write, atomic_write_text, check_new_output
from pipeline.layout import COLUMN_ALIASES, SPLITS, open_for_reading
from pipeline.parallel import read_parquet_chunks
from pipeline.parquet import expand_inputs as expand_paths
from pipeline.parquet import parse_channels
from pipeline.signals import StopFlag, exit_on_interrupt, polled, stop_on_signals

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
PARQUET_MAGIC = b"PAR1"
OUT_SUFFIXES = (".csv", ".parquet")
COLUMNS = ("source", "row", "m_pred", "m_true")
QUANTILE_COLUMNS = ("m_q16", "m_q84", "m_res")     # after m_pred, for a model with quantiles


class PredictError(UserError):
    """Bad input or options for predict (one line: which file or option, and what to do)."""


@dataclass
class PredictConfig:
    """Everything one prediction run depends on; saved beside the output."""
    checkpoint: str | None = None       # a massreg.train checkpoint, or
    onnx: str | None = None             # a massreg.export ONNX file, run by ONNX Runtime
    inputs: list[str] = field(default_factory=list)
    out: str = "predictions.csv"
    split: str | None = None            # HDF5 inputs: None = every row, or train | val | test
    cuts: str | None = None             # Parquet inputs: a pipeline.convert preset (paper | top | none)
    extra_cuts: tuple[str, ...] = ()    # Parquet inputs: more cuts in the converter's syntax
    clip: bool = False                  # Parquet inputs: saturate values beyond float16's range (as convert)
    chunk_size: int = 8                 # Parquet row groups per read
    batch_size: int = 256
    device: str = "auto"
    amp: bool = False
    workers: int = 0                    # DataLoader workers for HDF5 inputs
    force: bool = False
    tta: bool = False                   # average over the four eta/phi flips of each image
    keep: tuple[str, ...] = ()          # input columns copied into the output, row for row

    def validate(self) -> None:
        """Checks that need no file reading, so that a bad option fails before any work."""
        if (self.checkpoint is None) == (self.onnx is None):
            raise PredictError("give a CHECKPOINT or --onnx MODEL.onnx (exactly one)")
        if not self.inputs:
            raise PredictError("give at least one INPUT (Parquet file, directory of *.parquet, or HDF5 file)")
        if Path(self.out).suffix.lower() not in OUT_SUFFIXES:
            raise PredictError(f"--out {self.out}: the name must end in .csv or .parquet "
                               "(it picks the format)")
        check_new_output(self.out, self.force, label=f"--out {self.out}")
        if not Path(self.out).resolve().parent.is_dir():
            raise PredictError(f"--out {self.out}: folder {Path(self.out).parent} does not exist; "
                               "create it first")
        if self.split is not None and self.split not in SPLITS:
            raise PredictError(f"--split {self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.batch_size < 1 or self.chunk_size < 1 or self.workers < 0:
            raise PredictError(f"batch_size {self.batch_size}, chunk_size {self.chunk_size}, workers "
                               f"{self.workers}: sizes must be >= 1, workers >= 0")
        clash = sorted(set(self.keep) & set(COLUMNS + QUANTILE_COLUMNS))
        if clash:
            raise PredictError(f"--keep {','.join(clash)}: the output has such columns of its own; keep "
                               "others (the input's mass is m_true already)")
        if self.device not in DEVICES:
            raise PredictError(f"--device {self.device!r}: choose auto, cpu or cuda")


# ------------------------------------------------------------------------------------------------ inputs

def input_kind(path: Path) -> str:
    """'hdf5' or 'parquet' from the file's first bytes; PredictError otherwise."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise PredictError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head == HDF5_MAGIC:
        return "hdf5"
    if head[:4] == PARQUET_MAGIC:
        return "parquet"
    raise PredictError(f"{path}: neither a Parquet nor an HDF5 file (first bytes {head[:8]!r}); "
                       "give raw *.parquet files or files written by pipeline.convert")


def expand_inputs(inputs) -> list[tuple[str, str]]:
    """[(path as given or found in a directory, kind)] in the order given: the converter's expansion (a
    directory stands for its *.parquet, sorted by name; each file once), each kind by its magic bytes."""
    return [(str(p), input_kind(p)) for p in expand_paths(inputs)]


def parquet_batches(path: str, *, channels, aux_names, batch_size: int, chunk_size: int, clip: bool,
                    rows: np.ndarray | None, record: dict, bar) -> Iterator[dict]:
    """Loader-style batch dicts (as massreg.dataset.H5Images gives) from a Parquet file, decoded by chunks.

    The converter reads `chunk_size` row groups at a time (one row each in the real files), so chunks are
    gathered until a whole batch of `batch_size` rows is there: the model is called on full batches.
    "index" is the running position of each row; record["row"] / record["m"] receive, in that order, its row
    number in the file and its float64 mass (NaN where the file has none).
    """
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # (images, m, aux, row) parts
    n_pending, position = 0, 0

    def emit(images, m, aux, row):
        nonlocal position
        n = row.size
        record["row"].append(row)
        record["m"].append(m)
        batch = {"images": torch.from_numpy(images),                      # (B, C, 125, 125) float16
                 "m": torch.from_numpy(m.astype(np.float32)),              # (B,)
                 "aux": torch.from_numpy(aux),                             # (B, A) float32 raw
                 "index": torch.arange(position, position + n, dtype=torch.int64)}
        position += n
        bar.update(n)
        return batch

    for first, images, scalars in read_parquet_chunks(path, channels=channels, chunk_size=chunk_size,
                                                      clip=clip, rows=rows):
        n = images.shape[0]
        row = (np.arange(first, first + n, dtype=np.int64) if rows is None else rows[first:first + n])
        m = scalars["m"].astype(np.float64) if "m" in scalars else np.full(n, np.nan)
        missing = [a for a in aux_names if a not in scalars]
        if missing:
            raise PredictError(f"{path}: the model takes {', '.join(aux_names)} "
                               f"but the file has no "
                               f"{', '.join(missing)} (scalar columns: {', '.join(scalars)})")
        aux = (np.stack([scalars[a] for a in aux_names], axis=1).astype(np.float32) if aux_names
               else np.zeros((n, 0), dtype=np.float32))
        pending.append((images, m, aux, row))
        n_pending += n
        if n_pending >= batch_size:
            cat = [np.concatenate(p) for p in zip(*pending)]
            full = (n_pending // batch_size) * batch_size
            for a in range(0, full, batch_size):
                yield emit(*(x[a:a + batch_size] for x in cat))
            pending = [tuple(x[full:] for x in cat)] if full < n_pending else []
            n_pending -= full
    if n_pending:
        yield emit(*(np.concatenate(p) for p in zip(*pending)))


def counted(loader, bar) -> Iterator[dict]:
    """Pass batches through, advancing the progress bar by their size."""
    for batch in loader:
        bar.update(int(batch["index"].shape[0]))
        yield batch


# ------------------------------------------------------------------------------------------------ run

@dataclass
class Predictor:
    """What predict_file needs of a model, whichever runs it (PyTorch or ONNX Runtime)."""
    name: str                                  # "checkpoint" or "ONNX file", for messages
    channels: list[str]                        # the image channels it takes, in order
    aux_names: tuple[str, ...]                 # the raw scalar columns it takes, in order
    run: Callable[[Iterable[dict]], dict]      # loader batches -> dict(pred (N,) GeV, true, index)
    meta: dict                                 # what goes into FILE.json about the model


def torch_predictor(config: PredictConfig) -> Predictor:
    """The checkpoint's model on config.device, through massreg.engine (as evaluate)."""
    device = resolve_device(config.device)
    ckpt, r = load_for_inference(config.checkpoint, device)
    aux_names = tuple(r.aux_scaler.names) if r.aux_scaler is not None else ()

    def run(batches):
        return engine.predict(r.model, batches, normalizer=r.normalizer, target=r.target, tta=config.tta,
                              aux_scaler=r.aux_scaler, device=device, amp=config.amp)

    meta = {"checkpoint": {"path": config.checkpoint, "epoch": ckpt.get("epoch"),
                           "model_config": ckpt.get("model_config"), "channels": list(r.channels)},
            "onnx": None, "device": str(device)}
    return Predictor("checkpoint", list(r.channels), aux_names, run, meta)


def onnx_predictor(config: PredictConfig) -> Predictor:
    """The exported graph in ONNX Runtime on the CPU; its channels and aux from the file's own metadata."""
    model = OnnxRegressor(config.onnx)
    meta = {"checkpoint": None, "device": "onnxruntime CPU",
            "onnx": {"path": config.onnx, "from_checkpoint": model.meta.get("checkpoint"),
                     "versions": model.meta.get("versions"), "channels": model.channels}}
    return Predictor(f"ONNX file {config.onnx}", model.channels, tuple(model.aux_names),
                     lambda batches: model.predict(batches, tta=config.tta), meta)


def predict_file(path: str, kind: str, model: Predictor, config: PredictConfig, *,
                 progress: bool, stop: StopFlag | None = None) -> pd.DataFrame:
    """Predictions for one input as a DataFrame with COLUMNS; `stop` is polled before each batch."""
    aux_names = model.aux_names
    if kind == "hdf5":
        if config.cuts is not None or config.extra_cuts:
            raise PredictError(f"{path}: --cuts/--cut apply to Parquet inputs only "
                               "(an HDF5 file was cut when "
                               "converted); predict HDF5 files in a separate call")
        ds = H5Images(path, config.split, aux=aux_names)
        check_channels(model.channels, ds.channels, path, model=model.name)
        sources = keep_sources(path, kind, config.keep)
        loader = make_loader(ds, batch_size=config.batch_size, shuffle=False, seed=0, workers=config.workers)
        with tqdm(total=len(ds), desc=Path(path).name, unit="row", disable=not progress) as bar:
            out = model.run(polled(counted(loader, bar), stop))
        _, row = ds.locate(out["index"])                    # (N,) row of /images in this file
        m_true = ds.label("m")[out["index"]].astype(np.float64)  # float64, not the loader's float32
        kept = {name: ds.label(source)[out["index"]] for name, source in sources.items()}
    else:
        if config.split is not None:
            raise PredictError(f"{path}: --split applies to HDF5 inputs only (a Parquet file has no split); "
                               "predict Parquet files in a separate call")
        channels = parse_channels(list(model.channels))  # the model's channels, by name
        sources = keep_sources(path, kind, config.keep)
        rows, skipped = rows_passing(path, config.cuts or "none", config.extra_cuts)
        if skipped and progress:
            tqdm.write(f"{path}: cut(s) {', '.join(c.text for c in skipped)} skipped: the file lacks their "
                       "column", file=sys.stderr)
        record = {"row": [], "m": []}
        total = None if rows is None else int(rows.size)
        with tqdm(total=total, desc=Path(path).name, unit="row", disable=not progress) as bar:
            out = model.run(polled(parquet_batches(
                path, channels=channels, aux_names=aux_names, batch_size=config.batch_size,
                chunk_size=config.chunk_size, clip=config.clip, rows=rows, record=record, bar=bar), stop))
        all_rows = np.concatenate(record["row"]) if record["row"] else np.zeros(0, np.int64)
        all_m = np.concatenate(record["m"]) if record["m"] else np.zeros(0)
        row, m_true = all_rows[out["index"]], all_m[out["index"]]
        table = pq.read_table(path, columns=sorted(set(sources.values()))) if sources else None
        kept = {name: table.column(source).to_numpy(zero_copy_only=False)[row]
                for name, source in sources.items()}
    pred = out["pred"]
    bad = ~np.isfinite(pred)
    if bad.any():
        raise PredictError(f"{path}: {int(bad.sum())} of {pred.size} predictions are NaN or infinite "
                           f"(first at row {int(row[np.argmax(bad)])}): "
                           f"the {model.name} or the input is broken")
    columns = {"source": pd.Series([path] * pred.size, dtype="string"), "row": row.astype(np.int64),
               "m_pred": pred.astype(np.float64)}
    if "q16" in out:
        columns.update(m_q16=out["q16"], m_q84=out["q84"], m_res=(out["q84"] - out["q16"]) / 2)
    return pd.DataFrame({**columns, "m_true": m_true.astype(np.float64), **kept})


def keep_sources(path: str, kind: str, names) -> dict[str, str]:
    """{name asked with --keep: the column of `path` that holds it}: a Parquet column (or its alias: m for am)
    or an HDF5 /labels entry. Checked before any image is read; a missing one is one line naming the file and
    the columns it has."""
    if not names:
        return {}
    if kind == "hdf5":
        with open_for_reading(path) as f:
            present = sorted(f["labels"])
    else:
        schema = pq.read_schema(path)
        present = [n for n in schema.names if not pa.types.is_list(schema.field(n).type)]   # not the images
    sources = {}
    for name in names:
        candidates = [name, *COLUMN_ALIASES.get(name, ()),
                      *(canon for canon, aliases in COLUMN_ALIASES.items() if name in aliases)]
        found = next((c for c in candidates if c in present), None)
        if found is None:
            what = "labels" if kind == "hdf5" else "columns"
            raise PredictError(f"{path}: no column {name!r} to --keep; its {what}: {', '.join(present)}")
        sources[name] = found
    return sources


def _write_table(df: pd.DataFrame, out: Path, meta: dict) -> None:
    """CSV or Parquet by suffix, to a temp file beside `out`, then renamed into place."""
    if out.suffix.lower() == ".csv":
        # full precision: floats round-trip exactly
        atomic_write(out, lambda fh: df.to_csv(fh, index=False, na_rep=""), mode="w")
        return
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"massreg_predict": json.dumps(meta).encode()})
    atomic_write(out, lambda fh: pq.write_table(table, fh))


def predict(config: PredictConfig, *, progress: bool = False, stop: StopFlag | None = None) -> pd.DataFrame:
    """Predict every input, write config.out (+ its .json beside it), and return the table.

    `stop` (a StopFlag set by SIGTERM and friends) is polled between batches and before writing."""
    config.validate()
    inputs = expand_inputs(config.inputs)
    model = onnx_predictor(config) if config.onnx is not None else torch_predictor(config)
    frames = [predict_file(path, kind, model, config, progress=progress, stop=stop)
              for path, kind in polled(inputs, stop)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    if not df["m_true"].notna().any():
        # no input had a mass: leave the column out rather than fill it with NaN
        df = df.drop(columns="m_true")
    out = Path(config.out)
    meta = {"config": asdict(config), **model.meta,
            "inputs": [{"path": p, "kind": k, "rows": int((df["source"] == p).sum())} for p, k in inputs],
            "columns": list(df.columns)}
    check_new_output(out, config.force, label=f"--out {out}")   # again: it may have appeared while we worked
    side = out.with_name(out.name + ".json")
    if stop is not None:
        stop.check()
    try:
        atomic_write_text(side, json.dumps(meta, indent=2, default=str) + "\n")
        _write_table(df, out, meta)
    except OSError as exc:  # a full disk, a vanished folder: one line, and no half file (atomic writes)
        if not out.exists():
            side.unlink(missing_ok=True)
        raise PredictError(f"--out {out}: writing failed ({exc.strerror or exc}); "
                           "no predictions file was written") from None
    return df


@command()
@click.argument("args", nargs=-1, required=True, metavar="[CHECKPOINT] INPUT...")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output file: .csv or .parquet.")
@click.option("--onnx", default=None, type=click.Path(dir_okay=False), metavar="MODEL.onnx",
              help="Run this exported model (massreg.export) in ONNX Runtime instead of a CHECKPOINT in "
                   "PyTorch; every argument is then an INPUT.")
@click.option("--split", default=None, type=click.Choice(list(SPLITS)),
              help="HDF5 inputs: only the rows of this split [default: every row].")
@click.option("--cuts", default=None, type=click.Choice(list(CUT_PRESETS)),
              help="Parquet inputs: the converter's cut preset [default: no cuts].")
@click.option("--cut", "extra_cuts", multiple=True, metavar="EXPR",
              help="Parquet inputs: an extra cut in the converter's syntax, e.g. '|eta| < 1.4'; repeatable.")
@click.option("--clip", is_flag=True,
              help="Parquet inputs: saturate values beyond float16's range, as convert.")
@click.option("--chunk-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Parquet row groups per read.")
@batch_size_option(256)
@device_option
@amp_option
@workers_option("DataLoader workers (HDF5 inputs).")
@click.option("--keep", "keep", multiple=True, metavar="COL[,COL...]",
              help="Copy these input columns into the output, row for row: Parquet scalar columns, or HDF5 "
                   "labels (e.g. pt,ieta,iphi or an event id); repeatable.")
@click.option("--tta", is_flag=True,
              help="Average the model over the four eta/phi flips of each image (4x the compute).")
@force_option("Replace --out if it exists.")
def main(args, out, onnx, split, cuts, extra_cuts, clip, chunk_size, batch_size, device, amp, workers,
         force, keep, tta):
    """Predict the mass of every row of INPUT (raw Parquet or converted HDF5) with CHECKPOINT, or with the
    exported MODEL.onnx given by --onnx.

    \b
    Examples:
      python -m massreg.predict runs/top/best_val_loss.pt data/raw/ --out pred.csv --cuts top
      python -m massreg.predict runs/top/best_val_loss.pt data/top.h5 --split test --out test.parquet
      python -m massreg.predict --onnx deploy/top_mass.onnx data/raw/ --out pred_onnx.csv
    """
    checkpoint, inputs = (None, list(args)) if onnx is not None else (args[0], list(args[1:]))
    config = PredictConfig(checkpoint=checkpoint, onnx=onnx, inputs=inputs, out=out, split=split, cuts=cuts,
                           extra_cuts=tuple(extra_cuts), clip=clip, chunk_size=chunk_size,
                           batch_size=batch_size, device=device, amp=amp, workers=workers, force=force,
                           tta=tta, keep=tuple(c.strip() for k in keep for c in k.split(",") if c.strip()))
    with exit_on_interrupt(f"prediction to {out}"), stop_on_signals() as stop:
        with user_errors():
            df = predict(config, progress=sys.stderr.isatty(), stop=stop)
    per = df.groupby("source", sort=False).size()
    click.echo(f"wrote {len(df)} predictions ({', '.join(f'{Path(s).name}: {n}' for s, n in per.items())}) "
               f"to {out}")


if __name__ == "__main__":
    main()
