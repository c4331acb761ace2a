"""Accuracy study: train and evaluate several models on one converted file, several seeds, one table.

    python benchmarks/study_accuracy.py data/demo/top.h5 --out data/study --seeds 0,1 \
        --run tiny="--model tiny" --run resnet="--model resnet" --run seed-recipe="--recipe seed --model tiny"

Each run is `python -m massreg.train DATA --run-dir OUT/<name>-s<seed> --seed <seed> --epochs E --device cpu
<its options>`, then `python -m massreg.evaluate <run>/best_val_loss.pt DATA --split test`. The table gives,
per run, the mean over seeds (and each seed) of the test MAE, its ratio to the constant predictor and to the
kNN physics baseline (when the evaluation has one), MRE, resolution, and the median seconds per epoch;
`--same-time SECONDS` gives each run as many epochs as fit in that wall time (measured from its first
epoch), to compare models at equal cost as well as at equal epochs. A run already in OUT (its
`eval_test/metrics.json` exists) is read, not redone, so an interrupted study continues where it stopped.
Results: OUT/study.json and a markdown table on stdout.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import pandas as pd


def run_one(data: str, run_dir: Path, seed: int, epochs: int, options: str, threads: int) -> dict:
    """Train (unless done) and evaluate one run; return its test metrics and timing."""
    metrics_json = run_dir / "eval_test" / "metrics.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MPLBACKEND="Agg")
    if not metrics_json.exists():
        train = [sys.executable, "-m", "massreg.train", data, "--run-dir", str(run_dir), "--seed", str(seed),
                 "--epochs", str(epochs), "--device", "cpu", "--force", *shlex.split(options)]
        t0 = time.time()
        subprocess.run(train, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        subprocess.run([sys.executable, "-m", "massreg.evaluate", str(run_dir / "best_val_loss.pt"), data,
                        "--split", "test", "--device", "cpu", "--force"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        (run_dir / "study_wall_s.txt").write_text(f"{wall:.1f}\n")
    report = json.loads(metrics_json.read_text())
    history = pd.read_csv(run_dir / "metrics.csv")
    out = {"mae": report["model"]["mae"], "mre": report["model"]["mre"],
           "resolution": report["model"]["resolution"], "const_mae": report["constant"]["mae"],
           "epochs": int(history["epoch"].max()), "s_per_epoch": float(history["seconds"].median()),
           "wall_s": float((run_dir / "study_wall_s.txt").read_text())}
    knn = report.get("knn") or {}
    out["knn_mae"] = knn.get("mae")
    return out


def first_epoch_seconds(data: str, out: Path, name: str, options: str, threads: int) -> float:
    """Seconds of one training epoch of this run (a 1-epoch probe; the first epoch has no compile cost)."""
    probe = out / f"{name}-probe"
    if not (probe / "metrics.csv").exists():
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MPLBACKEND="Agg")
        subprocess.run([sys.executable, "-m", "massreg.train", data, "--run-dir", str(probe), "--epochs", "1",
                        "--device", "cpu", "--force", *shlex.split(options)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return float(pd.read_csv(probe / "metrics.csv")["seconds"].iloc[0])


def summarise(name: str, rows: list[dict]) -> dict:
    mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
    s = {"run": name, "seeds": len(rows), "epochs": rows[0]["epochs"]}
    for k in ("mae", "mre", "resolution", "const_mae", "s_per_epoch", "wall_s"):
        s[k] = mean(k)
    s["mae_each"] = [round(r["mae"], 1) for r in rows]
    s["ratio_const"] = s["mae"] / s["const_mae"]
    knn = [r["knn_mae"] for r in rows if r["knn_mae"] is not None]
    s["knn_mae"] = statistics.fmean(knn) if knn else None
    s["ratio_knn"] = s["mae"] / s["knn_mae"] if knn else None
    return s


def table(summary: list[dict], reference: str | None) -> str:
    ref = next((s for s in summary if s["run"] == reference), None)
    head = ("| run | epochs | test MAE [GeV] (each seed) | x constant | x kNN | "
            + (f"x {reference} | " if ref else "") + "MRE | resolution | s/epoch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        knn = f"{s['ratio_knn']:.3f}" if s["ratio_knn"] is not None else "-"
        vs = f"{s['mae'] / ref['mae']:.3f} | " if ref else ""
        each = ", ".join(map(str, s["mae_each"]))
        lines.append(f"| {s['run']} | {s['epochs']} | {s['mae']:.1f} ({each}) | "
                     f"{s['ratio_const']:.3f} | {knn} | {vs}{s['mre']:.3f} | {s['resolution']:.3f} | "
                     f"{s['s_per_epoch']:.1f} |")
    const = statistics.fmean(s["const_mae"] for s in summary)
    knns = [s["knn_mae"] for s in summary if s["knn_mae"] is not None]
    lines.append(f"\nconstant: {const:.1f} GeV" + (f"; kNN baseline: {statistics.fmean(knns):.1f} GeV"
                                                    if knns else ""))
    return "\n".join(lines)


@click.command(help=__doc__)
@click.argument("data")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/study"), show_default=True)
@click.option("--run", "runs", multiple=True, required=True, metavar="NAME=OPTIONS",
              help="A run: a name and the massreg.train options it adds (repeatable).")
@click.option("--seeds", default="0,1", show_default=True, help="Comma-separated training seeds.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Epochs per run (equal-epoch mode).")
@click.option("--same-time", type=float, default=None, metavar="SECONDS",
              help="Instead of --epochs: as many epochs as fit in SECONDS of training, per run.")
@click.option("--reference", default=None, help="Also print each MAE as a ratio to this run's.")
@click.option("--threads", type=int, default=2, show_default=True, help="OMP_NUM_THREADS of each run.")
def main(data, out, runs, seeds, epochs, same_time, reference, threads):
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in seeds.split(",")]
    summary = []
    for spec in runs:
        name, _, options = spec.partition("=")
        n_epochs = epochs
        if same_time is not None:
            n_epochs = max(1, round(same_time / first_epoch_seconds(data, out, name, options, threads)))
        rows = []
        for seed in seeds:
            print(f"{name} seed {seed}: {n_epochs} epochs ...", file=sys.stderr, flush=True)
            rows.append(run_one(data, out / f"{name}-s{seed}", seed, n_epochs, options, threads))
        summary.append(summarise(name, rows))
        (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary, reference))


if __name__ == "__main__":
    main()
