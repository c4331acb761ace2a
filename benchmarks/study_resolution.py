"""The per-jet resolution study (docs/evaluation.md, "Per-jet resolution"): what the quantile outputs cost the
point estimate, whether their coverage holds where an analysis looks, what flip averaging gives, and what
--reweight flat does to a falling mass spectrum. At the demo's budget, on generated data.

    python benchmarks/study_resolution.py --dir data/study            # ~40 min on 2 idle cores

Data sets (pipeline.synth, 2 x 6,000 top rows each, converted as the demo: --cuts top, 8 channels):
  demo      synth seed 1: the demo's data
  other     synth seed 7: a second data set, never trained on
  falling   synth seed 3 with a mass-dependent acceptance exp(-(m - 85) / 150 GeV): a falling spectrum
Runs (hybrid49, 8 epochs, the default recipe): for each --seeds value with and without quantile outputs on
`demo`; with and without --reweight flat on `falling`. Every run is evaluated on the test split of `demo`
(and the quantile runs also on `other`, and with --tta). Steps whose output exists are skipped, so the study
can be resumed; the table printed at the end is built from the metrics.json files.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq

PY = sys.executable
FALL_GEV = 150.0


def sh(*args) -> None:
    cmd = [str(a) for a in args]
    click.echo("$ " + " ".join(cmd), err=True)
    subprocess.run(cmd, check=True)


def dataset(root: Path, name: str, seed: int, rows: int, falling: bool = False) -> Path:
    """Generated, optionally thinned to a falling mass spectrum, converted: the .h5 path."""
    out = root / f"{name}.h5"
    if out.exists():
        return out
    raw = root / f"{name}_raw"
    if not raw.exists():
        sh(PY, "-m", "pipeline.synth", raw, "--process", "top", "--rows", rows, "--files", 2, "--seed", seed)
        if falling:   # keep a row with probability exp(-(m - 85) / FALL_GEV), seeded
            rng = np.random.default_rng(seed)
            for path in sorted(raw.glob("*.parquet")):
                table = pq.read_table(path)
                m = table.column("m").to_numpy()
                keep = rng.random(m.size) < np.exp(-(m - 85.0) / FALL_GEV)
                pq.write_table(table.filter(keep), path, row_group_size=1)
    sh(PY, "-m", "pipeline.convert", raw, out, "--cuts", "top", "--channels", "0,1,2,3,4,5,6,7")
    return out


def train(root: Path, name: str, data: Path, seed: int, epochs: int, model: str, *extra) -> Path:
    run = root / name
    if not (run / "best_val_loss.pt").exists() or not (run / "metrics.csv").exists():
        sh(PY, "-m", "massreg.train", data, "--model", model, "--epochs", epochs, "--seed", seed,
           "--run-dir", run, "--device", "cpu", "--force", *extra)
    return run / "best_val_loss.pt"


def evaluate(ckpt: Path, data: Path, out: Path, *extra) -> dict:
    if not (out / "metrics.json").exists():
        sh(PY, "-m", "massreg.evaluate", ckpt, data, "--split", "test", "--out", out, "--device", "cpu",
           "--knn", 0, "--force", *extra)
    return json.loads((out / "metrics.json").read_text())


def raw_outputs(ckpt: Path, data: Path, split: str) -> tuple[dict, object]:
    """(engine.predict's dict with the quantile head's widths uncalibrated, the TargetScaler); ValueError for
    a checkpoint without quantile outputs."""
    import torch
    from massreg import engine
    from massreg.checkpoint import load_for_inference
    from massreg.dataset import H5Images
    from massreg.sampling import make_loader

    _, r = load_for_inference(ckpt, torch.device("cpu"))
    if r.model.quantile_head is None:
        raise ValueError(f"{ckpt} has no quantile outputs")
    r.model.quantile_head.set_calibration(torch.zeros(1), torch.ones(1, 2))
    loader = make_loader(H5Images([str(data)], split, aux=tuple(r.aux_scaler.names)), batch_size=256,
                         shuffle=False, seed=0)
    return engine.predict(r.model, loader, normalizer=r.normalizer, target=r.target,
                          aux_scaler=r.aux_scaler), r.target


def knots_lines(ckpts: list[tuple[str, Path]], demo: Path, other: Path, choices=(1, 2, 3, 4, 6)) -> list[str]:
    """The calibration refitted on val with each number of knots (massreg.resolution.calibrate): coverage
    of the middle eight bins of predicted mass on the demo and the other test split, per run."""
    import torch
    from massreg.dataset import H5Images
    from massreg.heads import QuantileHead
    from massreg.metrics import mass_edges
    from massreg.resolution import calibrate

    lines = ["| run, knots | " + " | ".join(f"{k}" for k in choices) + " |", "|---|" + "---|" * len(choices)]
    for name, ckpt in ckpts:
        try:
            val, target = raw_outputs(ckpt, demo, "val")
        except ValueError as exc:     # make demo's model trained with --no-quantiles, or before them
            click.echo(f"knots table: {exc}; left out", err=True)
            continue
        tests = {"demo test": (raw_outputs(ckpt, demo, "test")[0], demo),
                 "other data": (raw_outputs(ckpt, other, "test")[0], other)}
        cells = {t: [] for t in tests}
        for k in choices:
            head = QuantileHead(1)
            calibrate(head, val, target, knots=k)
            for t, (out, path) in tests.items():
                f = head.factors(torch.as_tensor((out["pred"] - target.mean) / target.std,
                                                 dtype=torch.float32)).double().numpy()     # (N, 2)
                q16 = out["pred"] - (out["pred"] - out["q16"]) * f[:, 0]
                q84 = out["pred"] + (out["q84"] - out["pred"]) * f[:, 1]
                stats = H5Images([str(path)], "test").stats        # evaluate's bins: the train mass range
                edges = mass_edges(min(float(stats["m_min"]), out["true"].min()),
                                   max(float(stats["m_max"]), out["true"].max()), 10)
                bins = np.digitize(out["pred"], edges[1:-1])                    # 0..9
                inside = (out["true"] >= q16) & (out["true"] <= q84)
                mid = [inside[bins == b].mean() for b in range(1, 9)]
                cells[t].append(f"{min(mid):.2f}-{max(mid):.2f}")
        lines += [f"| {name}, {t} | " + " | ".join(c) + " |" for t, c in cells.items()]
    return lines


def resolution_line(name: str, r: dict) -> str:
    res = r["resolution"]
    quart = "/".join(f"{q['measured']:.3f}" for q in res["quartiles"])
    pred = "/".join(f"{q['predicted']:.3f}" for q in res["quartiles"])
    ratios = [q["ratio"] for q in res["quartiles"]]
    mid = [b["coverage"] for b in res["by_predicted_mass"][1:-1] if b["n"]]
    pt = [b["coverage"] for b in res.get("by_pt", [])]
    return (f"| {name} | {r['model']['mae']:.2f} | {res['coverage']:.3f} | {res['pull_width']:.3f} | "
            f"{min(mid):.2f}-{max(mid):.2f} | {min(pt):.2f}-{max(pt):.2f} | {pred} | {quart} | "
            f"{min(ratios):.2f}-{max(ratios):.2f} |")


@click.command()
@click.option("--dir", "root", default="data/study", show_default=True, type=click.Path(path_type=Path))
@click.option("--seeds", default="1,2", show_default=True, help="Training seeds.")
@click.option("--epochs", default=8, show_default=True)
@click.option("--rows", default=6000, show_default=True, help="Rows per file (2 files a data set).")
@click.option("--model", default="hybrid49", show_default=True)
@click.option("--demo-run", default="data/demo/run/best_val_loss.pt", show_default=True,
              type=click.Path(path_type=Path),
              help="make demo's model, added to the knots table when it exists (trained on the same data).")
def main(root: Path, seeds: str, epochs: int, rows: int, model: str, demo_run: Path):
    """Run (or resume) the study and print its tables (markdown)."""
    root.mkdir(parents=True, exist_ok=True)
    demo, other = dataset(root, "demo", 1, rows), dataset(root, "other", 7, rows)
    falling = dataset(root, "falling", 3, rows, falling=True)
    lines = ["| run | test MAE [GeV] | coverage | pull width | coverage, middle 8 m_pred bins | coverage, pT "
             "quartiles | predicted res. by quartile | measured | measured / predicted |",
             "|---|---|---|---|---|---|---|---|---|"]
    point, tta, quantile_runs = [], [], []
    for seed in [int(s) for s in seeds.split(",")]:
        q = train(root, f"q_seed{seed}", demo, seed, epochs, model)
        quantile_runs.append((f"seed {seed}", q))
        p = train(root, f"p_seed{seed}", demo, seed, epochs, model, "--no-quantiles")
        rq = evaluate(q, demo, root / f"q_seed{seed}" / "eval_demo")
        rp = evaluate(p, demo, root / f"p_seed{seed}" / "eval_demo")
        ro = evaluate(q, other, root / f"q_seed{seed}" / "eval_other")
        rt = evaluate(q, demo, root / f"q_seed{seed}" / "eval_demo_tta", "--tta")
        point.append((rq["model"]["mae"], rp["model"]["mae"]))
        tta.append((rq["model"]["mae"], rt["model"]["mae"]))
        lines += [resolution_line(f"seed {seed}, demo test", rq), resolution_line(f"seed {seed}, other data", ro),
                  resolution_line(f"seed {seed}, demo test, --tta", rt)]
    mean_q, mean_p = (float(np.mean(x)) for x in zip(*point))
    lines += ["", "| | with quantiles | without | ratio |", "|---|---|---|---|"]
    lines += [f"| seed {s} | {a:.2f} | {b:.2f} | {a / b:.4f} |" for s, (a, b) in zip(seeds.split(","), point)]
    lines.append(f"| mean | {mean_q:.2f} | {mean_p:.2f} | {mean_q / mean_p:.4f} |")
    lines += ["", "| | test MAE | with --tta | change |", "|---|---|---|---|"]
    lines += [f"| seed {s} | {a:.2f} | {b:.2f} | {b / a - 1:+.1%} |" for s, (a, b) in zip(seeds.split(","), tta)]
    # Reweighting: trained on the falling spectrum, judged on the flat demo test split.
    seed0 = int(seeds.split(",")[0])
    lines += ["", "| trained on the falling spectrum | test MAE (flat demo test) | response, top two true-mass bins |"
              " bias top bin [GeV] |", "|---|---|---|---|"]
    for name, extra in (("no reweighting", ()), ("--reweight flat", ("--reweight", "flat"))):
        tag = "flat" if extra else "none"
        ck = train(root, f"fall_{tag}", falling, seed0, epochs, model, *extra)
        r = evaluate(ck, demo, root / f"fall_{tag}" / "eval_demo")
        top = r["bins"][-2:]
        lines.append(f"| {name} | {r['model']['mae']:.2f} | {top[0]['response']:.3f}, {top[1]['response']:.3f} | "
                     f"{top[1]['bias']:.1f} |")
    lines += ["", "Coverage range over the middle 8 bins of predicted mass, the calibration refitted on val with K "
              "knots:", ""] + knots_lines(([("make demo", demo_run)] if demo_run.exists() else [])
                                          + quantile_runs, demo, other)
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
