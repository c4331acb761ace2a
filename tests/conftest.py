"""Builders shared by the test files (pytest puts this folder on sys.path, so `from conftest import ...`
works; fixtures defined here are found without an import)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
