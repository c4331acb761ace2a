"""30-nearest-neighbour regression of m on the invariant mass of the ECAL + HCAL pixels (the method of the
pipeline.synth_physics docstring): 4,096 top events, seed 5, simulated in chunks of 256 (chunk_rng(5, 0, i), as
`python -m pipeline.synth DIR --rows 4096 --seed 5` writes them); the pixel mass of each event as the one
feature; kNN (k=30, mean of the neighbours' m) fitted on one half, scored on the other half, and the other way
round (2-fold); constant = the training half's mean."""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_synth import pixel_mass
from pipeline.synth import simulate, chunk_rng

def knn_predict(x_tr, y_tr, x_te, k=30):
    d = np.abs(x_te[:, None] - x_tr[None, :])                 # (n_te, n_tr)
    idx = np.argpartition(d, k, axis=1)[:, :k]
    return y_tr[idx].mean(1)

t = time.perf_counter()
mp, m, pt = [], [], []
for i in range(16):
    ev = simulate("top", 256, chunk_rng(5, 0, i))
    mp.append(pixel_mass(ev["X_jet"], ev["ieta"])); m.append(ev["m"]); pt.append(ev["pt"])
mp, m, pt = map(np.concatenate, (mp, m, pt))
fits = 2 * m / pt < 1
print(f"simulated + pixel mass in {time.perf_counter() - t:.0f} s; fits {fits.mean():.2f}; Pearson fits "
      f"{np.corrcoef(mp[fits], m[fits])[0, 1]:.2f} all {np.corrcoef(mp, m)[0, 1]:.2f}")
n = len(m); h = n // 2
maes, consts = [], []
for tr, te in ((slice(0, h), slice(h, n)), (slice(h, n), slice(0, h))):
    pred = knn_predict(mp[tr], m[tr], mp[te])
    maes.append(np.abs(pred - m[te]).mean()); consts.append(np.abs(m[tr].mean() - m[te]).mean())
print(f"2-fold kNN-30 MAE {np.mean(maes):.1f} GeV (folds {maes[0]:.1f}, {maes[1]:.1f}); "
      f"constant {np.mean(consts):.1f}")
perm = np.random.default_rng(0).permutation(n)
tr, te = perm[: int(0.8 * n)], perm[int(0.8 * n):]
pred = knn_predict(mp[tr], m[tr], mp[te])
print(f"80/20 random split: kNN MAE {np.abs(pred - m[te]).mean():.1f}, "
      f"constant {np.abs(m[tr].mean() - m[te]).mean():.1f}")
