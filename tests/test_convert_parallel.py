"""pipeline.convert --threads, --workers and --shard: the same bytes as one thread, the same rows as one
conversion.

Parquet files come from the writer in conftest.py (numpy arrays in the real schema, tens of rows).
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import make_rows, write_parquet
from pipeline import convert as C
from pipeline import layout
from pipeline.convert import ConvertConfig, convert
from pipeline.parquet import ConvertError


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    for i, (n, per_group) in enumerate([(13, 1), (11, 2), (9, 1)]):
        images, s = make_rows(n, seed=20 + i)
        write_parquet(d / f"part_{i}.parquet", images, s, rows_per_group=per_group)
    return d


def read_all(path) -> dict:
    """Every dataset and every attribute of a file."""
    out = {}
    with h5py.File(path) as f:
        out.update({f"@{k}": v for k, v in f.attrs.items()})
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
        for name in ("images", "labels", "split", "stats"):
            out.update({f"{name}@{k}": v for k, v in f[name].attrs.items()})
    return out


RUNNERS = {"1 thread": dict(threads=1), "3 threads": dict(threads=3), "2 workers": dict(workers=2)}


def test_threads_and_workers_write_the_same_bytes_as_one_thread(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setattr(C, "PARALLEL_SCAN_BYTES", 0)      # passes 0-1 in the pool too, as for large inputs
    files = {}
    for i, (name, runner) in enumerate(RUNNERS.items()):
        d = tmp_path / f"r{i}"
        d.mkdir()
        monkeypatch.chdir(d)   # the same relative output name, stored in the config, in each directory
        convert(ConvertConfig([str(raw)], "out.h5", cuts="paper", channels=(0, 3, 7), chunk_size=2,
                              progress=False, **runner))
        files[name] = d / "out.h5"
    one = read_all(files["1 thread"])
    assert one["@created"] == "2023-11-14T22:13:20+00:00"
    for name in ("3 threads", "2 workers"):
        other = read_all(files[name])
        assert one.keys() == other.keys()
        for key in one:
            np.testing.assert_array_equal(one[key], other[key], err_msg=f"{name}: {key}")
        assert files["1 thread"].read_bytes() == files[name].read_bytes(), name


@pytest.mark.parametrize("where", ["image", "scalar"])
def test_an_error_in_a_thread_or_worker_names_file_and_row_as_one_thread(tmp_path, monkeypatch, where):
    monkeypatch.setattr(C, "PARALLEL_SCAN_BYTES", 0)      # pass 1 (scalars) runs in the pool too
    images, s = make_rows(12, seed=30)
    write_parquet(tmp_path / "a.parquet", images, s)
    if where == "image":
        images[9, 2, 0, 3] = np.nan
        expected = "x.parquet: row 9, channel 2 (d0): pixel value is nan; drop or repair this row " \
                   "(NaN and inf are always errors)"
    else:
        s["pt"][7] = np.inf
        expected = "x.parquet: row 7: column pt is inf; drop or repair the row"
    write_parquet(tmp_path / "x.parquet", images, s)
    messages = []
    for runner in RUNNERS.values():
        with pytest.raises(ConvertError) as err:
            convert(ConvertConfig([str(tmp_path)], str(tmp_path / "out.h5"), cuts="none", chunk_size=2,
                                  progress=False, **runner))
        messages.append(str(err.value))
    assert len(set(messages)) == 1, messages
    assert messages[0].endswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "x.parquet"]


def test_three_shards_equal_one_conversion(raw, tmp_path):
    def run(out, shard=None):
        return convert(ConvertConfig([str(raw)], str(out), cuts="paper", channels=(3, 1), chunk_size=2,
                                     shard=shard, progress=False))

    whole = run(tmp_path / "all.h5")
    parts = [run(tmp_path / f"part{i}.h5", f"{i}/3") for i in (1, 2, 3)]
    assert sum(p.rows_read for p in parts) == whole.rows_read == 33
    assert all(p.rows_kept > 0 for p in parts) and sum(p.rows_kept for p in parts) == whole.rows_kept
    full = read_all(tmp_path / "all.h5")
    shards = [read_all(tmp_path / f"part{i}.h5") for i in (1, 2, 3)]
    assert [s["@shard"] for s in shards] == ["1/3", "2/3", "3/3"] and full["@shard"] == ""
    for name in ("images", "labels/m", "labels/pt", "labels/eta", "labels/source_file", "labels/source_row"):
        np.testing.assert_array_equal(np.concatenate([s[name] for s in shards]), full[name], err_msg=name)

    def codes(d):
        c = np.full(len(d["labels/m"]), -1)
        for i, s in enumerate(layout.SPLITS):
            c[d[f"split/{s}"]] = i
        return c

    np.testing.assert_array_equal(np.concatenate([codes(s) for s in shards]), codes(full))
    stats = layout.combine_stats([{k[len("stats/"):]: v for k, v in s.items() if k.startswith("stats/")}
                                  for s in shards])
    for key, value in full.items():
        if key.startswith("stats/"):
            np.testing.assert_allclose(stats[key[len("stats/"):]], value, rtol=1e-12, atol=0, err_msg=key)
