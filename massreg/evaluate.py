"""Evaluate a trained checkpoint on one split of one or more converted HDF5 files.

Usage: python -m massreg.evaluate CHECKPOINT DATA.h5 [DATA2.h5 ...] [--split test] [--out DIR]
           [--max-mae-ratio 0.7] [--knn 30] [--knn-train-rows 20000]

Restores the model (massreg.checkpoint.restore), predicts every row of the split (massreg.engine.predict),
and reports MAE, RMSE, MRE, bias and resolution in GeV overall and per true-mass bin, beside two baselines,
so the gain is visible: a constant predictor that always answers the TRAIN mean mass from the files' /stats,
and a physics baseline (massreg.baselines): the k-nearest-neighbour mean mass in (invariant mass of the
ECAL + HCAL pixels, pT), fitted on a seeded subsample of the train split. The evaluated split's pixel masses
are computed from the batches the model reads (one pass over its images); the train subsample is read
separately, calorimeter channels only. Writes into --out (default: `eval_<split>/` beside the checkpoint),
each file atomically; a folder that already holds an evaluation is refused before any work, unless --force:

    metrics.json                  the EvaluateConfig, checkpoint, data files, the three metric sets (model,
                                  constant, knn with its settings or why it was skipped), the bin table
    bins.csv                      the per-bin table (model, constant predictor (_const), kNN (_knn))
    <split>_pred_vs_true.png, <split>_residuals.png, <split>_response_resolution.png
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd

from massreg import engine
from massreg.baselines import (CALO_CHANNELS, calo_channels, calo_energy, eta_from_ieta, fit_knn, knn_predict,
                               pixel_mass)
from massreg.checkpoint import check_channels, load_for_inference, to_plain
from massreg.cli import amp_option, batch_size_option, command, device_option, force_option, user_errors, \
    workers_option
from massreg.dataset import H5Images, LayoutError
from massreg.distributed import DEVICES, resolve_device
from massreg.metrics import binned_metrics, constant_baseline, mass_edges, regression_metrics
from massreg.plots import plot_predictions, plot_resolution
from massreg.resolution import format_resolution, resolution_report
from massreg.sampling import make_loader
from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline import layout
from pipeline.layout import SPLITS
from pipeline.signals import exit_on_interrupt, polled, stop_on_signals

ALL = "all"  # --split all: every row of the files


class EvaluateError(UserError):
    """Bad input to evaluate that is neither a bad checkpoint nor a bad file layout."""


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
    knn: int = 30                  # neighbours of the kNN physics baseline (massreg.baselines); 0: none
    knn_train_rows: int = 20_000   # fit it on a seeded random subsample of at most this many train rows
    knn_seed: int = 0              # seed of that subsample
    tta: bool = False              # average the model over the four eta/phi flips of each image

    def validate(self) -> None:
        if not self.data:
            raise EvaluateError("give at least one DATA.h5 file to evaluate on")
        if self.split not in (*SPLITS, ALL):
            raise EvaluateError(f"--split {self.split!r}: choose one of {', '.join((*SPLITS, ALL))}")
        if self.batch_size < 1 or self.workers < 0 or self.n_bins < 1:
            raise EvaluateError(f"batch_size {self.batch_size}, workers {self.workers}, "
                                f"n_bins {self.n_bins}: "
                                "batch_size and n_bins must be >= 1, workers >= 0")
        if self.device not in DEVICES:
            raise EvaluateError(f"--device {self.device!r}: choose auto, cpu or cuda")
        if self.max_mae_ratio is not None and not self.max_mae_ratio > 0:
            raise EvaluateError(f"--max-mae-ratio {self.max_mae_ratio}: it must be > 0")
        if self.knn < 0 or self.knn_train_rows < 1:
            raise EvaluateError(f"--knn {self.knn}, --knn-train-rows {self.knn_train_rows}: --knn must be "
                                ">= 0 (0 disables the baseline), --knn-train-rows >= 1")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.checkpoint).parent / f"eval_{self.split}"


def bin_table(pred: np.ndarray, true: np.ndarray, train_mean: float, edges: np.ndarray,
              knn_pred: np.ndarray | None = None, *, q16=None, q84=None) -> pd.DataFrame:
    """Per true-mass bin: the model's metrics (with q16 / q84: also its coverage and pull width) and, beside
    them, the constant predictor's (suffix _const) and, when given, the kNN baseline's (suffix _knn)."""
    model = binned_metrics(pred, true, edges, q16=q16, q84=q84)
    others = {"const": np.full(true.shape, train_mean)}
    if knn_pred is not None:
        others["knn"] = knn_pred
    for suffix, other in others.items():
        table = binned_metrics(other, true, edges)
        for col in ("mae", "rmse", "mre", "bias", "response", "resolution"):
            model[f"{col}_{suffix}"] = table[col]
    return model


# ----------------------------------------------------------------------------------------------------------
# the kNN physics baseline (definitions in massreg.baselines)


def _jet_labels(dataset) -> tuple[np.ndarray, str, np.ndarray | None]:
    """(eta_jet (n,), eta source, pt (n,) or None) for every row of an H5Images split, from its labels."""
    try:
        eta, source = eta_from_ieta(dataset.label("ieta")), "ieta"
    except LayoutError:
        eta, source = np.zeros(len(dataset)), "none: no ieta label, eta_jet = 0"
    try:
        pt = np.asarray(dataset.label("pt"), dtype=np.float64)
    except LayoutError:
        pt = None
    return eta, source, pt


class PixelMassTap:
    """Iterates `loader` unchanged and, on the way, writes each batch's pixel mass (GeV) into out[index].

    So the evaluated split's images are read once, for the model and the baseline together. The pixel mass
    is computed before the batch is handed on, while its (possibly reused) image buffer is still this batch.
    """

    def __init__(self, loader, channels, eta_jet: np.ndarray, out: np.ndarray):
        self.loader, self.channels, self.eta_jet, self.out = loader, list(channels), eta_jet, out
        self.seconds = 0.0  # time spent on the pixel masses

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            start = time.perf_counter()
            idx = np.asarray(batch["index"], dtype=np.int64)  # (B,) positions in the split
            self.out[idx] = pixel_mass(calo_energy(batch["images"], self.channels), self.eta_jet[idx])
            self.seconds += time.perf_counter() - start
            yield batch


def read_pixel_mass(dataset, positions: np.ndarray, eta_jet: np.ndarray, *, batch_size: int = 256) \
        -> np.ndarray:
    """Pixel mass (GeV) of rows `positions` (sorted) of an H5Images split, reading only its ECAL/HCAL planes.

    h5py reads the calorimeter channels of each batch of rows (a quarter of an 8-channel row's bytes, or
    less); eta_jet: (len(positions),) the jet eta of each of these rows.
    """
    channels = dataset.channels
    calo = calo_channels(channels)
    file, local = dataset.locate(positions)
    out = np.empty(positions.size, dtype=np.float64)
    for k, path in enumerate(dataset.paths):
        sel = np.flatnonzero(file == k)  # positions sorted -> local rows of one file ascending
        if not sel.size:
            continue
        with layout.open_for_reading(path) as f:
            images = f["images"]
            for lo in range(0, sel.size, batch_size):
                part = sel[lo:lo + batch_size]
                rows = local[part]
                energy = images[rows, calo[0]].astype(np.float64)  # (B, 125, 125)
                for c in calo[1:]:
                    energy += images[rows, c]
                out[part] = pixel_mass(energy, eta_jet[part])
    return out


def knn_skip_reason(config: EvaluateConfig, channels) -> str | None:
    """Why the kNN baseline cannot run for this config and these channel names, or None."""
    if config.knn == 0:
        return "disabled with --knn 0"
    if not calo_channels(channels):
        return (f"skipped: the files hold no calorimeter channel ({', '.join(CALO_CHANNELS)}) among "
                f"{', '.join(channels)}")
    return None


def knn_baseline(config: EvaluateConfig, eval_mass: np.ndarray, eval_pt: np.ndarray | None,
                 true: np.ndarray, eval_eta_source: str) -> tuple[np.ndarray | None, dict]:
    """Fit the kNN on a seeded train subsample and predict the evaluated rows: (pred (N,) or None, block).

    eval_mass, eval_pt: (N,) pixel mass and pT of the evaluated rows, in the order of `true`.
    """
    start = time.perf_counter()
    train = H5Images(list(config.data), split="train")
    channels = [train.channels[i] for i in calo_channels(train.channels)]
    settings = {"k": config.knn, "train_rows_available": len(train), "seed": config.knn_seed,
                "channels": channels, "eta_source": eval_eta_source,
                "features": ["pixel_mass", "pt"] if eval_pt is not None else ["pixel_mass"]}
    if len(train) == 0:
        return None, {"skipped": "skipped: the train split has no rows to fit on", **settings}
    rng = np.random.default_rng(config.knn_seed)
    n_fit = min(config.knn_train_rows, len(train))
    positions = np.sort(rng.choice(len(train), size=n_fit, replace=False))
    eta, _, pt = _jet_labels(train)
    mass = read_pixel_mass(train, positions, eta[positions], batch_size=config.batch_size)
    fit_x = np.stack([mass] + ([pt[positions]] if eval_pt is not None else []), axis=1)  # (n_fit, F)
    knn = fit_knn(fit_x, train.targets[positions], k=config.knn)
    eval_x = np.stack([eval_mass] + ([eval_pt] if eval_pt is not None else []), axis=1)  # (N, F)
    pred = knn_predict(knn, eval_x)
    block = {"skipped": None, **settings, "k_used": knn.k, "train_rows": n_fit,
             "seconds_fit_and_predict": time.perf_counter() - start, **regression_metrics(pred, true)}
    if config.split in ("train", ALL):
        block["note"] = f"the {config.split} rows evaluated include the train rows the kNN was fitted on"
    return pred, block


def evaluate(config: EvaluateConfig, *, progress: bool = False, stop=None) -> dict:
    """Run one evaluation, write its outputs, and return the dict saved as metrics.json."""
    config.validate()
    out_dir = config.out_dir()
    held = [name for name in ("metrics.json", "bins.csv") if (out_dir / name).exists()]
    if held and not config.force:
        raise EvaluateError(f"{out_dir} already holds an evaluation ({', '.join(held)}); pass --force to "
                            f"replace it or --out DIR to write elsewhere")
    device = resolve_device(config.device)
    ckpt, restored = load_for_inference(config.checkpoint, device)
    aux_names = tuple(restored.aux_scaler.names) if restored.aux_scaler is not None else ()
    dataset = H5Images(list(config.data), split=None if config.split == ALL else config.split, aux=aux_names)
    files = ", ".join(str(p) for p in config.data)
    check_channels(restored.channels, dataset.channels, files)
    if len(dataset) == 0:
        raise EvaluateError(f"split {config.split!r} of {files} has no rows; pick another --split")
    out, knn_pred, knn_block = predict_split(config, dataset, restored, device, progress=progress, stop=stop)
    pred, true = out["pred"], out["true"]                       # (N,) GeV each, in split order
    stats = dataset.stats
    train_mean = float(stats["m_mean"])  # the constant predictor: the train split's mean mass (GeV)
    # Bins over the train mass range, widened to hold every evaluated row.
    lo = min(float(stats.get("m_min", true.min())), float(true.min()))
    hi = max(float(stats.get("m_max", true.max())), float(true.max()))
    edges = mass_edges(lo, hi if hi > lo else lo + 1.0, config.n_bins)
    model_metrics = regression_metrics(pred, true)
    const_metrics = constant_baseline(train_mean, true)
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
        "knn": knn_block,
        "mae_ratio_knn": (model_metrics["mae"] / knn_block["mae"]
                          if knn_pred is not None and knn_block["mae"] > 0 else None),
        "resolution": resolution_report(out, _label(dataset, "pt", out["index"]), edges),
    }
    if stop is not None:
        stop.check()
    bins = bin_table(pred, true, train_mean, edges, knn_pred, q16=out.get("q16"), q84=out.get("q84"))
    return write_evaluation(report, out_dir, pred, true, edges, bins)


def _label(dataset: H5Images, name: str, positions: np.ndarray) -> np.ndarray | None:
    """/labels/<name> at split positions, float64; None when the files have no such label."""
    try:
        return np.asarray(dataset.label(name), dtype=np.float64)[positions]
    except LayoutError:
        return None


def predict_split(config: EvaluateConfig, dataset: H5Images, restored, device, *, progress: bool,
                  stop) -> tuple[dict, np.ndarray | None, dict]:
    """(engine.predict's dict over the split: pred, true, index[, q16, q84], in split order; the kNN
    baseline's pred (N,) or None; its metrics block). The kNN needs every row's pixel mass, taken from the
    same pass over the images."""
    loader = make_loader(dataset, batch_size=config.batch_size, shuffle=False, seed=0, workers=config.workers)
    skip = knn_skip_reason(config, dataset.channels)
    if skip is None:
        eval_eta, eta_source, eval_pt = _jet_labels(dataset)
        eval_mass = np.full(len(dataset), np.nan)
        loader = tap = PixelMassTap(loader, dataset.channels, eval_eta, eval_mass)
    out = engine.predict(restored.model, polled(loader, stop), normalizer=restored.normalizer,
                         target=restored.target, aux_scaler=restored.aux_scaler, device=device,
                         amp=config.amp, progress=progress, tta=config.tta)
    pred, true = out["pred"], out["true"]  # (N,) GeV each
    if not np.all(np.isfinite(pred)):
        raise EvaluateError(f"{int((~np.isfinite(pred)).sum())} of {pred.size} predictions of "
                            f"{config.checkpoint} are NaN or infinite: the checkpoint is broken")
    if skip is not None:
        return out, None, {"skipped": skip, "k": config.knn}
    order = out["index"]  # (N,) split position of each prediction
    knn_pred, knn_block = knn_baseline(config, eval_mass[order], None if eval_pt is None else eval_pt[order],
                                       true, eta_source)
    knn_block["seconds_eval_pixel_mass"] = tap.seconds
    return out, knn_pred, knn_block


def write_evaluation(report: dict, out_dir: Path, pred: np.ndarray, true: np.ndarray, edges: np.ndarray,
                     bins: pd.DataFrame) -> dict:
    """Plots, bins.csv, then metrics.json last (each atomically): a folder with metrics.json is complete.
    Returns the report as written (strict JSON values)."""
    split, checkpoint = report["split"], report["config"]["checkpoint"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # --force: the old metrics.json goes first; it must never sit beside new plots as if it were theirs
        (out_dir / "metrics.json").unlink(missing_ok=True)
        label = f"{split}, {Path(checkpoint).name}"
        plots = plot_predictions(pred, true, out_dir, split, edges=edges, label=label)
        if report["resolution"]["quantiles"]:
            plots += plot_resolution(report["resolution"], bins.to_dict(orient="records"), out_dir, split,
                                     label=label)
        atomic_write_text(out_dir / "bins.csv", bins.to_csv(index=False, float_format="%.6g"))
        report = to_plain({**report, "bins": bins.to_dict(orient="records"), "plots": [p.name for p in plots],
                           "out_dir": str(out_dir)}, json=True)
        atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    except OSError as exc:  # a full disk, a vanished folder: one line, and metrics.json stays absent
        raise EvaluateError(f"{out_dir}: writing the evaluation failed ({exc.strerror or exc}); "
                            "no metrics.json was written") from None
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
    """The model's metrics beside the constant predictor's and the kNN baseline's, overall and per true-mass
    bin, as text."""
    m, c, k = report["model"], report["constant"], report.get("knn") or {}
    has_knn = k.get("mae") is not None
    files = ", ".join(Path(d["path"]).name for d in report["data"])
    lines = [f"{Path(report['checkpoint']['path']).name} on {report['split']} of {files}: {m['n']} rows",
             f"{'':14s}{'model':>10s}  {'constant':>10s}  {'kNN':>10s}"]
    for key, label, unit in (("mae", "MAE", " [GeV]"), ("rmse", "RMSE", " [GeV]"), ("mre", "MRE", ""),
                             ("bias", "bias", " [GeV]"), ("resolution", "resolution", "")):
        knn = format(k[key], "10.4g") if has_knn else format("-", ">10s")
        lines.append(f"{label + unit:14s}{m[key]:10.4g}  {c[key]:10.4g}  {knn}")
    ratios = []
    if report.get("mae_ratio") is not None:
        ratios.append(f"MAE model / constant = {report['mae_ratio']:.3f}")
    if report.get("mae_ratio_knn") is not None:
        ratios.append(f"MAE model / kNN = {report['mae_ratio_knn']:.3f}")
    if ratios:
        lines.append(", ".join(ratios))
    lines.append(f"constant = train mean {c['value']:.2f} GeV")
    if has_knn:
        lines.append(f"kNN = mean mass of the {k['k_used']} nearest of {k['train_rows']} train rows in "
                     f"({', '.join(k['features'])});")
        lines.append(f"      pixel mass of {'+'.join(k['channels'])}, eta_jet from {k['eta_source']}")
        if k.get("note"):
            lines.append(f"kNN note: {k['note']}")
    else:
        lines.append(f"kNN baseline {k.get('skipped') or 'not run'}")
    lines.append("per true-mass bin [GeV]:")
    lines.append(f"{'lo':>8s} {'hi':>8s} {'n':>7s} {'MAE':>8s} {'MAE const':>10s}"
                 + (f" {'MAE kNN':>8s}" if has_knn else "")
                 + f" {'bias':>8s} {'response':>9s} {'resolution':>10s}")

    def f(v, spec):
        return format(v, spec) if v is not None else format("-", spec.split(".")[0].rstrip("f"))
    for b in report["bins"]:
        lines.append(f"{b['lo']:8.1f} {b['hi']:8.1f} {b['n']:7d} {f(b['mae'], '8.2f')} "
                     f"{f(b['mae_const'], '10.2f')}" + (f" {f(b['mae_knn'], '8.2f')}" if has_knn else "")
                     + f" {f(b['bias'], '8.2f')} {f(b['response'], '9.3f')} {f(b['resolution'], '10.3f')}")
    lines += format_resolution(report["resolution"])
    lines.append(f"wrote metrics.json, bins.csv and {len(report['plots'])} plots to {report['out_dir']}")
    return "\n".join(lines)


@command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("data", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--split", default="test", show_default=True, type=click.Choice([*SPLITS, ALL]),
              help="Which rows to evaluate on ('all' = every row).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Output folder [default: eval_<split>/ beside the checkpoint].")
@batch_size_option(256)
@device_option
@amp_option
@workers_option("DataLoader workers.")
@click.option("--bins", "n_bins", default=10, show_default=True, type=click.IntRange(min=1),
              help="Number of true-mass bins in the table and plots.")
@click.option("--max-mae-ratio", type=float, default=None,
              help="Exit non-zero (after writing everything) if MAE model / constant predictor "
                   "is above this.")
@force_option("Replace an evaluation already in the output folder.")
@click.option("--knn", default=30, show_default=True, type=click.IntRange(min=0),
              help="Neighbours of the physics baseline: the mean mass of the K train jets nearest in "
                   "(invariant mass of the ECAL+HCAL pixels, each a massless particle; pT). 0 disables it.")
@click.option("--knn-train-rows", default=20_000, show_default=True, type=click.IntRange(min=1),
              help="Fit the baseline on a seeded random subsample of at most this many train rows (read "
                   "separately, calorimeter channels only).")
@click.option("--tta", is_flag=True,
              help="Average the model over the four eta/phi flips of each image (4x the compute).")
def main(checkpoint, data, split, out, batch_size, device, amp, workers, n_bins, max_mae_ratio, force, knn,
         knn_train_rows, tta):
    """Evaluate CHECKPOINT on a split of DATA.h5 (several files = one data set), beside a constant and a
    kNN physics baseline."""
    config = EvaluateConfig(checkpoint=checkpoint, data=list(data), split=split, out=out,
                            batch_size=batch_size, device=device, amp=amp, workers=workers, n_bins=n_bins,
                            max_mae_ratio=max_mae_ratio, force=force, knn=knn, knn_train_rows=knn_train_rows,
                            tta=tta)
    outcome = "no metrics.json was written (it is written last)"
    with exit_on_interrupt(f"evaluation of {checkpoint}", outcome), stop_on_signals() as stop:
        with user_errors():
            report = evaluate(config, progress=sys.stderr.isatty(), stop=stop)
            click.echo(format_report(report))
            check_bound(report, max_mae_ratio)


if __name__ == "__main__":
    main()
