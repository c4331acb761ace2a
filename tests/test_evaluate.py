"""plots.py and massreg.evaluate: PNGs that hold a picture, metrics.json, and one-line errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from massreg.plots import plot_history, plot_predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path):
    """A PNG file of some size whose pixels are not all one colour."""
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 5_000
    img = imread(path)                        # (H, W, 4) float in [0, 1]
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01


def test_plot_predictions_writes_three_pngs(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.uniform(85, 500, 2000)
    pred = true * (1 + rng.normal(0, 0.1, true.size))
    paths = plot_predictions(pred, true, tmp_path / "plots", "test", label="unit test")
    assert [p.name for p in paths] == ["test_pred_vs_true.png", "test_residuals.png",
                                       "test_response_resolution.png"]
    for p in paths:
        assert_real_png(p)
    assert sorted(x.name for x in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp
    with pytest.raises(ValueError, match="1-D"):
        plot_predictions(pred[:, None], true, tmp_path, "x")


def test_plot_history_from_csv(tmp_path):
    df = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.6, 0.4],
                       "val_mae": [100.0, 70.0, 60.0], "lr": [1e-3] * 3})
    df.to_csv(tmp_path / "metrics.csv", index=False)
    assert_real_png(plot_history(tmp_path / "metrics.csv", tmp_path / "loss.png"))
    with pytest.raises(ValueError, match="no rows"):
        plot_history(df.iloc[:0], tmp_path / "empty.png")


# ------------------------------------------------------------------ evaluate on hand-built layout files

import json  # noqa: E402

import h5py  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from pipeline import layout  # noqa: E402
from conftest import make_checkpoint, make_file, oracle_predictions  # noqa: E402

S = layout.IMAGE_SIZE
CHANNELS = ("track_pt", "dz", "d0", "ecal")
LABELS = ("m", "pt", "ieta", "iphi")
TINY = dict(patch_size=25, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, dropout=0.0, emb_dropout=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    data = [str(make_file(d / "a.h5", 40, seed=1, source_file="a.parquet")),
            str(make_file(d / "b.h5", 30, seed=2, source_file="b.parquet"))]
    (d / "run").mkdir()
    ckpt = str(make_checkpoint(d / "run" / "best.pt", data[:1], aux=("pt", "ieta")))
    return d, data, ckpt


def test_evaluate_matches_an_independent_oracle(setup):
    from massreg.evaluate import EvaluateConfig, evaluate
    from massreg.metrics import regression_metrics

    d, data, ckpt = setup
    report = evaluate(EvaluateConfig(checkpoint=ckpt, data=data[:1], split="test"))
    pred, true = oracle_predictions(ckpt, data[:1], "test", aux=("pt", "ieta"))
    want = regression_metrics(pred, true)
    assert report["n"] == true.size > 5
    for k in ("mae", "rmse", "mre", "bias", "resolution"):
        assert report["model"][k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    # the constant predictor: the train rows' mean mass, computed here from /labels directly
    with h5py.File(data[0], "r") as f:
        train_mean = f["labels/m"][()][f["split/train"][()]].mean()
    assert report["constant"]["value"] == pytest.approx(train_mean)
    assert report["constant"]["mae"] == pytest.approx(np.abs(train_mean - true).mean())
    assert report["mae_ratio"] == pytest.approx(want["mae"] / np.abs(train_mean - true).mean(), rel=1e-4)
    # outputs land in eval_test/ beside the checkpoint, with no temp files
    out = d / "run" / "eval_test"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["metrics.json", "bins.csv", "test_pred_vs_true.png", "test_residuals.png",
                            "test_response_resolution.png"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["checkpoint"] == ckpt and saved["config"]["data"] == data[:1]
    assert saved["data"][0]["path"] == data[0] and saved["data"][0]["size"] > 0
    assert sum(b["n"] for b in saved["bins"]) == true.size
    bins = pd.read_csv(out / "bins.csv")
    assert {"lo", "hi", "n", "mae", "mae_const", "response", "resolution"} <= set(bins.columns)
    assert_real_png(out / "test_pred_vs_true.png")


def test_evaluate_several_files_and_cli(setup, tmp_path):
    from massreg.evaluate import main

    d, data, ckpt = setup
    res = CliRunner().invoke(main, [ckpt, *data, "--split", "val", "--out", str(tmp_path / "ev"),
                                    "--bins", "4"])
    assert res.exit_code == 0, res.output
    assert "MAE" in res.output and "constant" in res.output and "per true-mass bin" in res.output
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    pred, true = oracle_predictions(ckpt, data, "val", aux=("pt", "ieta"))
    assert saved["n"] == true.size and len(saved["data"]) == 2 and len(saved["bins"]) == 4
    assert saved["model"]["mae"] == pytest.approx(np.abs(pred - true).mean(), rel=1e-5)
    assert saved["model"]["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)), rel=1e-5)
    # the constant: the mean over the train rows of BOTH files (stats combined from their sums)
    ms = []
    for p in data:
        with h5py.File(p, "r") as f:
            ms.append(f["labels/m"][()][f["split/train"][()]])
    assert saved["constant"]["value"] == pytest.approx(np.concatenate(ms).mean())
    # --max-mae-ratio: the bound of `make demo`; outputs are written either way, the exit code tells
    ratio = saved["mae_ratio"]
    args = [ckpt, *data, "--split", "val", "--out", str(tmp_path / "ev2")]
    assert CliRunner().invoke(main, [*args, "--max-mae-ratio", str(ratio * 1.01)]).exit_code == 0
    # a second evaluation into the same folder is refused before any work, and --force replaces it
    before = (tmp_path / "ev2" / "metrics.json").read_text()
    res = CliRunner().invoke(main, [*args, "--max-mae-ratio", str(ratio * 0.99)])
    msg = res.output.strip()
    assert res.exit_code == 1 and len(msg.splitlines()) == 1, msg
    assert str(tmp_path / "ev2") in msg and "already holds an evaluation" in msg and "--force" in msg
    assert (tmp_path / "ev2" / "metrics.json").read_text() == before
    res = CliRunner().invoke(main, [*args, "--max-mae-ratio", str(ratio * 0.99), "--force"])
    assert res.exit_code == 1 and "is above the bound" in res.output.strip().splitlines()[-1]
    assert (tmp_path / "ev2" / "metrics.json").is_file()


def test_evaluate_bad_inputs_one_line(setup, tmp_path):
    from massreg.evaluate import main

    d, data, ckpt = setup
    other = str(make_file(tmp_path / "other.h5", 12, channels=("track_pt", "dz", "d0", "hcal")))
    foreign = str(make_file(tmp_path / "foreign.h5", 12, fmt="somebody-else"))
    not_ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": {}}, not_ckpt)
    cases = [
        ([str(not_ckpt), data[0]], [str(not_ckpt), "not a massreg checkpoint"]),
        ([ckpt, other], ["track_pt,dz,d0,ecal", "track_pt,dz,d0,hcal", other]),
        ([ckpt, foreign], [foreign, "format"]),
        ([ckpt, str(tmp_path / "missing.h5")], ["missing.h5"]),
    ]
    for args, needles in cases:
        res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "never")])
        assert res.exit_code != 0, args
        msg = res.output.strip()
        assert msg.startswith("Error:") and len(msg.splitlines()) == 1, msg
        assert "Traceback" not in res.output
        for needle in needles:
            assert needle in msg, (needle, msg)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------ the kNN physics baseline in evaluate

CALO = ("track_pt", "ecal", "hcal")


@pytest.fixture(scope="module")
def calo_setup(tmp_path_factory):
    """A file with positive ECAL and HCAL planes and a checkpoint trained (randomly) on its channels."""
    d = tmp_path_factory.mktemp("knn")
    data = str(make_file(d / "c.h5", 80, seed=5, channels=CALO, source_file="c.parquet", positive=True))
    (d / "run").mkdir()
    return d, data, str(make_checkpoint(d / "run" / "best.pt", [data], channels=CALO))


def knn_oracle(path, split, k):
    """kNN of the mass on (pixel mass of ecal + hcal, pt), every train row: h5py reads, numpy argsort."""
    from massreg.baselines import eta_from_ieta, pixel_mass

    with h5py.File(path, "r") as f:
        images = f["images"][()].astype(np.float64)
        energy = images[:, 1] + images[:, 2]                   # ecal + hcal, (N, 125, 125)
        m, pt, ieta = (f[f"labels/{k}"][()] for k in ("m", "pt", "ieta"))
        fit, ev = f["split/train"][()], f[f"split/{split}"][()]
    feats = np.stack([pixel_mass(energy, eta_from_ieta(ieta)), pt], axis=1)  # (N, 2)
    mean, std = feats[fit].mean(0), feats[fit].std(0)
    z = (feats - mean) / std
    dist = np.linalg.norm(z[ev][:, None] - z[fit][None], axis=-1)           # (n_ev, n_fit)
    pred = m[fit][np.argsort(dist, axis=1)[:, :k]].mean(1)
    return pred, m[ev], fit.size


def test_evaluate_knn_baseline_matches_an_oracle(calo_setup, tmp_path):
    from massreg.evaluate import EvaluateConfig, evaluate
    from massreg.metrics import regression_metrics

    d, data, ckpt = calo_setup
    report = evaluate(EvaluateConfig(checkpoint=ckpt, data=[data], split="test", out=str(tmp_path / "a"),
                                     knn=3, knn_train_rows=10_000))
    pred, true, n_fit = knn_oracle(data, "test", 3)
    want = regression_metrics(pred, true)
    knn = report["knn"]
    assert knn["skipped"] is None and knn["k"] == knn["k_used"] == 3
    assert knn["train_rows"] == knn["train_rows_available"] == n_fit > 20
    assert knn["channels"] == ["ecal", "hcal"] and knn["eta_source"] == "ieta"
    assert knn["features"] == ["pixel_mass", "pt"] and "note" not in knn
    for key in ("n", "mae", "rmse", "mre", "bias", "resolution"):
        # rel 1e-6: massreg.data holds the masses as float32, the oracle reads float64
        assert knn[key] == pytest.approx(want[key], rel=1e-6), key
    assert report["mae_ratio_knn"] == pytest.approx(report["model"]["mae"] / want["mae"])
    # the old keys are all still there, and the bins hold the kNN beside the constant
    assert {"model", "constant", "mae_ratio", "bins", "n"} <= set(report)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["knn"]["mae"] == pytest.approx(want["mae"]) and saved["config"]["knn"] == 3
    assert sum(b["n"] for b in saved["bins"]) == true.size and "mae_knn" in saved["bins"][0]
    assert "mae_knn" in pd.read_csv(tmp_path / "a" / "bins.csv").columns

    # a subsample of the train rows: seeded (the same twice), of the size asked for, k capped at it
    sub = [evaluate(EvaluateConfig(checkpoint=ckpt, data=[data], split="val", out=str(tmp_path / f"s{i}"),
                                   knn=30, knn_train_rows=7))["knn"] for i in range(2)]
    assert sub[0]["train_rows"] == 7 and sub[0]["k_used"] == 7
    assert sub[0]["mae"] == sub[1]["mae"]
    assert evaluate(EvaluateConfig(checkpoint=ckpt, data=[data], split="train", out=str(tmp_path / "t"),
                                   knn=3))["knn"]["note"].startswith("the train rows evaluated include")


def test_evaluate_knn_cli_prints_three_columns_and_knn_0_skips(calo_setup, tmp_path):
    from massreg.evaluate import main

    d, data, ckpt = calo_setup
    res = CliRunner().invoke(main, [ckpt, data, "--out", str(tmp_path / "a"), "--knn", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[1].split() == ["model", "constant", "kNN"]
    assert len(next(x for x in lines if x.startswith("MAE [GeV]")).split()) == 2 + 3  # label, unit, 3 values
    assert "MAE model / constant = " in res.output and "MAE model / kNN = " in res.output
    assert "kNN = mean mass of the 3 nearest of" in res.output and "MAE kNN" in res.output
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    pred, true, _ = knn_oracle(data, "test", 3)
    assert saved["knn"]["mae"] == pytest.approx(np.abs(pred - true).mean())

    res = CliRunner().invoke(main, [ckpt, data, "--out", str(tmp_path / "b"), "--knn", "0"])
    assert res.exit_code == 0, res.output
    assert "kNN baseline disabled with --knn 0" in res.output and "MAE kNN" not in res.output
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["knn"] == {"skipped": "disabled with --knn 0", "k": 0} and saved["mae_ratio_knn"] is None
    assert "mae_knn" not in saved["bins"][0] and saved["model"]["n"] == true.size

    res = CliRunner().invoke(main, ["--help"])
    assert "--knn INTEGER" in res.output and "--knn-train-rows" in res.output and "0 disables" in res.output
    res = CliRunner().invoke(main, [ckpt, data, "--out", str(tmp_path / "c"), "--knn", "-1"])
    assert res.exit_code == 2 and not (tmp_path / "c").exists()


def test_evaluate_knn_skipped_without_calorimeter_and_eta_0_without_ieta(tmp_path):
    from massreg.evaluate import main

    tracks = ("track_pt", "dz", "d0")
    data = str(make_file(tmp_path / "t.h5", 40, seed=3, channels=tracks, source_file="t.parquet"))
    ckpt = str(make_checkpoint(tmp_path / "t.pt", [data], channels=tracks))
    res = CliRunner().invoke(main, [ckpt, data, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    note = [x for x in res.output.splitlines() if x.startswith("kNN baseline")]
    assert note == ["kNN baseline skipped: the files hold no calorimeter channel (ecal, hcal) among "
                    "track_pt, dz, d0"]
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["knn"]["skipped"] == note[0][len("kNN baseline "):] and "mae" not in saved["knn"]
    assert saved["mae_ratio"] is not None and saved["mae_ratio_knn"] is None

    # no ieta label: eta_jet = 0, said so
    data = str(make_file(tmp_path / "e.h5", 60, seed=4, channels=CALO, source_file="e.parquet",
                         positive=True))
    with h5py.File(data, "r+") as f:
        del f["labels/ieta"]
    ckpt = str(make_checkpoint(tmp_path / "e.pt", [data], channels=CALO))
    res = CliRunner().invoke(main, [ckpt, data, "--out", str(tmp_path / "b"), "--knn", "3"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["knn"]["eta_source"] == "none: no ieta label, eta_jet = 0" and saved["knn"]["mae"] > 0
    assert "eta_jet from none: no ieta label, eta_jet = 0" in res.output
