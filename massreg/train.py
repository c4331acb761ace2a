"""Train a mass regressor (a DeepViT or a ResNet) on one converted HDF5 data set (several files = shards).

    python -m massreg.train data/top.h5 --model tiny --epochs 8 --run-dir runs/demo
    python -m massreg.train data/top.h5 --recipe seed                  # the original write-up, for comparison
    python -m massreg.train --resume runs/demo                         # continue from runs/demo/last.pt
    torchrun --nproc_per_node=4 -m massreg.train data/top_*.h5 ...     # DistributedDataParallel

Model selection uses the `val` split only; the `test` split is never opened here. The run directory gets
config.json, metrics.csv (one row per epoch), last.pt, best_val_loss.pt, best_mre.pt (each written atomically,
each enough to rebuild the model and resume) and plots/ (loss curves; predictions of best_val_loss.pt on val).

Recipes (explicit options override a recipe's values; config.json records the recipe and the final values):
  seed     the original write-up: Adam lr 1e-3, weight decay 1e-4 (L2), ExponentialLR gamma 0.4 stepped per
           epoch, batch 32, 25 epochs, MSE on the standardised mass, z-score normalisation from the file's
           stats, no aux, no flips, model `seed`. It uses the file's channels (convert with the default
           --channels 0,1,2,3 for the write-up's "first four channels").
  default  what trains, chosen by measurement on generated `top` data (README): AdamW, linear warm-up then
           cosine decay per step, Huber loss on the standardised mass, fixed per-channel reference scales,
           flips in eta/phi, the aux scalars (pt, ieta, iphi) fed to the model, grad clipping; peak lr by
           model size (DEFAULT_LR) unless --lr is given.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from massreg import checkpoint as ck
from massreg import engine
from massreg.config import PRESETS, describe
from massreg.stopping import EpochProgress, StepGate

if TYPE_CHECKING:  # annotations only: the data and model modules load when a run starts
    from torch.utils.data import Dataset

    from massreg.config import ModelConfig
    from massreg.data import AuxScaler, H5Images, Normalizer, TargetScaler
    from massreg.prefetch import DevicePrefetcher

AUX_NAMES = ("pt", "ieta", "iphi")
PATCH_PRESETS = tuple(name for name, preset in PRESETS.items() if preset.stem == "patch")  # have patch_norm
RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best_val_loss.pt", "best_mre.pt")
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_mae", "val_mre", "val_resolution", "lr", "seconds",
                  "samples_per_s")


class ConfigError(Exception):
    """An impossible option combination or a run directory we may not use; one line."""


class TrainingError(Exception):
    """Training had to stop (non-finite loss); the message names epoch, step and the last good checkpoint."""


class OutputError(Exception):
    """A run file could not be written (a full disk, a vanished directory); one line naming it."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Filled from a recipe, then the explicit command-line options."""
    data: tuple[str, ...] = ()
    run_dir: str = ""
    recipe: str = "default"
    overrides: tuple[str, ...] = ()   # the options given explicitly on top of the recipe
    model: str = "seed"               # massreg.config preset
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adamw"          # adam (L2 weight decay, as the write-up) | adamw (decoupled)
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"          # cosine: warm-up + cosine per step | exponential: per epoch | constant
    gamma: float = 0.4                # exponential: lr * gamma ** epoch
    warmup_fraction: float = 0.05     # cosine: share of all steps spent warming up linearly
    min_lr_ratio: float = 0.01        # cosine: final lr = lr * min_lr_ratio
    loss: str = "huber"               # on the standardised mass: mse | l1 | huber
    huber_delta: float = 0.2          # in standard deviations of the mass (~25 GeV on top data)
    grad_clip: float = 1.0            # max global grad norm; 0 = off
    norm: str = "reference"           # stats (z-score from /stats) | reference (fixed per-channel scales)
    aux: bool = True                  # feed pt, ieta, iphi (normalised) to the model
    flips: bool = True                # random flips in eta and phi, a function of (seed, epoch, row)
    shuffle: str = "row"              # row: uniform order | block: contiguous blocks, shuffled in windows
    patch_norm: bool | None = None    # None: the preset's; False drops the LayerNorm over raw patch pixels
    device: str = "auto"              # auto | cpu | cuda
    amp: bool = False                 # bf16 autocast on CUDA; a no-op on CPU
    compile: bool = False
    workers: int = 0
    seed: int = 0
    max_train_samples: int | None = None
    eval_every: int = 1
    checkpoint_every_minutes: float = 0.0  # also write last.pt inside an epoch this often; 0: at epoch ends
    resume: str | None = None
    force: bool = False


RECIPES: dict[str, dict] = {
    "seed": dict(model="seed", epochs=25, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                 schedule="exponential", gamma=0.4, loss="mse", grad_clip=0.0, norm="stats", aux=False,
                 flips=False),
    "default": dict(model="seed", epochs=20, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                    schedule="cosine", warmup_fraction=0.05, min_lr_ratio=0.01, loss="huber", huber_delta=0.2,
                    grad_clip=1.0, norm="reference", aux=True, flips=True),
}
# The default recipe's peak learning rate by model preset, unless --lr is given. Measured on 7,000 generated
# top rows, 8 channels, a 30-epoch schedule (README, "On a GPU"): the 43 M-parameter `seed` reached a test
# MAE of 0.85x the constant prediction at 1e-3, 0.75x at 3e-4 and 0.57x at 1e-4; `tiny` trains well at 1e-3
# and not at 3e-3. `resnet` trained well at 1e-3 in issue 9's probes (8 epochs of demo-size data); hybrid and
# hybrid49 are only checked to learn at 1e-3 (3 epochs on 6,000 generated rows: 0.74x and 0.72x the constant's
# val MAE), not tuned. resnet-wide (1e-3, as BatchNorm ResNets generally) and hybrid-seed (1e-4, as seed) are
# unmeasured guesses.
DEFAULT_LR = {"tiny": 1e-3, "small": 1e-3, "seed": 1e-4, "hybrid": 1e-3, "hybrid49": 1e-3,
              "hybrid-seed": 1e-4, "resnet": 1e-3, "resnet-wide": 1e-3}
CHOICES = {"recipe": tuple(RECIPES), "optimizer": ("adam", "adamw"),
           "schedule": ("cosine", "exponential", "constant"), "loss": ("mse", "l1", "huber"),
           "norm": ("stats", "reference"), "device": ("auto", "cpu", "cuda"), "shuffle": ("row", "block")}
# Options that may change when a run is resumed: they change where and how fast it runs, not what it computes
# (epochs may grow; with a cosine schedule that stretches the remaining decay).
RESUME_MUTABLE = {"device", "amp", "compile", "workers", "eval_every", "epochs", "resume", "force", "run_dir",
                  "data", "checkpoint_every_minutes"}


def build_config(recipe: str = "default", **overrides) -> TrainConfig:
    """TrainConfig from a recipe plus explicit overrides (None values are ignored), validated."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}")
    if "data" in given:
        given["data"] = tuple(str(p) for p in given["data"])
    explicit = tuple(sorted(k for k in given if k not in ("data", "run_dir", "resume", "force")))
    base = dict(RECIPES[recipe])
    if recipe == "default":
        base["lr"] = DEFAULT_LR.get(given.get("model", base["model"]), base["lr"])
    config = TrainConfig(**{**base, **given, "recipe": recipe, "overrides": explicit})
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Check option values and combinations before any work starts (ConfigError, one line)."""
    for name, allowed in CHOICES.items():
        if getattr(c, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(c, name)!r}: "
                              f"choose one of {', '.join(allowed)}")
    positive = {"epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr, "eval_every": c.eval_every,
                "huber_delta": c.huber_delta, "gamma": c.gamma}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("weight_decay", "grad_clip", "workers", "checkpoint_every_minutes"):
        if getattr(c, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
    if not 0 <= c.warmup_fraction < 1 or not 0 <= c.min_lr_ratio <= 1:
        raise ConfigError("warmup_fraction must be in [0, 1) and min_lr_ratio in [0, 1]")
    if c.max_train_samples is not None and c.max_train_samples < 1:
        raise ConfigError(f"--max-train-samples must be >= 1, got {c.max_train_samples}")
    if c.resume and c.force:
        raise ConfigError("--resume continues a run and --force starts it afresh: give one of them")
    if c.resume and c.run_dir and Path(c.run_dir).resolve() != Path(c.resume).resolve():
        raise ConfigError(f"--resume {c.resume} writes into that run directory; drop --run-dir {c.run_dir}")
    if not c.resume and not c.data:
        raise ConfigError("give at least one DATA.h5 file (or --resume RUN_DIR)")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    if c.model not in PRESETS:
        raise ConfigError(f"--model {c.model!r}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[c.model]
    if c.patch_norm is not None and preset.stem != "patch":
        raise ConfigError(f"--{'' if c.patch_norm else 'no-'}patch-norm: the {c.model} model has no patch "
                          f"norm (only the linear patch embedding of {', '.join(PATCH_PRESETS)} has one)")


# ---------------------------------------------------------------- small helpers around the loop

def lr_at(c: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at schedule position `step` = epoch * steps_per_epoch + batch in epoch (0-based).

    The position is counted from completed epochs, not from optimizer steps taken, so a run resumed with
    another number of processes (another steps_per_epoch) continues the same curve over epochs."""
    if c.schedule == "constant":
        return c.lr
    if c.schedule == "exponential":  # torch's ExponentialLR stepped once at the end of every epoch
        return c.lr * c.gamma ** (step // steps_per_epoch)
    total = c.epochs * steps_per_epoch
    warmup = int(round(c.warmup_fraction * total))
    if step < warmup:
        return c.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    low = c.lr * c.min_lr_ratio
    return low + 0.5 * (c.lr - low) * (1.0 + math.cos(math.pi * progress))


def loss_fn(c: TrainConfig, z_pred: torch.Tensor, z_true: torch.Tensor) -> torch.Tensor:
    """Mean loss over the batch, both (B,) in standardised mass units."""
    if c.loss == "mse":
        return F.mse_loss(z_pred, z_true)
    if c.loss == "l1":
        return F.l1_loss(z_pred, z_true)
    return F.huber_loss(z_pred, z_true, delta=c.huber_delta)


def make_optimizer(c: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with L2 weight decay on everything (the write-up), or AdamW decaying only matrices (not norms,
    biases, the cls token or positions: decaying those only pulls them to zero)."""
    if c.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "pos" not in name and "cls" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    ck.atomic_write_text(path, buf.getvalue())


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) job."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(c: TrainConfig) -> Dist:
    """Single process, or DDP when torchrun set WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    cuda = c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank,
                device=torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def broadcast(obj, d: Dist):
    """rank 0's value of a picklable object on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_predictions(out: dict, d: Dist) -> dict:
    """Concatenate every rank's predictions, drop DistributedSampler's padding duplicates, order by index."""
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, out)
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("pred", "true", "index")}
    _, first = np.unique(out["index"], return_index=True)  # sorted unique positions, first occurrence
    return {k: v[first] for k, v in out.items()}


# ---------------------------------------------------------------- run directory and resume

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


def resume_config(c: TrainConfig, ckpt: dict) -> TrainConfig:
    """The stored run config, with only the options that do not change the result taken from `c`."""
    stored = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                            for k, v in ckpt["train_config"].items()
                            if k in {f.name for f in fields(TrainConfig)}})
    if "model" in c.overrides and c.model != stored.model:
        from massreg.config import model_config
        mc = ckpt["model_config"]  # same data-derived fields, so only the preset's differences are named
        asked = model_config(c.model, channels=mc["channels"], num_aux=mc["num_aux"])
        ck.check_model_config(ckpt, asdict(asked), source=f"{c.resume}/last.pt")
    clash = [f"{k}={getattr(c, k)!r} (run has {getattr(stored, k)!r})" for k in c.overrides
             if k not in RESUME_MUTABLE and getattr(c, k) != getattr(stored, k)]
    if clash:
        raise ConfigError(f"--resume continues {c.resume} with its own settings; these options differ: "
                          f"{', '.join(clash)}. Start a new run to change them")
    changes = {k: getattr(c, k) for k in c.overrides if k in RESUME_MUTABLE}
    if c.data:
        changes["data"] = c.data
    if changes.get("epochs", stored.epochs) < ckpt["epoch"]:
        raise ConfigError(f"--epochs {changes['epochs']} but {c.resume} has already done {ckpt['epoch']}")
    return replace(stored, **changes, resume=c.resume, run_dir=str(c.resume), force=False)


def check_same_data(ckpt: dict, info: list[dict], source: str) -> None:
    """The resumed run must read the same files (by size), in the same order."""
    sizes = [int(x["size"]) for x in info]
    if list(ckpt["data"]["sizes"]) != sizes:
        raise ConfigError(f"{source} was trained on {ckpt['data']['paths']} (sizes {ckpt['data']['sizes']}), "
                          f"these files have sizes {sizes}; resume with the same data files")


# ---------------------------------------------------------------- the loop

def train_one_epoch(model, loader, optimizer, c: TrainConfig, *, epoch: int, step: int, steps_per_epoch: int,
                    normalizer, target, aux_scaler, d: Dist, bar, start_step: int = 0, loss_sum: float = 0.0,
                    count: int = 0, gate: StepGate | None = None,
                    checkpoint=None) -> tuple[float, int, int, bool]:
    """One pass over the train batches (DevicePrefetcher's, or a plain loader's), from batch `start_step` of
    the epoch, the loss sum and sample count of the batches before it carried in. Returns (train loss summed
    over this rank's samples, samples, next step, stopped by a signal).

    After each step the gate (if any) is polled: a checkpoint due or a stop signal calls
    checkpoint(batches done in the epoch, step, loss sum, count); a stop then ends the epoch early.
    Raises TrainingError on a non-finite loss or gradient before the optimizer step, so the weights stay
    finite.
    """
    model.train()
    total = loss_sum
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
    for i, batch in enumerate(loader, start_step):
        lr = lr_at(c, (epoch - 1) * steps_per_epoch + i, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        z_true = target.encode(batch["m"].to(d.device, non_blocking=True).float())   # (B,)
        z_pred = engine.forward(model, batch, normalizer=normalizer, aux_scaler=aux_scaler, device=d.device,
                                amp=c.amp)                                            # (B,)
        loss = loss_fn(c, z_pred, z_true)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Under DDP the gradients are already averaged over ranks, so every rank sees the same norm and
        # stops together (a NaN on one rank would otherwise leave the others waiting).
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss_value = loss.item()
        if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
            raise TrainingError(f"non-finite loss ({loss_value}) or gradient norm ({grad_norm.item()}) at "
                                f"epoch {epoch}, step {step + 1}; stopped without taking the step")
        optimizer.step()
        step += 1
        n = int(batch["m"].shape[0])
        total += loss_value * n
        count += n
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}", refresh=False)
        if gate is not None:
            stop, due = gate.poll()
            # A save due at the epoch's last batch waits for the epoch's own checkpoint, a moment later.
            if stop or (due and i + 1 < steps_per_epoch):
                checkpoint(i + 1, step, total, count)
            if stop:
                return total, count, step, True
    return total, count, step, False


def validate_epoch(model, loader, c: TrainConfig, *, normalizer, target, aux_scaler, d: Dist) -> dict:
    """Val predictions of every rank gathered, then loss and metrics on the full split (= single process)."""
    from massreg.metrics import regression_metrics

    out = engine.predict(model, loader, normalizer=normalizer, target=target, aux_scaler=aux_scaler,
                         device=d.device, amp=c.amp)
    out = gather_predictions(out, d)
    z_pred = torch.from_numpy((out["pred"] - target.mean) / target.std)
    z_true = torch.from_numpy((out["true"] - target.mean) / target.std)
    metrics = regression_metrics(out["pred"], out["true"])
    return {"val_loss": float(loss_fn(c, z_pred, z_true)), "val_mae": metrics["mae"],
            "val_mre": metrics["mre"], "val_resolution": metrics["resolution"], "predictions": out}


# ---------------------------------------------------------------- the steps of train()

@dataclass
class RunData:
    """The train and val sets of a run and the scalers derived from the file's stats; fixed for the run."""
    train_set: H5Images             # the train split, read as stored (flips happen on the device)
    fit_set: Dataset                # train_set, or a Subset of its first --max-train-samples rows
    val_set: H5Images               # the val split
    info: list[dict]                # path and size per file: which data a checkpoint came from
    stats: dict
    channels: list
    aux_names: tuple[str, ...]      # AUX_NAMES, or () without --aux
    normalizer: Normalizer          # on the run's device
    target: TargetScaler
    aux_scaler: AuxScaler | None


@dataclass
class RunState:
    """The model, optimizer and loop position of a run: what one epoch advances and a checkpoint stores."""
    config: TrainConfig
    d: Dist
    data: RunData
    mcfg: ModelConfig
    raw_model: torch.nn.Module      # uncompiled and unwrapped: its state_dict has no prefixes
    model: torch.nn.Module          # what trains: raw_model, compiled and/or DDP-wrapped
    eval_model: torch.nn.Module     # raw_model, compiled if --compile, never DDP-wrapped
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int            # per rank
    val_loader: torch.utils.data.DataLoader
    feed: DevicePrefetcher          # the train batches: read ahead, flipped and normalised on the device
    epoch: int                      # completed epochs
    step: int                       # optimizer steps taken by this process
    best: dict                      # val_loss, val_mre and the epochs they were reached at
    history: list[dict]             # one metrics row per completed epoch
    progress: EpochProgress | None = None  # of epoch s.epoch + 1, when last.pt was written inside it

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def resolve_run(config: TrainConfig, d: Dist) -> tuple[TrainConfig, dict | None]:
    """The config to run with and, under --resume, the last.pt it continues; a new run's directory checked."""
    ckpt = None
    if config.resume:
        ckpt = ck.load_checkpoint(Path(config.resume) / "last.pt")
        config = resume_config(config, ckpt)
        if not config.data:
            config = replace(config, data=tuple(ckpt["data"]["paths"]))
    else:
        if not config.run_dir:
            config = replace(config, run_dir=broadcast(default_run_dir(), d))
        check_run_dir(config)  # before any work, on every rank, so all refuse together
    return config, ckpt


def open_data(config: TrainConfig, ckpt: dict | None, d: Dist) -> RunData:
    """The train and val splits (the test split is never opened here) and the scalers from their stats."""
    from massreg.data import AuxScaler, H5Images, Normalizer, TargetScaler

    aux_names = AUX_NAMES if config.aux else ()
    train_set = H5Images(list(config.data), "train", aux=aux_names)   # flipped on the device (prefetch)
    val_set = H5Images(list(config.data), "val", aux=aux_names)
    info = train_set.file_info()
    if ckpt is not None:
        check_same_data(ckpt, info, f"{config.resume}/last.pt")
    stats, channels = train_set.stats, list(train_set.channels)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ConfigError(f"{', '.join(config.data)}: the train split has {len(train_set)} rows and val "
                          f"{len(val_set)}; both must be non-empty (convert with more rows)")
    fit_set = train_set
    if config.max_train_samples is not None and config.max_train_samples < len(train_set):
        # The first N train rows: the split is already a seeded hash, so they are a random sample.
        fit_set = torch.utils.data.Subset(train_set, range(config.max_train_samples))
    return RunData(train_set=train_set, fit_set=fit_set, val_set=val_set, info=info, stats=stats,
                   channels=channels, aux_names=aux_names,
                   normalizer=Normalizer.from_stats(stats, config.norm, channels).to(d.device),
                   target=TargetScaler.from_stats(stats),
                   aux_scaler=AuxScaler.from_stats(stats, aux_names) if aux_names else None)


def build_state(config: TrainConfig, data: RunData, ckpt: dict | None, d: Dist) -> RunState:
    """Model and optimizer, from the seed or from last.pt, wrapped for training; the val loader."""
    from massreg.config import build_model, model_config
    from massreg.data import make_loader
    from massreg.prefetch import DevicePrefetcher, ThreadReader, WorkerReader

    mcfg = model_config(config.model, channels=len(data.channels), num_aux=len(data.aux_names),
                        **({} if config.patch_norm is None else {"patch_norm": config.patch_norm}))
    if ckpt is not None:
        ck.check_model_config(ckpt, asdict(mcfg), source=f"{config.resume}/last.pt")
    # Built from the seed: identical on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(config.seed)
    raw_model = build_model(mcfg).to(d.device)
    optimizer = make_optimizer(config, raw_model)
    epoch, step, best, history, progress = restore(config, ckpt, raw_model, optimizer, d)

    model = torch.compile(raw_model) if config.compile else raw_model
    eval_model = model                      # validation runs outside DDP: no gradient sync needed
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    per_rank = math.ceil(len(data.fit_set) / d.world)  # DistributedSampler pads every rank to this many rows
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    val_sampler = (torch.utils.data.distributed.DistributedSampler(
        data.val_set, num_replicas=d.world, rank=d.rank, shuffle=False) if d.world > 1 else None)
    val_loader = make_loader(data.val_set, batch_size=config.batch_size, shuffle=False, seed=config.seed,
                             workers=config.workers, sampler=val_sampler)
    # --workers 0: reader threads in this process (faster on the machines measured: docs/performance.md);
    # --workers N: N persistent worker processes. Either way into reused (pinned on CUDA) buffers.
    reader = (WorkerReader(data.fit_set, workers=config.workers) if config.workers
              else ThreadReader(data.fit_set, pin=d.device.type == "cuda"))
    feed = DevicePrefetcher(reader, d.device, normalizer=data.normalizer, aux_scaler=data.aux_scaler,
                            flip_seed=config.seed if config.flips else None)
    return RunState(config=config, d=d, data=data, mcfg=mcfg, raw_model=raw_model, model=model,
                    eval_model=eval_model, optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                    val_loader=val_loader, feed=feed, epoch=epoch, step=step, best=best, history=history,
                    progress=progress)


def restore(config: TrainConfig, ckpt: dict | None, raw_model: torch.nn.Module,
            optimizer: torch.optim.Optimizer,
            d: Dist) -> tuple[int, int, dict, list[dict], EpochProgress | None]:
    """(epoch, step, best, history, progress) of a new run, or those of last.pt with its weights, optimizer
    state and RNG state loaded (progress: of the epoch last.pt was written inside, else None)."""
    if ckpt is None:
        torch.manual_seed(config.seed + d.rank)  # dropout masks differ between ranks
        best = {"val_loss": math.inf, "val_mre": math.inf, "epoch_val_loss": None, "epoch_mre": None}
        return 0, 0, best, [], None
    progress = EpochProgress.from_dict(ckpt.get("epoch_progress"))
    if progress is not None and len(progress.counts) != d.world:
        # The epoch's batches are split over the ranks: its rest only exists for the same number of them.
        raise ConfigError(f"{config.resume}/last.pt was written inside epoch {int(ckpt['epoch']) + 1} by "
                          f"{len(progress.counts)} process(es); resume it with {len(progress.counts)}, not "
                          f"{d.world}")
    try:
        raw_model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ck.CheckpointError(f"{config.resume}/last.pt: weights do not fit --model {config.model}: "
                                 f"{str(exc).splitlines()[0]}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    epoch, step, best = int(ckpt["epoch"]), int(ckpt["step"]), dict(ckpt["best"])
    history = [dict(r) for r in ckpt["metrics_history"]]
    rng = ckpt["rng"]
    ck.restore_rng(rng["ranks"][d.rank] if rng.get("ranks") and len(rng["ranks"]) == d.world else rng)
    return epoch, step, best, history, progress


def write_run_config(s: RunState, *, new_run: bool) -> None:
    """config.json in the run directory (made, or cleared with --force, for a new run). Rank 0 writes; the
    others wait so nobody reads a half-made directory."""
    d, config = s.d, s.config
    if d.world > 1:
        dist.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if d.main:
        if new_run:
            prepare_run_dir(config)
        config_json = {"train": asdict(config), "model": asdict(s.mcfg), "data": s.data.info,
                       "channels": s.data.channels, "world_size": d.world, "device": str(d.device),
                       "torch": torch.__version__,
                       "parameters": sum(p.numel() for p in s.raw_model.parameters())}
        ck.atomic_write_text(s.run_dir / "config.json", json.dumps(ck.to_plain(config_json), indent=2) + "\n")
    if d.world > 1:
        dist.barrier()


def train_epoch(s: RunState, gate: StepGate | None = None) -> dict | None:
    """Train epoch s.epoch + 1 (from where a mid-epoch last.pt left it) and count it done; its metrics row
    (train loss averaged over all ranks). None: a stop signal ended it, last.pt holds the step it ended at."""
    from tqdm.auto import tqdm

    from massreg.data import EpochBatches

    config, d, data = s.config, s.d, s.data
    done = s.progress or EpochProgress(loss_sums=(0.0,) * d.world, counts=(0,) * d.world)
    # The batches and the flips of this epoch: functions of (seed, epoch, step), split over the ranks.
    batches = EpochBatches(len(data.fit_set), config.batch_size, order=config.shuffle, seed=config.seed,
                           epoch=s.epoch, rank=d.rank, world=d.world, start_step=done.batches)
    assert batches.steps() == s.steps_per_epoch, (batches.steps(), s.steps_per_epoch)
    loader = s.feed.epoch(batches, s.epoch)
    bar = tqdm(total=s.steps_per_epoch, initial=done.batches, desc=f"epoch {s.epoch + 1}/{config.epochs}",
               unit="step", file=sys.stderr, leave=False, disable=True if not d.main else None)

    def checkpoint(batches_done: int, step: int, loss_sum: float, count: int) -> None:
        s.step = step
        sums = [(loss_sum, count)]
        if d.world > 1:
            sums = [None] * d.world
            dist.all_gather_object(sums, (loss_sum, count))
        s.progress = EpochProgress(batches_done, tuple(x[0] for x in sums), tuple(x[1] for x in sums))
        save_progress(s)
        gate.saved()

    t0 = time.perf_counter()
    try:
        loss_sum, n_seen, s.step, stopped = train_one_epoch(
            s.model, loader, s.optimizer, config, epoch=s.epoch + 1, step=s.step,
            steps_per_epoch=s.steps_per_epoch, normalizer=data.normalizer, target=data.target,
            aux_scaler=data.aux_scaler, d=d, bar=bar, start_step=done.batches,
            loss_sum=done.loss_sums[d.rank], count=done.counts[d.rank], gate=gate, checkpoint=checkpoint)
    except TrainingError as exc:
        if s.progress is not None:   # last.pt was written inside this epoch (a timed checkpoint, a resume)
            kept = f"{s.run_dir}/last.pt (epoch {s.epoch + 1}, batch {s.progress.batches})"
        else:
            kept = f"{s.run_dir}/last.pt (epoch {s.epoch})" if s.epoch else "none (this was the first epoch)"
        raise TrainingError(f"{exc}; last good checkpoint: {kept}. Try a lower --lr or check the data") \
            from None
    finally:
        loader.close()    # an epoch stopped early (a signal, a non-finite loss) ends its reader threads now
        bar.close()
    if stopped:
        return None
    seconds = time.perf_counter() - t0
    n_now = n_seen - done.counts[d.rank]   # samples trained in this process (not before a resume)
    sums = torch.tensor([loss_sum, n_seen, n_now], dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(sums)
    s.epoch += 1
    s.progress = None
    return {"epoch": s.epoch, "train_loss": (sums[0] / sums[1]).item(),
            "lr": lr_at(config, s.epoch * s.steps_per_epoch - 1, s.steps_per_epoch),  # the epoch's last
            "seconds": round(seconds, 3), "samples_per_s": round(sums[2].item() / seconds, 2)}


def validate_and_rank(s: RunState, row: dict) -> tuple[bool, bool]:
    """Validate when due (every --eval-every epochs, and the last), adding the val metrics to `row` and
    updating s.best; returns whether val_loss and val_mre improved (both False when not validated)."""
    if not (s.epoch % s.config.eval_every == 0 or s.epoch == s.config.epochs):
        return False, False
    if s.d.world > 1:
        # BatchNorm running statistics: DDP broadcasts rank 0's before each training forward, then every rank
        # updates its copy from its own batch. Take rank 0's (what the checkpoint stores), so that every rank
        # validates the same model. Nothing to do for a model without buffers (the patch-embedding DeepViT).
        for buffer in s.raw_model.buffers():
            dist.broadcast(buffer, src=0)
    val = validate_epoch(s.eval_model, s.val_loader, s.config, normalizer=s.data.normalizer,
                         target=s.data.target, aux_scaler=s.data.aux_scaler, d=s.d)
    row.update({k: val[k] for k in ("val_loss", "val_mae", "val_mre", "val_resolution")})
    better_loss = val["val_loss"] < s.best["val_loss"]
    better_mre = val["val_mre"] < s.best["val_mre"]
    if better_loss:
        s.best.update(val_loss=val["val_loss"], epoch_val_loss=s.epoch, val_mae=val["val_mae"])
    if better_mre:
        s.best.update(val_mre=val["val_mre"], epoch_mre=s.epoch)
    return better_loss, better_mre


def checkpoint_payload(s: RunState) -> dict:
    """Everything needed to rebuild the model and resume. Collective under DDP: every rank must call it."""
    config, data, spe = s.config, s.data, s.steps_per_epoch
    rng = ck.capture_rng()
    if s.d.world > 1:
        ranks = [None] * s.d.world
        dist.all_gather_object(ranks, rng)
        rng = {**rng, "ranks": ranks}
    stats, aux_names = data.stats, data.aux_names
    return ck.to_plain({
        "model": s.raw_model.state_dict(), "model_config": asdict(s.mcfg), "train_config": asdict(config),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": {"schedule": config.schedule, "steps_per_epoch": spe,
                      "lr": lr_at(config, max(s.epoch * spe - 1, 0), spe)},
        "epoch": s.epoch, "step": s.step, "best": s.best,
        "normalizer": data.normalizer.to_dict(),
        "target": {"mean": data.target.mean, "std": data.target.std},
        "aux": {"names": list(aux_names), "mean": [float(stats[f"{a}_mean"]) for a in aux_names],
                "std": [float(stats[f"{a}_std"]) for a in aux_names]},
        "data": {"paths": [x["path"] for x in data.info], "sizes": [x["size"] for x in data.info],
                 "channels": data.channels, "stats": stats},
        "rng": rng, "metrics_history": s.history,
        "epoch_progress": None if s.progress is None else s.progress.to_dict()})


def write_or_fail(path: Path, write, *args) -> None:
    """write(path, *args) (an atomic write); a failed write (a full disk, a vanished directory) becomes one
    line naming the file and the cause: the file keeps its previous content, no temporary is left."""
    try:
        write(path, *args)
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}; it keeps its previous content "
                          f"(if any). Free space and continue with --resume {path.parent}") from None


def save_progress(s: RunState) -> None:
    """last.pt inside an epoch (s.progress set): a stop signal, or --checkpoint-every-minutes."""
    state = checkpoint_payload(s)  # collective under DDP: every rank takes part
    if s.d.main:
        write_or_fail(s.run_dir / "last.pt", ck.save_checkpoint, state)
    if s.d.world > 1:
        # The others wait for the write: a rank that left first would make torchrun stop rank 0 mid-write.
        dist.barrier()


def save_epoch(s: RunState, row: dict, better_loss: bool, better_mre: bool, say) -> None:
    """last.pt, the best_*.pt that improved, metrics.csv and the epoch's summary line (rank 0 writes)."""
    state = checkpoint_payload(s)  # collective under DDP: every rank takes part
    if not s.d.main:
        return
    write_or_fail(s.run_dir / "last.pt", ck.save_checkpoint, state)
    if better_loss:
        write_or_fail(s.run_dir / "best_val_loss.pt", ck.save_checkpoint, state)
    if better_mre:
        write_or_fail(s.run_dir / "best_mre.pt", ck.save_checkpoint, state)
    write_or_fail(s.run_dir / "metrics.csv", write_metrics_csv, s.history)
    marks = ("  *loss" if better_loss else "") + ("  *mre" if better_mre else "")
    say(summary_line(row, s.config.epochs) + marks)


def train(config: TrainConfig, *, stop_after_epochs: int | None = None, echo=click.echo) -> dict:
    """Train (or resume) a run; returns {"run_dir", "best", "history", "epoch", "config", "stopped"}.

    stop_after_epochs: leave after that many epochs in this call, as if the job had been stopped there
    (the next call with resume=RUN_DIR continues; used by the resume test and time-limited batch jobs).
    A stop signal (SIGTERM, SIGHUP, SIGUSR1) ends the run after the step in progress with last.pt written at
    that step; "stopped" is then the signal's number (else None) and a line on stderr says how to continue.
    """
    validate(config)
    d = setup_distributed(config)
    say = echo if d.main else (lambda *a, **k: None)
    s = None
    try:
        config, ckpt = resolve_run(config, d)
        if config.amp and d.device.type != "cuda":
            say("note: --amp (bf16 autocast) applies on CUDA only; running in float32 on CPU")
        data = open_data(config, ckpt, d)
        s = build_state(config, data, ckpt, d)
        write_run_config(s, new_run=ckpt is None)
        say(f"run {s.run_dir}: {config.model} model ({count_params(s.raw_model)} parameters), recipe "
            f"{config.recipe}, {len(data.fit_set)} train / {len(data.val_set)} val rows, "
            f"{len(data.channels)} channels, {d.world} process(es) on {d.device}, "
            f"{s.steps_per_epoch} steps per epoch")

        stopped = run_epochs(s, stop_after_epochs, say)
        if stopped is not None:
            where = (f"inside epoch {s.epoch + 1} after batch {s.progress.batches}/{s.steps_per_epoch}"
                     if s.progress is not None else f"after epoch {s.epoch}")
            say(f"Error: training of {s.run_dir} interrupted by {signal.Signals(stopped).name} {where} "
                f"(step {s.step}); last.pt holds that step: continue with "
                f"`python -m massreg.train --resume {s.run_dir}`.", err=True)
            return {"run_dir": str(s.run_dir), "best": s.best, "history": s.history, "epoch": s.epoch,
                    "config": config, "stopped": stopped}
        if d.main and s.epoch >= config.epochs:
            make_plots(s.run_dir, s.history, s.raw_model, data.val_set, config, normalizer=data.normalizer,
                       target=data.target, aux_scaler=data.aux_scaler, device=d.device, echo=say)
        if d.world > 1:
            dist.barrier()
        return {"run_dir": str(s.run_dir), "best": s.best, "history": s.history, "epoch": s.epoch,
                "config": config, "stopped": None}
    finally:
        if s is not None:
            s.feed.close()
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_epochs(s: RunState, stop_after_epochs: int | None, say) -> int | None:
    """Epochs until config.epochs (or stop_after_epochs more), each validated and checkpointed; the number of
    the stop signal that ended them early (last.pt written at the step it arrived in), else None."""
    start_epoch = s.epoch
    with StepGate(s.config.checkpoint_every_minutes, rank=s.d.rank, world=s.d.world,
                  device=s.d.device) as gate:
        while s.epoch < s.config.epochs:
            if stop_after_epochs is not None and s.epoch - start_epoch >= stop_after_epochs:
                break
            row = train_epoch(s, gate)
            if row is None:
                return gate.signum
            better_loss, better_mre = validate_and_rank(s, row)
            s.history.append(row)
            save_epoch(s, row, better_loss, better_mre, say)
            gate.saved()
            if gate.poll()[0]:   # a signal during validation or the checkpoint: stop at the epoch's end
                return gate.signum
    return None


def count_params(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def summary_line(row: dict, epochs: int) -> str:
    """One line per epoch, e.g. `epoch 3/8  train 0.1234  val 0.1100  MAE 31.2 GeV  ...`."""
    text = f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}"
    if row.get("val_loss") is not None:
        text += (f"  val_loss {row['val_loss']:.4f}  val_mae {row['val_mae']:.2f} GeV  val_mre "
                 f"{row['val_mre']:.4f}  val_res {row['val_resolution']:.4f}")
    return text + f"  lr {row['lr']:.2e}  {row['seconds']:.1f} s  {row['samples_per_s']:.0f} samples/s"


def make_plots(run: Path, history: list[dict], raw_model, val_set, c: TrainConfig, *, normalizer, target,
               aux_scaler, device, echo) -> None:
    """Loss curves, and val predictions of best_val_loss.pt (reloaded, so a resumed run plots the same)."""
    from massreg import plots
    from massreg.data import make_loader

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


# ---------------------------------------------------------------- CLI

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
               epilog="Model presets (--model):\n\n\b\n" + "\n".join(
                   f"{name:<13}{describe(preset)}" for name, preset in PRESETS.items()))
@click.argument("data", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), help="Output folder [runs/<timestamp>].")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="default", show_default=True,
              help="Defaults for the options below; explicit options override them.")
@click.option("--model", help="Model preset (listed below) [seed].")
@click.option("--epochs", type=int, help="[recipe]")
@click.option("--batch-size", type=int, help="[recipe]")
@click.option("--lr", type=float,
              help="Peak learning rate [recipe; the default recipe's by model: "
                   + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()) + "].")
@click.option("--weight-decay", type=float, help="[recipe]")
@click.option("--optimizer", type=click.Choice(CHOICES["optimizer"]), help="[recipe]")
@click.option("--schedule", type=click.Choice(CHOICES["schedule"]), help="[recipe]")
@click.option("--loss", type=click.Choice(CHOICES["loss"]), help="On the standardised mass [recipe].")
@click.option("--huber-delta", type=float,
              help="Huber transition, in standard deviations of the mass [recipe].")
@click.option("--grad-clip", type=float, help="Max global gradient norm; 0 = off [recipe].")
@click.option("--norm", type=click.Choice(CHOICES["norm"]),
              help="Images: z-score from /stats or fixed scales.")
@click.option("--aux/--no-aux", default=None, help="Feed pt, ieta, iphi to the model [recipe].")
@click.option("--flips/--no-flips", default=None, help="Random flips in eta and phi while training [recipe].")
@click.option("--shuffle", type=click.Choice(CHOICES["shuffle"]), default="row", show_default=True,
              help="Train order: uniform over rows, or contiguous blocks shuffled in windows (data larger "
                   "than the page cache: docs/training.md).")
@click.option("--patch-norm/--no-patch-norm", default=None,
              help=f"LayerNorm over raw patch pixels ({', '.join(PATCH_PRESETS)} only) [preset's].")
@click.option("--device", type=click.Choice(CHOICES["device"]), default="auto", show_default=True)
@click.option("--amp/--no-amp", default=False, show_default=True, help="bf16 autocast (CUDA only).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Reader processes (persistent DataLoader workers); 0: reader threads in this process.")
@click.option("--resume", type=click.Path(file_okay=False, exists=True),
              help="Continue RUN_DIR from last.pt (from the step it was written at, inside an epoch or not).")
@click.option("--checkpoint-every-minutes", type=float,
              help="Also write last.pt inside an epoch this often, for jobs killed without warning; a stop "
                   "signal (SIGTERM, SIGHUP, SIGUSR1) always writes it at the step it arrives in [0: off].")
@click.option("--force", is_flag=True, help="Overwrite a run directory that already holds a run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-train-samples", type=int, help="Use only the first N train rows (quick runs).")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Validate every N epochs (and last).")
@click.pass_context
def main(ctx, data, recipe, **_):
    """Train a mass regressor (--model) on DATA.h5 (several files = shards of one data set).

    SIGTERM, SIGHUP or SIGUSR1 (a batch system's time limit or preemption) end the run after the step in
    progress, with last.pt written at that step (exit status 128 + the signal's number); --resume RUN_DIR
    continues there and ends as an uninterrupted run would. Ctrl-C stops at once: last.pt keeps the last
    checkpoint written.
    """
    from click.core import ParameterSource

    from massreg.data import LayoutError
    from pipeline.signals import exit_on_interrupt

    # Only what the user typed overrides the recipe (and, under --resume, is checked against the run);
    # the click defaults of the other options equal TrainConfig's.
    typed = {("compile" if n == "compile_" else n): v for n, v in ctx.params.items()
             if n not in ("data", "recipe") and ctx.get_parameter_source(n) in
             (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    try:
        config = build_config(recipe, data=data, **typed)
        if config.resume and ctx.get_parameter_source("recipe") == ParameterSource.COMMANDLINE:
            config = replace(config, overrides=(*config.overrides, "recipe"))  # checked against the run's
        run = config.resume or config.run_dir or "a new run"
        outcome = "its last.pt (if any) holds the last checkpoint written"
        with exit_on_interrupt(f"training of {run}", outcome):
            result = train(config)
        if result["stopped"] is not None:
            sys.exit(128 + result["stopped"])
    except (ConfigError, TrainingError, OutputError, ck.CheckpointError, LayoutError) as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
