"""Input, target and aux transforms: what turns stored values into model inputs and model outputs into GeV.

    norm = Normalizer.from_stats(ds.stats, "reference", ds.channels).to(device)
    x = norm(images_float16, eta, phi)           # float32 (B, C, 125, 125), flipped and normalised
    z = TargetScaler.from_stats(ds.stats).encode(m_gev)
    aux_z = encode_aux(AuxScaler.from_stats(ds.stats, ("pt", "ieta", "iphi")), aux)   # (B, 3) float32

Only torch and numpy: export and checkpoint restore load these without the dataset code (or h5py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Impact parameters: clipped to +-1 after the reference scale (docs/data.md: the stronger public submissions).
CLIP_CHANNELS = ("dz", "d0")
NORM_MODES = ("stats", "reference")


class Normalizer(torch.nn.Module):
    """float16 images -> float32, per channel (x - mean) / std, then clipped to [-clip, clip].

    mode "stats": mean/std are the train-split channel_mean/channel_std of the file (a channel with std 0
    gets std 1). mode "reference": mean 0, std 1/reference_scale (the fixed scales of the stronger public
    submissions, stored in the file), dz and d0 clipped to +-1. State lives in buffers, so .to(device) moves
    it.
    """

    def __init__(self, mean, std, clip=None, *, mode: str = "stats", channels: Sequence[str] = ()):
        super().__init__()
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float64), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(np.asarray(std, dtype=np.float64), dtype=torch.float32).reshape(-1)
        clip = torch.full_like(mean, float("inf")) if clip is None else \
            torch.as_tensor(np.asarray(clip, dtype=np.float64), dtype=torch.float32).reshape(-1)
        if not (mean.shape == std.shape == clip.shape) or bool((std <= 0).any()):
            raise ValueError(f"Normalizer needs mean, std, clip of one length and std > 0; got {mean}, {std}")
        if mode not in NORM_MODES:
            raise ValueError(f"normalisation mode must be one of {NORM_MODES}, not {mode!r}")
        self.mode, self.channels = mode, list(channels)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))  # (1, C, 1, 1) broadcast over (B, C, H, W)
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.register_buffer("clip", clip.view(1, -1, 1, 1))
        self._clipped = bool(torch.isfinite(clip).any())  # decided here, not per batch (no device sync)
        self._clip_list = [(c, float(v)) for c, v in enumerate(clip.tolist()) if math.isfinite(v)]
        self._zero_mean = bool((mean == 0).all())
        self._scratch: torch.Tensor | None = None   # the CPU path's flipped float16 batch, reused

    @classmethod
    def from_stats(cls, stats: dict, mode: str = "stats",
                   channels: Sequence[str] | None = None) -> "Normalizer":
        """From a file's /stats (H5Images.stats); `channels`: the stored channel names (H5Images.channels)."""
        if mode == "stats":
            mean = np.asarray(stats["channel_mean"], dtype=np.float64)
            std = np.asarray(stats["channel_std"], dtype=np.float64)
            return cls(mean, np.where(std > 0, std, 1.0), mode=mode, channels=channels or ())
        if mode == "reference":
            scale = np.asarray(stats["reference_scale"], dtype=np.float64)
            if channels is None or len(channels) != scale.size:
                raise ValueError(f"reference normalisation needs the {scale.size} channel names of the file")
            clip = np.where(np.isin(list(channels), CLIP_CHANNELS), 1.0, np.inf)
            return cls(np.zeros_like(scale), 1.0 / scale, clip, mode=mode, channels=channels)
        raise ValueError(f"normalisation mode must be one of {NORM_MODES}, not {mode!r}")

    def to_dict(self) -> dict:
        """Plain-python state for a checkpoint; Normalizer.from_dict(d) rebuilds it."""
        return {"mode": self.mode, "channels": self.channels, "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(), "clip": self.clip.flatten().tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        clip, channels = d.get("clip"), d.get("channels") or ()
        if clip is None and d["mode"] == "reference":  # a dict of only mode/mean/std: clip from the names
            clip = np.where(np.isin(list(channels), CLIP_CHANNELS), 1.0, np.inf) if channels else None
        return cls(d["mean"], d["std"], clip, mode=d["mode"], channels=channels)

    def forward(self, images: torch.Tensor, eta: torch.Tensor | None = None, phi: torch.Tensor | None = None,
                *, out: torch.Tensor | None = None) -> torch.Tensor:
        """float16 images (B, C, H, W) -> float32 (B, C, H, W), normalised; image b flipped in eta (H axis)
        where eta[b] and in phi (W axis) where phi[b] (bool (B,) on images' device, or None: no flips).

        Flipping commutes with the per-channel arithmetic, so the result equals normalising the flipped
        images bit for bit. `out`: a float32 (B, C, H, W) buffer to write into (reused by the caller).
        """
        assert images.ndim == 4 and images.shape[1] == self.mean.shape[1], \
            f"expected (B, {self.mean.shape[1]}, H, W) images, got {tuple(images.shape)}"
        if images.device.type == "cpu":
            return self.per_row(images, eta, phi, out)
        return self.batched(images, eta, phi, out)

    def batched(self, images, eta, phi, out):
        """Whole-batch kernels, no host sync (CUDA): a flip is a masked select of the flipped batch."""
        x = images
        if eta is not None:
            x = torch.where(eta.view(-1, 1, 1, 1), x.flip(2), x)       # (B, C, H, W) float16
            x = torch.where(phi.view(-1, 1, 1, 1), x.flip(3), x)
        x = (x.to(torch.float32) - self.mean) / self.std               # (B, C, H, W) float32
        if self._clipped:
            x = torch.minimum(torch.maximum(x, -self.clip), self.clip)
        if out is None:
            return x
        return out.copy_(x)

    def per_row(self, images, eta, phi, out):
        """The CPU path: flipped images copied into a reused float16 scratch batch by numpy (a reversed
        view copied: ~3x faster than torch.flip on the CPU), then a cast into `out` and the scale in place,
        the clip on the clipped channels only; no batch-sized temporaries (a fresh 16-32 MB tensor costs
        more in page faults than the pass). Measured, batch 64 x 4 channels, 2 threads, without flips (the
        trainer's reader flips while reading): ~1.2 ms, against ~10-30 ms for the whole-batch kernels with
        fresh tensors (docs/performance.md)."""
        if out is None:
            out = torch.empty(images.shape, dtype=torch.float32)
        assert out.dtype == torch.float32 and out.shape == images.shape
        if eta is not None and bool(eta.any() or phi.any()):
            scratch = self._scratch
            if scratch is None or scratch.shape[0] < len(images) or scratch.shape[1:] != images.shape[1:]:
                scratch = self._scratch = torch.empty(images.shape, dtype=torch.float16)
            src, dst = images.numpy(), scratch[:len(images)].numpy()            # (B, C, H, W) float16
            for b, (e, p) in enumerate(zip(eta.tolist(), phi.tolist())):
                view = src[b]                                                # (C, H, W)
                view = view[:, ::-1] if e else view                            # eta: the H axis
                np.copyto(dst[b], view[:, :, ::-1] if p else view)           # phi: the W axis
            images = scratch[:len(images)]
        # Cast first, then the arithmetic in float32 in place: a float16 operand with a float32 output takes
        # torch's unvectorised mixed-dtype loop (measured 1.5-2.6 ms against 0.93 ms for the two passes,
        # batch 64 x 4 channels, 2 threads). The same float32 operations: the same bits.
        out.copy_(images)
        if not self._zero_mean:                                              # x - 0 == x: skip a pass
            out.sub_(self.mean)
        out.div_(self.std)
        for c, v in self._clip_list:                                         # a (B, H, W) view per channel
            out[:, c].clamp_(-v, v)
        return out


@dataclass
class TargetScaler:
    """Standardises the mass: z = (m - mean) / std with the train-split m_mean / m_std; decode inverts it."""
    mean: float
    std: float

    @classmethod
    def from_stats(cls, stats: dict) -> "TargetScaler":
        mean, std = float(stats["m_mean"]), float(stats["m_std"])
        if not std > 0:
            raise ValueError(f"m_std is {std}: the train split has a single mass value, nothing to regress")
        return cls(mean, std)

    def encode(self, m_gev):
        return (m_gev - self.mean) / self.std

    def decode(self, z):
        return z * self.std + self.mean


@dataclass
class AuxScaler:
    """Standardises auxiliary inputs (B, K) with the train-split <name>_mean / <name>_std of each name."""
    names: tuple
    mean: tuple
    std: tuple

    @classmethod
    def from_stats(cls, stats: dict, names: Sequence[str]) -> "AuxScaler":
        missing = [n for n in names if f"{n}_mean" not in stats or f"{n}_std" not in stats]
        if missing:
            raise ValueError(f"/stats has no mean/std for {missing}; re-run pipeline.convert")
        std = tuple(float(stats[f"{n}_std"]) if float(stats[f"{n}_std"]) > 0 else 1.0 for n in names)
        return cls(tuple(names), tuple(float(stats[f"{n}_mean"]) for n in names), std)

    def encode(self, aux):
        """aux: (B, K) raw values (tensor or array) -> standardised, same type, device and dtype."""
        if isinstance(aux, torch.Tensor):
            mean = torch.tensor(self.mean, dtype=aux.dtype).to(aux.device, non_blocking=True)
            std = torch.tensor(self.std, dtype=aux.dtype).to(aux.device, non_blocking=True)
            return (aux - mean) / std
        return (np.asarray(aux) - np.asarray(self.mean)) / np.asarray(self.std)


def encode_aux(aux_scaler, aux: torch.Tensor) -> torch.Tensor:
    """(B, A) raw aux tensor -> (B, A) float32 standardised by `aux_scaler` (an AuxScaler, or anything with
    its encode), on aux's device: what the model takes."""
    return torch.as_tensor(aux_scaler.encode(aux), dtype=torch.float32, device=aux.device)
