"""Samples/s of massreg.data (H5Images + make_loader) against h5py fancy indexing and an in-RAM tensor.

Usage:
    python benchmarks/bench_loader.py                      # 8,000 rows x 4 channels (~1 GB), batch 256
    python benchmarks/bench_loader.py --rows 2000 --passes 2 --json out.json

One run measures, on the same file and the same shuffled batches of the train split (batch 256):
  ours      H5Images + make_loader (workers 0 and 2; also with flips, and the DataLoader's other batch path)
  h5py      h5py fancy indexing of each batch (indices sorted per batch, as h5py requires), one open file
  in-RAM    the whole /images loaded into a torch float16 tensor, indexed per batch (index_select with the
            default threads and with 1 thread, and ram[idx]; the fastest is the reference)
Methods run round-robin (the order rotated each pass), `passes` times each, so a change in the machine's load
hits all of them alike; the best pass and the median are printed (the best is the least disturbed by other
users). The file is built in the layout directly with h5py from random sparse float16 data, then read once in
full, so it is in the page cache for all three (dropping the cache needs root): this measures the CPU cost of
each path, not the disk.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from massreg.dataset import H5Images
from massreg.sampling import SortedBatchSampler, epoch_seed, flip_masks, make_loader
from pipeline import layout

S = layout.IMAGE_SIZE


class HostFlips(H5Images):
    """The loader path before massreg.prefetch, kept here to compare with: each batch read, then flipped on
    the host with numpy in three disjoint groups (eta only, phi only, both): each image rewritten once."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.epoch = seed, 0

    def __getitems__(self, indices) -> dict:
        batch = super().__getitems__(indices)
        images = batch["images"].numpy()                                  # (B, C, H, W) float16
        eta, phi = flip_masks(self.seed, self.epoch, batch["row"].numpy())  # (B,) bool each
        for sel, view in ((eta & ~phi, np.s_[:, :, ::-1, :]), (phi & ~eta, np.s_[:, :, :, ::-1]),
                          (eta & phi, np.s_[:, :, ::-1, ::-1])):
            if sel.any():
                images[sel] = images[sel][view]
        return batch


H5PY = "h5py fancy indexing (sorted per batch)"
RAM = "in-RAM torch tensor, index_select per batch"
RAM1 = "in-RAM torch tensor, index_select, 1 thread"
RAMI = "in-RAM torch tensor, ram[idx]"
RAMS = (RAM, RAM1, RAMI)  # the in-RAM reference is the fastest of these


@dataclass
class BenchConfig:
    rows: int = 8000
    channels: int = 4
    batch_size: int = 256
    passes: int = 5
    workers: tuple = (0, 2)
    density: float = 0.05        # fraction of non-zero pixels (real images are sparse)
    seed: int = 0
    file: str | None = None      # reuse this file (built if missing); default: a temporary file, deleted
    json: str | None = None      # also write the results (with this config) here
    threads: int = field(default_factory=torch.get_num_threads)


def build_file(path: str, rows: int, channels: int, *, density: float, seed: int, chunk: int = 250) -> str:
    """A file in the massreg layout with random sparse float16 images, written chunk by chunk, atomically."""
    rng = np.random.default_rng(seed)
    names = layout.CHANNEL_NAMES[:channels]
    codes = layout.split_codes(os.path.basename(path), np.arange(rows), seed=seed, val_fraction=0.1,
                               test_fraction=0.2)
    train = codes == 0
    labels = {"m": rng.uniform(85, 500, rows), "pt": rng.uniform(400, 1000, rows),
              "ieta": rng.integers(12, 44, rows).astype(np.float64),
              "iphi": rng.integers(0, 72, rows).astype(np.float64)}
    tmp = f"{path}.tmp{os.getpid()}"
    total, sumsq = np.zeros(channels), np.zeros(channels)
    cmax = np.full(channels, -np.inf)
    with h5py.File(tmp, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = layout.FORMAT_NAME, layout.FORMAT_VERSION
        images = f.create_dataset("images", (rows, channels, S, S), dtype=np.float16)  # contiguous
        images.attrs["channels"] = list(names)
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            x = np.zeros((n, channels, S, S), dtype=np.float16)               # (n, C, H, W)
            hit = rng.random(x.shape, dtype=np.float32) < density
            x[hit] = rng.exponential(2.0, hit.sum()).astype(np.float16)
            images[lo:lo + n] = x
            xt = x[train[lo:lo + n]].astype(np.float64)
            total += xt.sum(axis=(0, 2, 3))
            sumsq += (xt ** 2).sum(axis=(0, 2, 3))
            if len(xt):
                cmax = np.maximum(cmax, xt.max(axis=(0, 2, 3)))
        for k, v in labels.items():
            f[f"labels/{k}"] = v
        for i, s in enumerate(layout.SPLITS):
            f[f"split/{s}"] = np.flatnonzero(codes == i).astype(np.int64)
        st = f.create_group("stats")
        st["n_train"] = np.int64(train.sum())
        count = np.full(channels, float(train.sum()) * S * S)
        mean, std = layout.finish_stats(count, total, sumsq)
        for k, v in dict(count=count, sum=total, sumsq=sumsq, mean=mean, std=std, max=cmax).items():
            st[f"channel_{k}"] = v
        st["reference_scale"] = np.array([layout.REFERENCE_SCALES[c] for c in names])
        for k, v in labels.items():
            v = v[train]
            mean, std = layout.finish_stats(len(v), v.sum(), (v ** 2).sum())
            for name, val in dict(count=float(len(v)), sum=v.sum(), sumsq=(v ** 2).sum(), mean=mean, std=std,
                                  min=v.min(), max=v.max()).items():
                st[f"{k}_{name}"] = val
    os.replace(tmp, path)
    return path


def warm_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def batches_of(ds: H5Images, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The shuffled batches (split positions, sorted in each batch) that make_loader yields for this epoch."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).numpy()
    return [np.sort(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def consume(batches) -> tuple[int, float]:
    """Samples delivered by an iterable of batch dicts, and seconds until the first batch arrived."""
    t0, first, seen = time.perf_counter(), None, 0
    for batch in batches:
        seen += len(batch["images"])
        first = time.perf_counter() - t0 if first is None else first
    return seen, first


def run_bench(config: BenchConfig, path: str) -> dict:
    """Every method on `path`, round-robin over `passes` (so a change in the machine's load hits all alike).

    Returns {method: {"best", "median", "passes", "first_batch_s"}}, rates in samples/s.
    """
    ds = H5Images(path, "train")
    flipping = HostFlips(path, "train", seed=config.seed)
    n, b, seed = len(ds), config.batch_size, config.seed
    rows_t = torch.from_numpy(ds.rows)
    with h5py.File(path, "r") as f:
        ram = torch.from_numpy(f["images"][()])  # (N, C, H, W) float16: the whole file in RAM
    h5 = h5py.File(path, "r")
    dset = h5["images"]

    def in_ram(p: int, gather):
        return ({"images": gather(rows_t[torch.from_numpy(idx)])} for idx in batches_of(ds, b, seed, p))

    def one_thread_select(p: int):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from in_ram(p, lambda r: torch.index_select(ram, 0, r))
        finally:
            torch.set_num_threads(threads)

    methods = {f"ours: H5Images + make_loader, workers={w}": (
        lambda p, w=w: make_loader(ds, batch_size=b, shuffle=True, seed=seed, workers=w, epoch=p))
        for w in config.workers}
    methods.update({
        "ours + flips, workers=0": lambda p: make_loader(flipping, batch_size=b, shuffle=True, seed=seed,
                                                         epoch=p),
        # The DataLoader's other whole-batch path: auto-collation off, a batch sampler as the sampler, so each
        # fetch is dataset[list_of_indices] followed by default_convert.
        "ours, batch_size=None + batch sampler, workers=0": lambda p: DataLoader(
            ds, batch_size=None, sampler=SortedBatchSampler(
                RandomSampler(ds, generator=torch.Generator().manual_seed(epoch_seed(seed, p))), b, False)),
        "ours: __getitems__ alone (no DataLoader)": lambda p: (
            ds.__getitems__(i) for i in batches_of(ds, b, seed, p)),
        H5PY: lambda p: (  # batches are sorted: h5py needs increasing indices
            {"images": torch.from_numpy(dset[ds.rows[i]])} for i in batches_of(ds, b, seed, p)),
        # Three torch ways to gather rows; the fastest in each run is the in-RAM reference. index_select
        # copies whole rows but with 2 threads on a busy 2-core machine can lose to 1 thread; ram[idx] goes
        # through the element-wise advanced-indexing kernel.
        RAM: lambda p: in_ram(p, lambda r: torch.index_select(ram, 0, r)),
        RAM1: one_thread_select,
        RAMI: lambda p: in_ram(p, lambda r: ram[r]),
    })
    rates: dict[str, list] = {name: [] for name in methods}
    firsts: dict[str, list] = {name: [] for name in methods}
    names = list(methods)
    for p in range(config.passes):
        for name in names[p % len(names):] + names[:p % len(names)]:  # rotated: no method always goes first
            make = methods[name]
            t0 = time.perf_counter()
            got, first = consume(make(p))
            rates[name].append(got / (time.perf_counter() - t0))
            firsts[name].append(first)
            assert got == n, (name, got, n)
    h5.close()
    return {name: {"best": max(r), "median": statistics.median(r), "passes": r,
                   "first_batch_s": statistics.median(firsts[name])} for name, r in rates.items()}


def bench(config: BenchConfig) -> dict:
    """Build (or reuse) the file, warm the page cache, run every method; return config, facts, results."""
    tmpdir = None
    path = config.file
    if path is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="bench_loader_")
        path = os.path.join(tmpdir.name, "bench.h5")
    try:
        if not os.path.exists(path):
            t0 = time.perf_counter()
            build_file(path, config.rows, config.channels, density=config.density, seed=config.seed)
            print(f"built {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        warm_page_cache(path)
        load_before = os.getloadavg()[0]
        results = run_bench(config, path)
        return {"config": asdict(config), "file_bytes": os.path.getsize(path), "torch": torch.__version__,
                "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()[0],
                "results": results}
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def report(out: dict) -> str:
    res = out["results"]
    h5, ram = res[H5PY]["best"], max(res[k]["best"] for k in RAMS)
    c = out["config"]
    lines = [f"{c['rows']} rows x {c['channels']} channels float16 ({out['file_bytes'] / 1e9:.2f} GB, in "
             f"page cache), train split, batch {c['batch_size']}, {c['passes']} passes",
             f"torch {out['torch']}, {out['cpus']} CPUs, {c['threads']} torch threads, load average "
             f"{out['load_before']:.1f} before, {out['load_after']:.1f} after (other users of the machine)",
             f"{'method':52s} {'best/s':>9s} {'median/s':>9s} {'x h5py':>7s} {'x RAM':>6s} {'1st batch':>9s}"]
    for name, r in res.items():
        lines.append(f"{name:52s} {r['best']:9.0f} {r['median']:9.0f} {r['best'] / h5:7.2f} "
                     f"{r['best'] / ram:6.2f} {r['first_batch_s'] * 1e3:7.0f}ms")
    lines.append("x RAM: against the fastest in-RAM line; 1st batch: median time until the first batch "
                 "of a pass (worker start-up)")
    return "\n".join(lines)


@click.command()
@click.option("--rows", default=BenchConfig.rows, show_default=True, help="rows in the generated file")
@click.option("--channels", default=BenchConfig.channels, show_default=True)
@click.option("--batch-size", default=BenchConfig.batch_size, show_default=True)
@click.option("--passes", default=BenchConfig.passes, show_default=True, help="passes per method")
@click.option("--workers", default="0,2", show_default=True, help="DataLoader worker counts to measure")
@click.option("--file", "file", default=None, help="reuse (or build and keep) this file, not a temporary one")
@click.option("--json", "json_path", default=None, help="also write the results and config as JSON here")
@click.option("--seed", default=BenchConfig.seed, show_default=True)
def main(rows, channels, batch_size, passes, workers, file, json_path, seed):
    """Samples/s of H5Images + make_loader vs h5py fancy indexing and an in-RAM tensor."""
    try:
        w = tuple(int(x) for x in workers.split(",") if x.strip())
    except ValueError:
        raise click.ClickException(f"--workers {workers!r}: expected comma-separated integers, e.g. 0,2")
    config = BenchConfig(rows=rows, channels=channels, batch_size=batch_size, passes=passes, workers=w,
                         file=file, json=json_path, seed=seed)
    out = bench(config)
    print(report(out))
    if json_path:
        tmp = f"{json_path}.tmp"
        Path(tmp).write_text(json.dumps(out, indent=2))
        os.replace(tmp, json_path)


if __name__ == "__main__":
    main()
