"""Checkpoints: one torch.save'd dict that is enough to rebuild the model AND resume training.

    from massreg.checkpoint import load_checkpoint, restore
    r = restore(load_checkpoint("runs/x/best_mre.pt"), torch.device("cpu"))   # r.model, r.normalizer, ...

The payload (keys fixed by the API contract, version 1):
    format "massreg-checkpoint", version 1,
    model            state_dict of the UNcompiled, un-wrapped model (no `_orig_mod.` / `module.` prefixes)
    model_config     asdict(ModelConfig)      train_config   asdict(TrainConfig)
    optimizer, scheduler                      state_dicts (None in a checkpoint made only for inference)
    epoch (completed), step (optimizer steps done), best {"val_loss", "val_mre", ...}
    normalizer       Normalizer.to_dict(): {"mode", "channels", "mean", "std", "clip"} (the affine it applies)
    target {"mean", "std"}
    aux {"names", "mean", "std"}              data {"paths", "sizes", "channels", "stats"}
    rng {"torch", "numpy", "python", "cuda"}  metrics_history [per-epoch dicts, as in metrics.csv]

Everything in it is a tensor, a Python number / string / list / tuple / dict or None, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint cannot run code from the file.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from massreg.registry import ModelConfig, build_model, complete
from massreg.transforms import AuxScaler, Normalizer, TargetScaler
from pipeline.errors import UserError
from pipeline.files import atomic_write

FORMAT = "massreg-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "train_config", "epoch", "step", "normalizer", "target", "aux",
                 "data")


class CheckpointError(UserError):
    """A file that is not a massreg checkpoint, has another version, or does not fit the model asked for."""


def to_plain(value: Any, *, json: bool = False) -> Any:
    """numpy scalars / arrays -> Python numbers / lists and paths -> str, recursively, so a payload loads with
    torch.load(weights_only=True). json=True also makes it strict JSON: NaN / inf -> None, keys -> str,
    tuples -> lists."""
    if isinstance(value, dict):
        # keys stay as they are for torch.save: the optimizer's state is keyed by int parameter ids
        return {(str(k) if json else to_plain(k)): to_plain(v, json=json) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_plain(v, json=json) for v in value]
        return items if json else type(value)(items)
    if isinstance(value, np.ndarray):
        return to_plain(value.tolist(), json=json)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if json and isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` (with format/version added) to `path` atomically: temp file beside it, then
    os.replace."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; CheckpointError (one line, naming the file) for anything not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle / zip / weights_only errors all mean "not a checkpoint we wrote"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a massreg checkpoint "
                              f"(torch.load failed: {first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a massreg checkpoint (no format '{FORMAT}'); "
                              "pass a best_*.pt or last.pt written by massreg.train")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r}, this massreg reads "
                              f"version {VERSION}; re-train or use the matching massreg release")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; "
                              "it was not written by massreg.train")
    return ckpt


def check_model_config(ckpt: dict, model_config: dict, *, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every field where the checkpoint's model differs from `model_config`.

    Both sides are completed first (massreg.registry.complete): a checkpoint written before a field existed
    holds the model that field's default describes, and lists from JSON equal tuples."""
    stored, model_config = complete(ckpt["model_config"]), complete(model_config)
    diffs = [f"{k}: {stored.get(k)!r} in {source} vs {model_config.get(k)!r} asked"
             for k in sorted(set(stored) | set(model_config)) if stored.get(k) != model_config.get(k)]
    if diffs:
        raise CheckpointError(f"{source} holds another model ({'; '.join(diffs)}); "
                              "use the same --model/options as the run, or start a new run")


# ---- RNG state: torch, numpy's legacy global generator, Python's random (and CUDA where present) ----

def capture_rng() -> dict:
    """Every global RNG state, as tensors / plain Python values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    return state


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ---- rebuild for inference ----

@dataclass
class Restored:
    """What evaluate / predict need: the model in eval mode on the device, and the input/target transforms."""
    model: torch.nn.Module
    normalizer: torch.nn.Module
    target: Any                   # massreg.transforms.TargetScaler
    aux_scaler: Any               # massreg.transforms.AuxScaler or None when the model takes no aux
    model_config: Any             # massreg.registry.ModelConfig
    train_config: dict
    channels: list[str]


def restore(ckpt: dict, device: str | torch.device = "cpu") -> Restored:
    """Rebuild model (eval mode), Normalizer, TargetScaler and AuxScaler from a loaded checkpoint."""
    device = torch.device(device)
    try:
        model_config = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as exc:  # unknown field, or an impossible value
        raise CheckpointError("checkpoint model_config does not fit this massreg's ModelConfig: "
                              f"{exc}") from None
    model = build_model(model_config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not fit its model_config: {first}") from None
    model.to(device).eval()
    channels = list(ckpt["normalizer"].get("channels") or ckpt["data"]["channels"])
    normalizer = Normalizer.from_dict(ckpt["normalizer"]).to(device)
    target = TargetScaler(mean=float(ckpt["target"]["mean"]), std=float(ckpt["target"]["std"]))
    aux = ckpt["aux"]
    aux_scaler = None
    if aux and aux.get("names"):
        aux_scaler = AuxScaler(names=tuple(aux["names"]), mean=tuple(float(v) for v in aux["mean"]),
                               std=tuple(float(v) for v in aux["std"]))
    return Restored(model=model, normalizer=normalizer, target=target, aux_scaler=aux_scaler,
                    model_config=model_config, train_config=dict(ckpt["train_config"]), channels=channels)


def load_for_inference(path: str | os.PathLike, device: torch.device) -> tuple[dict, Restored]:
    """(the loaded checkpoint dict, its Restored model and transforms on `device`): what evaluate and predict
    start from."""
    ckpt = load_checkpoint(path, map_location="cpu")
    return ckpt, restore(ckpt, device)


def check_channels(model_channels, data_channels, where, *, model: str = "checkpoint") -> None:
    """The model only makes sense on the channels it was trained on, in the same order (CheckpointError)."""
    if list(model_channels) != list(data_channels):
        raise CheckpointError(f"{model} was trained on channels {','.join(model_channels)} but {where} holds "
                              f"{','.join(data_channels)}; convert with the checkpoint's channels "
                              "or use a checkpoint trained on these")
