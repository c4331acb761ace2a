"""The HDF5 reader: rows of one split of one or several converted files, read through numpy memmaps.

    ds = H5Images(["top_1of2.h5", "top_2of2.h5"], "train", aux=("pt", "ieta", "iphi"))
    batch = ds.__getitems__(sorted_positions)   # "images" float16 (B, C, 125, 125) as stored, "m", "aux", ...
    loader = make_loader(ds, batch_size=256, shuffle=False, seed=0)   # massreg.sampling

Design (why it is fast and safe with DataLoader workers):
- `/images` is contiguous float16 in the file (pipeline.layout), so numpy memory-maps it at its file offset;
  no h5py handle is kept open after __init__, and the memmaps are opened lazily once per process (a forked
  worker re-opens its own; pickling drops them), so a dataset pickles to metadata plus the small label arrays.
- A batch is one `__getitems__` call: indices are sorted (sequential reads), grouped by file, read with one
  fancy index per file, then put back in the requested order. make_loader hands over batches already sorted,
  so the read goes straight into the batch tensor: in a worker one in shared memory (no copy to hand it
  over), in the main process a reused one (a fresh 32 MB array costs more in page faults than the copy).
- Images stay float16 on the host; conversion to float32 and normalisation happen in massreg.transforms'
  Normalizer, which halves host memory traffic and the host-to-device copy.
- Flips (massreg.sampling.flip_masks, a pure function of (seed, epoch, global row)) are applied while
  reading (`read_into(..., flips=...)`, the CPU training path) or on the device (massreg.prefetch).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from massreg.sampling import flip_masks
from pipeline import layout
from pipeline.errors import UserError

POOL_SIZE = 3  # batch arrays kept per dataset and process: the one being filled, the one in use, one spare
FIX = "re-run pipeline.convert to write a file in the current layout"


class LayoutError(UserError):
    """A file that is not in our HDF5 layout (one line: which file, what is wrong, what to do)."""


@dataclass(frozen=True)
class FileMeta:
    """Where one file's /images lies: what a process needs to memory-map it."""
    path: str
    offset: int             # byte offset of /images in the file
    shape: tuple            # (N, C, 125, 125)
    dtype: str              # "<f2"
    size: int               # file size in bytes
    format_version: int


def channel_names(value) -> list[str]:
    """Channel names from an HDF5 attribute: an array of (byte) strings or a JSON list."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [value]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(value)]


def read_file(path: str, split: str | None, aux: Sequence[str]) -> tuple:
    """Check one file's layout and read its small parts: (meta, channels, stats, local rows (n,), m (n,),
    aux (n, K)); LayoutError (one line) for anything that is not the converter's layout."""
    with layout.open_checked(path, LayoutError) as f:
        check_format(path, f)
        meta = image_meta(path, f)
        channels = file_channels(path, f, meta.shape[1])
        rows = split_rows(path, f, split, meta.shape[0])
        m, aux_arr = read_labels(path, f["labels"], rows, meta.shape[0], aux)
        stats = {k: v[()] for k, v in f["stats"].items()}
        if "n_train" not in stats:
            raise LayoutError(f"{path}: /stats has no n_train (not written by pipeline.convert); {FIX}")
        return meta, channels, stats, rows, m, aux_arr


def check_format(path: str, f: h5py.File) -> None:
    """The format name and version attributes, and every object a reader needs."""
    fmt, version = f.attrs.get("format"), f.attrs.get("format_version")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt != layout.FORMAT_NAME:
        raise LayoutError(f"{path}: format attribute is {fmt!r}, expected {layout.FORMAT_NAME!r}; {FIX}")
    if version is None or int(version) != layout.FORMAT_VERSION:
        raise LayoutError(f"{path}: format_version is {version}, this massreg reads version "
                          f"{layout.FORMAT_VERSION}; {FIX}")
    need = ["images", "labels/m", "stats"] + [f"split/{s}" for s in layout.SPLITS]
    missing = [n for n in need if n not in f]
    if missing:
        raise LayoutError(f"{path}: missing {', '.join('/' + n for n in missing)}; {FIX}")


def image_meta(path: str, f: h5py.File) -> FileMeta:
    """Where /images lies in the file: (N, C, 125, 125) contiguous little-endian float16, memory-mappable."""
    dset = f["images"]
    shape = tuple(int(s) for s in dset.shape)
    if len(shape) != 4 or shape[2:] != (layout.IMAGE_SIZE, layout.IMAGE_SIZE):
        raise LayoutError(f"{path}: /images has shape {shape}, expected (N, C, {layout.IMAGE_SIZE}, "
                          f"{layout.IMAGE_SIZE}); {FIX}")
    if dset.dtype != np.dtype("<f2"):
        raise LayoutError(f"{path}: /images has dtype {dset.dtype}, expected little-endian float16; {FIX}")
    if dset.chunks is not None or dset.compression is not None:
        raise LayoutError(f"{path}: /images is chunked (chunks={dset.chunks}, compression="
                          f"{dset.compression}) and cannot be memory-mapped; {FIX} (it writes "
                          f"contiguous, unfiltered images)")
    offset = dset.id.get_offset()
    if offset is None and shape[0] > 0:
        raise LayoutError(f"{path}: /images has no contiguous storage in the file (unallocated or "
                          f"external) and cannot be memory-mapped; {FIX}")
    size = os.path.getsize(path)
    nbytes = int(np.prod(shape)) * 2
    if shape[0] > 0 and offset + nbytes > size:
        raise LayoutError(f"{path}: file is truncated ({size} bytes, /images ends at byte "
                          f"{offset + nbytes}); {FIX}")
    return FileMeta(path=path, offset=int(offset or 0), shape=shape, dtype="<f2", size=size,
                    format_version=int(f.attrs["format_version"]))


def file_channels(path: str, f: h5py.File, n_channels: int) -> list[str]:
    """The channel names of /images (its attribute, or the file's), one per stored channel."""
    dset = f["images"]
    stored = dset.attrs["channels"] if "channels" in dset.attrs else f.attrs.get("channels", [])
    channels = channel_names(stored)
    if len(channels) != n_channels:
        raise LayoutError(f"{path}: /images has {n_channels} channels but {len(channels)} channel names "
                          f"{channels}; {FIX}")
    return channels


def split_rows(path: str, f: h5py.File, split: str | None, n: int) -> np.ndarray:
    """(k,) int64 sorted local rows of `split` (/split/<name>), or every row for None."""
    if split is None:
        return np.arange(n, dtype=np.int64)
    rows = np.asarray(f["split"][split][()], dtype=np.int64)
    if rows.ndim != 1 or (rows.size and (rows[0] < 0 or rows[-1] >= n or np.any(np.diff(rows) <= 0))):
        raise LayoutError(f"{path}: /split/{split} is not a sorted list of distinct row numbers in "
                          f"[0, {n}); {FIX}")
    return rows


def read_labels(path: str, labels: h5py.Group, rows: np.ndarray, n: int,
                aux: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(m (k,) float32 GeV, aux (k, len(aux)) float32 raw) of `rows`."""
    m = np.asarray(labels["m"][()])
    if m.shape != (n,):
        raise LayoutError(f"{path}: /labels/m has shape {m.shape}, expected ({n},); {FIX}")
    cols = []
    for name in aux:
        if name not in labels or labels[name].shape != (n,):
            present = sorted(k for k in labels if k not in layout.LABEL_META)
            raise LayoutError(f"{path}: auxiliary input {name!r} is not a label of this file "
                              f"(labels present: {', '.join(present)}); choose --aux from these")
        cols.append(np.asarray(labels[name][()], dtype=np.float32)[rows])
    aux_arr = np.stack(cols, axis=1) if cols else np.zeros((rows.size, 0), dtype=np.float32)
    return m[rows].astype(np.float32), aux_arr


class H5Images(Dataset):
    """Rows of one split of one or several HDF5 files in the massreg layout, read through numpy memmaps.

    paths: one path or a list (several files or shards are one data set: rows concatenated in the given order,
    split indices offset per file). split: "train", "val", "test", or None for every row. aux: label names
    returned as "aux" (raw values; scale them with massreg.transforms.AuxScaler). Images come as stored;
    read_into flips while reading, the prefetcher on the device.

    A batch (``__getitems__``) is a dict: "images" float16 (B, C, 125, 125) as stored (not normalised),
    "m" float32 (B,) GeV, "aux" float32 (B, len(aux)), "index" int64 (B,) position within this split.
    """

    def __init__(self, paths, split: str | None = "train", *, aux: Sequence[str] = ()):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("H5Images needs at least one file")
        if split is not None and split not in layout.SPLITS:
            raise ValueError(f"split must be one of {layout.SPLITS} or None, not {split!r}")
        real = [os.path.realpath(p) for p in paths]
        for i, r in enumerate(real):
            if r in real[:i]:
                raise LayoutError(f"{paths[i]}: listed twice; each file (shard) may appear once")
        self.split, self.aux_names = split, tuple(aux)
        metas, stats, rows, m, aux_cols = [], [], [], [], []
        start = 0  # global row number of the current file's first row
        for path in paths:
            meta, channels, st, local, m_k, aux_k = read_file(path, split, self.aux_names)
            if metas and channels != self._channels:
                raise LayoutError(f"{path} has channels {channels} but {metas[0].path} has {self._channels}; "
                                  f"files read together must be converted with the same --channels")
            self._channels = channels
            metas.append(meta)
            stats.append(st)
            rows.append(local + start)
            m.append(m_k)
            aux_cols.append(aux_k)
            start += meta.shape[0]
        self._files = metas
        self._starts = np.cumsum([0] + [f.shape[0] for f in metas]).astype(np.int64)  # (F+1,) global offsets
        self._rows = np.concatenate(rows)   # (n,) global row of each split position; sorted, since splits are
        self._m = np.concatenate(m)         # (n,) float32
        self._aux = np.concatenate(aux_cols)  # (n, K) float32
        self._stats = stats[0] if len(stats) == 1 else layout.combine_stats(stats)
        self.maps: list[np.ndarray] | None = None  # opened lazily, once per process (see _images)
        self._pid: int | None = None
        self.buffer_pool: list[np.ndarray] = []  # batch arrays of this process, reused when free

    # -- metadata --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._rows.size)

    def __repr__(self) -> str:
        return (f"H5Images({len(self._files)} file(s), split={self.split!r}, rows={len(self)}, "
                f"channels={self._channels}, aux={list(self.aux_names)})")

    @property
    def channels(self) -> list[str]:
        return list(self._channels)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self._files]

    @property
    def stats(self) -> dict:
        """/stats of the file, or of all files combined exactly from their sums (layout.combine_stats)."""
        return dict(self._stats)

    @property
    def rows(self) -> np.ndarray:
        """(n,) int64 global row (in the concatenated files) of each position of this split."""
        return self._rows.copy()

    @property
    def targets(self) -> np.ndarray:
        """(n,) float32 mass in GeV of each position of this split (without touching the images)."""
        return self._m.copy()

    def file_info(self) -> list[dict]:
        """One dict per file: path, size (bytes), format_version; recorded in checkpoints."""
        return [{"path": f.path, "size": f.size, "format_version": f.format_version} for f in self._files]

    def locate(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(file number, row within that file) of split positions `index`, both int64 arrays."""
        rows = self._rows[np.asarray(index, dtype=np.int64)]
        file = np.searchsorted(self._starts, rows, side="right") - 1
        return file, rows - self._starts[file]

    def label(self, name: str) -> np.ndarray:
        """Any /labels/<name> (e.g. source_row) for every position of this split, read now with h5py."""
        parts = []
        for k, f in enumerate(self._files):
            with layout.open_for_reading(f.path) as h5:
                if name not in h5["labels"]:
                    raise LayoutError(f"{f.path}: no /labels/{name}")
                sel = self._rows[(self._rows >= self._starts[k]) & (self._rows < self._starts[k + 1])]
                parts.append(np.asarray(h5["labels"][name][()])[sel - self._starts[k]])
        return np.concatenate(parts)

    # -- process-local memmaps -------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["maps"], state["_pid"], state["buffer_pool"] = None, None, []  # never ship mappings or buffers
        return state

    def _images(self) -> list[np.ndarray]:
        """The (N, C, 125, 125) float16 memmap of each file, opened on first use in this process."""
        if self.maps is None or self._pid != os.getpid():  # a forked worker opens its own
            # .view(np.ndarray): a plain array over the mapping (fancy reads give plain arrays, not memmaps)
            self.maps = [np.memmap(f.path, mode="r", dtype=f.dtype, offset=f.offset, shape=f.shape)
                         .view(np.ndarray) if f.shape[0] else np.zeros(f.shape, np.float16)
                         for f in self._files]
            self._pid, self.buffer_pool = os.getpid(), []
        return self.maps

    def _batch_images(self, shape: tuple) -> torch.Tensor:
        """An uninitialised float16 batch tensor of `shape` (B, C, H, W), the destination of one read.

        In a DataLoader worker it is allocated in shared memory, so handing it to the main process costs no
        copy (what torch's default_collate does). In the main process it comes from a small pool: a fresh
        32-64 MB array costs ~8,000-16,000 page faults with zero-filling, about 3x the copy itself
        (benchmarks/bench_loader.py), so arrays that no batch references any more are reused. A pooled array
        is handed out only while nothing else holds it: every tensor made from it by torch.from_numpy (and
        every view of such a tensor) keeps a reference to it, so its reference count says whether it is free.
        (So one dataset must not be read from several threads at once; DataLoader never does that.)
        """
        if get_worker_info() is not None and math.prod(shape):
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * 2)  # 2 bytes per float16
            return torch.empty(0, dtype=torch.float16).set_(storage, 0, shape)
        # free: referenced only by the pool's list and getrefcount's own argument
        free = [i for i in range(len(self.buffer_pool)) if sys.getrefcount(self.buffer_pool[i]) == 2]
        for i in free:
            a = self.buffer_pool[i]
            if a.shape[1:] == shape[1:] and a.shape[0] >= shape[0]:
                return torch.from_numpy(a[: shape[0]])  # (B, C, H, W) view of the first B rows
        a = np.empty(shape, dtype=np.float16)
        if len(self.buffer_pool) < POOL_SIZE:
            self.buffer_pool.append(a)
        elif free:
            self.buffer_pool[free[0]] = a  # replace a free array of another shape
        return torch.from_numpy(a)

    # -- reading ---------------------------------------------------------------------------------------
    def __getitems__(self, indices) -> dict:
        """A whole batch: one sorted fancy read per file, in the order of `indices` (duplicates allowed)."""
        idx = self._check(indices)
        c = self._files[0].shape[1]
        self._images()                                         # first, so a new process also gets a new pool
        out = self._batch_images((idx.size, c, layout.IMAGE_SIZE, layout.IMAGE_SIZE))  # (B, C, H, W) float16
        return self.read_into(idx, out)

    def read_into(self, indices, out: torch.Tensor, flips: tuple[int, int] | None = None) -> dict:
        """The batch of `indices` with its images read into `out`, a float16 (B, C, 125, 125) CPU tensor the
        caller owns (a reused or pinned buffer: massreg.prefetch). Several threads may read at once into
        distinct buffers (numpy releases the GIL while it copies) once the memmaps are open (`open()`).

        flips: (seed, epoch) to flip while reading, with flip_masks(seed, epoch, row): each image is copied
        from the file through a reversed view, so the flips cost no pass of their own (the CPU training path;
        on CUDA the device flips). None: the images as stored.
        """
        idx = self._check(indices)
        maps = self._images()
        assert out.dtype == torch.float16 and tuple(out.shape) == (idx.size, *self._files[0].shape[1:]), \
            f"out must be float16 {(idx.size, *self._files[0].shape[1:])}, got {out.dtype} {tuple(out.shape)}"
        if flips is not None:
            rows = self._rows[idx]                                         # (B,) global rows, any order
            file = np.searchsorted(self._starts, rows, side="right") - 1
            eta, phi = flip_masks(*flips, rows)
            dst = out.numpy()
            for b, (k, r, e, p) in enumerate(zip(file.tolist(), (rows - self._starts[file]).tolist(),
                                                 eta.tolist(), phi.tolist())):
                view = maps[k][r]                                          # (C, H, W) in the file
                view = view[:, ::-1] if e else view                        # eta: the H axis
                np.copyto(dst[b], view[:, :, ::-1] if p else view)         # phi: the W axis
            return self._batch(idx, out)
        # Batches of make_loader / EpochBatches arrive sorted and distinct: read straight into `out`.
        # Otherwise read the sorted distinct positions into a scratch buffer and gather them into order.
        direct = bool(np.all(idx[1:] > idx[:-1]))
        uniq, inverse = (idx, None) if direct else np.unique(idx, return_inverse=True)  # (U,), (B,)
        dst = out.numpy() if direct else np.empty((uniq.size,) + tuple(out.shape[1:]), dtype=np.float16)
        rows = self._rows[uniq]                                # (U,) ascending: positions and rows sort alike
        bounds = np.searchsorted(rows, self._starts)           # (F+1,) slice of `rows` in each file
        for k in range(len(self._files)):                      # loop over files, not rows
            lo, hi = bounds[k], bounds[k + 1]
            if hi > lo:
                # mode="clip" (indices are checked above) lets numpy write straight into `out`; the default
                # mode="raise" buffers the whole read and copies it again.
                np.take(maps[k], rows[lo:hi] - self._starts[k], axis=0, out=dst[lo:hi], mode="clip")
        if not direct:
            np.take(dst, inverse.reshape(-1), axis=0, out=out.numpy(), mode="clip")
        return self._batch(idx, out)

    def _batch(self, idx: np.ndarray, out: torch.Tensor) -> dict:
        return {"images": out,
                "m": torch.from_numpy(self._m[idx]),
                "aux": torch.from_numpy(self._aux[idx]),
                "index": torch.from_numpy(idx),
                "row": torch.from_numpy(self._rows[idx])}   # (B,) global rows: the key of the flip masks

    def will_need(self, positions) -> None:
        """Ask the kernel to read now, in the background, the file stretch from the first to the last row of
        `positions` (posix_fadvise WILLNEED, one call per file). For the contiguous blocks of --shuffle block
        this turns the page faults of 125-250 kB rows into large sequential reads ahead of use."""
        rows = self._rows[np.asarray(positions, dtype=np.int64)]
        if rows.size == 0 or not hasattr(os, "posix_fadvise"):
            return
        file = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(file).tolist():
            local = rows[file == k] - self._starts[k]
            f = self._files[k]
            row_bytes = math.prod(f.shape[1:]) * 2                   # float16
            lo, hi = int(local.min()), int(local.max()) + 1
            fd = os.open(f.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, f.offset + lo * row_bytes, (hi - lo) * row_bytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def open(self) -> "H5Images":
        """Open this process's memmaps now (before reader threads share the dataset); returns self."""
        self._images()
        return self

    def _check(self, indices) -> np.ndarray:
        """(B,) int64 positions, negative ones wrapped; IndexError outside the split."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (B,)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a split of {n} rows")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, i) -> dict:
        if np.ndim(i) > 0:  # a whole batch (DataLoader with batch_size=None and a batch sampler)
            return self.__getitems__(i)
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}
