"""DistributedDataParallel on CPU (gloo): a 2-process torchrun of the trainer against a single-process
oracle."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from massreg import checkpoint as ck

sys.path.insert(0, str(Path(__file__).parent))
from test_train import write_layout_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(args, nproc=2, timeout=120):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "massreg.train", *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("model", ["tiny", "resnet", "hybrid49"])   # BatchNorm statistics under DDP
def test_two_process_gloo_run_matches_single_process_evaluation(tmp_path, model):
    data = write_layout_file(tmp_path / "top.h5", n=48)
    run = tmp_path / "run"
    proc = torchrun([data, "--model", model, "--epochs", 1, "--batch-size", 4, "--device", "cpu",
                     "--run-dir", run])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # one consistent run directory, written by rank 0 only
    assert sorted(p.name for p in run.iterdir()) == ["best_mre.pt", "best_val_loss.pt", "config.json",
                                                     "last.pt", "metrics.csv", "plots"]
    assert proc.stdout.count("epoch 1/1") == 1  # one summary line, not one per rank
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1]
    last = ck.load_checkpoint(run / "last.pt")
    assert len(last["rng"]["ranks"]) == 2 and not any(k.startswith("module.") for k in last["model"])
    from massreg.data import H5Images
    n_train = len(H5Images(data, "train"))
    # each rank takes ceil(n_train / 2) rows (DistributedSampler), batch 4; the gradients are averaged
    assert last["step"] == -(-(-(-n_train // 2)) // 4)

    # oracle: a single-process evaluation of the saved checkpoint over the whole val split
    r = ck.restore(ck.load_checkpoint(run / "best_val_loss.pt"), "cpu")
    val = H5Images(data, "val", aux=tuple(r.aux_scaler.names) if r.aux_scaler else ())
    batch = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        aux = r.aux_scaler.encode(batch["aux"]) if r.aux_scaler else None
        pred = r.target.decode(r.model(r.normalizer(batch["images"]), aux).double().numpy())
    true = batch["m"].double().numpy()
    rel = (pred - true) / true
    row = metrics.iloc[0]
    assert len(val) % 2 == 1  # odd: DistributedSampler pads one rank with a duplicate that must be dropped
    assert np.mean(np.abs(pred - true)) == pytest.approx(row["val_mae"], rel=1e-5)
    assert np.mean(np.abs(rel)) == pytest.approx(row["val_mre"], rel=1e-5)
    q75, q25 = np.percentile(rel, [75, 25])
    assert (q75 - q25) / 1.349 == pytest.approx(row["val_resolution"], rel=1e-4)
