"""The one forward path shared by training, validation, evaluate and predict.

    out = predict(model, loader, normalizer=n, target=t, aux_scaler=a, device=dev, amp=False)
    out["pred"], out["true"], out["index"]     # (N,) GeV, (N,) GeV, (N,) row position within the split

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


def forward(model: torch.nn.Module, batch: dict, *, normalizer: torch.nn.Module, aux_scaler,
            device: torch.device, amp: bool) -> torch.Tensor:
    """Model output in standardised target units, (B,) float32, for one loader or prefetcher batch."""
    if "x" in batch:                                                # prepared by DevicePrefetcher
        x, aux = batch["x"], batch["aux_z"]
    else:
        images = batch["images"].to(device, non_blocking=True)     # (B, C, 125, 125) float16
        x = normalizer(images)                                      # (B, C, 125, 125) float32
        aux = None
        if aux_scaler is not None:
            aux = encode_aux(aux_scaler, batch["aux"].to(device, non_blocking=True))   # (B, A)
    with autocast(device, amp):
        z = model(x, aux) if aux is not None else model(x)
    return z.float()                                                # (B,) even under bf16 autocast


@torch.no_grad()
def predict(model: torch.nn.Module, loader, *, normalizer: torch.nn.Module, target, aux_scaler=None,
            device: str | torch.device = "cpu", amp: bool = False, progress: bool = False) -> dict:
    """Predictions over a whole loader in eval mode: dict(pred (N,) GeV, true (N,) GeV, index (N,)) as numpy.

    The model's train/eval mode is restored afterwards. `target` decodes the standardised output to GeV.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    preds, trues, indices = [], [], []
    batches = loader
    if progress:
        batches = tqdm(loader, desc="predict", unit="batch", leave=False)
    try:
        for batch in batches:
            z = forward(model, batch, normalizer=normalizer, aux_scaler=aux_scaler, device=device, amp=amp)
            preds.append(z.double().cpu().numpy())
            trues.append(np.asarray(batch["m"], dtype=np.float64))
            indices.append(np.asarray(batch["index"], dtype=np.int64))
    finally:
        model.train(was_training)
    if not preds:
        empty = np.zeros(0, dtype=np.float64)
        return {"pred": empty, "true": empty.copy(), "index": np.zeros(0, dtype=np.int64)}
    z = np.concatenate(preds)
    return {"pred": np.asarray(target.decode(z), dtype=np.float64), "true": np.concatenate(trues),
            "index": np.concatenate(indices)}
