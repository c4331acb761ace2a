"""The deployed model: what an exported ONNX graph computes, and that graph run by ONNX Runtime.

    Deployed(model, normalizer, aux_scaler, target)   # raw images (B, C, 125, 125) [, aux (B, A)] -> GeV (B,)
    r = OnnxRegressor("model.onnx"); out = r.predict(batches)   # as massreg.engine.predict

massreg.export traces `Deployed` into the .onnx file; massreg.predict --onnx runs it with OnnxRegressor.
onnxruntime is the optional [export] extra, imported when an OnnxRegressor is made.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError

FORMAT = "massreg-onnx"
VERSION = 1
OPSET = 17
FLOAT16_MAX = 65504.0
IMAGES, AUX, MASS = "images", "aux", "mass"
AUX_UNITS = {"pt": "GeV", "ieta": "HCAL tower index (0.087 in eta)", "iphi": "HCAL tower index (0.087 rad)",
             "eta": "", "phi": "rad", "m": "GeV"}
# Agreement asked of ONNX Runtime against PyTorch, in GeV: the larger of RTOL * |m| and ATOL.
RTOL, ATOL = 1e-4, 0.01


class ExportError(UserError):
    """Bad input or options for export, or an ONNX file that is not ours (one line: what, and what to do)."""


class Deployed(nn.Module):
    """raw images (B, C, 125, 125) float32 [, raw aux (B, A) float32] -> mass (B,) float32 GeV.

    The checkpoint's model wrapped in the transforms that massreg.engine applies around it in Python, so that
    a consumer feeds detector values and reads GeV.
    """

    def __init__(self, model: nn.Module, normalizer: nn.Module, aux_scaler, target):
        super().__init__()
        self.model = model
        # The normaliser's affine map as plain buffers, applied below as whole-tensor ops: massreg.transforms'
        # Normalizer is tuned for the training loop (flips, per-image CPU kernels), not for a traced graph.
        self.register_buffer("mean", normalizer.mean.detach().clone().float())        # (1, C, 1, 1)
        self.register_buffer("std", normalizer.std.detach().clone().float())          # (1, C, 1, 1)
        clip = normalizer.clip.detach().clone().float()                      # (1, C, 1, 1), inf: none
        self.clipped = bool(torch.isfinite(clip).any())
        self.register_buffer("clip", torch.where(torch.isfinite(clip), clip, torch.full_like(clip, 3e38)))
        self.takes_aux = aux_scaler is not None
        if self.takes_aux:
            self.register_buffer("aux_mean", torch.tensor(aux_scaler.mean, dtype=torch.float32))   # (A,)
            self.register_buffer("aux_std", torch.tensor(aux_scaler.std, dtype=torch.float32))     # (A,)
        self.register_buffer("m_mean", torch.tensor(float(target.mean), dtype=torch.float32))
        self.register_buffer("m_std", torch.tensor(float(target.std), dtype=torch.float32))

    def forward(self, images: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        # The model was trained on float16 files: the same rounding here makes a raw float32 input give
        # exactly the prediction of its converted row (and saturates as the converter's --clip does).
        x = images.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).to(torch.float32)
        x = (x - self.mean) / self.std                                       # (B, C, 125, 125)
        if self.clipped:
            x = torch.minimum(torch.maximum(x, -self.clip), self.clip)
        if self.takes_aux:
            z = self.model(x, (aux - self.aux_mean) / self.aux_std)          # (B,) standardised mass
        else:
            z = self.model(x)
        return z * self.m_std + self.m_mean                                  # (B,) GeV


def max_excess(onnx_gev: np.ndarray, torch_gev: np.ndarray) -> tuple[float, float]:
    """(max |difference| in GeV, max of |difference| / allowed), allowed = max(RTOL * |torch|, ATOL)."""
    diff = np.abs(onnx_gev.astype(np.float64) - torch_gev.astype(np.float64))
    allowed = np.maximum(RTOL * np.abs(torch_gev), ATOL)
    return float(diff.max(initial=0.0)), float((diff / allowed).max(initial=0.0))


class OnnxRegressor:
    """An exported model in ONNX Runtime, fed the loader batches of massreg.sampling / massreg.predict.

        r = OnnxRegressor("model.onnx"); out = r.predict(batches)    # as massreg.engine.predict: pred (GeV),
                                                                      # true, index (N,) numpy
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("--onnx needs onnxruntime: pip install 'massreg[export]'") from None
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's InvalidProtobuf, Fail, ...: one type per cause, all "cannot load"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{path}: not an ONNX file ONNX Runtime can load ({first[:160]}); "
                              "give a file written by massreg.export") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if "massreg" not in props:
            raise ExportError(f"{path}: an ONNX file without massreg metadata; "
                              "give a file written by massreg.export")
        self.path, self.meta = path, json.loads(props["massreg"])
        inputs = {i["name"]: i for i in self.meta["inputs"]}
        self.channels = [c["name"] for c in inputs[IMAGES]["channels"]]
        self.aux_names = [c["name"] for c in inputs[AUX]["columns"]] if AUX in inputs else []

    def __call__(self, images: np.ndarray, aux: np.ndarray | None = None) -> np.ndarray:
        """images (B, C, 125, 125), aux (B, A) or None, raw values -> (B,) float32 GeV."""
        feeds = {IMAGES: np.ascontiguousarray(images, dtype=np.float32)}
        if self.aux_names:
            feeds[AUX] = np.ascontiguousarray(aux, dtype=np.float32)
        return self.session.run([MASS], feeds)[0]

    def predict(self, batches) -> dict:
        """dict(pred (N,) GeV, true (N,) GeV, index (N,)) over loader batches (float16 images, raw aux)."""
        preds, trues, indices = [], [], []
        for batch in batches:
            aux = batch["aux"].numpy() if self.aux_names else None
            preds.append(self(batch["images"].numpy().astype(np.float32), aux).astype(np.float64))
            trues.append(np.asarray(batch["m"], dtype=np.float64))
            indices.append(np.asarray(batch["index"], dtype=np.int64))
        if not preds:
            empty = np.zeros(0, dtype=np.float64)
            return {"pred": empty, "true": empty.copy(), "index": np.zeros(0, dtype=np.int64)}
        return {"pred": np.concatenate(preds), "true": np.concatenate(trues),
                "index": np.concatenate(indices)}
