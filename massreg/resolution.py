"""What evaluate reports of a model's per-jet resolution, and where an analysis looks: in bins of what it
observes (the predicted mass, pT), not only of the true mass.

    block = resolution_report(out, pt, edges)      # out: engine.predict's dict (pred, true[, q16, q84]) GeV
    lines = format_resolution(block)               # the text evaluate prints

Judged (0.68 and 1 are right; docs/evaluation.md): the coverage of [q16, q84] overall, in bins of predicted
mass and in pT quartiles; the pull width; measured against predicted resolution in quartiles of the
predicted relative resolution. Bins of true mass are reported, not judged: at the edges of a bounded mass
prior an honest estimate leans inward, and the coverage there is expected to fall.
"""
from __future__ import annotations

import numpy as np
import torch

from massreg.heads import CALIBRATION_JETS_PER_KNOT, CALIBRATION_KNOTS
from massreg.metrics import binned_metrics, quantile_metrics, resolution_quantiles
from massreg.optim import QUANTILES

PT_BINS = 4          # pT: quartiles of the evaluated jets


def resolution_report(out: dict, pt: np.ndarray | None, edges: np.ndarray) -> dict:
    """Response and resolution in bins of predicted mass (`edges`, as the true-mass bins) and of pT, and
    for a model with quantiles the coverage, pull width and resolution quartiles. JSON-ready lists."""
    pred, true = out["pred"], out["true"]
    q16, q84 = out.get("q16"), out.get("q84")
    block: dict = {"quantiles": q16 is not None}
    tables = {"by_predicted_mass": binned_metrics(pred, true, edges, by=pred, q16=q16, q84=q84)}
    if pt is not None:
        pt_edges = np.quantile(pt, np.linspace(0, 1, PT_BINS + 1))
        if np.all(np.diff(pt_edges) > 0):
            tables["by_pt"] = binned_metrics(pred, true, pt_edges, by=pt, q16=q16, q84=q84)
    if q16 is not None:
        block.update(quantile_metrics(pred, true, q16, q84))
        tables["quartiles"] = resolution_quantiles(pred, true, q16, q84, n=4)
    block.update({k: v.to_dict(orient="records") for k, v in tables.items()})
    return block


def format_resolution(block: dict) -> list[str]:
    """The resolution section of evaluate's printout."""
    lines = []
    if block["quantiles"]:
        lines.append(f"per-jet resolution res = (q84 - q16) / 2: coverage of [q16, q84] "
                     f"{block['coverage']:.3f} (0.68 is right), pull width {block['pull_width']:.3f} "
                     f"(1 is right)")
        lines.append("quartiles of predicted relative resolution res / m_pred:")
        lines.append(f"{'quartile':>9s} {'predicted':>10s} {'measured':>9s} {'ratio':>6s} {'coverage':>9s}")
        for q in block["quartiles"]:
            lines.append(f"{q['quantile']:9d} {q['predicted']:10.3f} {q['measured']:9.3f} {q['ratio']:6.2f} "
                         f"{q['coverage']:9.3f}")
    for key, label, unit in (("by_predicted_mass", "predicted mass", "GeV"), ("by_pt", "pT", "GeV")):
        if key in block:
            lines += _bin_lines(block[key], label, unit, block["quantiles"])
    return lines


def _bin_lines(rows: list[dict], label: str, unit: str, quantiles: bool) -> list[str]:
    head = f"per bin of {label} [{unit}]:"
    lines = [head, f"{'lo':>8s} {'hi':>8s} {'n':>7s} {'MAE':>8s} {'response':>9s} {'resolution':>10s}"
             + (f" {'coverage':>9s} {'pull':>6s}" if quantiles else "")]

    def f(v, spec):
        return format(v, spec) if v is not None and np.isfinite(v) else format("-", ">" + spec.split(".")[0])
    for r in rows:
        lines.append(f"{r['lo']:8.1f} {r['hi']:8.1f} {r['n']:7d} {f(r['mae'], '8.2f')} "
                     f"{f(r['response'], '9.3f')} {f(r['resolution'], '10.3f')}"
                     + (f" {f(r['coverage'], '9.3f')} {f(r['pull_width'], '6.2f')}" if quantiles else ""))
    return lines


@torch.no_grad()
def calibrate(head: torch.nn.Module, out: dict, target, knots: int | None = None) -> None:
    """Fit a QuantileHead's width factors on the val predictions, as a function of the predicted mass, so that
    16 % of the val jets fall below q16 and 16 % above q84 at every mass.

    out: the val predictions (GeV) made with the head's current factors; target: the TargetScaler (z units).
    A jet is below q16 when (pred - true) / (pred - q16) > 1. Taking out the current factor gives that ratio
    for the raw width; its 84th percentile in each of K equal-count groups of predicted z is the factor there,
    at the group's median z (the knot). K: one group per CALIBRATION_JETS_PER_KNOT val jets, 1 to
    CALIBRATION_KNOTS (a 16 % tail needs jets to be estimated), unless `knots` is given (the study compares
    them: benchmarks/study_resolution.py). Under DDP every rank has the gathered predictions, so every rank
    fits the same. Clipped to [0.1, 10]: one odd validation cannot wreck the widths."""
    pred, true = out["pred"], out["true"]                                         # (N,) GeV each
    z = torch.as_tensor((pred - target.mean) / target.std, dtype=torch.float32)   # (N,)
    current = head.factors(z.to(head.calibration.device)).cpu().double().numpy()  # (N, 2)
    below = (pred - true) / np.maximum(pred - out["q16"], 1e-9) * current[:, 0]  # (N,) > 1: under raw q16
    above = (true - pred) / np.maximum(out["q84"] - pred, 1e-9) * current[:, 1]  # (N,) > 1: over raw q84
    k = knots or int(np.clip(len(pred) // CALIBRATION_JETS_PER_KNOT, 1, CALIBRATION_KNOTS))
    order = np.argsort(z.numpy(), kind="stable")
    groups = np.array_split(order, k)                                             # K equal-count groups
    medians = [float(np.median(z.numpy()[g])) for g in groups]
    values = [[np.quantile(below[g], QUANTILES[1]), np.quantile(above[g], QUANTILES[1])] for g in groups]
    head.set_calibration(torch.tensor(medians), torch.as_tensor(np.clip(values, 0.1, 10.0)))
