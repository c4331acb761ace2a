"""Builders shared by the test files (pytest puts this folder on sys.path, so `from conftest import ...`
works; fixtures defined here are found without an import)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import layout

# ------------------------------------------------------------------ pipeline builders (Parquet inputs)

# Rounding hazards written into channel 3 of every row by `make_rows`: float16 midpoints just above / below /
# exact (rounding through float32 would get the first wrong), values in float16's subnormal range, a negative
# zero, an underflow.
HAZARDS = [1 + 2**-11 + 2**-40, 1 + 2**-11 - 2**-40, 1 + 2**-11, 3 * 2**-25 + 2**-45, 2**-20 + 2**-40,
           -0.0, 1e-9]


def nested(images: np.ndarray) -> pa.Array:
    """(n, C, H, W) numpy -> list<list<list<value>>> built from offsets (as the real files hold them)."""
    n, c, h, w = images.shape
    values = pa.array(np.ascontiguousarray(images).reshape(-1))
    rows = pa.ListArray.from_arrays(pa.array(np.arange(n * c * h + 1, dtype=np.int32) * w), values)
    planes = pa.ListArray.from_arrays(pa.array(np.arange(n * c + 1, dtype=np.int32) * h), rows)
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * c), planes)


def make_rows(n: int, seed: int, shape=(8, layout.IMAGE_SIZE, layout.IMAGE_SIZE)
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sparse signed images (channel 7 dense, to take the whole-channel path) and a2gg-like scalars, so that
    the default `paper` cuts keep about a third of the rows."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n,) + shape)
    mask = rng.random(images.shape) < 0.03
    images[mask] = rng.exponential(2.0, mask.sum()) * rng.choice([-1.0, 1.0], mask.sum())
    if shape[0] == 8:
        images[:, 7] = rng.random((n,) + shape[1:]) * 100
        images[:, 3, 0, :len(HAZARDS)] = HAZARDS
    scalars = {"m": rng.uniform(0, 2, n), "pt": rng.uniform(10, 150, n),
               "ieta": rng.integers(5, 50, n).astype(np.float64),
               "iphi": rng.integers(0, 72, n).astype(np.float64),
               "eta": rng.uniform(-2, 2, n)}
    return images, scalars


def write_parquet(path, images, scalars, *, rows_per_group=1, image_name="X_jet", dtype=np.float64,
                  names=None):
    """A Parquet file in the real schema from numpy arrays (the oracle stays in memory): the image column
    `image_name` (list<list<list<dtype>>>), then the scalar columns, renamed by `names` (e.g. {"m": "am"})."""
    names = names or {}
    columns = {image_name: nested(images.astype(dtype))}
    columns.update({names.get(k, k): v for k, v in scalars.items()})
    pq.write_table(pa.table(columns), path, row_group_size=rows_per_group)
    return path


# ------------------------------------------------------------------ massreg builders (HDF5 files, ckpts)
S = layout.IMAGE_SIZE
LABELS = ("m", "pt", "ieta", "iphi")
EVAL_CHANNELS = ("track_pt", "dz", "d0", "ecal")      # make_file / make_checkpoint
IMAGE_CHANNELS = ("track_pt", "dz", "d0")             # make_image_rows / write_image_file
TINY_DEEPVIT = dict(patch_size=25, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, dropout=0.0,
                    emb_dropout=0.0)
RESUME_MODELS = {
    "tiny-dropout": dict(preset="tiny", dropout=0.2, emb_dropout=0.1),
    "hybrid-test": dict(preset="hybrid", widths=(4, 8), dim=16, depth=2, heads=2, dim_head=8, mlp_dim=16,
                        dropout=0.2, emb_dropout=0.1),
    "resnet-test": dict(preset="resnet", widths=(4, 8, 8, 8), head_dims=(8,), dropout=0.2),  # + BatchNorm
}


def make_file(path, n, *, seed=0, channels=EVAL_CHANNELS, fmt=layout.FORMAT_NAME, source_file="raw.parquet",
              positive=False):
    """A small file in the layout of pipeline/layout.py, written with h5py (what pipeline.convert writes).
    positive: pixel values >= 0 (energies), else signed."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, len(channels), S, S)) * 2).astype(np.float32)
    if positive:
        x = np.abs(x)
    x[rng.random(x.shape) < 0.95] = 0
    images = x.astype(np.float16)
    labels = {"m": rng.uniform(85, 500, n), "pt": rng.uniform(400, 1000, n),
              "ieta": rng.integers(12, 44, n).astype(np.float64),
              "iphi": rng.integers(0, 72, n).astype(np.float64)}
    codes = layout.split_codes(source_file, np.arange(n), seed=42, val_fraction=0.2, test_fraction=0.3)
    splits = {s: np.flatnonzero(codes == i).astype(np.int64) for i, s in enumerate(layout.SPLITS)}
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = fmt, layout.FORMAT_VERSION
        f.create_dataset("images", data=images).attrs["channels"] = list(channels)
        for k, v in labels.items():
            f[f"labels/{k}"] = v
        f["labels/source_file"] = np.zeros(n, dtype=np.int32)
        f["labels/source_row"] = np.arange(n, dtype=np.int64)
        for s, r in splits.items():
            f[f"split/{s}"] = r
        train = images[splits["train"]].astype(np.float64)
        st = f.create_group("stats")
        st["n_train"] = np.int64(train.shape[0])
        count = np.full(len(channels), train.shape[0] * S * S, dtype=np.float64)
        total, sumsq = train.sum(axis=(0, 2, 3)), (train ** 2).sum(axis=(0, 2, 3))
        mean, std = layout.finish_stats(count, total, sumsq)
        for k, v in dict(count=count, sum=total, sumsq=sumsq, mean=mean, std=std,
                         max=train.max(axis=(0, 2, 3))).items():
            st[f"channel_{k}"] = v
        st["reference_scale"] = np.array([layout.REFERENCE_SCALES[c] for c in channels])
        for name in LABELS:
            v = labels[name][splits["train"]]
            mean, std = layout.finish_stats(float(v.size), v.sum(), (v ** 2).sum())
            for k, val in dict(count=float(v.size), sum=v.sum(), sumsq=(v ** 2).sum(), mean=mean, std=std,
                               min=v.min(), max=v.max()).items():
                st[f"{name}_{k}"] = val
    return path


def make_checkpoint(path, data_paths, *, channels=EVAL_CHANNELS, aux=(), seed=0, quantiles=False):
    """A checkpoint of a tiny randomly initialised model in the contract's payload (as massreg.train
    saves); quantiles: with a QuantileHead whose widths vary from jet to jet and calibration factors != 1."""
    from dataclasses import asdict

    from massreg import checkpoint as ck
    from massreg.registry import ModelConfig, build_model
    from massreg.dataset import H5Images
    from massreg.transforms import Normalizer

    torch.manual_seed(seed)
    mcfg = ModelConfig(channels=len(channels), num_aux=len(aux), quantiles=quantiles, **TINY_DEEPVIT)
    model = build_model(mcfg)
    with torch.no_grad():  # a spread of predictions (z ~ N(0, 1.2)), so that a wrong input shows in them
        model.head.weight.normal_(0.0, 0.3)
        if quantiles:
            model.quantile_head.net[-1].weight.normal_(0.0, 0.3)
            model.quantile_head.set_calibration(torch.tensor([-1.0, -0.3, 0.3, 1.0]),
                                                torch.tensor([[1.3, 0.8], [1.1, 0.9], [0.7, 1.2], [1.0, 1.5]]))
    ds = H5Images(data_paths, "train")
    stats = ds.stats
    payload = {
        "model": model.state_dict(), "model_config": asdict(mcfg), "train_config": {"model": "test"},
        "optimizer": None, "scheduler": None, "epoch": 1, "step": 10, "best": {"val_loss": 1.0},
        "normalizer": Normalizer.from_stats(stats, "stats", list(channels)).to_dict(),
        "target": {"mean": float(stats["m_mean"]), "std": float(stats["m_std"])},
        "aux": {"names": list(aux), "mean": [float(stats[f"{a}_mean"]) for a in aux],
                "std": [float(stats[f"{a}_std"]) for a in aux]},
        "data": {"paths": [str(p) for p in data_paths], "sizes": [x["size"] for x in ds.file_info()],
                 "channels": list(channels), "stats": stats},
        "rng": {}, "metrics_history": []}
    ck.save_checkpoint(path, ck.to_plain(payload))
    return path


def oracle_predictions(ckpt_path, data_paths, split, aux=()):
    """Predictions computed without massreg.data / engine: h5py reads, numpy normalisation, a bare forward."""
    from massreg.registry import ModelConfig, build_model

    ckpt = torch.load(ckpt_path, weights_only=True)
    model = build_model(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    images, m, auxv = [], [], []
    for p in data_paths:
        with h5py.File(p, "r") as f:
            rows = f[f"split/{split}"][()]
            images.append(f["images"][()][rows].astype(np.float32))
            m.append(f["labels/m"][()][rows])
            auxv.append(np.stack([f[f"labels/{a}"][()][rows] for a in aux], 1) if aux else None)
    x = np.concatenate(images)
    stats_mean = np.asarray(ckpt["normalizer"]["mean"]).reshape(1, -1, 1, 1)
    stats_std = np.asarray(ckpt["normalizer"]["std"]).reshape(1, -1, 1, 1)
    x = torch.from_numpy(((x - stats_mean) / stats_std).astype(np.float32))
    a = None
    if aux:
        raw = np.concatenate(auxv)
        a = torch.from_numpy(((raw - np.asarray(ckpt["aux"]["mean"])) / np.asarray(ckpt["aux"]["std"]))
                             .astype(np.float32))
    with torch.no_grad():
        z = (model(x, a) if aux else model(x)).double().numpy()
    return z * ckpt["target"]["std"] + ckpt["target"]["mean"], np.concatenate(m)


def write_layout_file(path, n=48, channels=("track_pt", "dz", "d0", "ecal"), seed=0, *, version=None,
                      drop=None, image_fn=None):
    """A file in pipeline.layout's format with sparse images whose ECAL sum grows with the mass.

    version: format_version to write (default: layout's); drop: a dataset path to leave out (bad-input tests).
    """
    import h5py
    from pipeline import layout

    g = np.random.default_rng(seed)
    size = layout.IMAGE_SIZE
    m = g.uniform(85, 500, n)
    labels = {"m": m, "pt": g.uniform(400, 1000, n), "ieta": g.integers(12, 44, n).astype(np.float64),
              "iphi": g.integers(0, 72, n).astype(np.float64)}
    images = np.zeros((n, len(channels), size, size), dtype=np.float16)
    hits = g.random((n, len(channels), size, size)) < 0.01
    images[hits] = g.exponential(1.0, hits.sum()).astype(np.float16)
    images[:, -1, 60:65, 60:65] += (m / 100.0)[:, None, None].astype(np.float16)  # the signal
    if image_fn is not None:
        images = image_fn(images)
    codes = layout.split_codes(path.name, np.arange(n), seed=42, val_fraction=0.25, test_fraction=0.25)
    train = np.flatnonzero(codes == 0)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = layout.FORMAT_NAME
        f.attrs["format_version"] = layout.FORMAT_VERSION if version is None else version
        f.attrs["channels"] = json.dumps(list(channels))
        dset = f.create_dataset("images", data=images)
        dset.attrs["channels"] = json.dumps(list(channels))
        for name, values in labels.items():
            f[f"labels/{name}"] = values
        for code, split in enumerate(layout.SPLITS):
            f[f"split/{split}"] = np.flatnonzero(codes == code).astype(np.int64)
        x = images[train].astype(np.float64)
        count = np.full(len(channels), float(train.size * size * size))
        total, sumsq = x.sum(axis=(0, 2, 3)), (x ** 2).sum(axis=(0, 2, 3))
        mean, std = layout.finish_stats(count, total, sumsq)
        stats = {"n_train": np.int64(train.size), "channel_count": count, "channel_sum": total,
                 "channel_sumsq": sumsq, "channel_mean": mean, "channel_std": std,
                 "channel_max": x.max(axis=(0, 2, 3)),
                 "reference_scale": np.array([layout.REFERENCE_SCALES[c] for c in channels])}
        for name, values in labels.items():
            v = values[train]
            mean, std = layout.finish_stats(v.size, v.sum(), (v ** 2).sum())
            stats.update({f"{name}_count": float(v.size), f"{name}_sum": v.sum(),
                          f"{name}_sumsq": (v ** 2).sum(), f"{name}_mean": float(mean),
                          f"{name}_std": float(std), f"{name}_min": v.min(), f"{name}_max": v.max()})
        for key, value in stats.items():
            f[f"stats/{key}"] = value
        if drop:
            del f[drop]
    return path


def run_cli(args):
    from click.testing import CliRunner

    from massreg.train import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def register_model(monkeypatch, name: str) -> None:
    from massreg import registry as mconfig

    options = dict(RESUME_MODELS[name])
    monkeypatch.setitem(mconfig.PRESETS, name, mconfig.model_config(options.pop("preset"), **options))


def make_image_rows(rng, n, c=len(IMAGE_CHANNELS)):
    """Sparse float16 images with signed values (so flips and clipping are visible) and labels."""
    x = rng.standard_normal((n, c, S, S)).astype(np.float32) * 3
    x[rng.random(x.shape) < 0.9] = 0
    labels = {"m": rng.uniform(85, 500, n), "pt": rng.uniform(400, 1000, n),
              "ieta": rng.integers(12, 44, n).astype(np.float64),
              "iphi": rng.integers(0, 72, n).astype(np.float64),
              "source_row": np.arange(n, dtype=np.int64)}
    codes = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])
    splits = {s: np.flatnonzero(codes == i).astype(np.int64) for i, s in enumerate(layout.SPLITS)}
    return x.astype(np.float16), labels, splits


def write_image_file(path, images, labels, splits, channels=IMAGE_CHANNELS, *, chunks=None, compression=None,
                     fmt=layout.FORMAT_NAME, version=layout.FORMAT_VERSION, skip=()):
    """A file in the layout (what pipeline.convert writes), with `skip` paths left out to make it broken."""
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = fmt, version
        if "images" not in skip:
            d = f.create_dataset("images", data=images, chunks=chunks, compression=compression)
            d.attrs["channels"] = list(channels)
        for k, v in labels.items():
            if f"labels/{k}" not in skip:
                f[f"labels/{k}"] = v
        for s, r in splits.items():
            if f"split/{s}" not in skip:
                f[f"split/{s}"] = r
        if "stats" in skip:
            return path
        train = images[splits["train"]].astype(np.float64)
        st = f.create_group("stats")
        st["n_train"] = np.int64(len(splits["train"]))
        count = np.full(images.shape[1], train.shape[0] * S * S, dtype=np.float64)
        total, sumsq = train.sum(axis=(0, 2, 3)), (train ** 2).sum(axis=(0, 2, 3))
        mean, std = layout.finish_stats(count, total, sumsq)
        cmax = train.max(axis=(0, 2, 3))
        for k, v in dict(count=count, sum=total, sumsq=sumsq, mean=mean, std=std, max=cmax).items():
            st[f"channel_{k}"] = v
        st["reference_scale"] = np.array([layout.REFERENCE_SCALES[c] for c in channels])
        for name in LABELS:
            v = labels[name][splits["train"]]
            mean, std = layout.finish_stats(len(v), v.sum(), (v ** 2).sum())
            for k, val in dict(count=float(len(v)), sum=v.sum(), sumsq=(v ** 2).sum(), mean=mean, std=std,
                               min=v.min(), max=v.max()).items():
                st[f"{name}_{k}"] = val
    return path
