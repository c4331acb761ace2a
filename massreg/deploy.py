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

from massreg.engine import FLIP_DIMS
from pipeline.errors import UserError

FORMAT = "massreg-onnx"
VERSION = 1
OPSET = 17
FLOAT16_MAX = 65504.0
IMAGES, AUX, MASS = "images", "aux", "mass"
MASS_Q16, MASS_Q84 = "mass_q16", "mass_q84"        # a model with quantiles: its 16 % and 84 % quantiles
AUX_UNITS = {"pt": "GeV", "ieta": "HCAL tower index (0.087 in eta)", "iphi": "HCAL tower index (0.087 rad)",
             "eta": "", "phi": "rad", "m": "GeV"}
# Agreement asked of ONNX Runtime against PyTorch, in GeV: the larger of RTOL * |m| and ATOL.
RTOL, ATOL = 1e-4, 0.01


class ExportError(UserError):
    """Bad input or options for export, or an ONNX file that is not ours (one line: what, and what to do)."""


class Deployed(nn.Module):
    """raw images (B, C, 125, 125) float32 [, raw aux (B, A) float32] -> mass (B,) float32 GeV; for a model
    with quantiles (mass, mass_q16, mass_q84), each (B,) GeV.

    The checkpoint's model wrapped in the transforms that massreg.engine applies around it in Python, so that
    a consumer feeds detector values and reads GeV. tta: the mean over the four eta/phi flips of each image,
    inside the graph (engine.forward's tta).
    """

    def __init__(self, model: nn.Module, normalizer: nn.Module, aux_scaler, target, *, tta: bool = False):
        super().__init__()
        self.model, self.tta = model, tta
        self.quantiles = getattr(model, "quantile_head", None) is not None
        self.output_names = [MASS, MASS_Q16, MASS_Q84] if self.quantiles else [MASS]
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

    def forward(self, images: torch.Tensor, aux: torch.Tensor | None = None):
        # The model was trained on float16 files: the same rounding here makes a raw float32 input give
        # exactly the prediction of its converted row (and saturates as the converter's --clip does).
        x = images.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).to(torch.float32)
        x = (x - self.mean) / self.std                                       # (B, C, 125, 125)
        if self.clipped:
            x = torch.minimum(torch.maximum(x, -self.clip), self.clip)
        aux_z = ((aux - self.aux_mean) / self.aux_std,) if self.takes_aux else ()
        if self.tta:
            z = sum(self.model(x.flip(dims) if dims else x, *aux_z) for dims in FLIP_DIMS) / len(FLIP_DIMS)
        else:
            z = self.model(x, *aux_z)                                        # (B,) or (B, 3) standardised
        gev = z * self.m_std + self.m_mean                                   # GeV
        return (gev[:, 1], gev[:, 0], gev[:, 2]) if self.quantiles else gev  # mass[, q16, q84], (B,) each


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
        self.outputs = [o["name"] for o in self.meta["outputs"]]           # [mass] or [mass, q16, q84]

    def __call__(self, images: np.ndarray, aux: np.ndarray | None = None, *,
                 tta: bool = False) -> np.ndarray:
        """images (B, C, 125, 125), aux (B, A) or None, raw values -> (B,) float32 GeV, or (B, 3)
        [q16, mass, q84] for a graph with quantiles. tta: the mean over the four flips of each image, run
        here (a graph exported with --tta has them inside already)."""
        views = [np.flip(images, axis=dims) if dims else images for dims in FLIP_DIMS] if tta else [images]
        outs = []
        for v in views:
            feeds = {IMAGES: np.ascontiguousarray(v, dtype=np.float32)}
            if self.aux_names:
                feeds[AUX] = np.ascontiguousarray(aux, dtype=np.float32)
            got = self.session.run(self.outputs, feeds)                   # [(B,)] or [(B,)] * 3
            outs.append(got[0] if len(got) == 1 else np.stack([got[1], got[0], got[2]], axis=1))
        return outs[0] if len(outs) == 1 else np.mean(outs, axis=0, dtype=np.float64).astype(np.float32)

    def predict(self, batches, *, tta: bool = False) -> dict:
        """As massreg.engine.predict over loader batches (float16 images, raw aux): pred, true, index (N,)
        and, for a graph with quantiles, q16 and q84 (N,), GeV."""
        outs, trues, indices = [], [], []
        for batch in batches:
            aux = batch["aux"].numpy() if self.aux_names else None
            outs.append(self(batch["images"].numpy().astype(np.float32), aux, tta=tta).astype(np.float64))
            trues.append(np.asarray(batch["m"], dtype=np.float64))
            indices.append(np.asarray(batch["index"], dtype=np.int64))
        if not outs:
            empty = np.zeros(0, dtype=np.float64)
            return {"pred": empty, "true": empty.copy(), "index": np.zeros(0, dtype=np.int64)}
        gev = np.concatenate(outs)
        extra = {"true": np.concatenate(trues), "index": np.concatenate(indices)}
        if gev.ndim == 1:
            return {"pred": gev, **extra}
        return {"pred": gev[:, 1], "q16": gev[:, 0], "q84": gev[:, 2], **extra}
