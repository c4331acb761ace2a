"""Converted files are read without HDF5's file lock: another process holding an exclusive flock on the file
(a writer, a copy tool; or a file system without flock) does not stop any reading command. A file that is not
HDF5 still gets the one-line error with the advice to reconvert."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import make_checkpoint, make_file
from massreg.dataset import H5Images, LayoutError
from pipeline.inspect import describe

HOLD = ("import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'rb')\n"
        "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")


@pytest.fixture
def locked(tmp_path):
    """A converted file and a checkpoint trained on its layout, the file locked exclusively by another
    process for the duration of the test."""
    data = make_file(tmp_path / "d.h5", 40, seed=2)
    ckpt = make_checkpoint(tmp_path / "c.pt", [data])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # what HDF5 would do with its lock: refused while the holder lives (so the test can fail)
        probe = subprocess.run([sys.executable, "-c", "import h5py, sys; h5py.File(sys.argv[1], 'r')",
                                str(data)], capture_output=True, text=True)
        assert probe.returncode != 0 and "lock" in probe.stderr
        yield data, ckpt
    finally:
        holder.kill()
        holder.wait()


def test_every_reader_works_on_a_locked_file(locked, tmp_path):
    from massreg.evaluate import main as evaluate_main
    from massreg.predict import main as predict_main

    data, ckpt = locked
    assert len(H5Images(data, "train")) > 0 and "splits:" in describe(data)
    result = CliRunner().invoke(evaluate_main, [str(ckpt), str(data), "--out", str(tmp_path / "ev"),
                                                "--device", "cpu", "--knn", "0"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(predict_main, [str(ckpt), str(data), "--out", str(tmp_path / "p.csv"),
                                               "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_a_file_that_is_not_hdf5_still_says_so(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5 at all")
    with pytest.raises(LayoutError, match=r"not an HDF5 file .*re-run pipeline.convert"):
        H5Images(bad, "train")
