"""Evaluate a trained checkpoint on one split of one or more converted HDF5 files.

Usage: python -m massreg.evaluate CHECKPOINT DATA.h5 [DATA2.h5 ...] [--split test] [--out DIR]
           [--max-mae-ratio 0.7]

Restores the model (massreg.checkpoint.restore), predicts every row of the split (massreg.engine.predict),
and reports MAE, RMSE, MRE, bias and resolution in GeV overall and per true-mass bin, beside a constant
predictor that always answers the TRAIN mean mass from the files' /stats, so the gain is visible. Writes
into --out (default: `eval_<split>/` beside the checkpoint), each file atomically; a folder that already
holds an evaluation is refused before any work, unless --force:

    metrics.json                  the EvaluateConfig, checkpoint, data files, both metric sets, the bin table
    bins.csv                      the per-bin table (model and constant predictor)
    <split>_pred_vs_true.png, <split>_residuals.png, <split>_response_resolution.png
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from massreg.checkpoint import atomic_write_text
from massreg.metrics import binned_metrics, constant_baseline, mass_edges, regression_metrics
from pipeline.layout import SPLITS

ALL = "all"  # --split all: every row of the files


class EvaluateError(Exception):
    """Bad input to evaluate / predict that is neither a bad checkpoint nor a bad file layout."""


@dataclass
class EvaluateConfig:
    """Everything one evaluation depends on; saved in metrics.json."""
    checkpoint: str
    data: list[str] = field(default_factory=list)
    split: str = "test"            # train | val | test | all
    out: str | None = None         # default: <checkpoint dir>/eval_<split>
    batch_size: int = 256
    device: str = "auto"           # auto | cpu | cuda
    amp: bool = False              # bf16 autocast on CUDA
    workers: int = 0
    n_bins: int = 10               # equal-width true-mass bins over the train split's [m_min, m_max]
    # fail (after writing) if MAE model / constant is above this (demo, CI)
    max_mae_ratio: float | None = None
    force: bool = False            # replace an evaluation already in the output folder

    def validate(self) -> None:
        if not self.data:
            raise EvaluateError("give at least one DATA.h5 file to evaluate on")
        if self.split not in (*SPLITS, ALL):
            raise EvaluateError(f"--split {self.split!r}: choose one of {', '.join((*SPLITS, ALL))}")
        if self.batch_size < 1 or self.workers < 0 or self.n_bins < 1:
            raise EvaluateError(f"batch_size {self.batch_size}, workers {self.workers}, "
                                f"n_bins {self.n_bins}: "
                                "batch_size and n_bins must be >= 1, workers >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise EvaluateError(f"--device {self.device!r}: choose auto, cpu or cuda")
        if self.max_mae_ratio is not None and not self.max_mae_ratio > 0:
            raise EvaluateError(f"--max-mae-ratio {self.max_mae_ratio}: it must be > 0")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.checkpoint).parent / f"eval_{self.split}"


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def check_channels(ckpt_channels, data_channels, where) -> None:
    """The model only makes sense on the channels it was trained on, in the same order."""
    if list(ckpt_channels) != list(data_channels):
        raise EvaluateError(f"checkpoint was trained on channels {','.join(ckpt_channels)} but {where} holds "
                            f"{','.join(data_channels)}; convert with the checkpoint's channels "
                            "or use a checkpoint trained on these")


def load_model(checkpoint: str | os.PathLike, device: torch.device):
    """(loaded checkpoint dict, massreg.checkpoint.Restored) for inference."""
    from massreg.checkpoint import load_checkpoint, restore
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    return ckpt, restore(ckpt, device)


def _json_safe(value):
    """NaN / inf -> None and numpy -> Python, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def bin_table(pred: np.ndarray, true: np.ndarray, train_mean: float, edges: np.ndarray) -> pd.DataFrame:
    """Per true-mass bin: the model's metrics and, beside them, the constant predictor's (suffix _const)."""
    model = binned_metrics(pred, true, edges)
    const = binned_metrics(np.full(true.shape, train_mean), true, edges)
    for col in ("mae", "rmse", "mre", "bias", "response", "resolution"):
        model[f"{col}_const"] = const[col]
    return model


def evaluate(config: EvaluateConfig, *, progress: bool = False) -> dict:
    """Run one evaluation, write its outputs, and return the dict saved as metrics.json."""
    from massreg import engine
    from massreg.data import H5Images, make_loader
    from massreg.plots import plot_predictions

    config.validate()
    out_dir = config.out_dir()
    held = [name for name in ("metrics.json", "bins.csv") if (out_dir / name).exists()]
    if held and not config.force:
        raise EvaluateError(f"{out_dir} already holds an evaluation ({', '.join(held)}); pass --force to "
                            f"replace it or --out DIR to write elsewhere")
    device = resolve_device(config.device)
    ckpt, restored = load_model(config.checkpoint, device)
    aux_names = tuple(restored.aux_scaler.names) if restored.aux_scaler is not None else ()
    dataset = H5Images(list(config.data), split=None if config.split == ALL else config.split, aux=aux_names)
    files = ", ".join(str(p) for p in config.data)
    check_channels(restored.channels, dataset.channels, files)
    if len(dataset) == 0:
        raise EvaluateError(f"split {config.split!r} of {files} has no rows; pick another --split")

    loader = make_loader(dataset, batch_size=config.batch_size, shuffle=False, seed=0, workers=config.workers)
    out = engine.predict(restored.model, loader, normalizer=restored.normalizer, target=restored.target,
                         aux_scaler=restored.aux_scaler, device=device, amp=config.amp, progress=progress)
    pred, true = out["pred"], out["true"]  # (N,) GeV each
    if not np.all(np.isfinite(pred)):
        raise EvaluateError(f"{int((~np.isfinite(pred)).sum())} of {pred.size} predictions of "
                            f"{config.checkpoint} are NaN or infinite: the checkpoint is broken")

    stats = dataset.stats
    train_mean = float(stats["m_mean"])  # the constant predictor: the train split's mean mass (GeV)
    model_metrics = regression_metrics(pred, true)
    const_metrics = constant_baseline(train_mean, true)
    # Bins over the train mass range, widened to hold every evaluated row.
    lo = min(float(stats.get("m_min", true.min())), float(true.min()))
    hi = max(float(stats.get("m_max", true.max())), float(true.max()))
    edges = mass_edges(lo, hi if hi > lo else lo + 1.0, config.n_bins)
    bins = bin_table(pred, true, train_mean, edges)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_predictions(pred, true, out_dir, config.split, edges=edges,
                             label=f"{config.split}, {Path(config.checkpoint).name}")
    atomic_write_text(out_dir / "bins.csv", bins.to_csv(index=False, float_format="%.6g"))
    report = {
        "config": asdict(config),
        "checkpoint": {"path": str(config.checkpoint), "resolved": str(Path(config.checkpoint).resolve()),
                       "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), "best": ckpt.get("best"),
                       "model_config": ckpt.get("model_config"), "channels": list(restored.channels),
                       "trained_on": ckpt.get("data", {}).get("paths")},
        "data": dataset.file_info(),
        "split": config.split,
        "device": str(device),
        "n": model_metrics["n"],
        "model": model_metrics,
        "constant": {"value": train_mean, **const_metrics},
        "mae_ratio": model_metrics["mae"] / const_metrics["mae"] if const_metrics["mae"] > 0 else None,
        "bins": bins.to_dict(orient="records"),
        "plots": [p.name for p in plots],
        "out_dir": str(out_dir),
    }
    report = _json_safe(report)
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def check_bound(report: dict, max_mae_ratio: float | None) -> None:
    """EvaluateError when the model's MAE is above max_mae_ratio x the constant predictor's."""
    ratio = report.get("mae_ratio")
    if max_mae_ratio is not None and (ratio is None or ratio > max_mae_ratio):
        raise EvaluateError(f"MAE model / constant = {ratio if ratio is None else format(ratio, '.3f')} "
                            f"is above the bound {max_mae_ratio} "
                            f"(model MAE {report['model']['mae']:.2f} GeV, constant "
                            f"{report['constant']['mae']:.2f} GeV); see {report['out_dir']}")


def format_report(report: dict) -> str:
    """The model's metrics beside the constant predictor's, overall and per true-mass bin, as text."""
    m, c = report["model"], report["constant"]
    files = ", ".join(Path(d["path"]).name for d in report["data"])
    lines = [f"{Path(report['checkpoint']['path']).name} on {report['split']} of {files}: {m['n']} rows",
             f"{'':14s}{'model':>10s}  {'constant':>10s}   (constant = train mean {c['value']:.2f} GeV)"]
    for key, label, unit in (("mae", "MAE", " [GeV]"), ("rmse", "RMSE", " [GeV]"), ("mre", "MRE", ""),
                             ("bias", "bias", " [GeV]"), ("resolution", "resolution", "")):
        lines.append(f"{label + unit:14s}{m[key]:10.4g}  {c[key]:10.4g}")
    if report.get("mae_ratio") is not None:
        lines.append(f"MAE model / constant = {report['mae_ratio']:.3f}")
    lines.append("per true-mass bin [GeV]:")
    lines.append(f"{'lo':>8s} {'hi':>8s} {'n':>7s} {'MAE':>8s} {'MAE const':>10s} {'bias':>8s} "
                 f"{'response':>9s} {'resolution':>10s}")

    def f(v, spec):
        return format(v, spec) if v is not None else format("-", spec.split(".")[0].rstrip("f"))
    for b in report["bins"]:
        lines.append(f"{b['lo']:8.1f} {b['hi']:8.1f} {b['n']:7d} {f(b['mae'], '8.2f')} "
                     f"{f(b['mae_const'], '10.2f')} {f(b['bias'], '8.2f')} {f(b['response'], '9.3f')} "
                     f"{f(b['resolution'], '10.3f')}")
    lines.append(f"wrote metrics.json, bins.csv and {len(report['plots'])} plots to {report['out_dir']}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("data", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--split", default="test", show_default=True, type=click.Choice([*SPLITS, ALL]),
              help="Which rows to evaluate on ('all' = every row).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Output folder [default: eval_<split>/ beside the checkpoint].")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--amp/--no-amp", default=False, show_default=True, help="bf16 autocast on CUDA.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader workers.")
@click.option("--bins", "n_bins", default=10, show_default=True, type=click.IntRange(min=1),
              help="Number of true-mass bins in the table and plots.")
@click.option("--max-mae-ratio", type=float, default=None,
              help="Exit non-zero (after writing everything) if MAE model / constant predictor "
                   "is above this.")
@click.option("--force", is_flag=True, help="Replace an evaluation already in the output folder.")
def main(checkpoint, data, split, out, batch_size, device, amp, workers, n_bins, max_mae_ratio, force):
    """Evaluate CHECKPOINT on a split of DATA.h5 (several files = one data set)."""
    from massreg.checkpoint import CheckpointError
    from massreg.data import LayoutError
    config = EvaluateConfig(checkpoint=checkpoint, data=list(data), split=split, out=out,
                            batch_size=batch_size, device=device, amp=amp, workers=workers, n_bins=n_bins,
                            max_mae_ratio=max_mae_ratio, force=force)
    try:
        report = evaluate(config, progress=sys.stderr.isatty())
        click.echo(format_report(report))
        check_bound(report, max_mae_ratio)
    except (EvaluateError, CheckpointError, LayoutError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
