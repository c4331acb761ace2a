"""DistributedDataParallel on CPU (gloo): a 2-process torchrun of the trainer against a single-process
oracle."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from massreg import checkpoint as ck

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_layout_file  # noqa: E402

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
    from massreg.dataset import H5Images
    n_train = len(H5Images(data, "train"))
    # each rank takes ceil(n_train / 2) rows (DistributedSampler), batch 4; the gradients are averaged
    assert last["step"] == -(-(-(-n_train // 2)) // 4)

    # oracle: a single-process evaluation of the saved checkpoint over the whole val split
    r = ck.restore(ck.load_checkpoint(run / "best_val_loss.pt"), "cpu")
    val = H5Images(data, "val", aux=tuple(r.aux_scaler.names) if r.aux_scaler else ())
    batch = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        aux = r.aux_scaler.encode(batch["aux"]) if r.aux_scaler else None
        z = r.model(r.normalizer(batch["images"]), aux)              # (B, 3) with quantiles: the point is 1
        pred = r.target.decode((z[:, 1] if z.dim() == 2 else z).double().numpy())
    true = batch["m"].double().numpy()
    rel = (pred - true) / true
    row = metrics.iloc[0]
    assert len(val) % 2 == 1  # odd: DistributedSampler pads one rank with a duplicate that must be dropped
    assert np.mean(np.abs(pred - true)) == pytest.approx(row["val_mae"], rel=1e-5)
    assert np.mean(np.abs(rel)) == pytest.approx(row["val_mre"], rel=1e-5)
    q75, q25 = np.percentile(rel, [75, 25])
    assert (q75 - q25) / 1.349 == pytest.approx(row["val_resolution"], rel=1e-4)


def rank_process(parent: int, rank: int, timeout: float = 60) -> int:
    """pid of the torchrun worker of `rank` below `parent` (found by its RANK environment variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in Path("/proc").iterdir():
            try:
                if not p.name.isdigit() or parent not in ancestors(int(p.name)):
                    continue
                env = dict(x.split("=", 1) for x in (p / "environ").read_text().split("\0") if "=" in x)
            except OSError:
                continue
            if env.get("RANK") == str(rank) and b"massreg.train" in (p / "cmdline").read_bytes():
                return int(p.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process below {parent}")


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(tmp_path):
    """SIGTERM to rank 1 only: both ranks finish the step they are in, agree to stop there, last.pt holds
    both ranks' share of the epoch; a 2-process --resume then equals an uninterrupted 2-process run."""
    data = write_layout_file(tmp_path / "top.h5", n=48)
    opts = ["--model", "tiny", "--batch-size", 4, "--device", "cpu", "--schedule", "constant", "--seed", 5]
    run = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "massreg.train", data, *opts, "--epochs", 500, "--run-dir", run]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        rank1 = rank_process(proc.pid, 1)
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(rank1, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert (out + err).count("interrupted by SIGTERM") == 1, (out + err)[-3000:]   # rank 0 says it
    # 128 + SIGTERM; a rank still shutting down when another has exited is stopped by torchrun itself (-15)
    codes = [ln.split(":")[1].split()[0] for ln in err.splitlines() if ln.strip().startswith("exitcode")]
    assert "143" in codes and set(codes) <= {"143", "-15"}, err[-3000:]
    last = ck.load_checkpoint(run / "last.pt")
    progress = last["epoch_progress"]
    stopped_epoch = last["epoch"] + 1
    if progress is not None:          # the signal landed inside an epoch (else: during its checkpoint)
        assert len(progress["counts"]) == 2 and progress["counts"][0] == progress["counts"][1] > 0
        assert last["step"] == last["epoch"] * last["scheduler"]["steps_per_epoch"] + progress["batches"]
    else:
        stopped_epoch = last["epoch"]

    resumed = torchrun(["--resume", run, "--epochs", stopped_epoch])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torchrun([data, *opts, "--epochs", stopped_epoch, "--run-dir", tmp_path / "straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = (ck.load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "stopped"))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == stopped_epoch
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    cols = ["epoch", "train_loss", "val_loss", "val_mae", "val_mre", "val_resolution", "lr"]
    pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / r / "metrics.csv")[cols]
                                    for r in ("straight", "stopped")), check_exact=True)
