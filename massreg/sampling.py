"""Which rows an epoch reads, in which order and with which flips: pure functions of (seed, epoch, step).

    batches = EpochBatches(len(ds), 256, order="row", seed=1, epoch=3, rank=0, world=1)   # a batch sampler
    eta, phi = flip_masks(1, 3, rows)          # (B,) bool each: flip row b in eta / in phi
    loader = make_loader(ds, batch_size=256, shuffle=False, seed=0)        # evaluation order

So resumed runs, any reader and any number of workers or processes agree on every batch and every flip, and
an epoch can start at any step. No h5py here: the dataset (massreg.dataset) imports this, not the other way.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from pipeline.signals import ignore_stop_signals

# ----------------------------------------------------------------------------------------------------------
# seeded hashing: reproducible randomness that depends only on its inputs, not on process or call order


def _key64(text: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of a uint64 array (the same mixer as layout.split_codes)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the shuffling generator for one epoch: a hash of (seed, epoch), so epochs are decorrelated."""
    return int(_key64(f"shuffle/{seed}/{epoch}") >> np.uint64(1))  # < 2**63, accepted by manual_seed


def flip_masks(seed: int, epoch: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which rows to flip in eta (H axis) and in phi (W axis): two independent fair coins per row.

    rows: (B,) global row numbers (position in the concatenated files). Returns two (B,) bool arrays, a pure
    function of (seed, epoch, row).
    """
    with np.errstate(over="ignore"):
        z = _splitmix64(np.asarray(rows, dtype=np.uint64) + _key64(f"flips/{seed}/{epoch}"))
    return (z >> np.uint64(63)).astype(bool), ((z >> np.uint64(62)) & np.uint64(1)).astype(bool)


# ----------------------------------------------------------------------------------------------------------
# the loader


class SortedBatchSampler(BatchSampler):
    """BatchSampler whose batches come out sorted: a batch is a set of rows (the loss does not depend on their
    order), and sorted distinct indices let H5Images read straight into the batch with no reordering copy."""

    def __iter__(self):
        for batch in super().__iter__():
            batch.sort()
            yield batch


ORDERS = ("row", "block", "none")
BLOCK_ROWS = 64       # --shuffle block: rows per contiguous block (8 MB of 4-channel rows, 16 MB of 8)
WINDOW_BLOCKS = 16    # blocks whose rows are shuffled together (1,024 rows: 128-256 MB of page cache)


def epoch_order(n: int, *, order: str = "row", seed: int = 0, epoch: int = 0, block_rows: int = BLOCK_ROWS,
                window_blocks: int = WINDOW_BLOCKS) -> np.ndarray:
    """(n,) int64 positions in the order of one epoch: a pure function of its arguments.

    row    a uniform permutation; the same as torch's RandomSampler seeded with epoch_seed(seed, epoch), i.e.
           what make_loader has always given (so earlier runs resume and reproduce).
    block  FFCV's quasi-random order: the positions cut into contiguous blocks of `block_rows`, the blocks
           permuted, then taken `window_blocks` at a time and the rows of each window shuffled together. A
           window is read from a few contiguous stretches of the file (near-sequential reads when the data do
           not fit in the page cache), at the price that a batch draws from window_blocks * block_rows rows,
           not from all n.
    none   0, 1, ..., n - 1.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if order == "none" or n == 0:
        return np.arange(n, dtype=np.int64)
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if order == "row":
        return torch.randperm(n, generator=g).numpy().astype(np.int64)
    if block_rows < 1 or window_blocks < 1:
        raise ValueError(f"block_rows and window_blocks must be >= 1, got {block_rows}, {window_blocks}")
    blocks = -(-n // block_rows)
    rank = torch.empty(blocks, dtype=torch.int64)
    rank[torch.randperm(blocks, generator=g)] = torch.arange(blocks)      # (blocks,) place of each block
    window = rank.numpy()[np.arange(n) // block_rows] // window_blocks     # (n,) window of each position
    key = torch.rand(n, generator=g, dtype=torch.float64).numpy()          # (n,) order inside the window
    return np.lexsort((key, window)).astype(np.int64)


class EpochBatches(Sampler):
    """The batches of one epoch (sorted position arrays) as a batch sampler: a pure function of
    (seed, epoch, step), so a run can stop at any step and restart there (`start_step`).

    rank / world split the epoch's order as torch's DistributedSampler does (padded with the order's first
    positions to a multiple of world, rank r taking every world-th position from r), then each rank cuts its
    share into batches. set_epoch / set_start_step change what the next iteration yields (a persistent
    DataLoader keeps this object).
    """

    def __init__(self, n: int, batch_size: int, *, order: str = "row", seed: int = 0, epoch: int = 0,
                 rank: int = 0, world: int = 1, drop_last: bool = False, start_step: int = 0,
                 block_rows: int = BLOCK_ROWS, window_blocks: int = WINDOW_BLOCKS):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        self.n, self.batch_size, self.order, self.seed = int(n), int(batch_size), order, int(seed)
        self.rank, self.world, self.drop_last = int(rank), int(world), bool(drop_last)
        self.block_rows, self.window_blocks = int(block_rows), int(window_blocks)
        self.epoch, self.start_step = int(epoch), int(start_step)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start_step(self, step: int) -> None:
        self.start_step = int(step)

    def per_rank(self) -> int:
        return -(-self.n // self.world) if self.world > 1 else self.n

    def steps(self) -> int:
        """Batches in a whole epoch of this rank (whatever start_step is)."""
        k = self.per_rank()
        return k // self.batch_size if self.drop_last else -(-k // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.steps() - self.start_step)

    def positions(self) -> np.ndarray:
        """(per_rank,) this rank's positions in this epoch's order, before batching."""
        order = epoch_order(self.n, order=self.order, seed=self.seed, epoch=self.epoch,
                            block_rows=self.block_rows, window_blocks=self.window_blocks)
        if self.world > 1:
            total = self.per_rank() * self.world
            order = np.concatenate([order, np.resize(order, total - self.n)])   # pad as DistributedSampler
            order = order[self.rank::self.world]
        return order

    def block_ranges(self, idx) -> list[tuple[int, int]]:
        """(lo, hi) position ranges of the whole blocks batch `idx` draws from (block order; [] otherwise):
        what a reader asks the kernel to read ahead."""
        if self.order != "block":
            return []
        br = self.block_rows
        return [(b * br, min((b + 1) * br, self.n)) for b in np.unique(np.asarray(idx) // br).tolist()]

    def __iter__(self):
        order, b = self.positions(), self.batch_size
        for step in range(self.start_step, self.steps()):
            yield np.sort(order[step * b:(step + 1) * b]).tolist()


def worker_init(*_) -> None:
    """worker_init_fn of every DataLoader worker of ours: stop signals are the parent's to handle
    (pipeline.signals.ignore_stop_signals), and tensors go to the parent by shared-memory file name, not by
    passing a file descriptor. With descriptors the parent fetches each one from the worker's
    multiprocessing resource_sharer thread; a Ctrl-C that ends the parent during that exchange made the
    worker print a ConnectionResetError traceback after the trainer's one-line message (seen in 1 of 25
    stops). The parent receives either kind; only how this worker sends changes."""
    ignore_stop_signals()
    torch.multiprocessing.set_sharing_strategy("file_system")


def whole_batch(batch):
    """collate_fn: __getitems__ already returns the collated batch dict."""
    return batch


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
                drop_last: bool = False, epoch: int = 0, sampler: Sampler | None = None,
                multiprocessing_context=None, prefetch_factor: int | None = None, order: str = "row",
                start_step: int = 0) -> DataLoader:
    """A DataLoader that fetches each batch with one ``dataset.__getitems__`` call.

    The indices of each batch are sorted: which rows share a batch is random, their order inside it is not,
    so H5Images reads them with no reordering copy.

    Build one per epoch (it is cheap): the order is EpochBatches' (`order` "row" or "block" when shuffling,
    seeded from (seed, epoch); start_step skips the epoch's first batches) and a `sampler`'s set_epoch (torch
    DistributedSampler) is set to `epoch`, so a resumed run sees the same batches. `sampler` replaces the
    built-in order (pass shuffle=False with it). Host memory is pinned when CUDA is available. For training,
    massreg.prefetch reads faster (reused buffers, flips while reading).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler: the sampler decides the order")
    if sampler is None:
        batches = EpochBatches(len(dataset), batch_size, order=order if shuffle else "none", seed=seed,
                               epoch=epoch, drop_last=drop_last, start_step=start_step)
    else:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches = SortedBatchSampler(sampler, batch_size, drop_last)
    # batch_sampler + __getitems__ (the DataLoader's documented batched path) measured as fast as
    # batch_size=None with a BatchSampler as sampler (benchmarks/bench_loader.py).
    return DataLoader(dataset, batch_sampler=batches, collate_fn=whole_batch, num_workers=workers,
                      pin_memory=torch.cuda.is_available(),
                      multiprocessing_context=multiprocessing_context if workers else None,
                      prefetch_factor=prefetch_factor if workers else None, persistent_workers=False,
                      worker_init_fn=worker_init if workers else None)
