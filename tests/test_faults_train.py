"""Faults of a batch system in training: a stop signal (SIGTERM, SIGUSR1) finishes the step in progress,
writes last.pt at that step and exits 128 + signum; --resume then ends with the same weights, optimizer state
and metrics as an uninterrupted run. A job killed without warning loses at most --checkpoint-every-minutes.
A signal or a full disk during a checkpoint write leaves the previous checkpoint whole, and no temporary."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from massreg import checkpoint as ck
from massreg import engine
from conftest import register_model, run_cli, write_layout_file

REPO = Path(__file__).resolve().parents[1]
REAL_FORWARD, REAL_SAVE = engine.forward, torch.save
QUIET = lambda *a, **k: None  # noqa: E731
COLUMNS = ["epoch", "train_loss", "val_loss", "val_mae", "val_mre", "val_resolution", "lr"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_layout_file(tmp_path_factory.mktemp("data") / "top.h5", n=48)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_file):
    """The uninterrupted oracle: 2 epochs of a small DeepViT with dropout, aux, flips, shuffling."""
    from _pytest.monkeypatch import MonkeyPatch

    from massreg.recipes import build_config

    from massreg.trainer import train

    with MonkeyPatch.context() as mp:
        mp.setattr("massreg.trainer.make_plots", lambda *a, **k: None)
        register_model(mp, "tiny-dropout")
        run = tmp_path_factory.mktemp("straight") / "run"
        train(build_config(**options(data_file), run_dir=str(run)), echo=QUIET)
    return run


def options(data_file, **extra) -> dict:
    return dict(data=(str(data_file),), model="tiny-dropout", batch_size=8, epochs=2, device="cpu", seed=3,
                **extra)


def cli_options(data_file) -> list:
    """options() on the command line."""
    return [data_file, "--model", "tiny-dropout", "--batch-size", 8, "--epochs", 2, "--device", "cpu",
            "--seed", 3]


@pytest.fixture
def trainer(monkeypatch):
    monkeypatch.setattr("massreg.trainer.make_plots", lambda *a, **k: None)   # tested elsewhere; slow
    register_model(monkeypatch, "tiny-dropout")


def at_training_step(monkeypatch, k: int, action) -> None:
    """Run action() during the forward pass of this process's k-th training step (1-based)."""
    real, calls = engine.forward, {"n": 0}

    def forward(model, batch, **kw):
        if model.training:
            calls["n"] += 1
            if calls["n"] == k:
                action()
        return real(model, batch, **kw)

    monkeypatch.setattr(engine, "forward", forward)


def send(signum: int):
    return lambda: os.kill(os.getpid(), signum)


def assert_same_run(a: Path, b: Path) -> None:
    """Same weights (bit for bit), optimizer state, step and metrics.csv (time columns aside)."""
    x, y = ck.load_checkpoint(a / "last.pt"), ck.load_checkpoint(b / "last.pt")
    assert x["epoch"] == y["epoch"] and x["step"] == y["step"]
    assert x["epoch_progress"] is None and y["epoch_progress"] is None
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]), k
    for px, py in zip(x["optimizer"]["state"].values(), y["optimizer"]["state"].values()):
        assert all(torch.equal(px[k], py[k]) for k in px)
    da, db = (pd.read_csv(r / "metrics.csv")[COLUMNS] for r in (a, b))
    pd.testing.assert_frame_equal(da, db, check_exact=True)


def no_temporaries(run: Path) -> None:
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def steps_per_epoch(run: Path) -> int:
    return ck.load_checkpoint(run / "last.pt")["scheduler"]["steps_per_epoch"]


@pytest.mark.parametrize("signum, where", [(signal.SIGTERM, "mid"), (signal.SIGUSR1, "mid"),
                                           (signal.SIGTERM, "last batch")])
def test_signal_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, data_file, straight, trainer,
                                                                  monkeypatch, signum, where):
    from massreg.recipes import build_config
    from massreg.trainer import train

    spe = steps_per_epoch(straight)
    k = spe + 2 if where == "mid" else spe            # epoch 2's 2nd batch, or epoch 1's last
    at_training_step(monkeypatch, k, send(signum))
    run = tmp_path / "run"
    lines = []
    result = train(build_config(**options(data_file), run_dir=str(run)), echo=lambda m, **kw: lines.append(m))
    assert result["stopped"] == signum
    last = ck.load_checkpoint(run / "last.pt")
    assert last["step"] == k                            # the step in progress was finished, then saved
    assert last["epoch"] == (k - 1) // spe              # completed epochs
    assert last["epoch_progress"]["batches"] == k - last["epoch"] * spe
    assert (run / "metrics.csv").exists() == (last["epoch"] > 0)   # rows of completed epochs only
    if last["epoch"]:
        assert len(pd.read_csv(run / "metrics.csv")) == last["epoch"]
    assert any(f"interrupted by {signal.Signals(signum).name}" in m and f"--resume {run}" in m for m in lines)
    no_temporaries(run)

    monkeypatch.setattr(engine, "forward", REAL_FORWARD)
    resumed = run_cli(["--resume", run])
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(straight, run)


def test_checkpoint_every_minutes_loses_at_most_that_much_to_a_kill(tmp_path, data_file, straight, trainer,
                                                                     monkeypatch):
    """A job killed without warning (here: an exception in the middle of a step) resumes from the last timed
    mid-epoch checkpoint and still ends as an uninterrupted run."""
    from massreg.recipes import build_config
    from massreg.trainer import train

    spe = steps_per_epoch(straight)
    killed_at = spe + 3                               # epoch 2, its 3rd step: 2 steps of it saved before

    def kill():
        raise RuntimeError("killed")

    at_training_step(monkeypatch, killed_at, kill)
    run = tmp_path / "run"
    config = build_config(**options(data_file), run_dir=str(run), checkpoint_every_minutes=1e-6)  # each step
    with pytest.raises(RuntimeError, match="killed"):
        train(config, echo=QUIET)
    last = ck.load_checkpoint(run / "last.pt")
    assert last["step"] == killed_at - 1 and last["epoch"] == 1
    assert last["epoch_progress"]["batches"] == 2
    monkeypatch.setattr(engine, "forward", REAL_FORWARD)
    resumed = run_cli(["--resume", run])
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(straight, run)


def patch_save(monkeypatch, action, *, on_call: int):
    """Run action() inside the on_call-th torch.save of a checkpoint (1-based), then save."""
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            action()
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_signal_during_the_epoch_checkpoint_write_stops_after_it(tmp_path, data_file, straight, trainer,
                                                                  monkeypatch):
    """A SIGTERM while epoch 1's last.pt is written: the write completes (nothing half-written), the run
    stops at the epoch's end, and resumes to the uninterrupted result."""
    from massreg.recipes import build_config
    from massreg.trainer import train

    patch_save(monkeypatch, send(signal.SIGTERM), on_call=1)          # epoch 1's last.pt
    run = tmp_path / "run"
    result = train(build_config(**options(data_file), run_dir=str(run)), echo=QUIET)
    assert result["stopped"] == signal.SIGTERM and result["epoch"] == 1
    last = ck.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and last["epoch_progress"] is None
    assert (run / "best_val_loss.pt").exists() and len(pd.read_csv(run / "metrics.csv")) == 1
    no_temporaries(run)
    monkeypatch.setattr(torch, "save", REAL_SAVE)
    assert run_cli(["--resume", run]).exit_code == 0
    assert_same_run(straight, run)


def test_second_signal_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, data_file, trainer,
                                                                              monkeypatch, straight):
    """SIGTERM mid-epoch 2, then another while its last.pt is being written (a user insisting, or Slurm's
    KILL-timeout): the write is abandoned, the temporary removed, last.pt still epoch 1's, one line."""
    import massreg.stopping as stopping
    from pipeline.signals import StopFlag

    monkeypatch.setattr(stopping, "StopFlag", lambda **kw: StopFlag())   # no 2 s grace for a repeat
    spe = steps_per_epoch(straight)
    at_training_step(monkeypatch, spe + 1, send(signal.SIGTERM))
    # saves in epoch 1: last.pt, best_val_loss.pt, best_mre.pt; the 4th is the mid-epoch last.pt
    patch_save(monkeypatch, send(signal.SIGTERM), on_call=4)
    run = tmp_path / "run"
    result = run_cli([*cli_options(data_file), "--run-dir", run])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and "interrupted by SIGTERM" in errors[0], result.output
    last = ck.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and last["epoch_progress"] is None and last["step"] == spe
    no_temporaries(run)


@pytest.mark.parametrize("every", [None, 1e-6])
def test_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, data_file, trainer, monkeypatch, every):
    """The disk fills while epoch 2's last.pt is written: at the epoch's end, or (saving every step) at its
    first mid-epoch save. One line, exit 1; last.pt is epoch 1's, whole."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if (obj["epoch"] == 2) if every is None else (obj["epoch"] == 1 and obj["epoch_progress"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    timed = [] if every is None else ["--checkpoint-every-minutes", every]
    result = run_cli([*cli_options(data_file), "--run-dir", run, *timed])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and f"could not write {run}/last.pt: No space left on device" in lines[0], lines
    assert f"--resume {run}" in lines[0] and "--lr" not in lines[0]
    last = ck.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and last["epoch_progress"] is None
    no_temporaries(run)


def test_resume_inside_an_epoch_needs_the_same_number_of_processes(tmp_path, data_file, straight, trainer,
                                                                   monkeypatch):
    from massreg.recipes import build_config
    from massreg.trainer import train

    at_training_step(monkeypatch, 2, send(signal.SIGTERM))
    run = tmp_path / "run"
    train(build_config(**options(data_file), run_dir=str(run)), echo=QUIET)
    payload = ck.load_checkpoint(run / "last.pt")
    payload["epoch_progress"] = {"batches": 2, "loss_sums": [1.0, 1.0], "counts": [16, 16]}   # as 2 ranks
    ck.save_checkpoint(run / "last.pt", {k: v for k, v in payload.items() if k not in ("format", "version")})
    result = run_cli(["--resume", run])
    assert result.exit_code == 1
    assert "written inside epoch 1 by 2 process(es); resume it with 2, not 1" in result.output


def _ctrl_c_default() -> None:
    """In the child, before exec: SIGINT's default action, as a terminal's foreground job has it. A shell
    starts background jobs (`make test &`, `nohup ...`) with SIGINT ignored, a child inherits that, and Python
    then installs no KeyboardInterrupt handler: the trainer would rightly ignore the test's Ctrl-C and the
    test would hang (it did, run as `nohup make test &`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_stops_the_cli_and_its_workers(tmp_path, data_file, signum):
    """As Slurm (SIGTERM) or a terminal's Ctrl-C (SIGINT) does it: the signal to every process of the job
    (the trainer and its --workers reader process), from outside. One line, 128 + signum, no process left;
    SIGTERM writes last.pt at the step it reports, Ctrl-C stops at once and leaves the last one whole."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "massreg.train", data_file, "--model", "tiny", "--batch-size", "4",
           "--epochs", "500", "--device", "cpu", "--workers", "1", "--run-dir", run]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, start_new_session=True,
                            preexec_fn=_ctrl_c_default, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, err[-2000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("epoch")]                            # tqdm aside
    assert len(lines) == 1 and lines[0].startswith("Error: training of"), err[-2000:]
    last = ck.load_checkpoint(run / "last.pt")
    if signum == signal.SIGTERM:
        assert "interrupted by SIGTERM inside epoch" in lines[0] or "after epoch" in lines[0], lines[0]
        assert last["step"] == int(lines[0].split("(step ")[1].split(")")[0])
    else:
        assert "interrupted by SIGINT (Ctrl-C); its last.pt" in lines[0], lines[0]
        assert last["epoch_progress"] is None and last["epoch"] >= 1
    no_temporaries(run)
    time.sleep(0.5)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _session(p) == proc.pid]
    assert not left, [(p.name, (p / "cmdline").read_bytes()) for p in left]


def _session(p: Path) -> int | None:
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[4])
    except (OSError, IndexError, ValueError):
        return None


def test_a_repeated_signal_is_the_same_request_for_two_seconds(monkeypatch):
    """torchrun forwards Slurm's SIGTERM to workers Slurm signalled too: that second one must not abort the
    checkpoint; one from a user insisting later does."""
    import pipeline.signals as signals
    from massreg.stopping import StepGate

    now = {"t": 100.0}
    monkeypatch.setattr(signals.time, "monotonic", lambda: now["t"])
    with StepGate() as gate:
        os.kill(os.getpid(), signal.SIGTERM)
        now["t"] += 1.9
        os.kill(os.getpid(), signal.SIGTERM)              # forwarded: the same request
        assert gate.poll() == (True, False) and gate.signum == signal.SIGTERM
        now["t"] += 0.2
        with pytest.raises(KeyboardInterrupt):            # Terminated
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)                                 # the handler runs at the next bytecode


def test_checkpoint_due_after_the_given_minutes():
    clock = {"t": 0.0}
    from massreg.stopping import StepGate

    with StepGate(every_minutes=2, clock=lambda: clock["t"]) as gate:
        clock["t"] = 119.0
        assert gate.poll() == (False, False)
        clock["t"] = 120.0
        assert gate.poll() == (False, True)
        gate.saved()
        assert gate.poll() == (False, False)
