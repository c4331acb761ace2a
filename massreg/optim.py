"""The objective and the optimizer of a run: loss, learning-rate schedule, parameter groups.

    lr = lr_at(config, step, steps_per_epoch)           # the schedule, a pure function of the position
    loss = loss_fn(config, z_pred, z_true)              # (B,) standardised mass each -> scalar
    optimizer = make_optimizer(config, model)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from massreg.recipes import TrainConfig


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
