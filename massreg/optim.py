"""The objective and the optimizer of a run: losses, learning-rate schedule, parameter groups.

    lr = lr_at(config, step, steps_per_epoch)           # the schedule, a pure function of the position
    loss = loss_fn(config, z_pred, z_true)              # (B,) standardised mass each -> scalar
    total, point = objective(config, out, z_true, w)    # out (B,) or (B, 3) [q16, point, q84]; w (B,) or None
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


QUANTILES = (0.16, 0.84)   # the quantiles of a QuantileHead's outer columns: (q84 - q16) / 2 is one sigma


def loss_fn(c: TrainConfig, z_pred: torch.Tensor, z_true: torch.Tensor,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the batch, both (B,) in standardised mass units; `weight` (B,): the weighted mean."""
    reduction = "mean" if weight is None else "none"
    if c.loss == "mse":
        loss = F.mse_loss(z_pred, z_true, reduction=reduction)
    elif c.loss == "l1":
        loss = F.l1_loss(z_pred, z_true, reduction=reduction)
    else:
        loss = F.huber_loss(z_pred, z_true, delta=c.huber_delta, reduction=reduction)
    return loss if weight is None else (loss * weight).sum() / weight.sum()


def pinball_loss(q: torch.Tensor, z_true: torch.Tensor, tau: float,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """The quantile (pinball) loss of q (B,) as the tau-quantile of z_true (B,): mean of tau * r for r =
    z_true - q >= 0, (tau - 1) * r below; its minimiser over q is the tau-quantile of z_true."""
    r = z_true - q
    loss = torch.maximum(tau * r, (tau - 1.0) * r)                      # (B,) >= 0
    return loss.mean() if weight is None else (loss * weight).sum() / weight.sum()


def objective(c: TrainConfig, out: torch.Tensor, z_true: torch.Tensor,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(what is minimised, the point loss alone) for a model output `out`: (B,) a point, or (B, 3)
    [q16, point, q84]; then the point loss plus quantile_weight x the pinball losses of q16 and q84."""
    if out.dim() == 1:
        point = loss_fn(c, out, z_true, weight)
        return point, point
    # contiguous: a mean over a strided column can sum in another order than over the (B,) a point model
    # gives, and the point model would then not be bitwise the same with and without quantiles
    point = loss_fn(c, out[:, 1].contiguous(), z_true, weight)
    pinball = (pinball_loss(out[:, 0], z_true, QUANTILES[0], weight)
               + pinball_loss(out[:, 2], z_true, QUANTILES[1], weight))
    return point + c.quantile_weight * pinball, point


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
