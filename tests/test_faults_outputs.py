"""Faults of a batch system in the commands that write results (evaluate, predict, export): SIGTERM and
SIGHUP take Ctrl-C's path (one line, exit 128 + signum, no output that looks whole), and a failed write
(a full disk) is one line naming the output, with nothing left behind."""
from __future__ import annotations

import errno
import os
import signal

import pytest
from click.testing import CliRunner

from conftest import make_checkpoint, make_file

AUX = ("pt", "ieta")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    data = str(make_file(d / "a.h5", 40, seed=1, source_file="a.parquet"))
    ckpt = str(make_checkpoint(d / "best.pt", [data], aux=AUX))
    return d, data, ckpt


def signal_during(work, signum):
    """`work`, receiving `signum` from outside (as Slurm sends it) as it starts; it goes on, and the command
    must stop at its next poll, before anything is written."""
    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return work(*args, **kwargs)
    return signalled


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line(result, code: int, *needles) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def invoke(main, args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_predict_stopped_by_a_signal_writes_nothing(setup, tmp_path, monkeypatch, signum):
    import massreg.predict as predict

    _, data, ckpt = setup
    monkeypatch.setattr(predict, "counted", signal_during(predict.counted, signum))
    result = invoke(predict.main, [ckpt, data, "--out", tmp_path / "p.csv"])
    one_line(result, 128 + signum, "prediction to", signal.Signals(signum).name)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL    # the handler is gone again


def test_predict_on_a_full_disk_is_one_line(setup, tmp_path, monkeypatch):
    import massreg.predict as predict

    _, data, ckpt = setup
    monkeypatch.setattr(predict, "atomic_write", full_disk)      # the table; its .json went first
    result = invoke(predict.main, [ckpt, data, "--out", tmp_path / "p.parquet"])
    one_line(result, 1, "p.parquet", "No space left on device", "no predictions file was written")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_stopped_by_sigterm_leaves_no_metrics(setup, tmp_path, monkeypatch):
    import massreg.engine as engine
    import massreg.evaluate as evaluate

    _, data, ckpt = setup
    monkeypatch.setattr(engine, "predict", signal_during(engine.predict, signal.SIGTERM))
    result = invoke(evaluate.main, [ckpt, data, "--out", tmp_path / "ev"])
    one_line(result, 143, "evaluation of", "SIGTERM", "no metrics.json")
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_evaluate_on_a_full_disk_is_one_line(setup, tmp_path, monkeypatch):
    import massreg.evaluate as evaluate

    _, data, ckpt = setup
    out = tmp_path / "ev"
    assert invoke(evaluate.main, [ckpt, data, "--out", out]).exit_code == 0
    assert (out / "metrics.json").exists()
    monkeypatch.setattr(evaluate, "atomic_write_text", full_disk)
    result = invoke(evaluate.main, [ckpt, data, "--out", out, "--force"])
    one_line(result, 1, str(out), "No space left on device", "no metrics.json")
    # the old metrics.json went with --force: it does not describe the new plots
    assert not (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_export_stopped_by_sigterm_writes_nothing(setup, tmp_path, monkeypatch):
    import massreg.export as export

    _, _, ckpt = setup
    monkeypatch.setattr(export, "trace", signal_during(export.trace, signal.SIGTERM))
    result = invoke(export.main, [ckpt, "--out", tmp_path / "m.onnx"])
    one_line(result, 143, "export of", "SIGTERM", "no output was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fails", ["onnx", "json"])
def test_export_on_a_full_disk_is_one_line(setup, tmp_path, monkeypatch, fails):
    """Whichever of the two files fails, neither is left (an .onnx without its .json is not an export)."""
    import massreg.export as export

    from massreg.export import main

    _, _, ckpt = setup
    name = "atomic_write" if fails == "onnx" else "atomic_write_text"
    monkeypatch.setattr(export, name, full_disk)
    result = invoke(main, [ckpt, "--out", tmp_path / "m.onnx"])
    one_line(result, 1, f"m.{fails}", "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []
