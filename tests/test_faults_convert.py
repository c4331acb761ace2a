"""The converter and the generator under a batch system's faults: SIGTERM / SIGHUP mid-run, a full disk, a
failed write. Each leaves no file that looks whole and says so in one line (docs/converter.md, "Faults and
interruptions").

The signal tests run the CLI in a subprocess of its own session (as Slurm signals a job's process group) with
each chunk's write slowed by 0.1 s (`SLOW_CONVERT`, a slow disk), so that pass 2 lasts seconds on tens of
rows and the signal surely lands in it. Parquet inputs come from the writer in conftest.py.
"""
from __future__ import annotations

import errno
import os
from collections import namedtuple
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import make_rows, write_parquet
from pipeline import convert as C
from pipeline import layout
from pipeline import synth as S
from pipeline.convert import ConvertConfig, convert
from pipeline.signals import StopFlag, Terminated
from pipeline.synth import SynthConfig, SynthError, generate

REPO = Path(__file__).resolve().parents[1]
ROWS, CHANNELS = 30, 4                               # 2 files x 15 rows, all kept (--cuts none)
ROW_BYTES = CHANNELS * layout.IMAGE_SIZE**2 * 2      # one row of float16 images
LABELS = 5 * 8 + 4 + 8 + 8                           # m, pt, ieta, iphi, eta; source_file, source_row; split
DATA_BYTES = ROWS * (ROW_BYTES + LABELS)             # what the converter must write

# pipeline.convert's main(), with each chunk's write 0.1 s slower; main() is what `python -m` runs
SLOW_CONVERT = """
import sys, time
from pipeline import convert as C
write = C.write_rows
def slow(*args):
    time.sleep(0.1)
    write(*args)
C.write_rows = slow
sys.argv[0] = "pipeline.convert"
C.main()
"""


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    for i in range(2):
        images, s = make_rows(ROWS // 2, seed=40 + i)
        write_parquet(d / f"part_{i}.parquet", images, s)
    return d


def start(args: list[str], *, module: str | None = None) -> subprocess.Popen:
    """The CLI in a new session (its pid is its process group's id), stderr captured; no progress bars, as
    stderr is not a terminal."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    head = ["-m", module] if module else ["-c", SLOW_CONVERT]
    return subprocess.Popen([sys.executable, *head, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0):
    """Poll `ready()` until it returns something true; fail if the process ends first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = ready()
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {what} within {timeout} s")


def in_pass_2(folder: Path):
    """The temporary file, once at least two rows of images are on disk (allocated blocks: the file is sparse
    until pass 2 fills /images, whose space HDF5 reserves at creation)."""
    for tmp in folder.glob(".*.tmp"):
        try:
            if tmp.stat().st_blocks * 512 >= 2 * ROW_BYTES:
                return tmp
        except FileNotFoundError:
            pass
    return None


def group_alive(pgid: int) -> list[str]:
    """Processes of the group that still run (zombies are dead; init reaps them)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()           # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(text[:text.rindex(")") + 1])
    return alive


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_convert_stopped_in_pass_2_exits_128_plus_signum_and_leaves_no_file(raw, tmp_path, sig):
    out = tmp_path / "out" / "top.h5"
    proc = start([str(raw), str(out), "--cuts", "none", "--chunk-size", "1"])
    tmp = wait_until(proc, lambda: out.parent.is_dir() and in_pass_2(out.parent), "pass 2")
    assert tmp.stat().st_blocks * 512 < ROWS * ROW_BYTES        # still in pass 2: not all rows written
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert one_line(err) == (f"Error: conversion to {out} interrupted by {signal.Signals(sig).name}; nothing "
                             f"was written and no temporary file is left.")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_convert_with_workers_stopped_as_a_process_group_leaves_no_file_and_no_process(raw, tmp_path, sig):
    """Slurm (and a closed terminal) signals every process of the job: the workers, the forkserver and the
    resource tracker get the signal too, and none may print a traceback or outlive the parent. (The tracker
    ignores SIGTERM of itself but not SIGHUP: killed, it made the parent warn of leaked semaphores.)"""
    if not Path("/proc/self/stat").exists():
        pytest.skip("the process scan reads /proc (Linux)")
    out = tmp_path / "out" / "top.h5"
    proc = start([str(raw), str(out), "--cuts", "none", "--chunk-size", "1", "--workers", "2"])
    wait_until(proc, lambda: out.parent.is_dir() and in_pass_2(out.parent), "pass 2")
    assert len(group_alive(proc.pid)) >= 3                   # the parent, its workers, the forkserver
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert one_line(err) == (f"Error: conversion to {out} interrupted by {signal.Signals(sig).name}; nothing "
                             f"was written and no temporary file is left.")
    assert list(out.parent.iterdir()) == []
    t0 = time.monotonic()
    while group_alive(proc.pid) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert group_alive(proc.pid) == []


def test_a_stop_request_is_acted_on_at_the_next_chunk(raw, tmp_path, monkeypatch):
    """What the CLI's signal handler does (it only sets the flag), without a signal: the next chunk raises."""
    write, calls = C.write_rows, []
    stop = StopFlag(())                                  # no handlers: request() stands for the signal

    def requesting(images, offset, block):
        calls.append(offset)
        if len(calls) == 2:
            stop.request(signal.SIGTERM)
        write(images, offset, block)

    monkeypatch.setattr(C, "write_rows", requesting)
    with pytest.raises(Terminated):
        convert(ConvertConfig([str(raw)], str(tmp_path / "o.h5"), cuts="none", chunk_size=2, progress=False),
                stop=stop)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_synth_stopped_keeps_finished_files_and_discards_the_one_in_progress(tmp_path):
    out = tmp_path / "raw"
    proc = start([str(out), "--rows", "150", "--files", "2", "--chunk-rows", "4"], module="pipeline.synth")
    def second_file_begun():
        return (out / "top_synth_000.parquet").exists() and list(out.glob(".top_synth_001*.tmp"))
    wait_until(proc, second_file_begun, "the second file")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert one_line(err) == (f"Error: generation of 2 top file(s) in {out} interrupted by SIGTERM; the files "
                             f"finished before it are whole, the one in progress was discarded, "
                             f"synth_config.json was not written.")
    assert sorted(p.name for p in out.iterdir()) == ["top_synth_000.parquet"]
    assert pq.ParquetFile(out / "top_synth_000.parquet").metadata.num_rows == 150


# ------------------------------------------------------------------------------------ disk space, writes

DiskUsage = namedtuple("DiskUsage", "total used free")     # what shutil.disk_usage returns


def disk_with(free: int):
    """shutil.disk_usage as a file system with `free` bytes free; records the paths asked about."""
    asked = []

    def usage(path):
        asked.append(Path(path))
        return DiskUsage(10**12, 10**12 - free, free)
    return usage, asked


def test_too_little_free_space_is_refused_before_any_file_exists(raw, tmp_path, monkeypatch):
    needed = int(DATA_BYTES * 1.01) + (4 << 20)
    usage, asked = disk_with(needed - 1)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(C, "write_rows", lambda *a: pytest.fail("pass 2 started"))
    out = tmp_path / "new" / "top.h5"
    result = CliRunner().invoke(C.main, [str(raw), str(out), "--cuts", "none"])
    assert result.exit_code == 1
    mount = C.mount_point(tmp_path)
    assert one_line(result.output) == (f"Error: {out} needs {needed / 1e6:.1f} MB on {mount} (the output's "
                                       f"file system), {(needed - 1) / 1e6:.1f} MB free; free space or "
                                       f"choose another OUTPUT")
    assert asked == [tmp_path] and list(tmp_path.iterdir()) == []   # not even the directory was made


def test_space_needed_bounds_the_file_and_fits_exactly(raw, tmp_path, monkeypatch):
    needed = int(DATA_BYTES * 1.01) + (4 << 20)
    monkeypatch.setattr(shutil, "disk_usage", disk_with(needed)[0])
    summary = convert(ConvertConfig([str(raw)], str(tmp_path / "o.h5"), cuts="none", progress=False))
    assert DATA_BYTES < summary.bytes <= needed and summary.bytes < DATA_BYTES + (1 << 20)


@pytest.mark.parametrize("fault, workers", [("ENOSPC", 1), ("EIO", 1), ("ENOSPC", 2), ("vanished", 1)])
def test_write_error_in_pass_2_is_one_line_naming_output_bytes_and_cause(raw, tmp_path, monkeypatch, fault,
                                                                         workers):
    out = tmp_path / "out" / "top.h5"
    write, calls = C.write_rows, []

    def failing(images, offset, block):
        calls.append(block.nbytes)
        if len(calls) == 3 and fault == "vanished":     # the scratch directory is cleaned under a running job
            shutil.rmtree(out.parent)
        elif len(calls) == 3:
            raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)))
        write(images, offset, block)

    monkeypatch.setattr(C, "write_rows", failing)
    result = CliRunner().invoke(C.main, [str(raw), str(out), "--cuts", "none", "--chunk-size", "2",
                                         "--workers", str(workers)])
    assert result.exit_code == 1
    if fault == "vanished":      # h5py writes on into the unlinked file; the rename finds no directory
        written, code = DATA_BYTES, errno.ENOENT
        assert not out.parent.exists()
    else:
        written, code = ROWS * LABELS + 2 * 2 * ROW_BYTES, getattr(errno, fault)
        assert list(out.parent.iterdir()) == []
    assert one_line(result.output) == (f"Error: {out}: write failed after {C.format_size(written)} of "
                                       f"{C.format_size(DATA_BYTES)} ([Errno {code}] {os.strerror(code)}); "
                                       f"the partial file was removed")


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB tmpfs (root only; skipped where mount is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                                         str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def test_full_tmpfs_refused_then_real_enospc_from_h5py_and_pyarrow(raw, small_disk, monkeypatch):
    out = small_disk / "top.h5"
    runner = CliRunner()
    refused = runner.invoke(C.main, [str(raw), str(out), "--cuts", "none"])
    assert refused.exit_code == 1
    assert one_line(refused.output).startswith(f"Error: {out} needs ")
    assert f" MB on {small_disk} (the output's file system), 1.0 MB free;" in refused.output

    # the check passed (as if the disk filled after it): h5py's own ENOSPC, raised twice, gives one line
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10**12))
    failed = runner.invoke(C.main, [str(raw), str(out), "--cuts", "none"])
    assert failed.exit_code == 1
    line = one_line(failed.output)
    assert line.startswith(f"Error: {out}: write failed after ")
    assert line.endswith("([Errno 28] No space left on device); the partial file was removed")
    assert list(small_disk.iterdir()) == [] and real(small_disk).used == 0          # the space is back

    synth = runner.invoke(S.main, [str(small_disk / "raw"), "--rows", "200", "--chunk-rows", "50"])
    assert synth.exit_code == 1
    assert one_line(synth.output) == (f"Error: cannot write {small_disk}/raw/top_synth_000.parquet: [Errno "
                                      f"28] No space left on device; 0 of 1 file(s) were finished before it, "
                                      f"synth_config.json was not written")
    assert list((small_disk / "raw").iterdir()) == []


def test_synth_write_error_with_force_leaves_no_mix_of_two_data_sets(tmp_path, monkeypatch):
    generate(tmp_path, SynthConfig(rows=2, files=3, seed=1))
    write, calls = S.write_file, []

    def failing(path, config, i_file, bar=None, stop=None):
        calls.append(i_file)
        if i_file == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        write(path, config, i_file, bar, stop)

    monkeypatch.setattr(S, "write_file", failing)
    with pytest.raises(SynthError) as info:
        generate(tmp_path, SynthConfig(rows=2, files=3, seed=2), force=True)
    assert str(info.value) == (f"cannot write {tmp_path}/top_synth_001.parquet: [Errno 5] Input/output "
                               f"error; 1 of 3 file(s) were finished before it, synth_config.json was not "
                               f"written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["top_synth_000.parquet"]   # the new one alone
    assert calls == [0, 1]
