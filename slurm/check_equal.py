"""Equalities that `make slurm-check` (slurm/check.sh) asserts; prints each one it checked.

    python slurm/check_equal.py runs REF RUN       # a run against an uninterrupted reference run
    python slurm/check_equal.py shards ONE.h5 SHARD.h5...   # shards (in order) against a single conversion

runs: metrics.csv equal in every column but the timings (seconds, samples_per_s), row for row, exactly; and
in last.pt (torch.load, weights_only) the model's tensors, the optimizer's state (Adam moments, step counts)
and param groups, the epoch and step, bitwise; best_val_loss.pt and best_mre.pt the same (model, epoch).
shards: the concatenated /images, every /labels/* and each row's split equal the single file's, and so do the
root attributes that describe the conversion (channels, cuts, seed, fractions, columns used).
Exit status 1 (and a line saying what differs) at the first difference.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

TIMING_COLUMNS = {"seconds", "samples_per_s"}


def fail(msg: str) -> None:
    print(f"NOT EQUAL: {msg}", flush=True)
    sys.exit(1)


def ok(msg: str) -> None:
    print(f"equal: {msg}", flush=True)


def metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def same_tree(a, b, where: str) -> None:
    """Bitwise equality of nested dicts / lists / tensors / numbers."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            fail(f"{where}: a tensor against {type(b).__name__}")
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else "shape"
            fail(f"{where}: tensors differ (max |diff| {diff})")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            fail(f"{where}: keys differ: {sorted(set(a) ^ set(b), key=str)}")
        for k in a:
            same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            fail(f"{where}: lengths {len(a)} and {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}[{i}]")
    elif a != b:
        fail(f"{where}: {a!r} != {b!r}")


def count_tensors(tree) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return 1
    if isinstance(tree, dict):
        return sum(count_tensors(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(count_tensors(v) for v in tree)
    return 0


def check_runs(ref: Path, run: Path) -> None:
    import torch

    a, b = metrics(ref / "metrics.csv"), metrics(run / "metrics.csv")
    if a != b:
        fail(f"{run}/metrics.csv against {ref}/metrics.csv: {len(a)} and {len(b)} rows"
             + ("" if len(a) != len(b) else f", first difference at epoch "
                f"{next(x['epoch'] for x, y in zip(a, b) if x != y)}"))
    cols = [c for c in a[0] if c] if a else []
    ok(f"{run}/metrics.csv == {ref}/metrics.csv: {len(a)} epochs, columns {', '.join(cols)} "
       f"(exactly, as text; timings left out)")
    for name in ("last.pt", "best_val_loss.pt", "best_mre.pt"):
        x = torch.load(ref / name, map_location="cpu", weights_only=True)
        y = torch.load(run / name, map_location="cpu", weights_only=True)
        same_tree(x["model"], y["model"], f"{run}/{name} model")
        same_tree((x["epoch"], x["step"]), (y["epoch"], y["step"]), f"{run}/{name} epoch/step")
        what = f"model ({count_tensors(x['model'])} tensors)"
        if name == "last.pt":
            same_tree(x["optimizer"], y["optimizer"], f"{run}/{name} optimizer")
            same_tree(x["epoch_progress"], y["epoch_progress"], f"{run}/{name} epoch_progress")
            what += (f", optimizer state ({count_tensors(x['optimizer'])} tensors: "
                     f"{', '.join(sorted({k for s in x['optimizer']['state'].values() for k in s}))}) "
                     "and param groups")
        ok(f"{run}/{name} == {ref}/{name}: {what}, epoch {x['epoch']}, step {x['step']} (bitwise)")


def check_shards(single: Path, shards: list[Path]) -> None:
    import h5py
    import numpy as np

    with h5py.File(single, "r") as one:
        files = [h5py.File(p, "r") for p in shards]
        try:
            n = len(one["labels/m"])
            counts = [len(f["labels/m"]) for f in files]
            if sum(counts) != n:
                fail(f"{single} has {n} rows, the shards {counts} (sum {sum(counts)})")
            ok(f"row count: {single} {n} == shards {' + '.join(map(str, counts))}")
            for shard_no, f in enumerate(files, 1):
                if f.attrs["shard"] != f"{shard_no}/{len(files)}":
                    fail(f"{shards[shard_no - 1]}: attribute shard {f.attrs['shard']!r}")
            ok(f"shard attributes: 1/{len(files)} .. {len(files)}/{len(files)} in file order")
            # Images: shard by shard, against the matching slice of the single file (equal bit patterns).
            start = 0
            for p, f in zip(shards, files):
                m = len(f["labels/m"])
                a = one["images"][start:start + m]
                b = f["images"][...]
                if a.shape != b.shape or not np.array_equal(a.view(np.uint16), b.view(np.uint16)):
                    fail(f"/images of {p} != rows {start}..{start + m - 1} of {single}")
                start += m
            ok(f"/images {one['images'].shape} {one['images'].dtype}: concatenated shards == {single}, "
               "row for row (bit patterns)")
            labels = sorted(one["labels"])
            if any(sorted(f["labels"]) != labels for f in files):
                fail("the label names differ")
            for name in labels:
                a = one[f"labels/{name}"][...]
                b = np.concatenate([f[f"labels/{name}"][...] for f in files])
                if a.dtype != b.dtype or not np.array_equal(a, b):
                    fail(f"/labels/{name} differs")
            ok(f"/labels/{{{', '.join(labels)}}}: concatenated shards == {single}, row for row")
            for split in ("train", "val", "test"):
                a = np.zeros(n, bool)
                a[one[f"split/{split}"][...]] = True
                b = np.concatenate([np.isin(np.arange(c), f[f"split/{split}"][...]) for c, f in zip(counts, files)])
                if not np.array_equal(a, b):
                    fail(f"the {split} split differs")
            ok(f"/split/{{train,val,test}}: every row in the same split "
               f"({', '.join(str(len(one[f'split/{s}'])) for s in ('train', 'val', 'test'))} rows)")
            for key in ("channels", "cuts", "seed", "val_fraction", "test_fraction", "columns_used", "chunk_size"):
                a = one.attrs[key]
                for f in files:
                    b = f.attrs[key]
                    if json.dumps(np.asarray(a).tolist()) != json.dumps(np.asarray(b).tolist()):
                        fail(f"root attribute {key}: {a!r} != {b!r}")
            ok("root attributes channels, cuts, seed, val/test fractions, columns_used, chunk_size")
        finally:
            for f in files:
                f.close()


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "runs":
        check_runs(Path(argv[1]), Path(argv[2]))
    elif len(argv) >= 3 and argv[0] == "shards":
        check_shards(Path(argv[1]), [Path(p) for p in argv[2:]])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
