"""pipeline.convert: stored rows, cuts, split, statistics and errors against independent numpy oracles.

The Parquet files are written from numpy arrays that stay in memory (the oracle) by the builders in
conftest.py, in the real schema (list<list<list<double>>> image column, float64 scalars, one row per row group
unless said otherwise).
Tiny sizes: tens of rows (each row is 8 x 125 x 125 doubles, 1 MB).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import HAZARDS, make_rows, nested, write_parquet
from pipeline import convert as C
from pipeline import inspect as I
from pipeline import layout, parallel
from pipeline.convert import ConvertConfig, convert
from pipeline.cuts import parse_cut, rows_passing
from pipeline.errors import UserError
from pipeline.parallel import read_parquet_chunks
from pipeline.parquet import ConvertError

P = layout.IMAGE_SIZE


def paper_mask(s: dict) -> np.ndarray:
    """The paper preset, written out independently of the converter."""
    return (s["pt"] >= 20) & (s["pt"] <= 100) & (s["m"] >= 0) & (s["m"] <= 1.6) & (np.abs(s["eta"]) < 1.4)


def f16_bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).view(np.uint16)


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".h5", ".tmp"))


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """Two files named out of order on purpose: b holds 3 rows per row group, a is float32, legacy names."""
    d = tmp_path_factory.mktemp("raw")
    img_a, s_a = make_rows(18, seed=1)
    img_b, s_b = make_rows(20, seed=2)
    write_parquet(d / "b.parquet", img_b, s_b, rows_per_group=3)
    write_parquet(d / "a.parquet", img_a, s_a, image_name="X_jets", dtype=np.float32,
                  names={"m": "am", "pt": "apt"})
    # the oracle for a is what the file holds: float32 values
    return d, [("a.parquet", img_a.astype(np.float32), s_a), ("b.parquet", img_b, s_b)]


@pytest.fixture(scope="module")
def converted(two_files, tmp_path_factory):
    d, files = two_files
    out = tmp_path_factory.mktemp("out") / "data.h5"
    summary = convert(ConvertConfig([str(d)], str(out), channels=(3, 0, 7), progress=False))
    return out, files, summary


def test_rows_equal_source_after_float16_rounding(converted):
    out, files, summary = converted
    keep = [paper_mask(s) for _, _, s in files]
    with h5py.File(out) as f:
        images = f["images"][()]
        source_file, source_row = f["labels/source_file"][()], f["labels/source_row"][()]
        names = [e["name"] for e in json.loads(f.attrs["source_files"])]
        m, eta = f["labels/m"][()], f["labels/eta"][()]
    assert names == ["a.parquet", "b.parquet"]                          # sorted by name, not as found
    expected_rows = [np.flatnonzero(k) for k in keep]
    np.testing.assert_array_equal(source_row, np.concatenate(expected_rows))
    np.testing.assert_array_equal(source_file, np.repeat([0, 1], [len(r) for r in expected_rows]))
    expected = np.concatenate([img[rows][:, [3, 0, 7]] for (_, img, _), rows in zip(files, expected_rows)])
    assert images.shape == (len(expected), 3, P, P) and images.dtype == np.float16
    np.testing.assert_array_equal(images.view(np.uint16), f16_bits(expected))     # bit for bit, -0.0 included
    np.testing.assert_array_equal(m, np.concatenate([s["m"][k] for (_, _, s), k in zip(files, keep)]))
    np.testing.assert_array_equal(eta, np.concatenate([s["eta"][k] for (_, _, s), k in zip(files, keep)]))
    # the hazards really were written and really are rounded once
    assert f16_bits(HAZARDS[0]) != f16_bits(np.float32(HAZARDS[0]))
    assert summary.rows_kept == len(expected) and summary.rows_read == 38


def test_row_count_equals_an_independent_count_of_rows_passing_the_cuts(converted):
    out, files, summary = converted
    s = {k: np.concatenate([f[2][k] for f in files]) for k in files[0][2]}
    assert summary.rows_kept == int(paper_mask(s).sum()) > 0
    fails = {"20 <= pt <= 100": ~((s["pt"] >= 20) & (s["pt"] <= 100)), "0 <= m <= 1.6": ~(s["m"] <= 1.6),
             "|eta| < 1.4": ~(np.abs(s["eta"]) < 1.4)}
    assert summary.rejected == {k: int(v.sum()) for k, v in fails.items()}
    with h5py.File(out) as f:
        per_file = json.loads(f.attrs["source_files"])
        cuts = json.loads(f.attrs["cuts"])
    assert [e["rows_read"] for e in per_file] == [18, 20]
    assert [e["rows_kept"] for e in per_file] == [int(paper_mask(x[2]).sum()) for x in files]
    assert [c["rejected"] for c in cuts] == list(summary.rejected.values())


def test_split_is_sorted_disjoint_complete_and_the_per_row_hash(converted):
    out, files, _ = converted
    with h5py.File(out) as f:
        split = {s: f[f"split/{s}"][()] for s in layout.SPLITS}
        source_file, source_row = f["labels/source_file"][()], f["labels/source_row"][()]
        n = f["images"].shape[0]
    for idx in split.values():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(n))
    codes = np.empty(n, np.int8)
    for i, name in enumerate(["a.parquet", "b.parquet"]):
        sel = source_file == i
        codes[sel] = layout.split_codes(name, source_row[sel], seed=42, val_fraction=0.1, test_fraction=0.2)
    for code, s in enumerate(layout.SPLITS):
        np.testing.assert_array_equal(split[s], np.flatnonzero(codes == code))


def test_split_of_a_row_does_not_depend_on_the_other_inputs(two_files, tmp_path):
    d, _ = two_files
    convert(ConvertConfig([str(d / "b.parquet")], str(tmp_path / "b.h5"), cuts="none", progress=False))
    convert(ConvertConfig([str(d)], str(tmp_path / "ab.h5"), cuts="none", progress=False))

    def membership(path, file_index):
        with h5py.File(path) as f:
            sel = f["labels/source_file"][()] == file_index
            code = np.zeros(f["images"].shape[0], np.int8)
            for i, s in enumerate(layout.SPLITS):
                code[f[f"split/{s}"][()]] = i
            return f["labels/source_row"][()][sel], code[sel]

    rows_alone, codes_alone = membership(tmp_path / "b.h5", 0)
    rows_with, codes_with = membership(tmp_path / "ab.h5", 1)
    np.testing.assert_array_equal(rows_alone, rows_with)
    np.testing.assert_array_equal(codes_alone, codes_with)


def test_stats_equal_numpy_on_the_stored_train_rows(converted):
    out, _, _ = converted
    with h5py.File(out) as f:
        train = f["split/train"][()]
        x = f["images"][()][train].astype(np.float64)                  # (n_train, C, 125, 125)
        stats = {k: v[()] for k, v in f["stats"].items()}
        labels = {k: f[f"labels/{k}"][()][train] for k in ("m", "pt", "ieta", "iphi", "eta")}
    assert stats["n_train"] == len(train) > 0
    np.testing.assert_array_equal(stats["channel_count"], np.full(3, len(train) * P * P, dtype=float))
    np.testing.assert_allclose(stats["channel_sum"], x.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["channel_sumsq"], (x ** 2).sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["channel_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["channel_std"], x.std(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_array_equal(stats["channel_max"], x.max(axis=(0, 2, 3)))
    np.testing.assert_array_equal(stats["reference_scale"], [layout.REFERENCE_SCALES[n] for n in
                                                             ("ecal", "track_pt", "pix3")])
    for name, v in labels.items():
        assert stats[f"{name}_count"] == len(train)
        got = [stats[f"{name}_{k}"] for k in ("sum", "sumsq", "mean", "std")]
        np.testing.assert_allclose(got, [v.sum(), (v ** 2).sum(), v.mean(), v.std()], rtol=1e-12)
        assert (stats[f"{name}_min"], stats[f"{name}_max"]) == (v.min(), v.max())


def test_layout_attributes_and_aliases(converted):
    out, _, summary = converted
    with h5py.File(out) as f:
        images = f["images"]
        assert images.chunks is None and images.compression is None
        assert images.id.get_create_plist().get_nfilters() == 0
        assert images.id.get_offset() is not None                        # memory-mappable
        assert list(images.attrs["channels"]) == ["ecal", "track_pt", "pix3"]
        assert list(images.attrs["units"]) == ["GeV", "GeV", "hits"]
        assert list(images.attrs["source_channels"]) == [3, 0, 7]
        a = f.attrs
        assert (a["format"], a["format_version"]) == (layout.FORMAT_NAME, layout.FORMAT_VERSION)
        assert a["shard"] == "" and a["chunk_size"] == 8 and a["seed"] == 42
        assert (a["val_fraction"], a["test_fraction"]) == (0.1, 0.2)
        config = json.loads(a["config"])
        assert config["cuts"] == "paper" and config["channels"] == [3, 0, 7] and "workers" not in config
        assert json.loads(a["columns_used"]) == {"image": "X_jets,X_jet", "m": "am,m", "pt": "apt,pt",
                                                 "ieta": "ieta", "iphi": "iphi", "eta": "eta"}
        files = json.loads(a["source_files"])
        assert files[0]["columns"]["m"] == "am" and files[1]["columns"]["m"] == "m"
        assert all(e["size"] > 0 for e in files)
        assert sorted(f["labels"]) == ["eta", "ieta", "iphi", "m", "pt", "source_file", "source_row"]
    assert "am" in summary.describe() and "kept" in summary.describe()


def test_preset_cut_on_a_missing_column_is_skipped_and_reported(tmp_path):
    images, s = make_rows(6, seed=3)
    del s["eta"]
    s["pt"][:] = 50.0
    s["m"][:] = 1.0
    write_parquet(tmp_path / "x.parquet", images, s)
    summary = convert(ConvertConfig([str(tmp_path)], str(tmp_path / "o.h5"), progress=False))
    assert summary.rows_kept == 6 and summary.skipped_cuts == ["|eta| < 1.4"]
    assert "|eta| < 1.4" in summary.describe()
    with h5py.File(tmp_path / "o.h5") as f:
        cuts = json.loads(f.attrs["cuts"])
    assert [c["applied"] for c in cuts] == [True, True, False]


@pytest.mark.parametrize("text, column, absolute, lo, hi, lo_inc, hi_inc", [
    ("20 <= pt <= 100", "pt", False, 20, 100, True, True),
    ("|eta| < 1.4", "eta", True, -np.inf, 1.4, True, False),
    ("abs(eta)<=2", "eta", True, -np.inf, 2, True, True),
    ("m > 0", "m", False, 0, np.inf, False, True),
    ("0 < m", "m", False, 0, np.inf, False, True),
    ("pt >= 1e2", "pt", False, 100, np.inf, True, True),
])
def test_parse_cut(text, column, absolute, lo, hi, lo_inc, hi_inc):
    cut = parse_cut(text)
    assert (cut.column, cut.absolute, cut.lo, cut.hi, cut.lo_inclusive, cut.hi_inclusive) == \
        (column, absolute, lo, hi, lo_inc, hi_inc)
    x = np.array([-200, -1.4, 0, 1.4, 2, 20, 100, 100.5])
    ax = np.abs(x) if absolute else x
    expected = ((ax >= lo) if lo_inc else (ax > lo)) & ((ax <= hi) if hi_inc else (ax < hi))
    np.testing.assert_array_equal(cut.passes(x), expected)


@pytest.mark.parametrize("text", ["pt", "pt = 3", "1 < 2", "pt < abc", "5 <= pt <= 1"])
def test_parse_cut_rejects_bad_syntax(text):
    with pytest.raises(ConvertError, match="cut"):
        parse_cut(text)


def test_rows_passing_equals_a_numpy_mask_and_the_converter(tmp_path):
    """`rows_passing` (what massreg.predict keeps of a raw file): a preset and --cut texts on one file."""
    images, s = make_rows(20, seed=12)
    path = write_parquet(tmp_path / "x.parquet", images, s, rows_per_group=3, names={"m": "am", "pt": "apt"})
    rows, skipped = rows_passing(str(path), "paper", ["|ieta| < 30", "iphi >= 10"])
    expected = np.flatnonzero(paper_mask(s) & (np.abs(s["ieta"]) < 30) & (s["iphi"] >= 10))
    assert rows.dtype == np.int64 and 0 < len(expected) < 20 and skipped == []
    np.testing.assert_array_equal(rows, expected)
    out = tmp_path / "o.h5"
    convert(ConvertConfig([str(path)], str(out), channels=(0,), extra_cuts=("|ieta| < 30", "iphi >= 10"),
                          progress=False))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["labels/source_row"][()], rows)
    assert rows_passing(path, "none", []) == (None, [])                    # no cut: every row, nothing read
    rows, skipped = rows_passing(path, "none", ["m > 1"])                   # `m` is the file's `am`
    np.testing.assert_array_equal(rows, np.flatnonzero(s["m"] > 1))


def test_rows_passing_skips_a_preset_cut_on_a_missing_column_and_refuses_an_explicit_one(tmp_path):
    images, s = make_rows(10, seed=13)
    del s["eta"]
    path = write_parquet(tmp_path / "x.parquet", images, s)
    rows, skipped = rows_passing(path, "paper", [])
    np.testing.assert_array_equal(rows, np.flatnonzero((s["pt"] >= 20) & (s["pt"] <= 100) & (s["m"] <= 1.6)))
    assert [(c.text, c.source) for c in skipped] == [("|eta| < 1.4", "paper")]
    with pytest.raises(ConvertError, match=rf"cut '\|eta\| < 1': column eta is not in {path}; columns "
                                           r"present: m, pt, ieta, iphi$"):
        rows_passing(path, "none", ["|eta| < 1"])
    with pytest.raises(ConvertError, match="unknown cut preset 'nope'"):
        rows_passing(path, "nope", [])


def test_extra_cuts_and_clip_count(tmp_path):
    images, s = make_rows(10, seed=4)
    images[2, 0, 5, 5] = 7.2e5
    images[4, 3, 0, 0] = -1e6
    write_parquet(tmp_path / "x.parquet", images, s)
    out = tmp_path / "o.h5"
    summary = convert(ConvertConfig([str(tmp_path / "x.parquet")], str(out), cuts="none", channels=(0, 3),
                                    extra_cuts=("pt >= 30", "|eta| < 1.9"), clip=True, progress=False))
    keep = (s["pt"] >= 30) & (np.abs(s["eta"]) < 1.9)
    assert summary.rows_kept == keep.sum() and 2 in np.flatnonzero(keep) and 4 in np.flatnonzero(keep)
    assert summary.clipped == 2
    with h5py.File(out) as f:
        stored = f["images"][()]
        assert f.attrs["clipped"] == 2
    expected = np.clip(images[keep][:, [0, 3]], -65504, 65504)
    np.testing.assert_array_equal(stored.view(np.uint16), f16_bits(expected))


def test_read_parquet_chunks_gives_the_stored_rows(two_files, tmp_path):
    d, files = two_files
    _, img_b, s_b = files[1]
    chunks = list(read_parquet_chunks(d / "b.parquet", channels=(7, 1), chunk_size=2))
    assert [first for first, _, _ in chunks] == [0, 6, 12, 18]               # 2 row groups of 3 rows per read
    images = np.concatenate([c[1] for c in chunks])
    np.testing.assert_array_equal(images.view(np.uint16), f16_bits(img_b[:, [7, 1]]))
    np.testing.assert_array_equal(np.concatenate([c[2]["pt"] for c in chunks]), s_b["pt"])
    rows = np.array([1, 2, 9, 19])
    chunks = list(read_parquet_chunks(d / "b.parquet", channels=("ecal",), rows=rows))
    assert [first for first, _, _ in chunks] == [0]
    np.testing.assert_array_equal(chunks[0][1].view(np.uint16), f16_bits(img_b[rows][:, [3]]))
    np.testing.assert_array_equal(chunks[0][2]["m"], s_b["m"][rows])
    with pytest.raises(ConvertError, match="sorted"):
        next(read_parquet_chunks(d / "b.parquet", rows=np.array([3, 1])))


# ---------------------------------------------------------------------------------------------------------
# bad input: one-line error naming what and where, nothing written
# ---------------------------------------------------------------------------------------------------------

def _bad_file(tmp_path, kind):
    images, s = make_rows(5, seed=5)
    path = tmp_path / "bad.parquet"
    if kind == "no image column":
        pq.write_table(pa.table(s), path, row_group_size=1)
    elif kind == "wrong width":
        write_parquet(path, make_rows(5, seed=5, shape=(8, P, P - 1))[0], s)
    elif kind == "seven channels":
        write_parquet(path, make_rows(5, seed=5, shape=(7, P, P))[0], s)
    elif kind == "null row":
        arr = nested(images)
        arr = pa.ListArray.from_arrays(arr.offsets, arr.values, mask=pa.array(np.arange(5) == 3))
        pq.write_table(pa.table({"X_jet": arr, **s}), path, row_group_size=1)
    elif kind == "null pixel":
        table = pa.table({"X_jet": nested(images), **s})
        values = table.column(0).combine_chunks().values.values.values
        mask = np.zeros(len(values), bool)
        mask[3 * 8 * P * P + 2 * P * P + 17] = True                     # row 3, channel 2
        values = pa.array(values.to_numpy(), mask=mask)
        arr = nested(images)
        inner = pa.ListArray.from_arrays(arr.values.values.offsets, values)
        mid = pa.ListArray.from_arrays(arr.values.offsets, inner)
        table = pa.table({"X_jet": pa.ListArray.from_arrays(arr.offsets, mid), **s})
        pq.write_table(table, path, row_group_size=1)
    elif kind in ("nan", "inf", "overflow"):
        images[3, 2, 60, 61] = {"nan": np.nan, "inf": -np.inf, "overflow": 7.2e5}[kind]
        write_parquet(path, images, s)
    elif kind == "null scalar":
        table = pa.table({"X_jet": nested(images), **s})
        pt = pa.array(s["pt"], mask=np.arange(5) == 3)
        pq.write_table(table.set_column(2, "pt", pt), path, row_group_size=1)
    elif kind == "nan scalar":
        s["pt"][3] = np.nan
        write_parquet(path, images, s)
    elif kind == "no mass column":
        del s["m"]
        write_parquet(path, images, s)
    elif kind == "not parquet":
        path.write_text("m,pt\n1,2\n")
    elif kind == "truncated":
        write_parquet(path, images, s)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt page":
        write_parquet(path, images, s)
        start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
        data = bytearray(path.read_bytes())
        data[start:start + 64] = b"\xff" * 64                           # row 1's image page header
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind, message", [
    ("no image column", r"bad.parquet: no image column \(X_jet or X_jets\); columns present: m, pt"),
    ("wrong width", r"bad.parquet: row 0, channel 0 \(track_pt\): X_jet has 124 entries at depth 3 where "
                    r"125"),
    ("seven channels", r"bad.parquet: row 0: X_jet has 7 entries at depth 1 where 8 are expected"),
    ("null row", r"bad.parquet: row 3: X_jet holds a null row"),
    ("null pixel", r"bad.parquet: row 3, channel 2 \(d0\): null pixel value"),
    ("nan", r"bad.parquet: row 3, channel 2 \(d0\): pixel value is nan"),
    ("inf", r"bad.parquet: row 3, channel 2 \(d0\): pixel value is -inf"),
    ("overflow", r"bad.parquet: row 3, channel 2 \(d0\): value 7.2e\+05 exceeds float16 max 65504; .*--clip"),
    ("null scalar", r"bad.parquet: row 3: column pt is null"),
    ("nan scalar", r"bad.parquet: row 3: column pt is nan"),
    ("no mass column", r"bad.parquet: no mass column \(m or am\)"),
    ("not parquet", r"bad.parquet: not a readable Parquet file"),
    ("truncated", r"bad.parquet: not a readable Parquet file"),
    ("corrupt page", r"bad.parquet: cannot read row groups 0-\d+ .*corrupt"),
])
def test_bad_input_gives_a_one_line_error_and_no_output(tmp_path, kind, message):
    path = _bad_file(tmp_path, kind)
    out = tmp_path / "out.h5"
    with pytest.raises(ConvertError, match=message) as err:
        convert(ConvertConfig([str(path)], str(out), cuts="none", channels=(0, 1, 2, 3), progress=False))
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path) == []
    # the CLI: non-zero exit, the message, no traceback
    result = CliRunner().invoke(C.main, [str(path), str(out), "--cuts", "none"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert leftovers(tmp_path) == []


def test_clip_saturates_but_nan_stays_an_error(tmp_path):
    path = _bad_file(tmp_path, "overflow")
    out = tmp_path / "out.h5"
    summary = convert(ConvertConfig([str(path)], str(out), cuts="none", clip=True, channels=(2,),
                                    progress=False))
    assert summary.clipped == 1
    with h5py.File(out) as f:
        assert f["images"][3, 0, 60, 61] == np.float16(65504)
    path = _bad_file(tmp_path, "nan")
    with pytest.raises(ConvertError, match="pixel value is nan"):
        convert(ConvertConfig([str(path)], str(out), cuts="none", clip=True, force=True, progress=False))


@pytest.mark.parametrize("change, message", [
    (dict(channels="0,9"), r"unknown channel '9'"),
    (dict(channels=(1, 1)), r"give each channel once"),
    (dict(cuts="nope"), r"unknown cut preset 'nope'"),
    (dict(extra_cuts=("pt =< 3",)), r"cannot read cut 'pt =< 3'"),
    (dict(extra_cuts=("|phi| < 1",)),
     r"cut '\|phi\| < 1': column phi is not in .*columns present: m, pt, ieta"),
    (dict(val_fraction=0.5, test_fraction=0.6), r"must be in \[0, 1\)"),
    (dict(shard="0/3"), r"shard '0/3': write I/N"),
    (dict(shard="2/99"), r"shard 2/99: the inputs hold only 1 chunks"),
    (dict(chunk_size=0), r"chunk size 0"),
    (dict(threads=0), r"threads 0: it must be at least 1"),
    (dict(workers=0), r"workers 0: it must be at least 1"),
    (dict(cuts="top"), r"no row of 5 passes the cuts \(85 <= m <= 500: observed 0\.\d+ to 1\.\d+; "
                       r"400 <= pt <= 1000: observed \d+\.?\d* to \d+"),
])
def test_bad_options_and_empty_selection(tmp_path, change, message):
    images, s = make_rows(5, seed=6)
    write_parquet(tmp_path / "x.parquet", images, s)
    config = ConvertConfig([str(tmp_path / "x.parquet")], str(tmp_path / "out.h5"), progress=False)
    for k, v in change.items():
        setattr(config, k, v)
    with pytest.raises(ConvertError, match=message):
        convert(config)
    assert leftovers(tmp_path) == []


def test_inputs_empty_directory_missing_path_and_duplicates(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match=r"empty: directory holds no \*.parquet files"):
        convert(ConvertConfig([str(tmp_path / "empty")], str(tmp_path / "o.h5")))
    with pytest.raises(ConvertError, match=r"nowhere.parquet: no such file or directory"):
        convert(ConvertConfig([str(tmp_path / "nowhere.parquet")], str(tmp_path / "o.h5")))
    images, s = make_rows(3, seed=7)
    write_parquet(tmp_path / "empty" / "x.parquet", images, s)
    with pytest.raises(ConvertError, match="given twice"):
        convert(ConvertConfig([str(tmp_path / "empty"), str(tmp_path / "empty" / "x.parquet")],
                              str(tmp_path / "o.h5")))
    del s["eta"]
    write_parquet(tmp_path / "empty" / "y.parquet", images, s)
    with pytest.raises(ConvertError, match=r"y.parquet: scalar columns m, pt, ieta, iphi differ from"):
        convert(ConvertConfig([str(tmp_path / "empty")], str(tmp_path / "o.h5"), cuts="none"))
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_without_force(tmp_path):
    images, s = make_rows(4, seed=8)
    write_parquet(tmp_path / "x.parquet", images, s)
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    config = ConvertConfig([str(tmp_path / "x.parquet")], str(out), cuts="none", progress=False)
    with pytest.raises(UserError, match=r"out.h5 exists; pass --force to replace it"):
        convert(config)
    assert out.read_bytes() == b"precious"
    config.force = True
    assert convert(config).rows_kept == 4
    with h5py.File(out) as f:
        assert f["images"].shape == (4, 4, P, P)


def test_interrupted_conversion_leaves_no_output(tmp_path, monkeypatch):
    images, s = make_rows(6, seed=9)
    write_parquet(tmp_path / "x.parquet", images, s)
    out = tmp_path / "out.h5"
    out.write_bytes(b"old")
    real, calls = parallel.decode_chunk, []

    def interrupted(chunk, table):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(chunk, table)

    monkeypatch.setattr(parallel, "decode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertConfig([str(tmp_path)], str(out), cuts="none", chunk_size=2, force=True,
                              progress=False))
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == ["out.h5"]


def test_cli_writes_and_summarises(two_files, tmp_path):
    d, _ = two_files
    out = tmp_path / "cli.h5"
    result = CliRunner().invoke(C.main, [str(d / "b.parquet"), str(out), "--cuts", "none", "--channels",
                                         "ecal,0", "--cut", "pt >= 30", "--seed", "7", "--chunk-size", "3"])
    assert result.exit_code == 0, result.output
    assert "Read 20 rows from 1 file(s)" in result.output and "pt >= 30" in result.output
    with h5py.File(out) as f:
        assert list(f["images"].attrs["channels"]) == ["ecal", "track_pt"] and f.attrs["seed"] == 7
    help_text = CliRunner().invoke(C.main, ["--help"]).output
    assert "paper" in help_text and "default" in help_text and "|COL|" in help_text


def test_inspect_prints_tree_splits_and_stats(converted):
    out, _, summary = converted
    text = I.describe(out)
    assert "/images" in text and "float16" in text and "/labels/source_row" in text
    for name, size in summary.split_sizes.items():
        assert f"{name}: {size}" in text
    assert "channel_mean" in text and "ecal" in text
    result = CliRunner().invoke(I.main, [str(out)])
    assert result.exit_code == 0 and "/stats/n_train" in result.output
    result = CliRunner().invoke(I.main, [str(out) + ".nope"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="h5ls not installed (apt-get install hdf5-tools)")
def test_h5ls_lists_the_layout(converted):
    out, _, _ = converted
    listing = subprocess.run(["h5ls", "-r", str(out)], capture_output=True, text=True, check=True).stdout
    for line in ["/images                  Dataset {", "/labels/m", "/labels/source_file", "/split/train",
                 "/split/val", "/split/test", "/stats/channel_mean", "/stats/m_std"]:
        assert line in listing


def test_channel_max_counts_the_unlisted_zeros(tmp_path):
    images, s = make_rows(4, seed=10)
    images[:, 1] = -np.abs(images[:, 1]) + 0.0         # dz: nonzero values all negative, most pixels +0
    write_parquet(tmp_path / "x.parquet", images, s)
    convert(ConvertConfig([str(tmp_path / "x.parquet")], str(tmp_path / "o.h5"), cuts="none", channels=(1,),
                          val_fraction=0.0, test_fraction=0.0, progress=False))
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["stats/channel_max"][0] == 0.0 and f["stats/n_train"][()] == 4
        assert f["stats/channel_sum"][0] == images[:, 1].astype(np.float16).astype(np.float64).sum() < 0


def test_generated_top_files_convert_to_their_pyarrow_decoded_rows(tmp_path):
    """On pipeline.synth's real-schema files, against pyarrow's own decoding to Python lists."""
    synth = pytest.importorskip("pipeline.synth")
    config = synth.SynthConfig(process="top", rows=5, files=2, seed=3, chunk_rows=5)
    paths = synth.generate(tmp_path / "raw", config)
    out = tmp_path / "top.h5"
    summary = convert(ConvertConfig([str(tmp_path / "raw")], str(out), cuts="top", channels=tuple(range(8)),
                                    progress=False))
    assert summary.rows_kept == 10 and summary.skipped_cuts == []
    decoded = np.concatenate([np.array(pq.read_table(p).column("X_jet").to_pylist(), dtype=np.float64)
                              for p in paths])                                   # (10, 8, 125, 125)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["images"][()].view(np.uint16), f16_bits(decoded))
        m = np.concatenate([pq.read_table(p).column("m").to_numpy() for p in paths])
        np.testing.assert_array_equal(f["labels/m"][()], m)


def test_first_alias_wins_wherever_it_sits(tmp_path):
    images, s = make_rows(3, seed=11)
    table = pa.table({"am": s["m"] + 100, "X_jet": nested(images), "m": s["m"], "pt": s["pt"],
                      "note": ["a"] * 3})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=1)
    summary = convert(ConvertConfig([str(tmp_path / "x.parquet")], str(tmp_path / "o.h5"), cuts="none",
                                    progress=False))
    assert summary.columns_used == {"image": "X_jet", "m": "m", "pt": "pt"}
    with h5py.File(tmp_path / "o.h5") as f:
        np.testing.assert_array_equal(f["labels/m"][()], s["m"])
        assert sorted(f["labels"]) == ["m", "pt", "source_file", "source_row"]
        assert json.loads(f.attrs["source_files"])[0]["ignored"] == ["am", "note"]
