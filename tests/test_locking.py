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


def test_a_truncated_file_is_one_line_naming_it(tmp_path):
    """A copy cut short: either the file's own structures are missing (h5py cannot open it) or the images
    end past the end of the file; both are one LayoutError line naming the file and what to do."""
    from click.testing import CliRunner

    from pipeline.inspect import main as inspect_main

    data = make_file(tmp_path / "d.h5", 40, seed=2)
    whole = data.read_bytes()
    for keep in (len(whole) // 2, 1000):
        cut = tmp_path / f"cut{keep}.h5"
        cut.write_bytes(whole[:keep])
        with pytest.raises(LayoutError) as err:
            H5Images(cut, "train")
        message = str(err.value)
        assert str(cut) in message and "\n" not in message
        assert "truncated" in message or "cut short" in message, message
        result = CliRunner().invoke(inspect_main, [str(cut)])
        assert result.exit_code == 1 and str(cut) in result.output and len(result.output.splitlines()) == 1
