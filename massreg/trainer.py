"""The trainer: one run from its config to its checkpoints, epoch by epoch.

    result = train(build_config("default", data=("top.h5",), model="hybrid49", run_dir="runs/x"))

train() resolves the run (new, or --resume from last.pt), opens the data, builds the model and optimizer,
then loops: train_epoch (the optimizer steps, read top to bottom), validation, checkpoints and metrics.csv;
after the last epoch, finish_run: the quantile head's final fit in every checkpoint, then the plots.
A stop signal is polled after every step (massreg.stopping.StepGate): last.pt is written at that step and
the run returns; --resume continues there, to the result of an uninterrupted run. Model selection uses the
`val` split only; the test split is never opened here.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from massreg import checkpoint as ck
from massreg import engine, headfit
from massreg.dataset import H5Images
from massreg.distributed import Dist, broadcast, gather_predictions, setup_distributed
from massreg.metrics import regression_metrics
from massreg.optim import loss_fn, lr_at, make_optimizer, objective
from massreg.prefetch import DevicePrefetcher, ThreadReader, WorkerReader
from massreg.recipes import AUX_NAMES, RESUME_MUTABLE, ConfigError, TrainConfig, check_config
from massreg.registry import ModelConfig, build_model, model_config
from massreg.resolution import calibrate
from massreg.reweight import describe as reweight_summary
from massreg.reweight import flat_weights
from massreg.rundir import (check_run_dir, count_params, default_run_dir, human_count, make_plots,
                            prepare_run_dir, summary_line, write_metrics_csv, write_or_fail)
from massreg.sampling import EpochBatches, make_loader
from massreg.plots import figure_pred_vs_true
from massreg.stopping import EpochProgress, StepGate
from massreg.tensorboard_log import TensorBoardLog
from massreg.transforms import AuxScaler, Normalizer, TargetScaler
from pipeline.errors import UserError
from pipeline.files import atomic_write_text


class TrainingError(UserError):
    """Training had to stop (non-finite loss); the message names epoch, step and the last good checkpoint."""


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
    weights: np.ndarray | None = None   # (len(fit_set),) --reweight flat sample weights, mean 1; or None


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
    val_loader: DataLoader
    feed: DevicePrefetcher          # the train batches: read ahead, flipped and normalised on the device
    epoch: int                      # completed epochs
    step: int                       # optimizer steps taken by this process
    best: dict                      # val_loss, val_mre and the epochs they were reached at
    history: list[dict]             # one metrics row per completed epoch
    progress: EpochProgress | None = None  # of epoch s.epoch + 1, when last.pt was written inside it
    tb: TensorBoardLog | None = None       # --tensorboard, on rank 0

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


# ---------------------------------------------------------------- setting up a run

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


def resume_config(c: TrainConfig, ckpt: dict) -> TrainConfig:
    """The stored run config, with only the options that do not change the result taken from `c`."""
    stored = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                            for k, v in ckpt["train_config"].items()
                            if k in {f.name for f in fields(TrainConfig)}})
    if "model" in c.overrides and c.model != stored.model:
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


def open_data(config: TrainConfig, ckpt: dict | None, d: Dist) -> RunData:
    """The train and val splits (the test split is never opened here) and the scalers from their stats."""
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
        fit_set = Subset(train_set, range(config.max_train_samples))
    weights = None
    if config.reweight == "flat":   # over the rows that train: the first len(fit_set) of the split
        n = len(fit_set)
        weights = flat_weights(train_set.targets[:n], train_set.label("pt")[:n])
    return RunData(train_set=train_set, fit_set=fit_set, val_set=val_set, info=info, stats=stats,
                   channels=channels, aux_names=aux_names,
                   normalizer=Normalizer.from_stats(stats, config.norm, channels).to(d.device),
                   target=TargetScaler.from_stats(stats),
                   aux_scaler=AuxScaler.from_stats(stats, aux_names) if aux_names else None, weights=weights)


def build_state(config: TrainConfig, data: RunData, ckpt: dict | None, d: Dist) -> RunState:
    """Model and optimizer, from the seed or from last.pt, wrapped for training; the val loader."""
    mcfg = model_config(config.model, channels=len(data.channels), num_aux=len(data.aux_names),
                        quantiles=config.quantiles,
                        **({} if config.patch_norm is None else {"patch_norm": config.patch_norm}))
    if ckpt is not None:
        ck.check_model_config(ckpt, asdict(mcfg), source=f"{config.resume}/last.pt")
    # Built from the seed: identical on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(config.seed)
    raw_model = build_model(mcfg).to(d.device)
    optimizer = make_optimizer(config, raw_model)
    epoch, step, best, history, progress = restore_training(config, ckpt, raw_model, optimizer, d)

    model = torch.compile(raw_model) if config.compile else raw_model
    eval_model = model                      # validation runs outside DDP: no gradient sync needed
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    per_rank = math.ceil(len(data.fit_set) / d.world)  # DistributedSampler pads every rank to this many rows
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    val_sampler = (DistributedSampler(
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


def restore_training(config: TrainConfig, ckpt: dict | None, raw_model: torch.nn.Module,
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
                       "parameters": count_params(s.raw_model)}
        atomic_write_text(s.run_dir / "config.json", json.dumps(ck.to_plain(config_json), indent=2) + "\n")
    if d.world > 1:
        dist.barrier()


# ---------------------------------------------------------------- the loop

def train_epoch(s: RunState, gate: StepGate) -> dict | None:
    """Train epoch s.epoch + 1 from where a mid-epoch last.pt left it (s.progress), and count it done; its
    metrics row (train loss averaged over all ranks). None: a stop signal ended it, and last.pt holds the step
    it ended at. TrainingError on a non-finite loss or gradient, raised before the optimizer step."""
    c, d, data = s.config, s.d, s.data
    done = s.progress or EpochProgress(loss_sums=(0.0,) * d.world, counts=(0,) * d.world)
    loss_sum, count = done.loss_sums[d.rank], done.counts[d.rank]   # the batches before a resume, carried
    # The batches and the flips of this epoch: functions of (seed, epoch, step), split over the ranks.
    batches = EpochBatches(len(data.fit_set), c.batch_size, order=c.shuffle, seed=c.seed, epoch=s.epoch,
                           rank=d.rank, world=d.world, start_step=done.batches)
    assert batches.steps() == s.steps_per_epoch, (batches.steps(), s.steps_per_epoch)
    loader = s.feed.epoch(batches, s.epoch)
    bar = tqdm(total=s.steps_per_epoch, initial=done.batches, desc=f"epoch {s.epoch + 1}/{c.epochs}",
               unit="step", file=sys.stderr, leave=False, disable=True if not d.main else None)
    # Clipped apart: the quantile head's gradients never change the point model's steps (or its clipping).
    head = s.raw_model.quantile_head
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    groups = [[p for p in s.model.parameters() if p.requires_grad and id(p) not in head_ids]]
    groups += [[p for p in head.parameters() if p.requires_grad]] if head is not None else []
    max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
    s.model.train()
    t0 = time.perf_counter()
    try:
        for i, batch in enumerate(loader, done.batches):
            lr = lr_at(c, s.epoch * s.steps_per_epoch + i, s.steps_per_epoch)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            z_true = data.target.encode(batch["m"].to(d.device, non_blocking=True).float())      # (B,)
            z_pred = engine.forward(s.model, batch, normalizer=data.normalizer, aux_scaler=data.aux_scaler,
                                    device=d.device, amp=c.amp)                         # (B,) or (B, 3)
            weight = None if data.weights is None else torch.from_numpy(
                data.weights[batch["index"].numpy()]).to(d.device, torch.float32, non_blocking=True)   # (B,)
            loss, point = objective(c, z_pred, z_true, weight)        # z_pred (B,) or (B, 3) with quantiles
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Under DDP the gradients are already averaged over ranks, so every rank sees the same norm and
            # stops together (a NaN on one rank would otherwise leave the others waiting).
            grad_norm = sum(torch.nn.utils.clip_grad_norm_(g, max_norm) for g in groups)
            loss_value, point_value = torch.stack((loss.detach(), point.detach())).tolist()
            if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
                raise TrainingError(non_finite_message(s, loss_value, grad_norm.item()))
            s.optimizer.step()
            s.step += 1
            n = int(batch["m"].shape[0])
            loss_sum, count = loss_sum + point_value * n, count + n      # train_loss: the point loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", lr=f"{lr:.2e}", refresh=False)
            if s.tb is not None:
                s.tb.step(s.step, point_value, lr, objective=loss_value if head is not None else None)
            stop, due = gate.poll()
            # A save due at the epoch's last batch waits for the epoch's own checkpoint, a moment later.
            if stop or (due and i + 1 < s.steps_per_epoch):
                save_progress(s, i + 1, loss_sum, count)
                gate.saved()
            if stop:
                return None
    finally:
        loader.close()    # an epoch stopped early (a signal, a non-finite loss) ends its reader threads now
        bar.close()
    return finish_epoch(s, loss_sum, count, count - done.counts[d.rank], time.perf_counter() - t0)


def non_finite_message(s: RunState, loss_value: float, grad_norm: float) -> str:
    """What a non-finite loss stopped, and which checkpoint is the last good one."""
    if s.progress is not None:   # last.pt was written inside this epoch (a timed checkpoint, a resume)
        kept = f"{s.run_dir}/last.pt (epoch {s.epoch + 1}, batch {s.progress.batches})"
    else:
        kept = f"{s.run_dir}/last.pt (epoch {s.epoch})" if s.epoch else "none (this was the first epoch)"
    return (f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at epoch {s.epoch + 1}, step "
            f"{s.step + 1}; stopped without taking the step; last good checkpoint: {kept}. Try a lower --lr "
            f"or check the data")


def finish_epoch(s: RunState, loss_sum: float, count: int, trained_now: int, seconds: float) -> dict:
    """Count the epoch done; its metrics row. trained_now: samples of this process since the epoch
    (re)started, for the throughput."""
    sums = torch.tensor([loss_sum, count, trained_now], dtype=torch.float64)
    if s.d.world > 1:
        dist.all_reduce(sums)
    s.epoch += 1
    s.progress = None
    return {"epoch": s.epoch, "train_loss": (sums[0] / sums[1]).item(),
            "lr": lr_at(s.config, s.epoch * s.steps_per_epoch - 1, s.steps_per_epoch),  # the epoch's last
            "seconds": round(seconds, 3), "samples_per_s": round(sums[2].item() / seconds, 2)}


def val_metrics(s: RunState) -> dict:
    """Val predictions of every rank gathered, then loss and metrics on the full split (= single process)."""
    data = s.data
    out = engine.predict(s.eval_model, s.val_loader, normalizer=data.normalizer, target=data.target,
                         aux_scaler=data.aux_scaler, device=s.d.device, amp=s.config.amp)
    out = gather_predictions(out, s.d)
    z_pred = torch.from_numpy((out["pred"] - data.target.mean) / data.target.std)
    z_true = torch.from_numpy((out["true"] - data.target.mean) / data.target.std)
    metrics = regression_metrics(out["pred"], out["true"])
    if s.raw_model.quantile_head is not None:
        calibrate(s.raw_model.quantile_head, out, s.data.target)
    if s.tb is not None:
        fig = figure_pred_vs_true(out["pred"], out["true"], f" (val, epoch {s.epoch})")
        s.tb.figure(s.step, "val/pred_vs_true", fig)
    return {"val_loss": float(loss_fn(s.config, z_pred, z_true)), "val_mae": metrics["mae"],
            "val_mre": metrics["mre"], "val_resolution": metrics["resolution"]}


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
    val = val_metrics(s)
    row.update(val)
    better_loss = val["val_loss"] < s.best["val_loss"]
    better_mre = val["val_mre"] < s.best["val_mre"]
    if better_loss:
        s.best.update(val_loss=val["val_loss"], epoch_val_loss=s.epoch, val_mae=val["val_mae"])
    if better_mre:
        s.best.update(val_mre=val["val_mre"], epoch_mre=s.epoch)
    return better_loss, better_mre


# ---------------------------------------------------------------- checkpoints

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


def save_progress(s: RunState, batches_done: int, loss_sum: float, count: int) -> None:
    """last.pt inside an epoch, after batch `batches_done` (a stop signal, or --checkpoint-every-minutes),
    with every rank's loss sum and sample count so far. Collective under DDP: every rank calls it."""
    sums = [(loss_sum, count)]
    if s.d.world > 1:
        sums = [None] * s.d.world
        dist.all_gather_object(sums, (loss_sum, count))
    s.progress = EpochProgress(batches_done, tuple(x[0] for x in sums), tuple(x[1] for x in sums))
    state = checkpoint_payload(s)
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


# ---------------------------------------------------------------- the quantile head's final fit

def finish_run(s: RunState, say) -> int | None:
    """What follows the last epoch, under a StepGate: the quantile heads' final fit (a stop signal ends it
    between two of its steps, and its number is returned: --resume fits the rest), then the plots (rank 0;
    seconds of work: a signal during them lets them finish, and the run is complete)."""
    c, d, data = s.config, s.d, s.data
    with StepGate(rank=d.rank, world=d.world, device=d.device) as gate:
        if c.quantiles and c.head_epochs > 0:
            if d.main:               # rank 0 works, leaving at once when the gate's flag is raised
                headfit.finish_checkpoints(s.run_dir, s.raw_model, data, c, d.device,
                                           stop=lambda: gate.flag.requested, say=say)
            if d.world > 1:
                dist.barrier()
            if gate.poll()[0]:       # collective under DDP: a signal on any rank stops every rank
                return gate.signum
        if d.main:
            paths = make_plots(s.run_dir, s.history, s.raw_model, data.val_set, c, normalizer=data.normalizer,
                               target=data.target, aux_scaler=data.aux_scaler, device=d.device, echo=say)
            if s.tb is not None:
                for path in paths or ():
                    s.tb.image(s.step, f"plots/{path.stem}", path.read_bytes())
    return None


# ---------------------------------------------------------------- the run

def train(config: TrainConfig, *, stop_after_epochs: int | None = None, echo=click.echo) -> dict:
    """Train (or resume) a run; returns {"run_dir", "best", "history", "epoch", "config", "stopped"}.

    stop_after_epochs: leave after that many epochs in this call, as if the job had been stopped there
    (the next call with resume=RUN_DIR continues; used by the resume test and time-limited batch jobs).
    A stop signal (SIGTERM, SIGHUP, SIGUSR1) ends the run after the step in progress with last.pt written at
    that step; "stopped" is then the signal's number (else None) and a line on stderr says how to continue.
    """
    check_config(config)
    d = setup_distributed(config.device)
    say = echo if d.main else (lambda *a, **k: None)
    s = None
    try:
        config, ckpt = resolve_run(config, d)
        if config.amp and d.device.type != "cuda":
            say("note: --amp (bf16 autocast) applies on CUDA only; running in float32 on CPU")
        data = open_data(config, ckpt, d)
        s = build_state(config, data, ckpt, d)
        write_run_config(s, new_run=ckpt is None)
        if config.tensorboard and d.main:   # a resumed run hides what the stopped one logged past last.pt
            s.tb = TensorBoardLog(s.run_dir, purge_step=s.step + 1 if ckpt is not None else None)
        n_params = human_count(count_params(s.raw_model))
        if data.weights is not None:
            say(f"--reweight flat: {reweight_summary(data.weights)}")
        quantiles = " with quantiles" if config.quantiles else ""
        say(f"run {s.run_dir}: {config.model} model{quantiles} ({n_params} parameters), recipe "
            f"{config.recipe}, {len(data.fit_set)} train / {len(data.val_set)} val rows, "
            f"{len(data.channels)} channels, {d.world} process(es) on {d.device}, "
            f"{s.steps_per_epoch} steps per epoch")

        stopped = run_epochs(s, stop_after_epochs, say)
        finishing = stopped is None and s.epoch >= config.epochs
        if finishing:
            stopped = finish_run(s, say)
        if stopped is not None:
            where = (f"inside epoch {s.epoch + 1} after batch {s.progress.batches}/{s.steps_per_epoch}"
                     if s.progress is not None else f"after epoch {s.epoch}")
            if finishing:
                where += " (training done; in the quantile head's final fit, which --resume completes)"
            say(f"Error: training of {s.run_dir} interrupted by {signal.Signals(stopped).name} {where} "
                f"(step {s.step}); last.pt holds that step: continue with "
                f"`python -m massreg.train --resume {s.run_dir}`.", err=True)
            return {"run_dir": str(s.run_dir), "best": s.best, "history": s.history, "epoch": s.epoch,
                    "config": config, "stopped": stopped}
        if d.world > 1:
            dist.barrier()
        return {"run_dir": str(s.run_dir), "best": s.best, "history": s.history, "epoch": s.epoch,
                "config": config, "stopped": None}
    finally:
        if s is not None:
            s.feed.close()
            if s.tb is not None:
                s.tb.close()
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
            if s.tb is not None:
                s.tb.epoch(s.step, row)
            gate.saved()
            if gate.poll()[0]:   # a signal during validation or the checkpoint: stop at the epoch's end
                return gate.signum
    return None
