"""Did a refactor change what the commands compute? Snapshot every output of a fixed set of runs, then compare
two snapshots made by two versions of the code.

    # the code to test is the one first on the path: a checkout of the old commit, then this tree
    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old python benchmarks/same_outputs.py snapshot /tmp/snap_old
    python benchmarks/same_outputs.py snapshot /tmp/snap_new
    python benchmarks/same_outputs.py compare /tmp/snap_old /tmp/snap_new

The runs, on generated data (600 top rows, 8 channels, the tiny model on CPU):
  fresh     massreg.train, 3 epochs
  resumed   2 epochs, then --resume with --epochs 3
  sigterm   SIGTERM sent to itself in the forward pass of step 30 (inside epoch 2), then --resume
  ddp       torchrun, 2 processes (gloo), 2 epochs
  evaluate / predict (HDF5 and Parquet with cuts) / export + predict --onnx, on the fresh run
and every command's --help. `compare` checks: every tensor of every checkpoint (weights, optimizer state, RNG),
every other checkpoint field, metrics.csv and config.json without the wall-clock fields, the HDF5 file's
datasets and attributes without its creation time and versions, the evaluation's metrics.json and
predictions, the prediction files, the printed output without timings, and the --help texts.
"""
from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import click

TIMED = {"seconds", "samples_per_s", "export_seconds", "seconds_fit_and_predict", "seconds_eval_pixel_mass"}
# Python's and numpy's global generators: the trainer never seeds or uses them (torch's is seeded and compared),
# so their state in a checkpoint differs between any two processes.
UNSEEDED = {"python", "numpy"}
# When a file was made, and the hash of a checkpoint's bytes (which hold those unseeded generators' states).
MOMENT = {"created", "sha256"}
DIRS: dict[str, str] = {}                         # snapshot folder -> "<dir>", set by compare
VOLATILE_ATTRS = {"created", "version", "pipeline_version", "config"}   # HDF5 root attributes of the moment
COMMANDS = ("pipeline.synth", "pipeline.convert", "pipeline.inspect", "massreg.train", "massreg.evaluate",
            "massreg.predict", "massreg.export")
TRAIN = ["--model", "tiny", "--batch-size", "32", "--device", "cpu", "--seed", "1"]


def sh(args: list[str], out: Path, name: str, ok=(0,), env: dict | None = None) -> None:
    """Run a command, its stdout+stderr saved as NAME.log; stop if its exit status is not in `ok`."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in ok:
        sys.exit(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


@click.group()
def main():
    """Snapshot the outputs of fixed runs with the code on the path, or compare two snapshots."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
def snapshot(out: Path):
    """Run everything into OUT (a new folder)."""
    out.mkdir(parents=True)
    py = sys.executable
    for name in COMMANDS:
        sh([py, "-m", name, "--help"], out, f"help_{name}")
    sh([py, "-m", "pipeline.synth", out / "raw", "--process", "top", "--rows", "600", "--files", "2",
        "--seed", "3"], out, "synth")
    data = out / "top.h5"
    sh([py, "-m", "pipeline.convert", out / "raw", data, "--cuts", "top", "--channels", "0,1,2,3,4,5,6,7"],
       out, "convert")
    sh([py, "-m", "pipeline.inspect", data], out, "inspect")
    sh([py, "-m", "massreg.train", data, *TRAIN, "--epochs", "3", "--run-dir", out / "fresh"], out, "fresh")
    sh([py, "-m", "massreg.train", data, *TRAIN, "--epochs", "2", "--run-dir", out / "resumed"], out, "resumed1")
    sh([py, "-m", "massreg.train", "--resume", out / "resumed", "--epochs", "3"], out, "resumed2")
    sh([py, __file__, "sigterm-at", "30", data, *TRAIN, "--epochs", "3", "--run-dir", out / "sigterm"], out,
       "sigterm1", ok=(128 + signal.SIGTERM,))
    sh([py, "-m", "massreg.train", "--resume", out / "sigterm"], out, "sigterm2")
    sh([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "massreg.train", data,
        *TRAIN, "--epochs", "2", "--run-dir", out / "ddp"], out, "ddp", env={"OMP_NUM_THREADS": "1"})
    best = out / "fresh" / "best_val_loss.pt"
    sh([py, "-m", "massreg.evaluate", best, data, "--split", "test", "--out", out / "eval"], out, "evaluate")
    sh([py, "-m", "massreg.predict", best, data, "--split", "test", "--out", out / "pred_h5.csv"], out,
       "predict_h5")
    sh([py, "-m", "massreg.predict", best, out / "raw", "--cuts", "top", "--out", out / "pred_raw.csv"], out,
       "predict_raw")
    sh([py, "-m", "massreg.export", best, "--out", out / "model.onnx"], out, "export")
    sh([py, "-m", "massreg.predict", "--onnx", out / "model.onnx", data, "--split", "test", "--out",
        out / "pred_onnx.csv"], out, "predict_onnx")
    click.echo(f"snapshot in {out}")


@main.command("sigterm-at", context_settings={"ignore_unknown_options": True})
@click.argument("step", type=int)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sigterm_at(step: int, args):
    """massreg.train ARGS, sending itself SIGTERM in the forward pass of training step STEP (1-based)."""
    from massreg import engine

    real, calls = engine.forward, {"n": 0}

    def forward(model, batch, **kw):
        if model.training:
            calls["n"] += 1
            if calls["n"] == step:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, **kw)

    engine.forward = forward
    sys.argv = ["massreg.train", *args]
    runpy.run_module("massreg.train", run_name="__main__", alter_sys=True)


# ------------------------------------------------------------------------------------------ compare

def plain_dirs(text: str) -> str:
    for d, name in DIRS.items():
        text = text.replace(d, name)
    return text


def same_tree(a, b, where: str, problems: list[str]) -> None:
    """Exact equality of nested dicts / lists / tensors / numbers (the snapshot folders' names aside)."""
    import torch

    if isinstance(a, str) and isinstance(b, str):
        if plain_dirs(a) != plain_dirs(b):
            problems.append(f"{where}: {a!r} != {b!r}")
    elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b)):
            problems.append(f"{where}: tensors differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            problems.append(f"{where}: keys differ: {sorted(map(str, set(a) ^ set(b)))}")
        for k in set(a) & set(b):
            if k in TIMED or k in MOMENT or (k in UNSEEDED and (where.endswith("rng") or "rng.ranks[" in where)):
                continue
            same_tree(a[k], b[k], f"{where}.{k}", problems)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            problems.append(f"{where}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}[{i}]", problems)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        problems.append(f"{where}: {a!r} != {b!r}")


def without_timing(text: str) -> str:
    """A log with its wall-clock numbers (and tqdm bars) taken out."""
    text = re.sub(r"[\d.,]+ (s|samples/s|rows/s|ms|min)\b", "<t>", text)
    text = re.sub(r"@created = \S+", "@created = <time>", text)
    text = re.sub(r"\b\d{8}-\d{6}\b", "<time>", text)
    return "\n".join(line for line in text.splitlines() if "\r" not in line and "it/s" not in line
                     and "s/it" not in line)


def compare_h5(a: Path, b: Path, problems: list[str]) -> None:
    import h5py
    import numpy as np

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        if names_a != names_b:
            problems.append(f"{a.name}: objects differ: {sorted(set(names_a) ^ set(names_b))}")
        for name in set(names_a) & set(names_b):
            oa, ob = fa[name], fb[name]
            if isinstance(oa, h5py.Dataset) and not np.array_equal(oa[()], ob[()]):
                problems.append(f"{a.name}:/{name}: values differ")
            for key in set(oa.attrs) | set(ob.attrs):
                if not np.array_equal(np.asarray(oa.attrs.get(key)), np.asarray(ob.attrs.get(key))):
                    problems.append(f"{a.name}:/{name} attribute {key} differs")
        for key in set(fa.attrs) | set(fb.attrs):
            va, vb = (plain_dirs(str(np.asarray(f.attrs.get(key)).tolist())) for f in (fa, fb))
            if key not in VOLATILE_ATTRS and va != vb:
                problems.append(f"{a.name} root attribute {key} differs")


def compare_csv(a: Path, b: Path, problems: list[str]) -> None:
    import pandas as pd

    x, y = (pd.read_csv(p).replace(regex={d: name for d, name in DIRS.items()}) for p in (a, b))
    x, y = x.drop(columns=[c for c in x if c in TIMED]), y.drop(columns=[c for c in y if c in TIMED])
    if list(x.columns) != list(y.columns) or not x.equals(y):
        problems.append(f"{a}: contents differ")


@main.command()
@click.argument("old", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("new", type=click.Path(file_okay=False, exists=True, path_type=Path))
def compare(old: Path, new: Path):
    """Compare snapshot NEW with OLD; print each check, exit 1 if anything differs."""
    import torch

    DIRS.update({str(old): "<dir>", str(new): "<dir>"})
    problems: list[str] = []
    checks = 0
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old)
        other = new / rel
        if path.is_dir() or rel.parts[0] == "raw":
            continue
        if not other.exists():
            problems.append(f"{rel}: missing in {new}")
            continue
        checks += 1
        before = len(problems)
        if path.suffix == ".pt":
            same_tree(torch.load(path, weights_only=True), torch.load(other, weights_only=True), str(rel),
                      problems)
        elif path.suffix == ".h5":
            compare_h5(path, other, problems)
        elif path.suffix == ".csv":
            compare_csv(path, other, problems)
        elif path.suffix == ".json":
            same_tree(json.loads(path.read_text()), json.loads(other.read_text()), str(rel), problems)
        elif path.suffix == ".log":
            ta, tb = (plain_dirs(without_timing(p.read_text())) for p in (path, other))
            if ta != tb:
                import difflib

                diff = "\n".join(list(difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm=""))[:20])
                problems.append(f"{rel}: printed output differs\n{diff}")
        else:
            checks -= 1
            continue
        click.echo(f"{'same' if len(problems) == before else 'DIFFERENT':9} {rel}")
    for p in problems:
        click.echo(f"  {p}", err=True)
    click.echo(f"{checks} files compared, {len(problems)} difference(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
