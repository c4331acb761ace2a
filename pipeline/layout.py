"""The HDF5 layout that `pipeline.convert` writes and `massreg` reads: one place for its names.

    /                      attrs: format, format_version, tool_version, created, config (JSON of the
                           ConvertConfig), source_files (JSON list of {name, path, size, rows_read,
                           rows_kept}), columns_used (JSON {image, m, ...: source column}), cuts (JSON),
                           channels, chunk_size, seed, val_fraction, test_fraction, shard
    /images                (N, C, 125, 125) float16, contiguous (no chunks, no filters: memory-mappable);
                           attrs channels (names), units, source_channels (indices into the 8 raw channels)
    /labels/m              (N,) float64, the mass in GeV whatever its source column (`m` or `am`)
    /labels/<name>         (N,) float64, every other scalar column (pt, ieta, iphi, eta, ...)
    /labels/source_file    (N,) int32, index into the root attr `source_files`
    /labels/source_row     (N,) int64, row number inside that source file
    /split/{train,val,test}  sorted int64 row indices into /images; disjoint; together all N rows
    /stats/                computed on the train rows from the stored float16 values, float64 sums:
        n_train            scalar int64
        channel_count      (C,) float64, number of pixel values summed (n_train * 125 * 125)
        channel_sum, channel_sumsq, channel_mean, channel_std, channel_max   (C,) float64
        reference_scale    (C,) float64, fixed per-channel scales (REFERENCE_SCALES) for the names stored
        <label>_{count,sum,sumsq,mean,std,min,max}   scalars for every float label (m_mean, m_std,
                                                     pt_mean ...)

Sums are stored next to means so that several shards combine exactly (`combine_stats`).
"""
from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np

FORMAT_NAME = "massreg-e2e"
FORMAT_VERSION = 1
IMAGE_SIZE = 125  # pixels per side; 125 = 5^3, one ECAL crystal (0.0174 in eta and phi) per pixel

# The eight raw channels, in the order of the source files (docs/data.md, "Channels and units"; the order
# of dz and d0 is disputed between sources, we follow the majority).
CHANNEL_NAMES = ("track_pt", "dz", "d0", "ecal", "hcal", "pix1", "pix2", "pix3")
CHANNEL_UNITS = ("GeV", "cm", "cm", "GeV", "GeV", "hits", "hits", "hits")
# Fixed scales seen in the stronger public submissions (track pT x0.01, dZ x0.05, d0 x0.1, ECAL x0.1,
# HCAL x1); pixel hit counts are left as they are.
REFERENCE_SCALES = {"track_pt": 0.01, "dz": 0.05, "d0": 0.1, "ecal": 0.1, "hcal": 1.0,
                    "pix1": 1.0, "pix2": 1.0, "pix3": 1.0}

# Column aliases seen in the task write-ups: canonical name -> accepted source names, first wins.
COLUMN_ALIASES = {"X_jet": ("X_jet", "X_jets"), "m": ("m", "am"), "pt": ("pt", "apt")}

SPLITS = ("train", "val", "test")
LABEL_META = ("source_file", "source_row")  # /labels entries that are bookkeeping, not physics
FLOAT16_MAX = 65504.0


def split_codes(file_name: str, rows: np.ndarray, *, seed: int, val_fraction: float,
                test_fraction: float) -> np.ndarray:
    """Split of each row: 0 train, 1 val, 2 test, as int8 of the shape of `rows`.

    A row's split depends only on (seed, base name of its source file, row number), never on which
    other files or shards were converted with it: u = splitmix64(key(seed, file) + row) / 2**64, then
    test if u < test_fraction, val if u < test_fraction + val_fraction, train otherwise.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be in [0, 1)")
    digest = hashlib.blake2b(f"{seed}/{file_name}".encode(), digest_size=8).digest()
    key = np.uint64(int.from_bytes(digest, "little"))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        z = np.asarray(rows, dtype=np.uint64) + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # uniform in [0, 1)
    codes = np.zeros(u.shape, dtype=np.int8)
    codes[u < test_fraction + val_fraction] = 1
    codes[u < test_fraction] = 2
    return codes


def finish_stats(count: np.ndarray, total: np.ndarray, sumsq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std from float64 count, sum and sum of squares."""
    count = np.asarray(count, dtype=np.float64)
    mean = np.divide(total, count, out=np.zeros_like(np.asarray(total, dtype=np.float64)), where=count > 0)
    var = np.divide(sumsq, count, out=np.zeros_like(mean), where=count > 0) - mean ** 2
    return mean, np.sqrt(np.maximum(var, 0.0))


def combine_stats(parts: list[dict]) -> dict:
    """Combine `/stats` dicts of several shards exactly, from their counts and sums (not their means)."""
    out = {"n_train": sum(int(p["n_train"]) for p in parts)}
    prefixes = {k[: -len("_sum")] for k in parts[0] if k.endswith("_sum")}
    for pre in sorted(prefixes):
        count = sum(np.asarray(p[f"{pre}_count"], dtype=np.float64) for p in parts)
        total = sum(np.asarray(p[f"{pre}_sum"], dtype=np.float64) for p in parts)
        sumsq = sum(np.asarray(p[f"{pre}_sumsq"], dtype=np.float64) for p in parts)
        out[f"{pre}_count"], out[f"{pre}_sum"], out[f"{pre}_sumsq"] = count, total, sumsq
        out[f"{pre}_mean"], out[f"{pre}_std"] = finish_stats(count, total, sumsq)
        if f"{pre}_max" in parts[0]:
            out[f"{pre}_max"] = np.max([p[f"{pre}_max"] for p in parts], axis=0)
        if f"{pre}_min" in parts[0]:
            out[f"{pre}_min"] = np.min([p[f"{pre}_min"] for p in parts], axis=0)
    for key in parts[0]:
        out.setdefault(key, parts[0][key])  # e.g. reference_scale: the same in every shard
    return out


def open_for_reading(path: str | os.PathLike) -> h5py.File:
    """A converted file opened read-only WITHOUT HDF5's file lock. Our readers only read files that the
    converter renamed into place whole, so they need no lock, and taking one fails where another process holds
    one (a writer, a copy tool) or where the file system has no flock (some Lustre and NFS mounts).

    OSError as h5py raises it; `open_checked` words it for a user."""
    return h5py.File(path, "r", locking=False)


def open_checked(path: str | os.PathLike, error: type[Exception]) -> h5py.File:
    """open_for_reading of a file a user named: `error` (the caller's one-line error class) when it does not
    exist, is not HDF5 at all (reconvert), or is HDF5 but cannot be opened (permissions, a truncated or
    damaged file: the cause as h5py gives it)."""
    if not os.path.isfile(path):
        raise error(f"{path}: no such file")
    try:
        return open_for_reading(path)
    except OSError as exc:
        raise error(_open_failure(path, exc)) from None


def _open_failure(path: str | os.PathLike, exc: OSError) -> str:
    cause = " ".join(str(exc).split())
    try:
        is_hdf5 = h5py.is_hdf5(os.fspath(path))
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        return f"{path}: not an HDF5 file ({cause}); re-run pipeline.convert to write one"
    return (f"{path}: an HDF5 file that cannot be read ({cause}); if it was cut short or damaged (a copy "
            "that did not finish), copy it again or re-run pipeline.convert")
