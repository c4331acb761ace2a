"""Feed the device: batches read ahead into reused host buffers, copied on a side stream, flipped and
normalised on the device (timm's PrefetchLoader pattern).

    reader = ThreadReader(train_set, pin=device.type == "cuda")      # or WorkerReader(train_set, workers=4)
    feed = DevicePrefetcher(reader, device, normalizer=norm, aux_scaler=aux, flip_seed=seed)
    for epoch in range(epochs):
        for batch in feed.epoch(EpochBatches(len(train_set), 256, seed=seed, epoch=epoch), epoch):
            z = model(batch["x"], batch["aux_z"])    # x: float32 (B, C, 125, 125) on the device, flipped

Two readers fill a ring of host buffers (float16 (B, C, 125, 125) each, allocated once per run):
- ThreadReader: threads of this process read batch k + 1, k + 2 while batch k computes (numpy's take releases
  the GIL). On CUDA the buffers are pinned, so the copy to the device is a true asynchronous DMA; a buffer is
  refilled only after the CUDA event recorded after its copy has completed.
- WorkerReader: persistent DataLoader worker processes write into a ring in shared memory and hand over only
  the slot number and the small labels (no fresh 32-64 MB shared segment per batch, no worker restart per
  epoch). The DataLoader has at most prefetch_factor * workers batches in flight beyond the one it hands out,
  so a ring of that many + 2 slots is never overwritten while the consumer uses a slot.
Which is faster is measured by benchmarks/bench_train.py (docs/performance.md); `--workers 0` (the default)
uses the ThreadReader.

The flips are a pure function of (seed, epoch, global row) (massreg.sampling.flip_masks), so any reader, any
number of workers or processes, and a resumed run see the same images. On CUDA they are applied on the device
with the normalisation (the host only copies raw float16 rows). On the CPU the device is the host, and the
cheapest place is the one copy that must happen anyway: the reader copies each row out of the file through a
reversed view (H5Images.read_into), off the main thread.

On the CPU the DevicePrefetcher is the plain path: no streams, no pinning, no copies beyond the one cast +
normalise pass into a reused float32 buffer; the reader thread reads (and flips) ahead.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from massreg.dataset import H5Images
from massreg.sampling import EpochBatches, flip_masks, whole_batch, worker_init
from massreg.transforms import encode_aux
from pipeline import layout


def _base(dataset) -> tuple[H5Images, np.ndarray | None]:
    """The H5Images under (nested) Subsets, and the map from the outer positions to its positions."""
    remap = None
    while isinstance(dataset, Subset):
        idx = np.asarray(dataset.indices, dtype=np.int64)
        remap = idx if remap is None else idx[remap]
        dataset = dataset.dataset
    assert isinstance(dataset, H5Images), f"a reader reads an H5Images (or a Subset of one), not {dataset!r}"
    return dataset, remap


HINT_AHEAD = 8    # batches: the blocks of batch k + 8 are asked for while batch k is read (block order)


def with_hints(sampler, ahead: int = HINT_AHEAD):
    """(positions, block ranges to read ahead now) per batch of `sampler`: the whole blocks (EpochBatches.
    block_ranges; none in row order) of the batch `ahead` steps later, each block once."""
    ranges_of = getattr(sampler, "block_ranges", None)
    if ranges_of is None or getattr(sampler, "order", None) != "block":
        for idx in sampler:                       # nothing to read ahead: stay lazy
            yield idx, []
        return
    batches = list(sampler)                       # position lists: small next to the images they name
    seen: set = set()

    def new(k: int) -> list:
        if ranges_of is None or k >= len(batches):
            return []
        out = [r for r in ranges_of(batches[k]) if r not in seen]
        seen.update(out)
        return out

    first = [r for k in range(ahead) for r in new(k)]
    for k, idx in enumerate(batches):
        yield idx, (first if k == 0 else []) + new(k + ahead)


def _read_ahead(base: H5Images, remap: np.ndarray | None, ranges) -> None:
    for lo, hi in ranges:
        base.will_need(np.arange(lo, hi) if remap is None else remap[lo:hi])


def _ring(slots: int, batch_size: int, base: H5Images, *, pin: bool = False, shared: bool = False):
    """(slots, batch_size, C, 125, 125) float16: the reused host buffers."""
    shape = (slots, batch_size, len(base.channels), layout.IMAGE_SIZE, layout.IMAGE_SIZE)
    ring = torch.empty(shape, dtype=torch.float16, pin_memory=pin)
    return ring.share_memory_() if shared else ring


class ThreadReader:
    """Reads the batches of a sampler with `threads` background threads, `depth` batches ahead, into a ring
    of depth + 2 reused host buffers (pinned when `pin`).

    Each host batch carries "slot"; the consumer calls release(slot, event) once it no longer needs the
    buffer (event: a CUDA event after which the buffer's copy is complete, or None).
    """

    def __init__(self, dataset: Dataset, *, threads: int = 1, depth: int = 2, pin: bool = False):
        if threads < 1 or depth < 1:
            raise ValueError(f"threads and depth must be >= 1, got {threads}, {depth}")
        self.dataset, self.threads, self.depth, self.pin = dataset, threads, depth, pin
        self._ring: torch.Tensor | None = None
        self._free: deque = deque()

    def release(self, slot: int, event=None) -> None:
        self._free.append((slot, event))

    def close(self) -> None:
        self._ring = None

    def batches(self, sampler, flips: tuple[int, int] | None = None):
        """Host batches (H5Images.read_into dicts + "slot") of `sampler`'s position lists, in its order;
        flipped while read with flips = (seed, epoch) (the CPU path), as stored with None."""
        base, remap = _base(self.dataset)
        base.open()                           # memmaps opened once, here, not raced by the threads
        slots = self.depth + 2
        if self._ring is None or self._ring.shape[1] < sampler.batch_size:
            self._ring = _ring(slots, sampler.batch_size, base, pin=self.pin)
        elif self.pin and torch.cuda.is_available():
            torch.cuda.synchronize()          # copies from the last epoch's buffers are done (once an epoch)
        ring = self._ring
        free = self._free = deque((s, None) for s in range(slots))
        positions = with_hints(sampler)
        pending: deque = deque()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="massreg-reader")

        def read(pos: np.ndarray, ranges, slot: int, event) -> dict:
            _read_ahead(base, remap, ranges)  # block order: the kernel reads whole blocks ahead of use
            if event is not None:
                event.synchronize()           # the previous batch in this buffer has reached the device
            batch = base.read_into(pos, ring[slot, :len(pos)], flips)
            batch["slot"] = slot
            return batch

        def submit() -> None:
            task = next(positions, None)
            if task is None:
                return
            if not free:
                raise RuntimeError("every reader buffer is held: release(batch['slot']) each batch")
            pos = np.asarray(task[0], dtype=np.int64)
            pending.append(pool.submit(read, pos if remap is None else remap[pos], task[1], *free.popleft()))

        try:
            for _ in range(self.depth):
                submit()
            while pending:
                batch = pending.popleft().result()
                yield batch
                submit()                      # the consumer has released the batch it was given
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)          # a read in progress finishes into its buffer, then nothing


class _SlotTasks:
    """Batch sampler of (slot, positions, read-ahead ranges) tasks: the k-th batch of an epoch goes to ring
    slot k % slots."""

    def __init__(self, slots: int):
        self.slots, self.sampler, self.flips = slots, None, None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for k, (idx, ranges) in enumerate(with_hints(self.sampler)):
            yield k % self.slots, idx, ranges, self.flips


class _RingFetch(Dataset):
    """What a worker runs for one task: read the batch into its ring slot, return the slot and the labels."""

    def __init__(self, base: H5Images, remap: np.ndarray | None, ring: torch.Tensor):
        self.base, self.remap, self.ring = base, remap, ring

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, task) -> dict:
        slot, idx, ranges, flips = task
        _read_ahead(self.base, self.remap, ranges)
        pos = np.asarray(idx, dtype=np.int64)
        pos = pos if self.remap is None else self.remap[pos]
        batch = self.base.read_into(pos, self.ring[slot, :len(pos)], flips)
        del batch["images"]                   # stays in the shared ring; the main process maps the slot
        batch["slot"] = slot
        return batch


class WorkerReader:
    """Reads with `workers` persistent DataLoader processes into a ring of prefetch_factor * workers + 2
    buffers in shared memory (see the module docstring for why no slot is overwritten while in use)."""

    def __init__(self, dataset: Dataset, *, workers: int, prefetch_factor: int = 2,
                 multiprocessing_context=None):
        if workers < 1:
            raise ValueError(f"WorkerReader needs workers >= 1, got {workers}")
        self.dataset, self.workers, self.prefetch_factor = dataset, workers, prefetch_factor
        self.context = multiprocessing_context
        self.slots = prefetch_factor * workers + 2
        self._loader: DataLoader | None = None
        self._ring: torch.Tensor | None = None
        self._tasks = _SlotTasks(self.slots)

    def release(self, slot: int, event=None) -> None:
        """Nothing to do: a slot's reuse is bounded by the ring size (the copy from pageable shared memory
        returns once CUDA has staged it, so an event is not needed either)."""

    def close(self) -> None:
        self._loader, self._ring = None, None   # the persistent workers exit with their iterator

    def batches(self, sampler, flips: tuple[int, int] | None = None):
        """As ThreadReader.batches."""
        if self._ring is None or self._ring.shape[1] < sampler.batch_size:
            base, remap = _base(self.dataset)
            self._ring = _ring(self.slots, sampler.batch_size, base, shared=True)
            self._loader = DataLoader(_RingFetch(base, remap, self._ring), batch_sampler=self._tasks,
                                      collate_fn=whole_batch, num_workers=self.workers,
                                      persistent_workers=True,
                                      prefetch_factor=self.prefetch_factor,
                                      multiprocessing_context=self.context,
                                      # a stop signal is the trainer's to handle: it ends the workers
                                      worker_init_fn=worker_init,
                                      # its own generator: the workers' base seed is drawn from it, not
                                      # from the global RNG (dropout), so threads and workers train alike
                                      generator=torch.Generator().manual_seed(0))
        self._tasks.sampler, self._tasks.flips = sampler, flips
        for batch in self._loader:
            batch["images"] = self._ring[batch["slot"], :len(batch["index"])]
            yield batch


class DevicePrefetcher:
    """Host batches of a reader -> device batches {"x", "aux_z", "m", "index", "row"}: images flipped (with
    flip_seed; None: no flips) and normalised, float32 (B, C, 125, 125); aux_z float32 (B, A) normalised or
    None; m float32 (B,) GeV on the device; index, row int64 (B,) on the host.

    A yielded batch stays valid until the batch after the next is asked for (two output buffers alternate on
    the CPU; on CUDA the caching allocator and record_stream keep it alive).
    """

    def __init__(self, reader, device, *, normalizer: torch.nn.Module, aux_scaler=None,
                 flip_seed: int | None = None):
        self.reader, self.device = reader, torch.device(device)
        self.normalizer, self.aux_scaler, self.flip_seed = normalizer, aux_scaler, flip_seed
        self._out: list[torch.Tensor | None] = [None, None]

    def epoch(self, sampler: EpochBatches, epoch: int):
        """The batches of `sampler` for `epoch` (which selects the flips), prepared on the device."""
        if self.device.type == "cuda":
            return self._cuda(self.reader.batches(sampler), epoch)
        # The CPU path: the reader flips while it copies the rows out of the file (no pass of its own).
        flips = None if self.flip_seed is None else (self.flip_seed, epoch)
        return self._cpu(self.reader.batches(sampler, flips))

    def close(self) -> None:
        self.reader.close()

    def _masks(self, rows: torch.Tensor, epoch: int):
        """(eta, phi) bool (B,) CPU tensors, or (None, None) without flips."""
        if self.flip_seed is None:
            return None, None
        eta, phi = flip_masks(self.flip_seed, epoch, rows.numpy())
        return torch.from_numpy(eta), torch.from_numpy(phi)

    def _aux(self, aux: torch.Tensor) -> torch.Tensor | None:
        return None if self.aux_scaler is None else encode_aux(self.aux_scaler, aux)

    def _cpu(self, host_batches):
        """The plain path: one cast + normalise pass of the (already flipped) rows into one of two reused
        float32 buffers."""
        for k, host in enumerate(host_batches):
            images = host["images"]                                   # (B, C, H, W) float16, a ring slot
            buf = self._out[k % 2]
            if buf is None or buf.shape[0] < images.shape[0] or buf.shape[1:] != images.shape[1:]:
                buf = self._out[k % 2] = torch.empty(images.shape, dtype=torch.float32)
            x = self.normalizer(images, out=buf[:images.shape[0]])
            self.reader.release(host["slot"])                         # read into x: the slot is free
            yield {"x": x, "aux_z": self._aux(host["aux"]), "m": host["m"], "index": host["index"],
                   "row": host["row"]}

    def _cuda(self, host_batches, epoch: int):
        """Batch k + 1 is copied, flipped and normalised on a side stream while batch k computes."""
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)

        def load(host: dict) -> dict:
            eta, phi = self._masks(host["row"], epoch)
            with torch.cuda.stream(side):
                images = host["images"].to(self.device, non_blocking=True)   # pinned: an async DMA
                copied = torch.cuda.Event()
                copied.record(side)
                if eta is not None:
                    eta, phi = (t.to(self.device, non_blocking=True) for t in (eta, phi))
                x = self.normalizer(images, eta, phi)                 # (B, C, H, W) float32, side stream
                m = host["m"].to(self.device, non_blocking=True)
                aux = self._aux(host["aux"].to(self.device, non_blocking=True))
            self.reader.release(host["slot"], copied)                  # refilled once the DMA is done
            return {"x": x, "aux_z": aux, "m": m, "index": host["index"], "row": host["row"]}

        it = iter(host_batches)
        first = next(it, None)
        nxt = None if first is None else load(first)
        while nxt is not None:
            main.wait_stream(side)                                     # batch k is ready before it is used
            cur = nxt
            for t in (cur["x"], cur["m"], cur["aux_z"]):
                if t is not None:
                    t.record_stream(main)    # made on the side stream, freed only after main is done
            host = next(it, None)
            nxt = None if host is None else load(host)                 # k + 1 copies while k computes
            yield cur
