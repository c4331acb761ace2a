"""Checkpoints, the shared forward path (engine) and the trainer (massreg.train)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from massreg import checkpoint as ck
from massreg import engine


# ---------------------------------------------------------------- checkpoint

def payload(**extra) -> dict:
    base = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "model_config": {"dim": 8, "depth": 1},
            "train_config": {"lr": 1e-3, "channels": (0, 1)}, "optimizer": None, "scheduler": None,
            "epoch": 3, "step": 30, "best": {"val_loss": 0.5, "val_mre": 0.1},
            "normalizer": {"mode": "stats", "mean": [0.0, 1.0], "std": [1.0, 2.0], "reference_scale": [1.0, 1.0],
                           "channels": ["ecal", "hcal"]},
            "target": {"mean": 290.0, "std": 120.0}, "aux": {"names": [], "mean": [], "std": []},
            "data": {"paths": ["a.h5"], "sizes": [10], "channels": ["ecal", "hcal"]},
            "rng": ck.capture_rng(), "metrics_history": [{"epoch": 1, "val_loss": 0.7}]}
    base.update(extra)
    return base


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, ck.to_plain(payload(extra=np.arange(3), scalar=np.float32(2.5))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    got = ck.load_checkpoint(path)
    assert got["format"] == ck.FORMAT and got["version"] == ck.VERSION
    assert torch.equal(got["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert got["extra"] == [0, 1, 2] and got["scalar"] == 2.5 and got["epoch"] == 3
    # the same file must load under the strict unpickler, i.e. it holds no arbitrary objects
    torch.load(path, weights_only=True)


@pytest.mark.parametrize("content, message", [
    (b"this is not a checkpoint", "not a massreg checkpoint"),
    ("dict", "no format"),
    ("version", "version 99"),
    ("missing", "lacks"),
])
def test_load_checkpoint_refuses_foreign_files(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content == "dict":
        torch.save({"state_dict": {}}, path)
    elif content == "version":
        torch.save({**payload(), "format": ck.FORMAT, "version": 99}, path)
    elif content == "missing":
        torch.save({"format": ck.FORMAT, "version": ck.VERSION, "model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match=message) as info:
        ck.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no such checkpoint"):
        ck.load_checkpoint(tmp_path / "nope.pt")


def test_check_model_config_names_differences():
    ckpt = payload()
    ck.check_model_config(ckpt, {"dim": 8, "depth": 1})
    with pytest.raises(ck.CheckpointError, match=r"dim: 8 in checkpoint vs 16 asked"):
        ck.check_model_config(ckpt, {"dim": 16, "depth": 1})


def test_rng_capture_restore_replays_every_generator():
    state = ck.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(7), random.random()  # move every generator on
    ck.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_unwrap_compiled_model_has_no_prefix():
    lin = torch.nn.Linear(2, 1)

    class Wrapper(torch.nn.Module):  # what torch.compile's OptimizedModule looks like from outside
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert ck.unwrap(Wrapper(lin)) is lin
    assert set(ck.unwrap(Wrapper(lin)).state_dict()) == {"weight", "bias"}


# ---------------------------------------------------------------- engine.predict

class AffineModel(torch.nn.Module):
    """z = 2 * mean(x) + sum(aux): an output we can compute independently."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, aux=None):
        z = 2 * x.mean(dim=(1, 2, 3)) + self.dummy
        return z if aux is None else z + aux.sum(dim=1)


class Halve(torch.nn.Module):
    def forward(self, images):
        return images.float() / 2


class Scaler:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def encode(self, x):
        return (x - self.mean) / self.std

    def decode(self, z):
        return z * self.std + self.mean


def fake_batches(n=10, batch=4, aux=2, seed=0):
    g = np.random.default_rng(seed)
    images = g.normal(size=(n, 2, 5, 5)).astype(np.float16)
    auxv = g.normal(size=(n, aux)).astype(np.float32)
    m = g.uniform(85, 500, n).astype(np.float32)
    out = [{"images": torch.from_numpy(images[i:i + batch]), "aux": torch.from_numpy(auxv[i:i + batch]),
            "m": torch.from_numpy(m[i:i + batch]), "index": torch.arange(i, min(i + batch, n))}
           for i in range(0, n, batch)]
    return out, images, auxv, m


@pytest.mark.parametrize("with_aux", [False, True])
def test_engine_predict_matches_numpy(with_aux):
    batches, images, auxv, m = fake_batches()
    model = AffineModel().train()
    aux_scaler = Scaler(np.float32(0.5), np.float32(2.0)) if with_aux else None
    out = engine.predict(model, batches, normalizer=Halve(), target=Scaler(300.0, 100.0), aux_scaler=aux_scaler,
                         device="cpu", amp=True)  # amp is a no-op on CPU
    z = 2 * (images.astype(np.float64) / 2).mean(axis=(1, 2, 3))
    if with_aux:
        z = z + ((auxv - 0.5) / 2.0).sum(axis=1)
    np.testing.assert_allclose(out["pred"], z * 100 + 300, rtol=1e-5)
    np.testing.assert_array_equal(out["true"], m.astype(np.float64))
    np.testing.assert_array_equal(out["index"], np.arange(10))
    assert out["pred"].shape == (10,) and model.training  # mode restored


def test_engine_predict_empty_loader():
    out = engine.predict(AffineModel(), [], normalizer=Halve(), target=Scaler(0, 1))
    assert out["pred"].shape == out["true"].shape == out["index"].shape == (0,)
