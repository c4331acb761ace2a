"""Sample weights that flatten a training sample's (mass, pT) spectrum (`massreg.train --reweight flat`).

    w = flat_weights(m, pt)        # (N,) float64, mean 1: rows in crowded (m, pT) cells weigh less

The real top data are flat in mass and pT by construction, but a user's mix of samples need not be: a falling
mass spectrum teaches a regressor that high masses are rare, and its predictions lean low there. Weighting
each jet by the inverse population of its (m, pT) cell makes every cell count alike in the loss (weaver's
`reweight_method: flat`, which resamples instead; CMS's AK8 mass regression trains on a flattened spectrum).
Weights are clipped at `max_weight` times their mean, so a nearly empty cell cannot dominate a batch, then
normalised to mean 1, so the loss keeps its scale and the learning rate its meaning.
"""
from __future__ import annotations

import numpy as np

BINS = (20, 20)         # equal-width (mass, pT) cells over the sample's range
MAX_WEIGHT = 10.0       # times the mean weight


def flat_weights(mass, pt, *, bins: tuple[int, int] = BINS, max_weight: float = MAX_WEIGHT) -> np.ndarray:
    """(N,) weights, mean 1, proportional to 1 / (rows in the row's (mass, pT) cell), clipped at max_weight x
    the mean and normalised again."""
    mass, pt = np.asarray(mass, dtype=np.float64), np.asarray(pt, dtype=np.float64)
    if mass.ndim != 1 or mass.shape != pt.shape or mass.size == 0:
        raise ValueError(f"mass {mass.shape} and pt {pt.shape} must be non-empty 1-D arrays of one shape")
    if not (np.all(np.isfinite(mass)) and np.all(np.isfinite(pt))):
        raise ValueError("mass and pt must be finite to be binned")
    cells = [_cell(x, n) for x, n in ((mass, bins[0]), (pt, bins[1]))]
    flat = cells[0] * bins[1] + cells[1]                                   # (N,) cell of each row
    counts = np.bincount(flat, minlength=bins[0] * bins[1])                # rows per cell
    w = 1.0 / counts[flat]                                                 # (N,)
    w /= w.mean()
    w = np.minimum(w, max_weight)
    return w / w.mean()


def _cell(x: np.ndarray, n: int) -> np.ndarray:
    """(N,) int cell index in n equal-width bins over [min, max] (the maximum in the last bin)."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.size, dtype=np.int64)
    return np.minimum(((x - lo) / (hi - lo) * n).astype(np.int64), n - 1)


def describe(w: np.ndarray) -> str:
    """'weights 0.31-10.00, effective sample 71 % of 8,354 rows' (Kish: sum(w)^2 / sum(w^2) rows)."""
    ess = w.sum() ** 2 / np.square(w).sum()
    return f"weights {w.min():.2f}-{w.max():.2f}, effective sample {ess / w.size:.0%} of {w.size:,} rows"
