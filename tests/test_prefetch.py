"""massreg.prefetch and the epoch order: device flips against numpy's, readers against make_loader, the
batch order as a pure function of (seed, epoch, step)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, Subset

from massreg.dataset import H5Images
from massreg.sampling import EpochBatches, epoch_order, epoch_seed, flip_masks
from massreg.transforms import AuxScaler, Normalizer
from massreg.prefetch import DevicePrefetcher, ThreadReader, WorkerReader, with_hints

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_image_rows, write_image_file  # noqa: E402

AUX = ("pt", "ieta")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two files of 37 and 29 rows, channels track_pt, dz, d0 (signed values: flips and clipping show)."""
    rng = np.random.default_rng(11)
    d = tmp_path_factory.mktemp("prefetch")
    return [str(write_image_file(d / f"s{i}.h5", *make_image_rows(rng, n))) for i, n in enumerate((37, 29))]


def numpy_oracle(images16: np.ndarray, eta, phi, norm: Normalizer) -> np.ndarray:
    """Flip each (C, H, W) image with np.flip where its mask says, then normalise in float32 with numpy."""
    out = []
    for img, e, p in zip(images16, eta, phi):
        img = np.flip(img, 1) if e else img             # eta: the H axis
        img = np.flip(img, 2) if p else img             # phi: the W axis
        out.append(img)
    x = np.stack(out).astype(np.float32)                # (B, C, H, W)
    mean, std, clip = (t.numpy() for t in (norm.mean, norm.std, norm.clip))
    x = (x - mean) / std
    return np.minimum(np.maximum(x, -clip), clip)


@pytest.mark.parametrize("mode", ["reference", "stats"])
@pytest.mark.parametrize("path", ["rows", "batched"])   # the CPU kernels and the whole-batch (CUDA) kernels
def test_device_flips_equal_numpy_flips_with_the_masks_of_flip_masks(shards, mode, path):
    ds = H5Images(shards, "train")
    norm = Normalizer.from_stats(ds.stats, mode, ds.channels)
    batch = ds.__getitems__(np.arange(len(ds)))
    eta, phi = flip_masks(4, 2, batch["row"].numpy())
    assert eta.any() and phi.any() and (eta & phi).any() and (~eta & ~phi).any()
    x16 = batch["images"]
    kernel = norm if path == "rows" else (lambda *a: norm.batched(*a, None))
    got = kernel(x16, torch.from_numpy(eta), torch.from_numpy(phi))
    want = numpy_oracle(x16.numpy(), eta, phi, norm)
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))   # bit for bit
    # ... and equal to the reader's path: flipped while read out of the file, then the normaliser
    read = ds.read_into(np.arange(len(ds)), torch.empty_like(x16), flips=(4, 2))["images"]
    np.testing.assert_array_equal(got.numpy(), norm(read).numpy())


def test_read_into_flips_while_reading_any_order_and_duplicates(shards):
    ds = H5Images(shards, None)
    idx = np.array([40, 3, 3, 65, 0, 37, 12, 40])            # unsorted, duplicates, both files
    plain = ds.__getitems__(idx)
    out = torch.empty_like(plain["images"])
    got = ds.read_into(idx, out, flips=(9, 1))
    assert got["images"] is out
    eta, phi = flip_masks(9, 1, plain["row"].numpy())
    want = [np.flip(np.flip(img, 1) if e else img, 2) if p else (np.flip(img, 1) if e else img)
            for img, e, p in zip(plain["images"].numpy(), eta, phi)]
    np.testing.assert_array_equal(out.numpy().view(np.uint16), np.stack(want).view(np.uint16))
    for k in ("m", "index", "row"):
        assert torch.equal(got[k], plain[k])


def test_normalizer_writes_into_a_given_buffer(shards):
    ds = H5Images(shards, "val")
    norm = Normalizer.from_stats(ds.stats, "reference", ds.channels)
    x16 = ds.__getitems__(np.arange(5))["images"]
    out = torch.full((5, *x16.shape[1:]), float("nan"))
    assert norm(x16, out=out) is out
    torch.testing.assert_close(out, norm.batched(x16, None, None, None), rtol=0, atol=0)


def host_reference(fit_set, batches: EpochBatches) -> list[dict]:
    """The same batches read the plain way: make_loader-style __getitems__ of each position list."""
    return [{k: v.clone() for k, v in fit_set.__getitems__(idx).items()} for idx in batches]


@pytest.mark.parametrize("reader", ["thread", "workers"])
def test_prefetcher_yields_the_batches_of_the_plain_path(shards, reader):
    train = H5Images(shards, "train", aux=AUX)
    fit = Subset(train, range(len(train) - 3))           # as --max-train-samples
    norm = Normalizer.from_stats(train.stats, "reference", train.channels)
    aux = AuxScaler.from_stats(train.stats, AUX)
    r = ThreadReader(fit, depth=2) if reader == "thread" else WorkerReader(fit, workers=2)
    feed = DevicePrefetcher(r, "cpu", normalizer=norm, aux_scaler=aux, flip_seed=7)
    try:
        for epoch in (0, 1):                              # twice: the ring and the workers are reused
            batches = EpochBatches(len(fit), 5, order="block", seed=3, epoch=epoch, block_rows=4,
                                   window_blocks=2)
            ref = host_reference(fit, batches)
            got = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                   for b in feed.epoch(batches, epoch)]
            assert len(got) == len(ref) == batches.steps()
            for g, h in zip(got, ref):
                eta, phi = flip_masks(7, epoch, h["row"].numpy())
                want = numpy_oracle(h["images"].numpy(), eta, phi, norm)
                np.testing.assert_array_equal(g["x"].numpy(), want)
                np.testing.assert_array_equal(g["index"].numpy(), h["index"].numpy())
                np.testing.assert_array_equal(g["m"].numpy(), h["m"].numpy())
                torch.testing.assert_close(g["aux_z"], aux.encode(h["aux"]))
    finally:
        feed.close()


def test_thread_reader_never_overwrites_a_batch_before_it_is_released(shards):
    ds = H5Images(shards, None)
    reader = ThreadReader(ds, depth=2)
    batches = EpochBatches(len(ds), 4, order="row", seed=1)
    held = []
    for b in reader.batches(batches):
        held.append((b, b["images"].clone()))
        if len(held) > 1:                                 # the consumer is one batch behind: still intact
            prev, snapshot = held[-2]
            assert torch.equal(prev["images"], snapshot)
            reader.release(prev["slot"])
    slots = {b["slot"] for b, _ in held}
    assert slots == set(range(4))                         # depth 2 + 2: a small ring, reused
    with pytest.raises(RuntimeError, match="release"):    # a consumer that never releases is told so
        for b in ThreadReader(ds, depth=1).batches(batches):
            pass


# ---------------------------------------------------------------------------------------------------------
# the order of an epoch


def test_row_order_is_the_random_sampler_of_earlier_versions():
    n, g = 101, torch.Generator().manual_seed(epoch_seed(5, 3))
    assert epoch_order(n, order="row", seed=5, epoch=3).tolist() == list(RandomSampler(range(n), generator=g))


@pytest.mark.parametrize("n", [1, 63, 64, 1000, 1037])
def test_block_order_is_a_permutation_of_shuffled_blocks_within_windows(n):
    order = epoch_order(n, order="block", seed=2, epoch=1, block_rows=16, window_blocks=4)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, epoch_order(n, order="block", seed=2, epoch=1, block_rows=16,
                                             window_blocks=4))
    size = lambda blk: min(16, n - 16 * blk)  # noqa: E731  (the last block may be short)
    window, left = set(), 0                               # walk the order: windows of whole blocks
    for blk in (order // 16).tolist():
        if blk not in window:
            if left == 0 and len(window) == 4:            # the previous window is complete
                window = set()
            assert len(window) < 4, "a 5th block inside a window"
            window.add(blk)
            left += size(blk)
        left -= 1
        assert left >= 0
    if n >= 1000:
        assert not np.array_equal(order, epoch_order(n, order="block", seed=2, epoch=2, block_rows=16,
                                                     window_blocks=4))
        assert not np.all(np.diff(order[:64]) > 0)          # shuffled within the window


@pytest.mark.parametrize("order", ["row", "block"])
def test_epoch_batches_start_at_any_step_and_split_over_ranks(order):
    n, b = 103, 8
    full = list(EpochBatches(n, b, order=order, seed=1, epoch=4))
    assert all(idx == sorted(idx) for idx in full) and sorted(sum(full, [])) == list(range(n))
    late = EpochBatches(n, b, order=order, seed=1, epoch=4, start_step=5)
    assert list(late) == full[5:] and len(late) == len(full) - 5 and late.steps() == len(full)
    ranks = [list(EpochBatches(n, b, order=order, seed=1, epoch=4, rank=r, world=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1                      # every rank takes as many steps
    rows = sorted(sum(sum(ranks, []), []))
    assert sorted(set(rows)) == list(range(n)) and len(rows) == 3 * -(-n // 3)   # padded like DDP's


def test_block_order_reads_each_block_ahead_once(shards):
    sampler = EpochBatches(200, 8, order="block", seed=0, block_rows=16, window_blocks=2)
    hinted_at = {}
    for k, (idx, ranges) in enumerate(with_hints(sampler, ahead=3)):
        for r in ranges:
            assert r not in hinted_at
            hinted_at[r] = k
        assert all(hinted_at[r] <= max(0, k - 3) for r in sampler.block_ranges(idx))  # asked 3 batches early
    assert sorted(hinted_at) == [(lo, min(lo + 16, 200)) for lo in range(0, 200, 16)]
    assert all(not r for _, r in with_hints(EpochBatches(200, 8, order="row"), ahead=3))
    H5Images(shards, "train").will_need(np.arange(3, 30))       # posix_fadvise across both files: no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_equals_the_cpu_path(shards):
    train = H5Images(shards, "train", aux=AUX)
    norm = Normalizer.from_stats(train.stats, "reference", train.channels)
    aux = AuxScaler.from_stats(train.stats, AUX)
    batches = EpochBatches(len(train), 8, order="row", seed=0, epoch=1)
    cpu = DevicePrefetcher(ThreadReader(train), "cpu", normalizer=norm, aux_scaler=aux, flip_seed=2)
    want = [{k: v.clone() for k, v in b.items() if k in ("x", "m")} for b in cpu.epoch(batches, 1)]
    on_gpu = Normalizer.from_stats(train.stats, "reference", train.channels).to("cuda")
    gpu = DevicePrefetcher(ThreadReader(train, pin=True), "cuda", normalizer=on_gpu, aux_scaler=aux,
                           flip_seed=2)
    got = [{k: b[k].cpu() for k in ("x", "m")} for b in gpu.epoch(batches, 1)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["x"], w["x"]) and torch.equal(g["m"], w["m"])
