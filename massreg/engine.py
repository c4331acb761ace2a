"""The one forward path shared by training, validation, evaluate and predict.

    out = predict(model, loader, normalizer=n, target=t, aux_scaler=a, device=dev, amp=False)
    out["pred"], out["true"], out["index"]     # (N,) GeV, (N,) GeV, (N,) row position within the split
    out["q16"], out["q84"]                     # (N,) GeV, for a model with quantiles

Batches are the dicts of massreg.dataset.H5Images: "images" float16 (B, C, 125, 125) raw values, "m" float32
(B,) GeV, "aux" float32 (B, A) raw values, "index" int64 (B,). The float16 -> float32 cast and the
normalisation happen here, on the device, so the loader moves half the bytes. A batch prepared by
massreg.prefetch.DevicePrefetcher ("x" float32 (B, C, 125, 125), already flipped and normalised on the
device, and "aux_z" (B, A) or None) goes straight to the model.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from massreg.transforms import encode_aux


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU bf16 matmuls are slower than fp32 here)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# The four images a jet is trained as (--flips): as stored, flipped in eta (H axis), in phi (W), in both.
FLIP_DIMS = ((), (2,), (3,), (2, 3))


def forward(model: torch.nn.Module, batch: dict, *, normalizer: torch.nn.Module, aux_scaler,
            device: torch.device, amp: bool, tta: bool = False) -> torch.Tensor:
    """Model output in standardised target units, float32: (B,) a point, or (B, 3) [q16, point, q84] for a
    model with quantiles, for one loader or prefetcher batch. tta: the mean of the outputs for the four flips
    of each image (the symmetries the model is trained with)."""
    if "x" in batch:                                                # prepared by DevicePrefetcher
        x, aux = batch["x"], batch["aux_z"]
    else:
        images = batch["images"].to(device, non_blocking=True)     # (B, C, 125, 125) float16
        x = normalizer(images)                                      # (B, C, 125, 125) float32
        aux = None
        if aux_scaler is not None:
            aux = encode_aux(aux_scaler, batch["aux"].to(device, non_blocking=True))   # (B, A)
    with autocast(device, amp):
        views = [x.flip(dims) if dims else x for dims in FLIP_DIMS] if tta else [x]   # (B, C, H, W) each
        outs = [model(v, aux) if aux is not None else model(v) for v in views]
        z = outs[0] if len(outs) == 1 else torch.stack(outs).float().mean(dim=0)
    return z.float()                                                # (B,) or (B, 3), even under bf16


@torch.no_grad()
def predict(model: torch.nn.Module, loader, *, normalizer: torch.nn.Module, target, aux_scaler=None,
            device: str | torch.device = "cpu", amp: bool = False, progress: bool = False,
            tta: bool = False) -> dict:
    """Predictions over a whole loader in eval mode as numpy: pred (N,) GeV, true (N,) GeV, index (N,), and
    for a model with quantiles q16 and q84 (N,) GeV. tta: average over the four flips (`forward`).

    The model's train/eval mode is restored afterwards. `target` decodes the standardised output to GeV.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outs, trues, indices = [], [], []
    batches = tqdm(loader, desc="predict", unit="batch", leave=False) if progress else loader
    try:
        for batch in batches:
            z = forward(model, batch, normalizer=normalizer, aux_scaler=aux_scaler, device=device, amp=amp,
                        tta=tta)
            outs.append(z.double().cpu().numpy())                  # (B,) or (B, 3)
            trues.append(np.asarray(batch["m"], dtype=np.float64))
            indices.append(np.asarray(batch["index"], dtype=np.int64))
    finally:
        model.train(was_training)
    if not outs:
        empty = np.zeros(0, dtype=np.float64)
        return {"pred": empty, "true": empty.copy(), "index": np.zeros(0, dtype=np.int64)}
    return decode_outputs(np.concatenate(outs), target, true=np.concatenate(trues),
                          index=np.concatenate(indices))


def decode_outputs(z: np.ndarray, target, **extra) -> dict:
    """Standardised outputs (N,) or (N, 3) -> {"pred"[, "q16", "q84"]} in GeV (the decoding is affine, so
    quantiles decode as the point does), with `extra` arrays added."""
    gev = np.asarray(target.decode(z), dtype=np.float64)
    if gev.ndim == 1:
        return {"pred": gev, **extra}
    return {"pred": gev[:, 1], "q16": gev[:, 0], "q84": gev[:, 2], **extra}
