"""Tests of pipeline.synth: Parquet schema, chunks and row groups, determinism, physics sanity, calibration
against the real data's statistics, the report, CLI."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.layout import CHANNEL_NAMES, COLUMN_ALIASES, REFERENCE_SCALES
from pipeline.synth import (SynthConfig, SynthError, chunk_rng, format_report, four_vector, generate, main,
                            report, simulate, to_table, two_body)

SIZE = 125
CH = {name: i for i, name in enumerate(CHANNEL_NAMES)}


def nesting(t: pa.DataType) -> list[str]:
    """Type of a nested list column as a list of levels, e.g. ['list', 'list', 'list', 'double']."""
    levels = []
    while pa.types.is_list(t):
        levels.append("list")
        t = t.value_type
    return levels + [str(t)]


def decode(table: pa.Table, column: str = "X_jet") -> np.ndarray:
    """Images (n, 8, 125, 125) from the nested list column, by flattening three list levels."""
    col = table.column(column).combine_chunks()
    return col.flatten().flatten().flatten().to_numpy().reshape(len(col), 8, SIZE, SIZE)


@pytest.fixture(scope="module")
def top():
    """192 top events (~190 MB): enough for the physics checks to have a margin, shared by the tests."""
    return simulate("top", 192, np.random.default_rng(21))


@pytest.fixture(scope="module")
def a2gg():
    return simulate("a2gg", 128, np.random.default_rng(12))


# ---------------------------------------------------------------------------------------------------- schema

def test_schema_row_groups_and_config(tmp_path):
    config = SynthConfig(process="top", rows=6, files=2, seed=3, chunk_rows=4)
    paths = generate(tmp_path, config)
    assert [p.name for p in paths] == ["top_synth_000.parquet", "top_synth_001.parquet"]
    for path in paths:
        f = pq.ParquetFile(path)
        schema = f.schema_arrow
        assert schema.names == ["X_jet", "m", "pt", "ieta", "iphi"]
        assert nesting(schema.field("X_jet").type) == ["list", "list", "list", "double"]
        assert all(schema.field(n).type == pa.float64() for n in ["m", "pt", "ieta", "iphi"])
        assert f.metadata.num_rows == 6 and f.metadata.num_row_groups == 6   # one row per row group
        assert all(f.metadata.row_group(i).num_rows == 1 for i in range(6))
        assert f.metadata.row_group(0).column(0).compression == "SNAPPY"
    assert json.loads((tmp_path / "synth_config.json").read_text()) == asdict(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_config.json", "top_synth_000.parquet",
                                                          "top_synth_001.parquet"]  # no temp files left


def test_rows_per_group_spans_chunks_and_keeps_data(tmp_path):
    base = SynthConfig(rows=10, seed=5, chunk_rows=3)
    one = generate(tmp_path / "a", base)[0]
    four = generate(tmp_path / "b", SynthConfig(**{**asdict(base), "rows_per_group": 4}))[0]
    meta = pq.ParquetFile(four).metadata
    assert meta.num_row_groups == math.ceil(10 / 4)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    assert pq.read_table(one).equals(pq.read_table(four))     # row grouping does not change the data


def test_float32_and_legacy_names(tmp_path):
    config = SynthConfig(process="a2gg", rows=5, seed=2, dtype="float32", legacy_names=True)
    path = generate(tmp_path / "f32", config)[0]
    table = pq.read_table(path)
    assert table.schema.names == ["X_jets", "am", "apt", "ieta", "iphi", "eta"]
    for name, legacy in zip(["X_jet", "m", "pt"], table.schema.names):
        assert legacy in COLUMN_ALIASES[name]                          # the converter's accepted aliases
    assert nesting(table.schema.field("X_jets").type) == ["list", "list", "list", "float"]
    assert table.schema.field("am").type == pa.float64()
    ref = pq.read_table(generate(tmp_path / "f64", SynthConfig(process="a2gg", rows=5, seed=2))[0])
    assert ref.schema.names == ["X_jet", "m", "pt", "ieta", "iphi", "eta"]
    np.testing.assert_array_equal(decode(table, "X_jets"), decode(ref).astype(np.float32))
    np.testing.assert_array_equal(table.column("am").to_numpy(), ref.column("m").to_numpy())


# ----------------------------------------------------------------------------------- decoding, determinism

def test_file_equals_simulate_per_chunk(tmp_path):
    config = SynthConfig(process="top", rows=6, files=2, seed=7, chunk_rows=4)
    paths = generate(tmp_path, config)
    for i_file, path in enumerate(paths):
        table = pq.read_table(path)
        images = decode(table)
        for i_chunk, (lo, hi) in enumerate([(0, 4), (4, 6)]):
            sim = simulate("top", hi - lo, chunk_rng(7, i_file, i_chunk))
            np.testing.assert_array_equal(images[lo:hi], sim["X_jet"])
            for name in ["m", "pt", "ieta", "iphi"]:
                np.testing.assert_array_equal(table.column(name).to_numpy()[lo:hi], sim[name])
    # an independent decoding of one row through Python lists: the nesting is (channel, row, column)
    table = pq.read_table(paths[0])
    row = np.array(table.column("X_jet")[1].as_py())
    sim = simulate("top", 4, chunk_rng(7, 0, 0))["X_jet"][1]
    assert row.shape == (8, SIZE, SIZE)
    np.testing.assert_array_equal(row, sim)
    c, r, k = np.argwhere(sim != 0)[0]                                  # a known nonzero pixel
    assert row[c][r][k] == sim[c, r, k] != 0


def test_deterministic(tmp_path):
    a = generate(tmp_path / "a", SynthConfig(rows=3, seed=1))[0]
    b = generate(tmp_path / "b", SynthConfig(rows=3, seed=1))[0]
    c = generate(tmp_path / "c", SynthConfig(rows=3, seed=2))[0]
    assert pq.read_table(a).equals(pq.read_table(b))
    assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(decode(pq.read_table(a)), decode(pq.read_table(c)))


# ---------------------------------------------------------------------------------------- distributions

def test_top_ranges_and_sparsity(top):
    ev = top
    assert ev["X_jet"].shape == (192, 8, SIZE, SIZE) and ev["X_jet"].dtype == np.float64
    assert ev["m"].min() >= 85 and ev["m"].max() <= 500 and ev["m"].std() > 60
    assert ev["pt"].min() >= 400 and ev["pt"].max() <= 1000
    for name, lo, hi in [("ieta", 12, 43), ("iphi", 0, 71)]:
        v = ev[name]
        assert v.dtype == np.float64 and np.all(v == np.round(v)) and v.min() >= lo and v.max() <= hi


def test_a2gg_ranges_and_labels(a2gg):
    ev = a2gg
    assert list(ev) == ["X_jet", "m", "pt", "ieta", "iphi", "eta"]
    assert ev["m"].min() >= 0 and ev["m"].max() <= 2
    assert ev["pt"].min() >= 10 and ev["pt"].max() <= 150
    assert np.abs(ev["eta"]).max() < 2
    np.testing.assert_array_equal(ev["ieta"], np.floor(ev["eta"] / 0.087) + 28)
    assert ev["iphi"].min() >= 0 and ev["iphi"].max() <= 71


@pytest.mark.parametrize("process", ["top", "a2gg"])
def test_image_structure(process, top, a2gg):
    x = (top if process == "top" else a2gg)["X_jet"]
    n = x.shape[0]
    assert np.all((x == 0).reshape(n, -1).mean(1) > 0.9)               # sparse, every image
    assert np.all((x != 0).reshape(n, 8, -1).any(-1)[:, CH["ecal"]])   # every event deposits in ECAL
    for name in ("track_pt", "ecal", "hcal"):                          # zero suppression as the real data
        v = x[:, CH[name]]
        assert v.min() >= 0 and np.all(v[v != 0] >= 1e-3 / REFERENCE_SCALES[name])
    hcal = x[:, CH["hcal"]].reshape(n, 25, 5, 25, 5)                   # uniform over 5 x 5 towers
    assert np.all(hcal == hcal[:, :, :1, :, :1])
    hits = x[:, CH["pix1"]:]
    assert np.all(hits == np.round(hits)) and hits.min() >= 0
    tracks = x[:, CH["track_pt"]] != 0                                  # impact parameters only on tracks
    for name in ("dz", "d0"):
        assert np.all((x[:, CH[name]] != 0) == tracks)
    assert np.abs(x).max() < 1e4                                        # physical, far inside float16's range


# -------------------------------------------------------------------------------------------------- physics

def mass_of(p: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(p[:, 0] ** 2 - (p[:, 1:] ** 2).sum(1), 0))


def test_two_body_conserves_four_momentum():
    rng = np.random.default_rng(0)
    n = 200
    m = rng.uniform(90, 500, n)
    parent = four_vector(rng.uniform(10, 1000, n), rng.uniform(-2, 2, n), rng.uniform(0, 6.28, n), m)
    m1, m2 = 4.8, rng.uniform(1, 80, n)
    d1, d2 = two_body(parent, m, m1, m2, rng)
    np.testing.assert_allclose(d1 + d2, parent, rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(mass_of(d1), m1, rtol=1e-5)
    np.testing.assert_allclose(mass_of(d2), m2, rtol=1e-5)
    # isotropic in the rest frame: the daughter's direction along the boost is uniform in [-1, 1]
    beta = parent[:, 1:] / parent[:, :1]
    gamma = parent[:, 0] / m
    p_star_par = (gamma * ((d1[:, 1:] * beta).sum(1) / np.linalg.norm(beta, axis=1)
                           - np.linalg.norm(beta, axis=1) * d1[:, 0]))   # momentum along beta, rest frame
    p_star = np.sqrt(np.maximum(((m ** 2 - (m1 + m2) ** 2) * (m ** 2 - (m1 - m2) ** 2)), 0)) / (2 * m)
    cos = p_star_par / p_star
    np.testing.assert_allclose(np.sort(cos), np.linspace(-1, 1, n), atol=0.2)


def test_two_body_massless_limit():
    """a2gg at m -> 0: the photons must stay finite and massless and share the parent's momentum."""
    rng = np.random.default_rng(1)
    m = np.array([0.0, 1e-9, 1e-6, 1e-3, 1.0])
    parent = four_vector(np.full(5, 150.0), np.full(5, 1.9), np.zeros(5), m)
    g1, g2 = two_body(parent, m, 0.0, 0.0, rng)
    assert np.all(np.isfinite(g1)) and np.all(g1[:, 0] >= 0) and np.all(g2[:, 0] >= 0)
    np.testing.assert_allclose(g1 + g2, parent, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mass_of(g1 + g2), m, atol=1e-3)


def pixel_mass(images: np.ndarray, ieta: np.ndarray) -> np.ndarray:
    """Oracle independent of the generator: every nonzero ECAL + HCAL pixel is a massless particle with
    E = pixel value at its (eta, phi) (axis eta from the ieta label, pixel 62 on the axis, rows are eta);
    invariant mass of the sum. (Tracks are left out: they would count charged energy twice.)"""
    e = images[:, CH["ecal"]] + images[:, CH["hcal"]]                  # (n, 125, 125) GeV
    d = (np.arange(SIZE) - 62) * 0.0174
    eta = ((ieta - 28 + 0.5) * 0.087)[:, None, None] + d[None, :, None]
    phi = np.broadcast_to(d[None, None, :], e.shape)
    pt = e / np.cosh(eta)
    p = np.stack([e, pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)], -1).sum((1, 2))  # (n, 4)
    return np.sqrt(np.maximum(p[:, 0] ** 2 - (p[:, 1:] ** 2).sum(-1), 0))


def test_top_mass_recoverable_with_physical_floor(top):
    m, pt = top["m"], top["pt"]
    mp = pixel_mass(top["X_jet"], top["ieta"])
    spread = 2 * m / pt                                                 # opening angle of the decay
    fits = spread < 1.0                                                 # within the +-1.09 half-width
    wide = spread > 1.5
    assert fits.sum() > 80 and wide.sum() > 10
    assert np.corrcoef(mp[fits], m[fits])[0, 1] > 0.6
    assert np.corrcoef(mp, m)[0, 1] > 0.3                               # all events, floor included
    # wide decays often lose a whole parton (the b or the W) out of the image: the error floor
    lost = mp / m < 0.6
    assert lost[wide].mean() > lost[fits].mean() + 0.2
    # the correlation comes from the events, not from the ranges: another event's mass kills it
    shuffled = np.random.default_rng(0).permutation(m[fits])
    assert abs(np.corrcoef(mp[fits], shuffled)[0, 1]) < 0.3


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_a2gg_photon_separation_grows_with_m_over_pt(a2gg):
    # energy-weighted RMS width of the ECAL deposit in 31 x 31 crystals around the axis; for two photons of
    # energy fractions z, 1 - z it is about (m / pT) / 0.0174 crystals, whatever z
    ecal = a2gg["X_jet"][:, CH["ecal"], 47:78, 47:78]
    i = np.arange(31)
    w = ecal.sum((1, 2))
    ci = (ecal.sum(2) * i).sum(1) / w
    cj = (ecal.sum(1) * i).sum(1) / w
    width = np.sqrt((ecal * ((i[None, :, None] - ci[:, None, None]) ** 2
                             + (i[None, None, :] - cj[:, None, None]) ** 2)).sum((1, 2)) / w)
    ratio = a2gg["m"] / a2gg["pt"]
    assert spearman(width, ratio) > 0.6
    merged, resolved = ratio < 0.005, ratio > 0.02                      # < 0.6 and > 2.3 crystals apart
    assert merged.sum() > 5 and resolved.sum() > 20
    assert np.median(width[resolved]) > np.median(width[merged]) + 0.7


# --------------------------------------------------------------------- calibration against the real data

# The real data's statistics (docs/data.md, "The published statistics"), typed here rather than
# taken from pipeline.synth so that the test does not move with the module: nonzero pixels per jet after the
# notebook's thresholds (track pT >= 1 GeV, also for the dz / d0 pixels; ECAL >= 0.1 GeV; HCAL >= 0.01 GeV),
# pixel layers ~0.2 % of 15,625 pixels; 7.8 kB per row on disk; all-pixel std of dz / d0 0.47 / 0.77 cm.
REAL_NONZERO = {"track_pt": 27, "dz": 27, "d0": 22, "ecal": 271, "hcal": 703,
                "pix1": 0.002 * SIZE ** 2, "pix2": 0.002 * SIZE ** 2, "pix3": 0.002 * SIZE ** 2}
REAL_BYTES_PER_ROW = 7.8e3
REAL_STD_ALL = {"dz": 0.47, "d0": 0.77}


@pytest.fixture(scope="module")
def top_report(tmp_path_factory):
    """The report of 200 generated top jets written as the real files are (one row per row group)."""
    paths = generate(tmp_path_factory.mktemp("calib"), SynthConfig(process="top", rows=200, seed=31))
    return report(paths)


@pytest.mark.parametrize("name", CHANNEL_NAMES)
def test_occupancy_within_1p5_of_real(top_report, name):
    got = top_report["channels"][name]["nonzero_per_jet"]
    assert REAL_NONZERO[name] / 1.5 <= got <= REAL_NONZERO[name] * 1.5, (name, got, REAL_NONZERO[name])


def test_bytes_per_row_within_1p5_of_real(top_report):
    assert REAL_BYTES_PER_ROW / 1.5 <= top_report["bytes_per_row"] <= REAL_BYTES_PER_ROW * 1.5


@pytest.mark.parametrize("name", ["dz", "d0"])
def test_impact_parameter_spread_is_centimetres(top_report, name):
    """Pileup vertices and secondary interactions: the all-pixel std within 3x of the real 0.47 / 0.77 cm
    (prompt tracks alone give ~0.002 cm)."""
    got = top_report["channels"][name]["std_all"]
    assert REAL_STD_ALL[name] / 3 <= got <= REAL_STD_ALL[name] * 3, (name, got)


def test_report_is_exact_on_known_images(tmp_path):
    """Two hand-made jets: every figure of the report by hand."""
    x = np.zeros((2, 8, SIZE, SIZE))
    x[0, CH["track_pt"], 0, :2] = [0.5, 3.0]                            # one track under 1 GeV, one over
    x[0, CH["dz"], 0, :2] = [-2.0, 4.0]
    x[0, CH["d0"], 0, :2] = [1.0, -1.0]
    x[1, CH["track_pt"], 5, 5] = 1.0                                    # exactly at the threshold: counted
    x[1, CH["dz"], 5, 5] = 0.5
    x[1, CH["d0"], 5, 5] = 0.25
    x[0, CH["ecal"], 10, 10:13] = [0.05, 0.1, 2.0]
    x[1, CH["hcal"], :5, :5] = 0.008                                    # a tower under the 0.01 threshold
    x[1, CH["hcal"], 5:10, :5] = 0.2
    x[0, CH["pix1"], 3, 3] = 2.0
    events = {"X_jet": x, "m": np.array([100.0, 200.0]), "pt": np.array([500.0, 600.0]),
              "ieta": np.array([20.0, 30.0]), "iphi": np.array([1.0, 2.0])}
    path = tmp_path / "known.parquet"
    pq.write_table(to_table(events), path, row_group_size=1)
    rep = report([path], batch_rows=1)                                  # one jet per batch: sums carried
    ch = rep["channels"]
    assert rep["rows"] == 2 and rep["bytes_per_row"] == path.stat().st_size / 2
    assert ch["track_pt"]["nonzero_per_jet_raw"] == 1.5 and ch["track_pt"]["nonzero_per_jet"] == 1.0
    assert ch["track_pt"]["mean_nonzero"] == pytest.approx(2.0) and ch["track_pt"]["std_nonzero"] == 1.0
    assert ch["track_pt"]["max_abs_nonzero"] == 3.0
    assert ch["dz"]["nonzero_per_jet"] == 1.0 and ch["dz"]["nonzero_per_jet_raw"] == 1.5
    assert ch["dz"]["mean_nonzero"] == pytest.approx(2.25)              # (4 + 0.5) / 2: the -2 is on 0.5 GeV
    assert ch["d0"]["mean_nonzero"] == pytest.approx(-0.375) and ch["d0"]["max_abs_nonzero"] == 1.0
    assert ch["ecal"]["nonzero_per_jet"] == 1.0 and ch["ecal"]["nonzero_per_jet_raw"] == 1.5
    assert ch["ecal"]["mean_nonzero"] == pytest.approx(1.05)
    assert ch["hcal"]["nonzero_per_jet"] == 12.5 and ch["hcal"]["nonzero_per_jet_raw"] == 25.0
    assert ch["pix1"]["nonzero_per_jet"] == 0.5 and ch["pix2"]["nonzero_per_jet"] == 0.0
    pixels = 2 * SIZE ** 2                                              # all-pixel figures: raw values
    assert ch["dz"]["mean_all"] == pytest.approx(2.5 / pixels)
    assert ch["dz"]["std_all"] == pytest.approx(np.sqrt(20.25 / pixels - (2.5 / pixels) ** 2))
    assert ch["track_pt"]["real"]["nonzero_per_jet"] == 27               # the real figures travel with it
    text = format_report(rep)
    assert "| ecal | >= 0.1 | 1.0 | 271 | 1.5 |" in text and "bytes per row" in text
    assert report([path], max_rows=1)["rows"] == 1


def test_report_refuses_no_files():
    with pytest.raises(SynthError):
        report([])


# ---------------------------------------------------------------------------------------- errors and CLI

def test_generate_refuses_existing_and_force_replaces(tmp_path):
    generate(tmp_path, SynthConfig(rows=2, files=3))
    with pytest.raises(SynthError, match="already holds 3 top_synth"):
        generate(tmp_path, SynthConfig(rows=2, files=1))
    generate(tmp_path, SynthConfig(process="a2gg", rows=2))             # another process: no clash
    generate(tmp_path, SynthConfig(rows=2, files=1, seed=9), force=True)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["a2gg_synth_000.parquet",
                                                                  "top_synth_000.parquet"]
    assert json.loads((tmp_path / "synth_config.json").read_text())["seed"] == 9


@pytest.mark.parametrize("bad", [{"process": "ttbar"}, {"rows": 0}, {"dtype": "float16"},
                                 {"chunk_rows": 100_000}, {"files": 1001}])
def test_bad_config(tmp_path, bad):
    with pytest.raises(SynthError):
        generate(tmp_path, SynthConfig(**bad))
    assert not any(tmp_path.iterdir())


def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "raw"
    args = [str(out), "--rows", "3", "--files", "2", "--seed", "4", "--rows-per-group", "2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 file(s), 6 rows" in result.output
    assert pq.ParquetFile(out / "top_synth_001.parquet").metadata.num_row_groups == 2
    assert json.loads((out / "synth_config.json").read_text())["rows_per_group"] == 2

    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "--force" in again.output and "Traceback" not in again.output
    assert runner.invoke(main, args + ["--force"]).exit_code == 0

    result = runner.invoke(main, [str(tmp_path / "b"), "--process", "a2gg", "--rows", "2",
                                  "--dtype", "float32", "--legacy-names"])
    assert result.exit_code == 0, result.output
    assert pq.read_schema(tmp_path / "b" / "a2gg_synth_000.parquet").names[:3] == ["X_jets", "am", "apt"]

    help_ = runner.invoke(main, ["--help"])
    assert help_.exit_code == 0 and "--rows-per-group" in help_.output and "a2gg" in help_.output
    assert "--report-only" in help_.output
    assert runner.invoke(main, [str(tmp_path / "c"), "--rows", "0"]).exit_code == 2


def test_cli_report(tmp_path):
    runner = CliRunner()
    out = tmp_path / "raw"
    result = runner.invoke(main, [str(out), "--rows", "3", "--seed", "4", "--report"])
    assert result.exit_code == 0, result.output
    assert "3 jets from 1 file(s)" in result.output and "| hcal | >= 0.01 |" in result.output
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    only = runner.invoke(main, [str(out), "--report-only"])             # reads, writes nothing
    assert only.exit_code == 0, only.output
    assert "3 jets from 1 file(s)" in only.output and "wrote" not in only.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    mixed = runner.invoke(main, [str(out), "--report-only", "--rows", "5", "--force"])
    assert mixed.exit_code == 2 and "drop --rows, --force" in mixed.output
    empty = runner.invoke(main, [str(tmp_path / "none"), "--report-only"])
    assert empty.exit_code == 1 and "no *.parquet" in empty.output and "Traceback" not in empty.output
