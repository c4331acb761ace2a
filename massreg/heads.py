"""Output heads shared by the model families (modules only).

    head = QuantileHead(dim)           # features (B, dim), point z (B,) -> (B, 3) [q16, z, q84]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. The point z leaves QuantileHead as column 1 of
    a (B, 3) stack, whose backward would give z a strided gradient; reductions over it (the head's bias
    gradient) can then sum in another order than for a plain (B,) output, and the point model of a run with
    quantiles would drift from the same run without them by rounding. With this, it is bitwise the same."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# Knots of the width calibration in the predicted mass: equal-count groups of the val jets, one per
# CALIBRATION_JETS_PER_KNOT of them, at most CALIBRATION_KNOTS (the demo's 1,214 val jets: 6 groups). Chosen
# by measurement (docs/evaluation.md): 1, 2, 3, 4 and 6 knots for three models on two data sets; 6 kept the
# coverage of every bin of predicted mass closest to 0.68.
CALIBRATION_KNOTS = 6
CALIBRATION_JETS_PER_KNOT = 200

# The narrowest width a QuantileHead gives, in standard deviations of the mass (~0.1 GeV on top data): far
# below any resolution, far above float32's rounding of z.
MIN_WIDTH = 1e-3


class QuantileHead(nn.Module):
    """The 16 % and 84 % quantiles around a point estimate: features (B, D) and the point z (B,) ->
    (B, 3) = [q16, z, q84], non-crossing by construction: q16 = z - w_lo, q84 = z + w_hi, w = softplus(.) +
    MIN_WIDTH (softplus alone underflows to 0 in float32 far in its tail, and z - 0 == z).

    The widths see the features and z detached, so the pinball loss on q16 / q84 trains this head alone: the
    point estimate, and everything under it, is exactly what the same model without the head learns. The
    widths depend on z as well as on the features (the resolution varies with the mass by a factor ~3).

    Calibration, applied in eval mode only: factors on the lower and upper width as a function of z,
    piecewise linear between `calibration_z` (K,) knots, `calibration` (K, 2) their values, constant beyond
    the outer knots (K = 1: one factor per side). The trainer fits them on the val split after each
    validation (resolution.calibrate): the pinball loss sees the residuals of jets the model was trained on,
    narrower than those of jets it has not seen. They are saved with the weights and exported; K follows
    the checkpoint loaded (older ones hold 4 knots).
    """

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim + 1), nn.Linear(dim + 1, hidden), nn.GELU(),
                                 nn.Linear(hidden, 2))
        self.register_buffer("calibration_z", torch.zeros(1))      # (K,) knots in z; uncalibrated: K = 1
        self.register_buffer("calibration", torch.ones(1, 2))      # (K, 2) factors on the lower, upper width
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """LayerNorm 1 / 0; hidden Linear Kaiming (fan_in, ReLU gain), bias 0; last Linear std 0.01 and bias
        softplus^-1(0.5): every width starts at 0.5 standard deviations of the mass (~60 GeV on top data),
        the scale of an untrained model's residuals, not at 0."""
        norm, hidden, _, last = self.net
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
        nn.init.kaiming_normal_(hidden.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(hidden.bias)
        nn.init.trunc_normal_(last.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.constant_(last.bias, math.log(math.expm1(0.5)))

    def set_calibration(self, knots: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the calibration by `knots` (K,) and `values` (K, 2), K >= 1 (buffers resized in place)."""
        assert knots.dim() == 1 and values.shape == (knots.shape[0], 2) and knots.shape[0] >= 1, (
            knots.shape, values.shape)
        device = self.calibration.device
        self.calibration_z = knots.to(device, self.calibration_z.dtype).clone()
        self.calibration = values.to(device, self.calibration.dtype).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint's calibration may have another number of knots than this head: take its size.
        knots, values = state_dict.get(prefix + "calibration_z"), state_dict.get(prefix + "calibration")
        if knots is not None and values is not None and knots.dim() == 1 and values.shape == (knots.shape[0], 2):
            self.set_calibration(knots, values)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def factors(self, z: torch.Tensor) -> torch.Tensor:
        """(B,) z -> (B, 2) calibration factors: linear between the knots, constant outside. Written as a sum
        of clamped ramps (Clip, Sub, Mul in ONNX), so the exported graph carries it too."""
        knots, values = self.calibration_z, self.calibration                    # (K,), (K, 2)
        if knots.shape[0] == 1:
            return values.expand(z.shape[0], 2)                                 # one factor per side
        gaps = (knots[1:] - knots[:-1]).clamp(min=1e-6)                         # (K - 1,)
        slopes = (values[1:] - values[:-1]) / gaps.unsqueeze(-1)                # (K - 1, 2)
        ramps = torch.minimum(torch.maximum(z.unsqueeze(-1), knots[:-1]), knots[1:]) - knots[:-1]   # (B, K-1)
        return values[0] + ramps @ slopes                                       # (B, 2)

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """features (B, D), z (B,) -> (B, 3) [q16, z, q84] in z's units."""
        h = torch.cat((features.detach(), z.detach().unsqueeze(-1)), dim=-1)     # (B, D + 1)
        width = F.softplus(self.net(h)) + MIN_WIDTH                               # (B, 2) > 0
        if not self.training:
            width = width * self.factors(z.detach())
        centre = z.detach()
        if self.training:
            z = ContiguousGrad.apply(z)
        return torch.stack((centre - width[:, 0], z, centre + width[:, 1]), dim=-1)   # (B, 3)
