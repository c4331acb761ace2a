"""ONNX export: how long `massreg.export` takes, and ONNX Runtime's CPU inference speed against PyTorch's.

    python benchmarks/bench_export.py [--presets seed,hybrid49,resnet] [--batch 64] [--rounds 5] [--threads 2]

For each preset a randomly initialised model (4 channels, pt/ieta/iphi) is saved as a checkpoint and exported
with massreg.export.export (trace, onnx.checker, the check against PyTorch, both files written): its wall time
is the export time. Then the same graph, the exported `Deployed` module (float16 rounding, normalisation,
model, GeV), runs on one batch of sparse detector-like images in PyTorch (eval, no_grad) and in ONNX Runtime
(CPU provider, the same number of threads), in alternating rounds, so that the load of a shared machine falls
on both alike. The table gives each side's median samples/s and the median over rounds of the paired ratio
ONNX Runtime / PyTorch.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from massreg.checkpoint import load_checkpoint, restore, save_checkpoint  # noqa: E402
from massreg.registry import PRESETS, build_model, model_config  # noqa: E402
from massreg.deploy import Deployed, OnnxRegressor  # noqa: E402
from massreg.export import ExportConfig, check_inputs, export  # noqa: E402

AUX = ("pt", "ieta", "iphi")


def write_checkpoint(path: Path, preset: str) -> None:
    """A checkpoint of a fresh `preset` with the demo data's statistics (4 channels, reference scales)."""
    cfg = model_config(preset, channels=4, num_aux=len(AUX))
    torch.manual_seed(0)
    model = build_model(cfg)
    payload = {"model": model.state_dict(), "model_config": asdict(cfg), "train_config": {"model": preset},
               "optimizer": None, "scheduler": None, "epoch": 0, "step": 0, "best": {},
               "normalizer": {"mode": "reference", "channels": ["track_pt", "dz", "d0", "ecal"],
                              "mean": [0.0] * 4, "std": [10.0, 0.1, 0.1, 2.0],
                              "clip": [3e38, 1.0, 1.0, 3e38]},
               "target": {"mean": 293.0, "std": 120.0},
               "aux": {"names": list(AUX), "mean": [700.0, 27.5, 35.5], "std": [172.0, 8.3, 21.0]},
               "data": {"paths": []}, "rng": {}, "metrics_history": []}
    save_checkpoint(path, payload)


def time_rounds(torch_fn, ort_fn, rounds: int, reps: int) -> tuple[list[float], list[float]]:
    """Seconds per call of each, `rounds` alternating rounds of `reps` calls (who goes first alternates)."""
    t_torch, t_ort = [], []
    for r in range(rounds):
        order = [(torch_fn, t_torch), (ort_fn, t_ort)]
        for fn, sink in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sink.append((time.perf_counter() - t0) / reps)
    return t_torch, t_ort


@click.command()
@click.option("--presets", default="seed,hybrid49,resnet", show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--rounds", default=5, show_default=True)
@click.option("--reps", default=2, show_default=True, help="Calls per round and side.")
@click.option("--threads", default=0, show_default=True, help="Threads of both runtimes; 0: torch's default.")
def main(presets, batch, rounds, reps, threads):
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    names = [p for p in presets.split(",") if p]
    unknown = [p for p in names if p not in PRESETS]
    if unknown:
        raise click.ClickException(f"unknown preset(s) {', '.join(unknown)}; "
                                   f"choose from {', '.join(PRESETS)}")
    print(f"batch {batch}, {threads} thread(s), {rounds} rounds x {reps} calls; torch {torch.__version__}")
    print(f"{'preset':<12} {'export s':>9} {'PyTorch/s':>10} {'ORT/s':>10} {'ORT/PyTorch':>12}  rounds")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in names:
            ckpt, out = Path(tmp) / f"{preset}.pt", Path(tmp) / f"{preset}.onnx"
            write_checkpoint(ckpt, preset)
            t0 = time.perf_counter()
            export(ExportConfig(checkpoint=str(ckpt), out=str(out)))
            export_s = time.perf_counter() - t0

            r = restore(load_checkpoint(ckpt), "cpu")
            deployed = Deployed(r.model, r.normalizer, r.aux_scaler, r.target).eval()
            feeds = check_inputs(r, batch, seed=1)
            images, aux = torch.from_numpy(feeds["images"]), torch.from_numpy(feeds["aux"])
            runtime = OnnxRegressor(out, threads=threads)

            def run_torch():
                with torch.no_grad():
                    return deployed(images, aux)

            def run_ort():
                return runtime(feeds["images"], feeds["aux"])

            run_torch(), run_ort()                                   # warm-up: allocators, kernel choice
            t_torch, t_ort = time_rounds(run_torch, run_ort, rounds, reps)
            ratios = [a / b for a, b in zip(t_torch, t_ort)]          # > 1: ONNX Runtime faster
            row = {"preset": preset, "export_s": round(export_s, 2),
                   "torch_per_s": round(batch / statistics.median(t_torch), 1),
                   "ort_per_s": round(batch / statistics.median(t_ort), 1),
                   "ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios]}
            rows.append(row)
            print(f"{preset:<12} {row['export_s']:>9.1f} {row['torch_per_s']:>10.1f} "
                  f"{row['ort_per_s']:>10.1f} {row['ratio']:>11.2f}x  "
                  f"{', '.join(f'{x:.2f}' for x in row['ratios'])}", flush=True)
    print(json.dumps({"batch": batch, "threads": threads, "rows": rows}))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
