"""massreg.data: the memory-mapped dataset, its loader, flips and normalisation, against h5py/numpy oracles.

The files are built here directly with h5py in the layout of pipeline/layout.py (tiny: tens of rows).
"""
from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

import massreg.dataset as dataset_module
from massreg.dataset import H5Images, LayoutError
from massreg.sampling import flip_masks, make_loader
from massreg.transforms import AuxScaler, Normalizer, TargetScaler
from pipeline import layout
from conftest import make_image_rows, write_image_file

S = layout.IMAGE_SIZE
CHANNELS = ("track_pt", "dz", "d0")
LABELS = ("m", "pt", "ieta", "iphi")


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """Two files of 23 and 17 rows; returns (paths, [(images, labels, splits), ...])."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("data")
    parts = [make_image_rows(rng, 23), make_image_rows(rng, 17)]
    paths = [str(write_image_file(d / f"shard{i}.h5", *p)) for i, p in enumerate(parts)]
    return paths, parts


def oracle(paths, parts, split, positions, aux=()):
    """Independent reading with h5py: (images, m, aux) of split positions, in the order asked."""
    where = [(k, r) for k, p in enumerate(parts) for r in (p[2][split] if split else range(len(p[0])))]
    imgs, ms, auxs = [], [], []
    for pos in positions:
        k, r = where[pos]
        with h5py.File(paths[k], "r") as f:
            imgs.append(f["images"][r])
            ms.append(f["labels/m"][r])
            auxs.append([f[f"labels/{a}"][r] for a in aux])
    auxs = np.array(auxs, np.float32).reshape(len(positions), len(aux))
    return np.stack(imgs), np.array(ms, np.float32), auxs


def bits(t):
    """Exact comparison of float16 data (bit patterns, so -0.0 and 0.0 differ)."""
    return (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).view(np.uint16)


# ---------------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("split", ["train", "val", "test", None])
def test_batches_equal_h5py_across_two_files(two_files, split):
    paths, parts = two_files
    ds = H5Images(paths, split, aux=("pt", "iphi"))
    expect_len = sum(len(p[2][split]) if split else len(p[0]) for p in parts)
    assert len(ds) == expect_len
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(ds), 20)          # unsorted, duplicates, both files
    idx[:3] = [len(ds) - 1, 0, len(ds) - 1]
    batch = ds.__getitems__(idx.tolist())
    img, m, aux = oracle(paths, parts, split, idx, ("pt", "iphi"))
    assert batch["images"].dtype == torch.float16 and batch["images"].shape == (20, 3, S, S)
    np.testing.assert_array_equal(bits(batch["images"].numpy()), bits(img))
    np.testing.assert_array_equal(batch["m"].numpy(), m)
    assert batch["m"].dtype == torch.float32 and batch["aux"].dtype == torch.float32
    np.testing.assert_array_equal(batch["aux"].numpy(), aux)
    np.testing.assert_array_equal(batch["index"].numpy(), idx)
    run = np.unique(idx)                         # sorted and distinct: the direct path make_loader uses
    want = oracle(paths, parts, split, run)[0]
    np.testing.assert_array_equal(bits(ds.__getitems__(run)["images"]), bits(want))
    one = ds[int(idx[5])]
    np.testing.assert_array_equal(bits(one["images"].numpy()), bits(img[5]))
    assert one["m"].item() == m[5] and one["index"].item() == idx[5]


def test_split_sizes_rows_and_labels(two_files):
    paths, parts = two_files
    sizes = {s: len(H5Images(paths, s)) for s in layout.SPLITS}
    assert sum(sizes.values()) == len(H5Images(paths, None)) == 40
    ds = H5Images(paths, "val")
    expect = np.concatenate([parts[0][2]["val"], parts[1][2]["val"] + 23])
    np.testing.assert_array_equal(ds.rows, expect)
    file, row = ds.locate(np.arange(len(ds)))
    np.testing.assert_array_equal(row, np.concatenate([parts[0][2]["val"], parts[1][2]["val"]]))
    np.testing.assert_array_equal(ds.label("source_row"), row)
    np.testing.assert_array_equal(file, np.repeat([0, 1], [len(parts[0][2]["val"]), len(parts[1][2]["val"])]))
    assert ds.channels == list(CHANNELS) and ds.paths == paths
    info = ds.file_info()
    assert [i["format_version"] for i in info] == [1, 1] and all(i["size"] > 23 * 3 * S * S for i in info[:1])


def test_edge_indices(two_files):
    paths, _ = two_files
    ds = H5Images(paths[0], "train")
    assert ds.__getitems__([])["images"].shape == (0, 3, S, S)
    np.testing.assert_array_equal(bits(ds[-1]["images"]), bits(ds[len(ds) - 1]["images"]))
    with pytest.raises(IndexError):
        ds.__getitems__([len(ds)])


def test_reused_batch_memory_never_overwrites_a_held_batch(two_files):
    paths, parts = two_files
    ds = H5Images(paths, None)
    rng = np.random.default_rng(2)
    held = []
    for k in range(8):  # more batches than the pool holds; keep some whole, some as views, some as numpy
        idx = np.unique(rng.integers(0, len(ds), 6))
        images = ds.__getitems__(idx)["images"]
        keep = [images, images[1:3], images.numpy()[2:], None][k % 4]
        held.append((keep, bits(np.asarray(keep)).copy() if keep is not None else None))
    for keep, snapshot in held:
        if keep is not None:
            np.testing.assert_array_equal(bits(np.asarray(keep)), snapshot)
    ptrs = {a.ctypes.data for a in ds.buffer_pool}
    del held, images, keep
    idx = np.arange(6)
    again = ds.__getitems__(idx)["images"]
    assert again.data_ptr() in ptrs  # released arrays are reused...
    np.testing.assert_array_equal(bits(again), bits(oracle(paths, parts, None, idx)[0]))  # ...and refilled


def test_combined_stats_equal_numpy_over_concatenated_train_rows(two_files):
    paths, parts = two_files
    st = H5Images(paths).stats
    train = np.concatenate([p[0][p[2]["train"]] for p in parts]).astype(np.float64)  # (n, C, H, W)
    np.testing.assert_allclose(st["channel_mean"], train.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(st["channel_std"], train.std(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_array_equal(st["channel_max"], train.max(axis=(0, 2, 3)))
    m = np.concatenate([p[1]["m"][p[2]["train"]] for p in parts])
    np.testing.assert_allclose([st["m_mean"], st["m_std"]], [m.mean(), m.std()], rtol=1e-12)
    assert st["n_train"] == len(m)
    np.testing.assert_array_equal(st["reference_scale"], [0.01, 0.05, 0.1])


# ---------------------------------------------------------------------------------------------------------
# refusing what is not our layout


def _small(rng=np.random.default_rng(3)):
    return make_image_rows(rng, 6)


@pytest.mark.parametrize("how, expect", [
    (dict(chunks=(1, 3, S, S)), "chunked"),
    (dict(compression="gzip"), "chunked"),
    (dict(skip=("images",)), "missing /images"),
    (dict(skip=("labels/m",)), "missing /labels/m"),
    (dict(skip=("split/val",)), "missing /split/val"),
    (dict(skip=("stats",)), "missing /stats"),
    (dict(fmt="something-else"), "format attribute is 'something-else'"),
    (dict(version=99), "format_version is 99"),
])
def test_refuses_files_not_in_our_layout(tmp_path, how, expect):
    path = write_image_file(tmp_path / "bad.h5", *_small(), **how)
    with pytest.raises(LayoutError) as err:
        H5Images(path, "train")
    msg = str(err.value)
    assert str(path) in msg and expect in msg and "pipeline.convert" in msg and "\n" not in msg


def test_refuses_mismatched_channels_missing_aux_and_non_hdf5(tmp_path, two_files):
    other = write_image_file(tmp_path / "other.h5", *_small(), channels=("track_pt", "d0", "dz"))
    with pytest.raises(LayoutError, match="same --channels") as err:
        H5Images([two_files[0][0], other])
    assert str(other) in str(err.value) and two_files[0][0] in str(err.value)
    with pytest.raises(LayoutError, match="'eta' is not a label.*ieta"):
        H5Images(two_files[0][0], aux=("eta",))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(LayoutError, match="not an HDF5 file"):
        H5Images(junk)
    with pytest.raises(LayoutError, match="listed twice"):
        H5Images([two_files[0][0], two_files[0][0]])


# ---------------------------------------------------------------------------------------------------------
# processes


def test_pickles_cheaply_and_reopens_per_process(two_files, monkeypatch):
    paths, _ = two_files
    ds = H5Images(paths, "train")
    first = ds[0]["images"]                    # opens the memmaps in this process
    assert ds.maps is not None
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 + 64 * len(ds)      # metadata + labels; images are 40 * 94 kB
    clone = pickle.loads(blob)
    assert clone.maps is None
    np.testing.assert_array_equal(bits(clone[0]["images"]), bits(first))
    maps = ds.maps
    monkeypatch.setattr(dataset_module.os, "getpid", lambda: -1)  # as seen from a forked child
    ds[0]
    assert ds.maps is not maps


def batches(loader):
    out = [{k: v.clone() for k, v in b.items()} for b in loader]
    return {k: torch.cat([b[k] for b in out]) for k in out[0]}, [len(b["index"]) for b in out]


# spawn: a fresh interpreter gets the pickled dataset (one worker: importing torch there is the slow part)
@pytest.mark.parametrize("context, workers", [("fork", 2), ("spawn", 1)])
def test_workers_yield_the_same_batches(two_files, context, workers):
    paths, _ = two_files
    ds = H5Images(paths, "train", aux=("ieta",))
    ds[0]  # memmaps open in the parent: a forked worker must not reuse them
    ref, sizes = batches(make_loader(ds, batch_size=4, shuffle=True, seed=3, epoch=2))
    got, sizes2 = batches(make_loader(ds, batch_size=4, shuffle=True, seed=3, epoch=2, workers=workers,
                                      multiprocessing_context=context))
    assert sizes == sizes2 and sizes[:-1] == [4] * (len(sizes) - 1)
    for k in ref:
        np.testing.assert_array_equal(ref[k].numpy(), got[k].numpy())
    assert sorted(ref["index"].tolist()) == list(range(len(ds)))  # each row once per epoch
    assert all(np.all(np.diff(b["index"].numpy()) > 0)  # batches come sorted
               for b in make_loader(ds, batch_size=4, shuffle=True, seed=3))


def test_shuffle_is_seeded_per_epoch_and_sampler_is_honoured(two_files):
    paths, _ = two_files
    ds = H5Images(paths, "train")
    order = lambda **kw: [i for b in make_loader(ds, batch_size=5, **kw) for i in b["index"].tolist()]  # noqa
    assert order(shuffle=True, seed=1, epoch=0) == order(shuffle=True, seed=1, epoch=0)
    assert order(shuffle=True, seed=1, epoch=0) != order(shuffle=True, seed=1, epoch=1)
    assert order(shuffle=True, seed=1, epoch=0) != order(shuffle=True, seed=2, epoch=0)
    assert order(shuffle=False, seed=1) == list(range(len(ds)))
    assert len(list(make_loader(ds, batch_size=5, shuffle=False, seed=0, drop_last=True))) == len(ds) // 5
    ranks = [order(shuffle=False, seed=0, epoch=3,
                   sampler=DistributedSampler(ds, num_replicas=2, rank=r, seed=0)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1])[: len(ds)] == sorted(set(ranks[0] + ranks[1])) == list(range(len(ds)))
    sub = torch.utils.data.Subset(ds, range(7))
    got = [i for b in make_loader(sub, batch_size=5, shuffle=False, seed=0, epoch=9)
           for i in b["index"].tolist()]
    assert got == list(range(7))
    with pytest.raises(ValueError, match="shuffle=False"):
        make_loader(ds, batch_size=5, shuffle=True, seed=0, sampler=DistributedSampler(ds, 2, 0))


def test_flips_are_deterministic_and_really_flip(two_files):
    """read_into(..., flips=(seed, epoch)): each image flipped while it is copied out of the file."""
    paths, parts = two_files
    ds = H5Images(paths, "train")
    idx = np.arange(len(ds))
    src = ds.__getitems__(idx)["images"].numpy().copy()            # (n, C, H, W) unflipped

    def flipped(positions, epoch):
        out = torch.empty((len(positions), *src.shape[1:]), dtype=torch.float16)
        return ds.read_into(positions, out, flips=(11, epoch))["images"].numpy()

    out = flipped(idx, 4)
    np.testing.assert_array_equal(bits(flipped(idx[::-1], 4)), bits(out[::-1]))
    eta, phi = flip_masks(11, 4, ds.rows)
    for i in idx:
        want = src[i]
        want = np.flip(want, 1) if eta[i] else want   # eta: H axis of one (C, H, W) image
        want = np.flip(want, 2) if phi[i] else want   # phi: W axis
        np.testing.assert_array_equal(bits(out[i]), bits(np.ascontiguousarray(want)))
    assert 0 < eta.sum() < len(ds) and 0 < phi.sum() < len(ds) and (eta != phi).any()
    changed = [(bits(out[i]) != bits(src[i])).any() for i in idx]
    np.testing.assert_array_equal(changed, eta | phi)  # random images: every flip changes the image
    assert not np.array_equal(bits(flipped(idx, 5)), bits(out))
    many = np.stack(flip_masks(0, 0, np.arange(20000)))
    assert np.all(np.abs(many.mean(axis=1) - 0.5) < 0.02) and abs(np.corrcoef(many)[0, 1]) < 0.03


# ---------------------------------------------------------------------------------------------------------
# normalisation and scalers


def test_normalizer_stats_and_reference_against_numpy(two_files):
    paths, _ = two_files
    ds = H5Images(paths, "train")
    x = ds.__getitems__(np.arange(6))["images"]                  # float16 (6, 3, H, W)
    xf = x.numpy().astype(np.float64)
    st = ds.stats
    norm = Normalizer.from_stats(st, "stats", ds.channels)
    y = norm(x)
    assert y.dtype == torch.float32
    want = (xf - st["channel_mean"][None, :, None, None]) / st["channel_std"][None, :, None, None]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    ref = Normalizer.from_stats(st, "reference", ds.channels)
    want = xf * np.array([0.01, 0.05, 0.1])[None, :, None, None]
    want[:, 1:] = np.clip(want[:, 1:], -1, 1)                     # dz, d0
    assert np.abs(xf[:, 1:] * 0.1).max() > 1                      # the clip is exercised
    np.testing.assert_allclose(ref(x).numpy(), want, rtol=1e-6, atol=1e-7)
    assert set(dict(ref.named_buffers())) == {"mean", "std", "clip"}
    again = Normalizer.from_dict({k: v for k, v in ref.to_dict().items() if k != "clip"})
    torch.testing.assert_close(again(x), ref(x))
    with pytest.raises(ValueError, match="mode"):
        Normalizer.from_stats(st, "zscore", ds.channels)


def test_target_and_aux_scalers(two_files):
    paths, parts = two_files
    ds = H5Images(paths, "train", aux=("pt", "ieta"))
    st = ds.stats
    t = TargetScaler.from_stats(st)
    m = torch.tensor([85.0, 292.0, 500.0])
    torch.testing.assert_close(t.encode(m), (m - float(st["m_mean"])) / float(st["m_std"]))
    torch.testing.assert_close(t.decode(t.encode(m)), m)
    a = AuxScaler.from_stats(st, ds.aux_names)
    raw = ds.__getitems__([0, 1, 2])["aux"]
    want = (raw.numpy() - [st["pt_mean"], st["ieta_mean"]]) / [st["pt_std"], st["ieta_std"]]
    np.testing.assert_allclose(a.encode(raw).numpy(), want, rtol=1e-5)
    assert AuxScaler.from_stats(st, ()).encode(torch.zeros(3, 0)).shape == (3, 0)


# ---------------------------------------------------------------------------------------------------------
# the converter's real output: three shards read together are the single conversion


def test_converter_shards_read_as_one_data_set(tmp_path):
    synth = pytest.importorskip("pipeline.synth")
    convert = pytest.importorskip("pipeline.convert")
    raw = tmp_path / "raw"
    synth.generate(raw, synth.SynthConfig(process="top", rows=12, files=2, seed=3))

    def run(out, shard=None):
        convert.convert(convert.ConvertConfig(
            inputs=[str(raw)], output=str(out), channels=(0, 1, 2, 3, 4), cuts="none", chunk_size=2,
            shard=shard,
            val_fraction=0.25, test_fraction=0.25, progress=False))
    run(tmp_path / "one.h5")
    shards = [tmp_path / f"part{i}.h5" for i in (1, 2, 3)]
    for i, path in enumerate(shards, 1):
        run(path, f"{i}/3")
    for split in ("train", "val", "test", None):
        one, parts = H5Images(tmp_path / "one.h5", split, aux=("pt",)), H5Images(shards, split, aux=("pt",))
        assert len(one) == len(parts) > 0
        a, b = one.__getitems__(np.arange(len(one))), parts.__getitems__(np.arange(len(parts)))
        np.testing.assert_array_equal(bits(a["images"]), bits(b["images"]))
        np.testing.assert_array_equal(a["m"].numpy(), b["m"].numpy())
        np.testing.assert_array_equal(a["aux"].numpy(), b["aux"].numpy())
    st1, st3 = H5Images(tmp_path / "one.h5").stats, H5Images(shards).stats
    for key in ("channel_mean", "channel_std", "channel_max", "m_mean", "m_std", "pt_mean", "n_train"):
        np.testing.assert_allclose(st3[key], st1[key], rtol=1e-12, err_msg=key)
    assert parts.channels == one.channels == ["track_pt", "dz", "d0", "ecal", "hcal"]
