"""Export a trained checkpoint to ONNX, for ONNX Runtime (CMSSW's PhysicsTools/ONNXRuntime, or any other).

Usage: python -m massreg.export RUN/best_val_loss.pt --out model.onnx [--force]

The graph takes what a detector producer has at hand and returns GeV:
    images  float32 (B, C, 125, 125)  raw detector values, the checkpoint's channels in its order
    aux     float32 (B, A)            raw pt, ieta, iphi (as in the data), only when the model takes them
    mass    float32 (B,)              GeV
Everything between is inside the graph (`Deployed`): the converter's float16 rounding (saturating at +-65504,
as `pipeline.convert --clip`), the per-channel normalisation and clip, the aux scaler, the network in eval
mode, and the target's inverse scaling. Batch is a dynamic axis; opset 17 (native LayerNormalization), fp32.

Beside the .onnx, `model.json` (same stem) describes the inputs and outputs (names, shapes, dtypes, channel
names and units), the opset, the checkpoint it came from and the versions that made it; the same JSON is in
the ONNX file's metadata under "massreg", so the file alone is enough (`massreg.predict --onnx` reads it).
Before anything is written, ONNX Runtime runs the graph on a check batch and must agree with PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from pipeline.layout import CHANNEL_NAMES, CHANNEL_UNITS

FORMAT = "massreg-onnx"
VERSION = 1
OPSET = 17
FLOAT16_MAX = 65504.0
IMAGES, AUX, MASS = "images", "aux", "mass"
AUX_UNITS = {"pt": "GeV", "ieta": "HCAL tower index (0.087 in eta)", "iphi": "HCAL tower index (0.087 rad)",
             "eta": "", "phi": "rad", "m": "GeV"}
# Agreement asked of ONNX Runtime against PyTorch, in GeV: the larger of RTOL * |m| and ATOL.
RTOL, ATOL = 1e-4, 0.01


class ExportError(Exception):
    """Bad input or options for export, or an ONNX file that is not ours (one line: what, and what to do)."""


@dataclass
class ExportConfig:
    """Everything one export depends on; stored in model.json."""
    checkpoint: str
    out: str = "model.onnx"
    opset: int = OPSET
    check_batch: int = 8          # rows of the check batch run through both PyTorch and ONNX Runtime
    force: bool = False

    def json_path(self) -> Path:
        return Path(self.out).with_suffix(".json")

    def validate(self) -> None:
        out = Path(self.out)
        if out.suffix.lower() != ".onnx":
            raise ExportError(f"--out {out}: the name must end in .onnx (model.json goes beside it)")
        if not out.resolve().parent.is_dir():
            raise ExportError(f"--out {out}: folder {out.parent} does not exist; create it first")
        for path in (out, self.json_path()):
            if path.exists() and not self.force:
                raise ExportError(f"{path} exists; pass --force to replace it")
        if self.opset < OPSET:
            raise ExportError(f"--opset {self.opset}: 17 is the lowest with a native LayerNormalization")
        if self.check_batch < 1:
            raise ExportError(f"--check-batch {self.check_batch} must be >= 1")


class Deployed(nn.Module):
    """raw images (B, C, 125, 125) float32 [, raw aux (B, A) float32] -> mass (B,) float32 GeV.

    The checkpoint's model wrapped in the transforms that massreg.engine applies around it in Python, so that
    a consumer feeds detector values and reads GeV.
    """

    def __init__(self, model: nn.Module, normalizer: nn.Module, aux_scaler, target):
        super().__init__()
        self.model = model
        # The normaliser's affine map as plain buffers, applied below as whole-tensor ops: massreg.data's
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


# ------------------------------------------------------------------------------------------------ export

def _describe(restored, ckpt: dict, config: ExportConfig) -> dict:
    """model.json: what a C++ producer needs to build the inputs, and where the model came from."""
    import onnx
    import onnxruntime

    from massreg import __version__

    channels = list(restored.channels)
    units = [CHANNEL_UNITS[CHANNEL_NAMES.index(c)] if c in CHANNEL_NAMES else "" for c in channels]
    aux_names = list(restored.aux_scaler.names) if restored.aux_scaler is not None else []
    inputs = [{"name": IMAGES, "dtype": "float32", "shape": ["batch", len(channels), 125, 125],
               "layout": "NCHW, row-major; H = ieta (crystal rows), W = iphi (crystal columns)",
               "channels": [{"index": i, "name": c, "unit": u}
                            for i, (c, u) in enumerate(zip(channels, units))],
               "values": "raw detector values as in the Parquet X_jet (not normalised); "
                         "NaN/inf are not allowed"}]
    if aux_names:
        inputs.append({"name": AUX, "dtype": "float32", "shape": ["batch", len(aux_names)],
                       "columns": [{"index": i, "name": a, "unit": AUX_UNITS.get(a, "")}
                                   for i, a in enumerate(aux_names)],
                       "values": "raw values as in the Parquet scalar columns (not normalised)"})
    normalizer = restored.normalizer.to_dict()       # x -> clamp((x - mean) / std, -clip, clip)
    # null, not Infinity, where a channel is not clipped: strict JSON, which C++ parsers require
    normalizer["clip"] = [c if math.isfinite(c) else None for c in normalizer["clip"]]
    path = Path(config.checkpoint)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            sha.update(block)
    return {
        "format": FORMAT, "version": VERSION, "onnx_file": Path(config.out).name, "opset": config.opset,
        "inputs": inputs,
        "outputs": [{"name": MASS, "dtype": "float32", "shape": ["batch"], "unit": "GeV"}],
        "in_graph": {"float16_rounding": f"clamp to +-{FLOAT16_MAX:g}, round to float16 (as the converter)",
                     "normalizer": normalizer,
                     "aux": {"names": aux_names, "mean": list(restored.aux_scaler.mean) if aux_names else [],
                             "std": list(restored.aux_scaler.std) if aux_names else []},
                     "target": {"mean": restored.target.mean, "std": restored.target.std}},
        "model_config": asdict(restored.model_config),
        "checkpoint": {"path": str(path), "size": path.stat().st_size, "sha256": sha.hexdigest(),
                       "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), "best": ckpt.get("best"),
                       "data": (ckpt.get("data") or {}).get("paths")},
        "versions": {"massreg": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "export_config": asdict(config),
    }


def check_inputs(restored, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A check batch in raw units, drawn around the training statistics: per channel mean + std * N(0, 1)
    (sparse: 90 % of pixels 0, as detector images are), aux mean + std * N(0, 1)."""
    rng = np.random.default_rng(seed)
    norm = restored.normalizer
    mean = norm.mean.detach().cpu().numpy().reshape(1, -1, 1, 1)
    std = norm.std.detach().cpu().numpy().reshape(1, -1, 1, 1)
    shape = (batch, mean.shape[1], 125, 125)
    images = (mean + std * rng.standard_normal(shape)) * (rng.random(shape) < 0.1)
    feeds = {IMAGES: images.astype(np.float32)}
    if restored.aux_scaler is not None:
        a = restored.aux_scaler
        feeds[AUX] = (np.asarray(a.mean) + np.asarray(a.std) * rng.standard_normal((batch, len(a.names))))\
            .astype(np.float32)
    return feeds


def max_excess(onnx_gev: np.ndarray, torch_gev: np.ndarray) -> tuple[float, float]:
    """(max |difference| in GeV, max of |difference| / allowed), allowed = max(RTOL * |torch|, ATOL)."""
    diff = np.abs(onnx_gev.astype(np.float64) - torch_gev.astype(np.float64))
    allowed = np.maximum(RTOL * np.abs(torch_gev), ATOL)
    return float(diff.max(initial=0.0)), float((diff / allowed).max(initial=0.0))


def _trace(deployed: Deployed, feeds: dict, tmp: Path, opset: int) -> None:
    """torch.onnx.export of `deployed` to `tmp`, batch axis dynamic.

    The TorchScript exporter (dynamo=False): the torch.export-based one emits opset >= 18 and its conversion
    down to 17 fails on this graph (ReduceMean's axes), and CMSSW's ONNX Runtime wants 17."""
    names = [IMAGES] + ([AUX] if deployed.takes_aux else [])
    args = tuple(torch.from_numpy(feeds[n][:2]) for n in names)     # batch 2, as weaver: 1 could specialise
    with warnings.catch_warnings():
        # The exporter's deprecation notice and tracer chatter; the graph is checked against PyTorch below.
        warnings.simplefilter("ignore")
        torch.onnx.export(deployed, args, str(tmp), dynamo=False, opset_version=opset, input_names=names,
                          output_names=[MASS], dynamic_axes={n: {0: "batch"} for n in (*names, MASS)},
                          do_constant_folding=True)


def export(config: ExportConfig, *, stop=None) -> dict:
    """Export config.checkpoint to config.out (+ model.json beside it); returns the model.json dict.

    Writes nothing unless onnx.checker accepts the graph and ONNX Runtime agrees with PyTorch on a check
    batch; both files are written under temporary names and renamed into place. `stop` (a StopFlag) is
    polled between the steps."""
    check = stop.check if stop is not None else (lambda: None)
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(f"export needs onnx and onnxruntime ({exc.name} is missing): "
                          "pip install 'massreg[export]'") from None
    from massreg.checkpoint import CheckpointError, load_checkpoint, restore

    config.validate()
    try:
        ckpt = load_checkpoint(config.checkpoint)
        restored = restore(ckpt, "cpu")
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    deployed = Deployed(restored.model, restored.normalizer, restored.aux_scaler, restored.target).eval()
    meta = _describe(restored, ckpt, config)
    feeds = check_inputs(restored, config.check_batch)

    out = Path(config.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.trace.tmp")
    try:
        t0 = time.perf_counter()
        _trace(deployed, feeds, tmp, config.opset)
        check()
        meta["export_seconds"] = round(time.perf_counter() - t0, 3)
        # Checker and session read the traced file itself: serialising a 160 MB graph costs ~0.6 s a time.
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{config.checkpoint}: the exported graph fails onnx.checker "
                              f"({str(exc).splitlines()[0]}); please report this with the model_config"
                              ) from None
        check()
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run([MASS], {k: v for k, v in feeds.items()})[0]
        with torch.no_grad():
            want = deployed(*(torch.from_numpy(feeds[k]) for k in feeds)).numpy()
        worst, ratio = max_excess(got, want)
        meta["check"] = {"rows": config.check_batch, "max_abs_diff_gev": worst, "rtol": RTOL,
                         "atol_gev": ATOL}
        if not ratio <= 1.0:            # also catches NaN
            raise ExportError(f"{config.checkpoint}: ONNX Runtime and PyTorch differ by up to {worst:.4g} "
                              f"GeV on the check batch (allowed max({RTOL:g} x m, {ATOL} GeV)); "
                              "nothing was written")
        meta_json = json.dumps(meta, indent=2, default=str, allow_nan=False)
        graph = onnx.load(str(tmp))
        entry = graph.metadata_props.add()
        entry.key, entry.value = "massreg", meta_json
        graph.doc_string = f"massreg mass regressor from {config.checkpoint}: raw images (and aux) -> GeV"
        check()
        _write_both(out, graph.SerializeToString(), config.json_path(), meta_json + "\n")
    except OSError as exc:  # the trace's own file: a full disk, a vanished folder
        raise ExportError(f"{out}: writing failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return json.loads(meta_json)      # as model.json reads back (tuples as lists)


def _write_both(out: Path, graph: bytes, json_path: Path, text: str) -> None:
    """The .onnx, then its .json, each atomically; a failure leaves neither new file (an .onnx beside no or
    an older .json is not an export) and is one ExportError naming the file."""
    from massreg.checkpoint import atomic_write, atomic_write_text

    try:
        atomic_write(out, lambda fh: fh.write(graph))
    except OSError as exc:
        raise ExportError(f"{out}: writing failed ({exc.strerror or exc}); nothing was written") from None
    try:
        atomic_write_text(json_path, text)
    except BaseException as exc:
        out.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ExportError(f"{json_path}: writing failed ({exc.strerror or exc}); {out} was removed "
                              "again, nothing was written") from None
        raise


# ------------------------------------------------------------------------------------------------ runtime

class OnnxRegressor:
    """An exported model in ONNX Runtime, fed the loader batches of massreg.data / massreg.predict.

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


# ------------------------------------------------------------------------------------------------ CLI

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write; model.json (same stem) goes beside it.")
@click.option("--opset", default=OPSET, show_default=True, type=int,
              help="ONNX opset (17: native LayerNormalization, what CMSSW's ONNX Runtime runs).")
@click.option("--check-batch", default=8, show_default=True, type=int,
              help="Rows of the batch on which ONNX Runtime must agree with PyTorch before anything is "
                   "written.")
@click.option("--force", is_flag=True, help="Replace --out and its model.json if they exist.")
def main(checkpoint, out, opset, check_batch, force):
    """Export CHECKPOINT (a best_*.pt or last.pt of massreg.train) to ONNX: raw detector images (and pt,
    ieta, iphi when the model takes them) in, the mass in GeV out; normalisation inside the graph.

    \b
    Example:
      python -m massreg.export runs/top/best_val_loss.pt --out deploy/top_mass.onnx
      python -m massreg.predict --onnx deploy/top_mass.onnx data/raw/ --out check.csv
    """
    from pipeline.signals import exit_on_interrupt, stop_on_signals

    config = ExportConfig(checkpoint=checkpoint, out=out, opset=opset, check_batch=check_batch, force=force)
    with exit_on_interrupt(f"export of {checkpoint}"), stop_on_signals() as stop:
        try:
            meta = export(config, stop=stop)
        except (ExportError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out} and {config.json_path()} (opset {meta['opset']}, "
               f"{meta['export_seconds']:.1f} s; "
               f"ONNX Runtime within {meta['check']['max_abs_diff_gev']:.2g} GeV of PyTorch)",
               file=sys.stdout)


if __name__ == "__main__":
    main()
