"""Plots of a training run and of predictions, as PNG files (matplotlib Agg; no display needed).

    plot_history("runs/x/metrics.csv", "runs/x/loss.png")
    plot_predictions(pred, true, "runs/x/eval_test", "test")   # -> [.../test_pred_vs_true.png, ...]

Figures are built with `matplotlib.figure.Figure` directly (no pyplot state, no backend switch) and
saved to a temp file beside the target that is then renamed into place.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from massreg.metrics import binned_metrics, mass_edges

DPI = 110

# metrics.csv column names accepted for each curve, first present wins (train.py writes the first).
HISTORY_COLUMNS = {
    "epoch": ("epoch",),
    "train_loss": ("train_loss",),
    "val_loss": ("val_loss",),
    "val_mae": ("val_mae", "val_mae_gev"),
}


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _column(df: pd.DataFrame, key: str) -> str | None:
    return next((c for c in HISTORY_COLUMNS[key] if c in df.columns), None)


def plot_history(metrics_csv_or_df, out_path) -> Path:
    """Train and val loss against epoch (log scale when positive) and val MAE in GeV on a second panel."""
    df = metrics_csv_or_df if isinstance(metrics_csv_or_df, pd.DataFrame) else pd.read_csv(metrics_csv_or_df)
    if df.empty:
        raise ValueError(
            f"{metrics_csv_or_df if not isinstance(metrics_csv_or_df, pd.DataFrame) else 'history'}"
            " has no rows: train at least one epoch before plotting")
    epoch_col = _column(df, "epoch")
    epochs = df[epoch_col].to_numpy() if epoch_col else np.arange(1, len(df) + 1)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_mae = fig.subplots(1, 2)
    losses = []
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        col = _column(df, key)
        if col:
            ax_loss.plot(epochs, df[col], marker="o", ms=3, label=label)
            losses.append(df[col].to_numpy(dtype=float))
    if losses and all(np.all(v[np.isfinite(v)] > 0) for v in losses):
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="epoch", ylabel="loss (standardised units)", title="loss")
    if losses:
        ax_loss.legend()
    col = _column(df, "val_mae")
    if col:
        ax_mae.plot(epochs, df[col], marker="o", ms=3, color="C2", label="val")
        best = int(np.nanargmin(df[col].to_numpy(dtype=float)))
        ax_mae.axhline(df[col].iloc[best], color="0.6", ls=":", label=f"best {df[col].iloc[best]:.1f} GeV")
        ax_mae.legend()
    ax_mae.set(xlabel="epoch", ylabel="MAE [GeV]", title="validation mean absolute error")
    for ax in (ax_loss, ax_mae):
        ax.grid(alpha=0.3)
    return save_figure(fig, out_path)


def _name(prefix: str, stem: str) -> str:
    return f"{prefix}_{stem}.png" if prefix else f"{stem}.png"


def plot_predictions(pred, true, out_dir, prefix: str = "", *, edges=None, label: str = "") -> list[Path]:
    """Three PNGs in out_dir, named `<prefix>_<stem>.png`; returns their paths:

    pred_vs_true          2-D histogram of predicted against true mass with the diagonal
    residuals             distribution of pred - true (GeV), mean and std in the legend
    response_resolution   median(pred / true) and IQR/1.349 of (pred - true)/true per true-mass bin

    pred, true: 1-D arrays in GeV. edges: true-mass bin edges (default 10 equal bins over the range of
    true). label: a line for the titles (e.g. the split and the model).
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.ndim != 1 or pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must be non-empty 1-D arrays of one shape")
    out_dir = Path(out_dir)
    if edges is None:
        lo, hi = float(true.min()), float(true.max())
        edges = mass_edges(lo, hi if hi > lo else lo + 1.0, 10)
    edges = np.asarray(edges, dtype=np.float64)
    suffix = f" ({label})" if label else ""
    return [save_figure(figure_pred_vs_true(pred, true, suffix), out_dir / _name(prefix, "pred_vs_true")),
            save_figure(figure_residuals(pred - true, suffix), out_dir / _name(prefix, "residuals")),
            save_figure(figure_response(binned_metrics(pred, true, edges), suffix),
                        out_dir / _name(prefix, "response_resolution"))]


def figure_pred_vs_true(pred: np.ndarray, true: np.ndarray, suffix: str) -> Figure:
    """Predicted against true: where the model is confused, and whether it hugs the mean."""
    fig = Figure(figsize=(5.6, 5), layout="constrained")
    ax = fig.subplots()
    # The range covers every true mass and the central 99.8 % of predictions, so that a few wild
    # predictions do not squeeze the picture; how many fall outside is said in the legend.
    p_lo, p_hi = np.percentile(pred, [0.1, 99.9])
    lo, hi = float(min(p_lo, true.min())), float(max(p_hi, true.max()))
    span = (hi - lo) or 1.0
    rng = [lo - 0.02 * span, hi + 0.02 * span]
    outside = int(np.count_nonzero((pred < rng[0]) | (pred > rng[1])))
    bins = int(np.clip(1.5 * np.sqrt(pred.size), 20, 80))  # fewer, wider cells for a small test split
    _, _, _, im = ax.hist2d(true, pred, bins=bins, range=[rng, rng], cmin=1, norm=LogNorm(), cmap="viridis")
    cbar = fig.colorbar(im, ax=ax, label="rows")
    cbar.ax.yaxis.set_major_formatter(LogFormatter())  # plain "2", "30", not "2 x 10^0"
    cbar.ax.yaxis.set_minor_formatter(LogFormatter())
    ax.plot(rng, rng, color="red", lw=1, ls="--",
            label="pred = true" + (f"\n{outside} predictions off the plot" if outside else ""))
    ax.set(xlabel="true mass [GeV]", ylabel="predicted mass [GeV]", xlim=rng, ylim=rng,
           title=f"predicted vs true mass{suffix}")
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    return fig


def figure_residuals(r: np.ndarray, suffix: str) -> Figure:
    """Residuals pred - true (GeV): the bias is the offset of the peak, the width the absolute resolution."""
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    r_lo, r_hi = np.percentile(r, [0.1, 99.9])  # mean and std are of all rows; the picture of 99.8 %
    ax.hist(r, bins=80, range=(r_lo, r_hi) if r_hi > r_lo else None, color="C0", alpha=0.8,
            label=f"mean {r.mean():.2f} GeV\nstd {r.std():.2f} GeV\nn = {r.size}")
    ax.axvline(0.0, color="red", lw=1, ls="--")
    ax.set(xlabel="predicted - true mass [GeV]", ylabel="rows", title=f"residuals{suffix}")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def figure_response(df, suffix: str) -> Figure:
    """Response and resolution per true-mass bin (a binned_metrics table): a model that predicts the mean has
    a response falling from > 1 to < 1 across the range."""
    centres = 0.5 * (df["lo"] + df["hi"]).to_numpy()
    half = 0.5 * (df["hi"] - df["lo"]).to_numpy()
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax_resp, ax_res = fig.subplots(2, 1, sharex=True)
    ax_resp.errorbar(centres, df["response"], xerr=half, fmt="o", ms=4, capsize=0)
    ax_resp.axhline(1.0, color="red", lw=1, ls="--")
    ax_resp.set(ylabel="response: median(pred / true)", title=f"response and resolution{suffix}")
    ax_res.errorbar(centres, df["resolution"], xerr=half, fmt="o", ms=4, capsize=0, color="C1")
    ax_res.set(xlabel="true mass [GeV]", ylabel="resolution: IQR/1.349 of (pred-true)/true")
    ax_res.set_ylim(bottom=0)
    for ax in (ax_resp, ax_res):
        ax.grid(alpha=0.3)
    return fig


def plot_resolution(block: dict, true_bins: list[dict], out_dir, prefix: str = "", *,
                    label: str = "") -> list[Path]:
    """For a model with quantiles (massreg.resolution.resolution_report's block), two PNGs:

    resolution_predicted_vs_measured   measured against predicted relative resolution, per quartile of the
                                       predicted one, with the diagonal (points on it: honest widths)
    coverage                           coverage of [q16, q84] per bin of predicted mass, pT and true mass,
                                       with 0.68 and the 0.58-0.78 band
    true_bins: the true-mass bin rows with coverage (reported, not judged: they lean at the edges)."""
    out_dir = Path(out_dir)
    suffix = f" ({label})" if label else ""
    q = pd.DataFrame(block["quartiles"])
    fig = Figure(figsize=(5.4, 5), layout="constrained")
    ax = fig.subplots()
    top = 1.1 * float(np.nanmax([q["predicted"].max(), q["measured"].max()]))
    ax.plot([0, top], [0, top], color="red", lw=1, ls="--", label="measured = predicted")
    ax.plot(q["predicted"], q["measured"], "o-", ms=6, label="quartiles of predicted res / m_pred")
    ax.set(xlabel="predicted relative resolution: median (q84 - q16) / 2 / m_pred",
           ylabel="measured: IQR/1.349 of (pred - true) / true", xlim=(0, top), ylim=(0, top),
           title=f"per-jet resolution{suffix}")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    paths = [save_figure(fig, out_dir / _name(prefix, "resolution_predicted_vs_measured"))]

    panels = [(key, title) for key, title in (("by_predicted_mass", "predicted mass [GeV]"),
                                              ("by_pt", "pT [GeV]")) if key in block]
    panels.append(("true", "true mass [GeV] (reported, not judged)"))
    fig = Figure(figsize=(6, 2.4 * len(panels)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1))
    for ax, (key, title) in zip(axes, panels):
        df = pd.DataFrame(true_bins if key == "true" else block[key])
        centres, half = 0.5 * (df["lo"] + df["hi"]), 0.5 * (df["hi"] - df["lo"])
        ax.axhspan(0.58, 0.78, color="green", alpha=0.12, label="0.58-0.78")
        ax.axhline(0.68, color="green", lw=1)
        ax.errorbar(centres, df["coverage"], xerr=half, fmt="o", ms=4, capsize=0)
        ax.set(xlabel=title, ylabel="coverage of [q16, q84]", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_title(f"coverage{suffix}")
    axes[0].legend(loc="lower right")
    paths.append(save_figure(fig, out_dir / _name(prefix, "coverage")))
    return paths
