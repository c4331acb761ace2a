"""The run directory and its files: config.json, metrics.csv, checkpoints, plots, the per-epoch line.

    RUN/config.json        the TrainConfig, model config, data files, world size, device, versions
    RUN/metrics.csv        one row per epoch (METRIC_COLUMNS)
    RUN/last.pt, best_val_loss.pt, best_mre.pt   (massreg.checkpoint; each written atomically)
    RUN/plots/             loss curves; predictions of best_val_loss.pt on val
"""
from __future__ import annotations

import csv
import io
import shutil
from datetime import datetime
from pathlib import Path

import torch

from massreg import checkpoint as ck
from massreg import engine, plots
from massreg.recipes import ConfigError, TrainConfig
from massreg.sampling import make_loader
from pipeline.errors import UserError
from pipeline.files import atomic_write_text

RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best_val_loss.pt", "best_mre.pt")
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_mae", "val_mre", "val_resolution", "lr", "seconds",
                  "samples_per_s")


class OutputError(UserError):
    """A run file could not be written (a full disk, a vanished directory); one line naming it."""


def default_run_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def check_run_dir(c: TrainConfig) -> list[str]:
    """Our files already in the run directory; ConfigError if there are any and --force was not given."""
    run = Path(c.run_dir)
    held = [name for name in RUN_FILES if (run / name).exists()]
    if held and not c.force:
        raise ConfigError(f"{run} already holds a run ({', '.join(held)}); continue it with --resume {run}, "
                          "or start afresh with --force")
    return held


def prepare_run_dir(c: TrainConfig) -> Path:
    """Create the run directory; with --force remove only the files a run writes (nothing else in it)."""
    run = Path(c.run_dir)
    held = check_run_dir(c)
    run.mkdir(parents=True, exist_ok=True)
    for name in held:
        (run / name).unlink()
    if (run / "plots").is_dir():
        shutil.rmtree(run / "plots")
    return run


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """metrics.csv: one row per epoch, METRIC_COLUMNS in order, empty where an epoch was not validated."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def write_or_fail(path: Path, write, *args) -> None:
    """write(path, *args) (an atomic write); a failed write (a full disk, a vanished directory) becomes one
    line naming the file and the cause: the file keeps its previous content, no temporary is left."""
    try:
        write(path, *args)
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}; it keeps its previous content "
                          f"(if any). Free space and continue with --resume {path.parent}") from None


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def human_count(n: int) -> str:
    """1234567 -> '1.23 M', 45600 -> '45.6 k'."""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def summary_line(row: dict, epochs: int) -> str:
    """One line per epoch, e.g. `epoch 3/8  train 0.1234  val 0.1100  MAE 31.2 GeV  ...`."""
    text = f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}"
    if row.get("val_loss") is not None:
        text += (f"  val_loss {row['val_loss']:.4f}  val_mae {row['val_mae']:.2f} GeV  val_mre "
                 f"{row['val_mre']:.4f}  val_res {row['val_resolution']:.4f}")
    return text + f"  lr {row['lr']:.2e}  {row['seconds']:.1f} s  {row['samples_per_s']:.0f} samples/s"


def make_plots(run: Path, history: list[dict], raw_model, val_set, c: TrainConfig, *, normalizer, target,
               aux_scaler, device, echo) -> list[Path]:
    """Loss curves, and val predictions of best_val_loss.pt (reloaded, so a resumed run plots the same)."""
    out = run / "plots"
    paths = [plots.plot_history(run / "metrics.csv", out / "history.png")]
    best_path = run / "best_val_loss.pt"
    if best_path.exists():
        best = ck.load_checkpoint(best_path, map_location=device)
        state = {k: v.clone() for k, v in raw_model.state_dict().items()}
        raw_model.load_state_dict(best["model"])
        loader = make_loader(val_set, batch_size=c.batch_size, shuffle=False, seed=c.seed, workers=c.workers)
        pred = engine.predict(raw_model, loader, normalizer=normalizer, target=target, aux_scaler=aux_scaler,
                              device=device, amp=c.amp)
        raw_model.load_state_dict(state)  # leave the caller's model as it was (last epoch)
        label = f"val, best_val_loss.pt epoch {best['epoch']}"
        paths += plots.plot_predictions(pred["pred"], pred["true"], out, "val", label=label)
    echo(f"plots: {', '.join(str(p) for p in paths)}")
    return paths
