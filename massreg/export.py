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

from massreg import __version__
from massreg.checkpoint import load_checkpoint, restore
from massreg.cli import command, force_option, user_errors
from massreg.deploy import (ATOL, AUX, AUX_UNITS, FLOAT16_MAX, FORMAT, IMAGES, MASS, MASS_Q16, MASS_Q84,
                            OPSET, RTOL, VERSION, Deployed, ExportError, max_excess)
from pipeline.files import atomic_write, atomic_write_text, check_new_output
from pipeline.layout import CHANNEL_NAMES, CHANNEL_UNITS
from pipeline.signals import exit_on_interrupt, stop_on_signals


@dataclass
class ExportConfig:
    """Everything one export depends on; stored in model.json."""
    checkpoint: str
    out: str = "model.onnx"
    opset: int = OPSET
    check_batch: int = 8          # rows of the check batch run through both PyTorch and ONNX Runtime
    force: bool = False
    tta: bool = False             # the mean over the four eta/phi flips of each image, inside the graph

    def json_path(self) -> Path:
        return Path(self.out).with_suffix(".json")

    def validate(self) -> None:
        out = Path(self.out)
        if out.suffix.lower() != ".onnx":
            raise ExportError(f"--out {out}: the name must end in .onnx (model.json goes beside it)")
        if not out.resolve().parent.is_dir():
            raise ExportError(f"--out {out}: folder {out.parent} does not exist; create it first")
        for path in (out, self.json_path()):
            check_new_output(path, self.force)
        if self.opset < OPSET:
            raise ExportError(f"--opset {self.opset}: 17 is the lowest with a native LayerNormalization")
        if self.check_batch < 1:
            raise ExportError(f"--check-batch {self.check_batch} must be >= 1")


# ------------------------------------------------------------------------------------------------ export

def describe(restored, ckpt: dict, config: ExportConfig) -> dict:
    """model.json: what a C++ producer needs to build the inputs, and where the model came from."""
    import onnx
    import onnxruntime

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
        "outputs": outputs(restored),
        "flip_averaging": config.tta,
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


def outputs(restored) -> list[dict]:
    """model.json's outputs: the mass, and for a model with quantiles its 16 % and 84 % quantiles (a per-jet
    resolution is (mass_q84 - mass_q16) / 2)."""
    out = [{"name": MASS, "dtype": "float32", "shape": ["batch"], "unit": "GeV"}]
    if restored.model_config.quantiles:
        out += [{"name": name, "dtype": "float32", "shape": ["batch"], "unit": "GeV",
                 "meaning": f"the {q} % quantile of the mass given the inputs; non-crossing: "
                            f"{MASS_Q16} < {MASS} < {MASS_Q84}"}
                for name, q in ((MASS_Q16, 16), (MASS_Q84, 84))]
    return out


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


def trace(deployed: Deployed, feeds: dict, tmp: Path, opset: int) -> None:
    """torch.onnx.export of `deployed` to `tmp`, batch axis dynamic.

    The TorchScript exporter (dynamo=False): the torch.export-based one emits opset >= 18 and its conversion
    down to 17 fails on this graph (ReduceMean's axes), and CMSSW's ONNX Runtime wants 17."""
    names = [IMAGES] + ([AUX] if deployed.takes_aux else [])
    args = tuple(torch.from_numpy(feeds[n][:2]) for n in names)     # batch 2, as weaver: 1 could specialise
    with warnings.catch_warnings():
        # The exporter's deprecation notice and tracer chatter; the graph is checked against PyTorch below.
        warnings.simplefilter("ignore")
        torch.onnx.export(deployed, args, str(tmp), dynamo=False, opset_version=opset, input_names=names,
                          output_names=deployed.output_names,
                          dynamic_axes={n: {0: "batch"} for n in (*names, *deployed.output_names)},
                          do_constant_folding=True)


def export(config: ExportConfig, *, stop=None) -> dict:
    """Export config.checkpoint to config.out (+ model.json beside it); returns the model.json dict.

    Writes nothing unless onnx.checker accepts the graph and ONNX Runtime agrees with PyTorch on a check
    batch; both files are written under temporary names and renamed into place. `stop` (a StopFlag) is
    polled between the steps."""
    check = stop.check if stop is not None else (lambda: None)
    try:
        import onnx  # the optional [export] extra: imported only by the commands that need it
    except ImportError as exc:
        raise ExportError(f"export needs onnx and onnxruntime ({exc.name} is missing): "
                          "pip install 'massreg[export]'") from None
    config.validate()
    ckpt = load_checkpoint(config.checkpoint)
    restored = restore(ckpt, "cpu")
    deployed = Deployed(restored.model, restored.normalizer, restored.aux_scaler, restored.target,
                        tta=config.tta).eval()
    meta = describe(restored, ckpt, config)
    feeds = check_inputs(restored, config.check_batch)

    out = Path(config.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.trace.tmp")
    try:
        t0 = time.perf_counter()
        trace(deployed, feeds, tmp, config.opset)
        check()
        meta["export_seconds"] = round(time.perf_counter() - t0, 3)
        meta["check"] = check_graph(tmp, deployed, feeds, config, check)
        meta_json = json.dumps(meta, indent=2, default=str, allow_nan=False)
        graph = onnx.load(str(tmp))
        entry = graph.metadata_props.add()
        entry.key, entry.value = "massreg", meta_json
        graph.doc_string = f"massreg mass regressor from {config.checkpoint}: raw images (and aux) -> GeV"
        check()
        write_both(out, graph.SerializeToString(), config.json_path(), meta_json + "\n")
    except OSError as exc:  # the trace's own file: a full disk, a vanished folder
        raise ExportError(f"{out}: writing failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return json.loads(meta_json)      # as model.json reads back (tuples as lists)


def check_graph(path: Path, deployed: nn.Module, feeds: dict, config: ExportConfig, check) -> dict:
    """onnx.checker's full check of the traced file, then ONNX Runtime against PyTorch on the check batch;
    ExportError (nothing written) if either fails. Returns model.json's "check" block."""
    import onnx
    import onnxruntime as ort

    # Checker and session read the traced file itself: serialising a 160 MB graph costs ~0.6 s a time.
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{config.checkpoint}: the exported graph fails onnx.checker "
                          f"({str(exc).splitlines()[0]}); please report this with the model_config") from None
    check()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.stack(session.run(deployed.output_names, feeds))                    # (outputs, B)
    with torch.no_grad():   # eval: the quantile head's calibration applies in eval mode only, as in the graph
        want = deployed.eval()(*(torch.from_numpy(feeds[k]) for k in feeds))
    want = torch.stack(want if isinstance(want, tuple) else (want,)).numpy()     # (outputs, B)
    worst, ratio = max_excess(got, want)
    if not ratio <= 1.0:            # also catches NaN
        raise ExportError(f"{config.checkpoint}: ONNX Runtime and PyTorch differ by up to {worst:.4g} "
                          f"GeV on the check batch (allowed max({RTOL:g} x m, {ATOL} GeV)); "
                          "nothing was written")
    return {"rows": config.check_batch, "max_abs_diff_gev": worst, "rtol": RTOL, "atol_gev": ATOL}


def write_both(out: Path, graph: bytes, json_path: Path, text: str) -> None:
    """The .onnx, then its .json, each atomically; a failure leaves neither new file (an .onnx beside no or
    an older .json is not an export) and is one ExportError naming the file."""
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


# ------------------------------------------------------------------------------------------------ CLI

@command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write; model.json (same stem) goes beside it.")
@click.option("--opset", default=OPSET, show_default=True, type=int,
              help="ONNX opset (17: native LayerNormalization, what CMSSW's ONNX Runtime runs).")
@click.option("--check-batch", default=8, show_default=True, type=int,
              help="Rows of the batch on which ONNX Runtime must agree with PyTorch before anything is "
                   "written.")
@click.option("--tta", is_flag=True,
              help="Put the four eta/phi flips of each image in the graph and output their mean (4x the "
                   "compute).")
@force_option("Replace --out and its model.json if they exist.")
def main(checkpoint, out, opset, check_batch, force, tta):
    """Export CHECKPOINT (a best_*.pt or last.pt of massreg.train) to ONNX: raw detector images (and pt,
    ieta, iphi when the model takes them) in, the mass in GeV out (and its 16 % and 84 % quantiles for a
    model with quantiles); normalisation inside the graph.

    \b
    Example:
      python -m massreg.export runs/top/best_val_loss.pt --out deploy/top_mass.onnx
      python -m massreg.predict --onnx deploy/top_mass.onnx data/raw/ --out check.csv
    """
    config = ExportConfig(checkpoint=checkpoint, out=out, opset=opset, check_batch=check_batch, force=force,
                          tta=tta)
    with exit_on_interrupt(f"export of {checkpoint}"), stop_on_signals() as stop:
        with user_errors():
            meta = export(config, stop=stop)
    click.echo(f"wrote {out} and {config.json_path()} (opset {meta['opset']}, "
               f"{meta['export_seconds']:.1f} s; "
               f"ONNX Runtime within {meta['check']['max_abs_diff_gev']:.2g} GeV of PyTorch)",
               file=sys.stdout)


if __name__ == "__main__":
    main()
