"""The quantile head's final fit: the head alone, trained again on the finished trunk's features of the train
jets in the flips the trunk was trained with, on a schedule of its own.

    finish_checkpoints(run_dir, model, data, config, device, stop=..., say=print)   # what the trainer calls
    rows = head_rows(len(train_set), views=4, seed=0)          # which jets (all of them up to HEAD_FIT_ROWS)
    inputs = trunk_outputs(model, loader, normalizer=n, target=t, aux_scaler=a, device=dev, flips=True)
    before, after = fit_quantile_head(model.quantile_head, inputs, epochs=4, batch_size=64, seed=0)

Why: during training the head learns beside the trunk, on features that change under it, at the trunk's
learning rate, which is near its floor by the time the features are final. Measured on three models of the
demo's budget (docs/training.md, docs/evaluation.md): as trained, the widths missed the train jets' own
quantiles by up to 38 % in some bins of predicted mass, a shape the val calibration then had to fit from a few
hundred jets a knot; with this fit the coverage per bin of predicted mass on fresh jets is flatter (standard
deviation over the bins 0.014-0.016 against 0.022-0.035).

The trunk and the point estimate are not touched: the features are computed without gradients.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from massreg import checkpoint as ck
from massreg import engine
from massreg.optim import QUANTILES, pinball_loss
from massreg.resolution import calibrate
from massreg.rundir import write_or_fail
from massreg.sampling import make_loader
from massreg.transforms import encode_aux

# At most this many (jet, flip) rows: every jet of the demo in its 4 flips, 25,000 jets of a large set. The
# head has ~8,000 parameters; the features take (rows x (dim + 1)) float32: 52 MB at dim 128.
HEAD_FIT_ROWS = 100_000
HEAD_FIT_LR = 1e-3              # AdamW peak learning rate, cosine to 0 over the fit
HEAD_FIT_WEIGHT_DECAY = 0.05    # on the head's matrices (as massreg.optim.make_optimizer: not norms, biases)
CHECKPOINTS = ("last.pt", "best_val_loss.pt", "best_mre.pt")


def finish_checkpoints(run_dir: Path, model: torch.nn.Module, data, c, device: torch.device, *, stop,
                       say) -> None:
    """The quantile head of every checkpoint of a finished run fitted again on its own frozen trunk,
    calibrated on val and written back (atomically) with a "head_fit" record. A checkpoint whose record is of
    its epoch is done: a resumed run (stopped during this, or extended by --epochs) does the rest.
    Checkpoints of one epoch hold one model, fitted once. Leaves at once when stop() turns true (the
    checkpoint in progress is not written). model: the run's (a copy is fitted); data: the trainer's RunData;
    c: its TrainConfig. One process: under DDP the trainer calls it on rank 0."""
    done: dict[int, tuple[dict, dict]] = {}     # epoch -> (the fitted model's state_dict, its record)
    for name in CHECKPOINTS:
        path = Path(run_dir) / name
        if not path.exists():
            continue
        ckpt = ck.load_checkpoint(path)                     # on the CPU: one model at a time on the device
        epoch = int(ckpt["epoch"])
        if (ckpt.get("head_fit") or {}).get("epoch") == epoch:
            continue
        if epoch not in done:
            fitted = fit_checkpoint_head(model, ckpt, data, c, device, stop)
            if fitted is None:
                return
            done[epoch] = fitted
            info = fitted[1]
            say(f"quantile head of {name} (epoch {epoch}) fitted on its trunk: {info['jets']} train jets x "
                f"{info['views']} flip(s), {info['epochs']} epochs, pinball loss {info['loss_before']:.4f} "
                f"-> {info['loss_after']:.4f}; widths calibrated on {info['val_jets']} val jets")
        state, info = done[epoch]
        write_or_fail(path, ck.save_checkpoint, ck.to_plain({**ckpt, "model": state, "head_fit": info}))


def fit_checkpoint_head(model: torch.nn.Module, ckpt: dict, data, c, device: torch.device,
                        stop) -> tuple[dict, dict] | None:
    """(state_dict, record) of the checkpoint's model (loaded into a copy of `model`) with its quantile head
    fitted on the train jets (in the flips of --flips) and calibrated on the whole val split. None when stop()
    turned true before the end."""
    model = copy.deepcopy(model)
    model.load_state_dict(ckpt["model"])
    views = len(engine.FLIP_DIMS) if c.flips else 1
    rows = head_rows(len(data.fit_set), views, c.seed)
    loader = make_loader(Subset(data.fit_set, rows.tolist()), batch_size=c.batch_size, shuffle=False,
                         seed=c.seed, workers=c.workers)
    inputs = trunk_outputs(model, loader, normalizer=data.normalizer, target=data.target,
                           aux_scaler=data.aux_scaler, device=device, flips=c.flips, amp=c.amp,
                           weights=data.weights, progress=True, stop=stop)
    losses = None if inputs is None else fit_quantile_head(
        model.quantile_head, inputs, epochs=c.head_epochs, batch_size=c.batch_size, seed=c.seed, stop=stop)
    del inputs
    if losses is None:
        return None
    val_loader = make_loader(data.val_set, batch_size=c.batch_size, shuffle=False, seed=c.seed,
                             workers=c.workers)   # the whole split: only this process works
    out = engine.predict(model, val_loader, normalizer=data.normalizer, target=data.target,
                         aux_scaler=data.aux_scaler, device=device, amp=c.amp)
    calibrate(model.quantile_head, out, data.target)
    record = {"epoch": int(ckpt["epoch"]), "jets": len(rows), "views": views, "epochs": c.head_epochs,
              "loss_before": losses[0], "loss_after": losses[1], "val_jets": len(out["pred"])}
    return model.state_dict(), record


def head_rows(n: int, views: int, seed: int) -> np.ndarray:
    """Sorted positions of the train jets the fit uses: all n, or a seeded random HEAD_FIT_ROWS // views."""
    keep = max(1, HEAD_FIT_ROWS // views)
    if n <= keep:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0x4EAD]).choice(n, size=keep, replace=False))


@torch.no_grad()
def trunk_outputs(model: torch.nn.Module, loader, *, normalizer: torch.nn.Module, target, aux_scaler,
                  device: torch.device, flips: bool, amp: bool = False, weights: np.ndarray | None = None,
                  progress: bool = False, stop=lambda: False) -> dict | None:
    """What the quantile head reads, for every jet of `loader` in each flip (four with flips, else as
    stored): {"features" (R, D), "z" (R,) the point, "z_true" (R,), "weight" (R,) or None} on `device`,
    float32, R = jets x views. weights: per train row (batch "index"), the --reweight flat weights. None if
    stop() turns true (polled after every batch: a stop signal)."""
    model.eval()
    views = engine.FLIP_DIMS if flips else ((),)
    parts: dict[str, list] = {"features": [], "z": [], "z_true": [], "weight": []}
    for batch in tqdm(loader, desc="head features", unit="batch", leave=False,
                      disable=None if progress else True):   # None: shown on a terminal only
        if stop():
            return None
        x = normalizer(batch["images"].to(device, non_blocking=True))             # (B, C, H, W) float32
        aux = None if aux_scaler is None else encode_aux(aux_scaler, batch["aux"].to(device))   # (B, A)
        z_true = target.encode(batch["m"].to(device).float())                     # (B,)
        for dims in views:
            with engine.autocast(device, amp):
                features, z = model.trunk(x.flip(dims) if dims else x, aux)      # (B, D), (B,)
            parts["features"].append(features.float())
            parts["z"].append(z.float())
            parts["z_true"].append(z_true)
            if weights is not None:
                parts["weight"].append(torch.as_tensor(weights[batch["index"].numpy()], dtype=torch.float32,
                                                       device=device))
    return {k: torch.cat(v) if v else None for k, v in parts.items()}


def head_loss(head: torch.nn.Module, inputs: dict, idx: torch.Tensor | slice) -> torch.Tensor:
    """The pinball losses of the head's raw q16 and q84 (train mode: no calibration) on rows `idx`."""
    out = head(inputs["features"][idx], inputs["z"][idx])                       # (B, 3) [q16, z, q84]
    w = None if inputs["weight"] is None else inputs["weight"][idx]
    return (pinball_loss(out[:, 0], inputs["z_true"][idx], QUANTILES[0], w)
            + pinball_loss(out[:, 2], inputs["z_true"][idx], QUANTILES[1], w))


def fit_quantile_head(head: torch.nn.Module, inputs: dict, *, epochs: int, batch_size: int, seed: int,
                      stop=lambda: False) -> tuple[float, float] | None:
    """Train `head` alone on `inputs` (trunk_outputs): AdamW from its current weights, cosine from
    HEAD_FIT_LR to 0 over epochs x (rows // batch_size) steps, rows shuffled by a generator seeded with
    `seed` (the global RNG is not touched). Leaves the head in eval mode; returns the pinball loss over all
    rows before and after, or None if stop() turned true (polled after every step; the head is then half
    fitted: do not keep it). The calibration buffers are not changed: fit them on val afterwards."""
    n = int(inputs["z"].shape[0])
    matrices = [p for p in head.parameters() if p.ndim >= 2]
    others = [p for p in head.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": HEAD_FIT_WEIGHT_DECAY},
                                   {"params": others, "weight_decay": 0.0}], lr=HEAD_FIT_LR)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    total = epochs * per_epoch
    head.train()
    with torch.no_grad():
        before = head_loss(head, inputs, slice(None)).item()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator).to(inputs["z"].device)
        i = step % per_epoch
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * HEAD_FIT_LR * (1.0 + math.cos(math.pi * step / total))
        loss = head_loss(head, inputs, order[i * batch_size:(i + 1) * batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stop():
            return None
    with torch.no_grad():
        after = head_loss(head, inputs, slice(None)).item()
    head.eval()
    return before, after
