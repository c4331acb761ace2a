"""Per-jet resolution: the pinball loss, a quantile head that never crosses and never changes the point
estimate, coverage / pull / quartile metrics on constructed arrays, flat reweighting, flip averaging, and the
quantile outputs through predict and ONNX."""
from __future__ import annotations

import math
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_checkpoint, make_file, write_layout_file
from massreg import engine
from massreg.metrics import binned_metrics, quantile_metrics, resolution_quantiles
from massreg.optim import objective, pinball_loss
from massreg.recipes import build_config
from massreg.registry import build_model, model_config
from massreg.reweight import flat_weights


# ---------------------------------------------------------------------------------------------- the loss

def test_pinball_loss_against_hand_worked_numbers():
    z = torch.tensor([1.0, 1.0, 1.0, 1.0])
    q = torch.tensor([0.0, 1.0, 2.0, 3.0])          # r = z - q = 1, 0, -1, -2
    # tau 0.16: 0.16 * 1, 0, 0.84 * 1, 0.84 * 2 -> mean (0.16 + 0.84 + 1.68) / 4 = 0.67
    assert pinball_loss(q, z, 0.16).item() == pytest.approx(0.67)
    # tau 0.84: 0.84, 0, 0.16, 0.32 -> 1.32 / 4 = 0.33
    assert pinball_loss(q, z, 0.84).item() == pytest.approx(0.33)
    w = torch.tensor([1.0, 0.0, 0.0, 3.0])          # weighted: (0.16 + 3 * 1.68) / 4
    assert pinball_loss(q, z, 0.16, w).item() == pytest.approx((0.16 + 3 * 1.68) / 4)
    # its minimiser over a constant q is the tau-quantile of z
    sample = torch.linspace(0, 1, 101)
    grid = torch.linspace(0, 1, 1001)
    best = grid[torch.stack([pinball_loss(torch.full_like(sample, g), sample, 0.84) for g in grid]).argmin()]
    assert best.item() == pytest.approx(0.84, abs=0.011)


def test_objective_adds_the_weighted_pinball_losses_to_the_point_loss():
    c = build_config(data=("x.h5",), loss="l1", quantile_weight=0.5)
    z = torch.tensor([0.0, 2.0])
    out = torch.tensor([[-1.0, 0.5, 1.0], [1.0, 1.5, 3.0]])     # [q16, point, q84] per row
    total, point = objective(c, out, z)
    assert point.item() == pytest.approx(0.5)                    # |0.5 - 0|, |1.5 - 2|
    pin = (0.16 * 1 + 0.16 * 1) / 2 + (0.16 * 1 + 0.16 * 1) / 2  # q16 under z by 1 (both); q84 over by 1
    assert total.item() == pytest.approx(0.5 + 0.5 * pin)
    w = torch.tensor([1.0, 3.0])
    total_w, point_w = objective(c, out, z, w)
    assert point_w.item() == pytest.approx((0.5 + 3 * 0.5) / 4)
    assert objective(c, out[:, 1], z)[0].item() == pytest.approx(0.5)   # a point model: the point loss


# ---------------------------------------------------------------------------------------------- the head

@pytest.mark.parametrize("preset", ["tiny", "hybrid", "resnet"])
def test_quantiles_never_cross_under_random_weights(preset):
    torch.manual_seed(0)
    model = build_model(model_config(preset, channels=2, num_aux=3, quantiles=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
        model.quantile_head.set_calibration(torch.tensor([-2.0, 0.0, 0.5, 3.0]),
                                            torch.tensor([[0.3, 4.0], [1.0, 0.1], [10.0, 1.0], [0.5, 0.5]]))
    x, aux = torch.randn(16, 2, 125, 125), torch.randn(16, 3)
    for mode in (True, False):
        model.train(mode)
        out = model(x, aux)                                          # (B, 3)
        assert out.shape == (16, 3) and torch.isfinite(out).all()
        assert (out[:, 0] <= out[:, 1]).all() and (out[:, 1] <= out[:, 2]).all()   # never crossed
        # and strictly apart wherever float32 can still tell z from z + MIN_WIDTH (N(0, 1) weights make a
        # ResNet's z reach 1e7, where the float32 spacing is 1)
        sane = out[:, 1].abs() < 1e3
        assert (out[sane, 0] < out[sane, 1]).all() and (out[sane, 1] < out[sane, 2]).all()


@pytest.mark.parametrize("preset", ["tiny", "resnet"])
def test_the_pinball_loss_trains_the_head_alone(preset):
    """Gradients of the pinball terms reach the quantile head and nothing else; the point output and every
    trunk weight equal those of the model built without the head."""
    torch.manual_seed(4)
    with_q = build_model(model_config(preset, channels=2, num_aux=0, quantiles=True))
    torch.manual_seed(4)
    without = build_model(model_config(preset, channels=2, num_aux=0))
    trunk = {k: v for k, v in with_q.state_dict().items() if not k.startswith("quantile_head.")}
    assert trunk.keys() == without.state_dict().keys()
    assert all(torch.equal(trunk[k], v) for k, v in without.state_dict().items())
    x = torch.randn(4, 2, 125, 125)
    out = with_q(x)
    torch.testing.assert_close(out[:, 1], without(x), rtol=0, atol=0)
    z = torch.randn(4)
    pin = pinball_loss(out[:, 0], z, 0.16) + pinball_loss(out[:, 2], z, 0.84)
    pin.backward()
    for name, p in with_q.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert touched == name.startswith("quantile_head."), name


def test_a_run_with_quantiles_trains_the_same_point_model(tmp_path, monkeypatch):
    """Two epochs with and without quantile outputs (flips, aux, grad clipping on): the point weights, the
    optimizer's point state and every val metric are bitwise equal."""
    from massreg.trainer import train

    monkeypatch.setattr("massreg.trainer.make_plots", lambda *a, **k: None)
    data = write_layout_file(tmp_path / "d.h5", n=64)
    runs = {}
    for q in (False, True):
        c = build_config(data=(str(data),), model="tiny", batch_size=8, epochs=2, device="cpu", seed=2,
                         quantiles=q, run_dir=str(tmp_path / f"q{q}"))
        train(c, echo=lambda *a, **k: None)
        runs[q] = torch.load(tmp_path / f"q{q}" / "last.pt", weights_only=True)
    point = {k: v for k, v in runs[True]["model"].items() if not k.startswith("quantile_head.")}
    assert point.keys() == runs[False]["model"].keys()
    assert all(torch.equal(point[k], v) for k, v in runs[False]["model"].items())
    cols = ["train_loss", "val_loss", "val_mae", "val_mre", "val_resolution"]
    a = pd.read_csv(tmp_path / "qFalse" / "metrics.csv")[cols]
    b = pd.read_csv(tmp_path / "qTrue" / "metrics.csv")[cols]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    cal = runs[True]["model"]["quantile_head.calibration"]
    assert not torch.equal(cal, torch.ones_like(cal)) and (cal > 0).all()   # fitted on val at each validation


def test_calibration_fits_the_widths_as_a_function_of_the_predicted_mass():
    """Widths too narrow by 2x at low predicted mass and too wide by 2x at high: after calibrate, 16 % of the
    jets fall below q16 and 16 % above q84 in every group, and the factors follow the mass."""
    from massreg.heads import QuantileHead
    from massreg.resolution import calibrate
    from massreg.transforms import TargetScaler

    rng = np.random.default_rng(0)
    n = 40_000
    pred = rng.uniform(100, 500, n)
    sigma = 0.1 * pred                                       # the true resolution
    true = pred + sigma * rng.standard_normal(n)
    claimed = sigma * np.where(pred < 300, 0.5, 2.0)        # what an uncalibrated head says
    out = {"pred": pred, "true": true, "q16": pred - claimed, "q84": pred + claimed}
    head = QuantileHead(8)
    target = TargetScaler(mean=300.0, std=120.0)
    calibrate(head, out, target)
    z = torch.as_tensor((pred - 300.0) / 120.0, dtype=torch.float32)
    f = head.factors(z).double().numpy()                     # (N, 2)
    low, high = pred < 250, pred > 350
    assert np.median(f[low], axis=0) == pytest.approx([2.0, 2.0], rel=0.1)
    assert np.median(f[high], axis=0) == pytest.approx([0.5, 0.5], rel=0.1)
    for sel in (low, high):
        w_lo, w_hi = claimed[sel] * f[sel, 0], claimed[sel] * f[sel, 1]
        assert np.mean(true[sel] < pred[sel] - w_lo) == pytest.approx(0.16, abs=0.02)
        assert np.mean(true[sel] > pred[sel] + w_hi) == pytest.approx(0.16, abs=0.02)
    # fitting again on outputs made with these factors changes nothing (the current factor is taken out)
    before = head.calibration.clone()
    calibrate(head, {**out, "q16": pred - claimed * f[:, 0], "q84": pred + claimed * f[:, 1]}, target)
    torch.testing.assert_close(head.calibration, before, rtol=1e-5, atol=1e-6)


def test_the_calibration_has_one_knot_per_200_val_jets_up_to_6():
    from massreg.heads import QuantileHead
    from massreg.resolution import calibrate
    from massreg.transforms import TargetScaler

    rng = np.random.default_rng(1)
    for n, knots in ((150, 1), (450, 2), (1214, 6), (5000, 6)):
        pred = rng.uniform(100, 500, n)
        true = pred + 20.0 * rng.standard_normal(n)
        head = QuantileHead(8)
        calibrate(head, {"pred": pred, "true": true, "q16": pred - 20.0, "q84": pred + 20.0},
                  TargetScaler(mean=300.0, std=120.0))
        assert head.calibration_z.shape == (knots,) and head.calibration.shape == (knots, 2)
        assert (np.diff(head.calibration_z.numpy()) > 0).all()


def test_a_head_loads_a_calibration_with_another_number_of_knots():
    """Checkpoints written before the knots became adaptive hold 4; a head built with 1 takes their size and
    gives the same outputs, and a 1-knot head is one factor per side everywhere."""
    from massreg.heads import QuantileHead

    torch.manual_seed(0)
    old, new = QuantileHead(8), QuantileHead(8)
    factors = torch.tensor([[0.5, 2.0], [1.0, 1.0], [2.0, 0.7], [1.2, 1.3]])
    old.set_calibration(torch.tensor([-1.0, 0.0, 0.5, 1.5]), factors)
    new.load_state_dict(old.state_dict())
    x, z = torch.randn(64, 8), torch.linspace(-3, 3, 64)
    old.eval(), new.eval()
    torch.testing.assert_close(new(x, z), old(x, z), rtol=0, atol=0)
    one = QuantileHead(8)
    one.set_calibration(torch.tensor([0.3]), torch.tensor([[0.5, 2.0]]))
    torch.testing.assert_close(one.factors(z), torch.tensor([[0.5, 2.0]]).expand(64, 2))


def test_the_head_fit_meets_the_quantiles_of_its_rows_deterministically():
    """Residuals of two spreads (0.2 and 0.5, by the sign of the first feature), widths starting at 0.5: after
    fit_quantile_head, 16 % of the rows fall below the raw q16 and 16 % above q84, and the widths follow the
    spread; the fit is deterministic and leaves the global RNG alone."""
    from massreg.headfit import fit_quantile_head
    from massreg.heads import QuantileHead

    g = torch.Generator().manual_seed(3)
    n, dim = 8000, 6
    features = torch.randn(n, dim, generator=g)
    z = torch.randn(n, generator=g)
    wide = features[:, 0] > 0
    z_true = z + (0.2 + 0.3 * wide) * torch.randn(n, generator=g)
    inputs = {"features": features, "z": z, "z_true": z_true, "weight": None}
    fits = []
    for _ in range(2):
        torch.manual_seed(0)
        head = QuantileHead(dim)
        rng_state = torch.get_rng_state()
        before, after = fit_quantile_head(head, inputs, epochs=10, batch_size=64, seed=5)
        assert torch.equal(torch.get_rng_state(), rng_state)
        assert after < 0.9 * before and not head.training
        fits.append(head.state_dict())
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])
    head.train()                                                   # raw widths: no calibration
    with torch.no_grad():
        out = head(features, z)                                    # (N, 3)
    assert (z_true < out[:, 0]).float().mean().item() == pytest.approx(0.16, abs=0.015)
    assert (z_true > out[:, 2]).float().mean().item() == pytest.approx(0.16, abs=0.015)
    width = out[:, 2] - out[:, 0]
    assert width[wide].median() > 1.5 * width[~wide].median()     # 2.5 in truth; a smooth fit of a step


def test_a_finished_run_fits_the_head_of_every_checkpoint_once(tmp_path, monkeypatch):
    """--head-epochs: every checkpoint's quantile head is fitted on its own trunk and recorded; the point
    weights are those of the run without it; a run stopped before the end, or by a signal during the fit, and
    resumed writes bitwise the same checkpoints; resuming the finished run again changes nothing."""
    from massreg import headfit
    from massreg.dataset import H5Images
    from massreg.trainer import train

    monkeypatch.setattr("massreg.trainer.make_plots", lambda *a, **k: None)
    quiet = lambda *a, **k: None   # noqa: E731

    data = write_layout_file(tmp_path / "d.h5", n=64)
    n_train = len(H5Images([str(data)], "train"))
    opts = dict(data=(str(data),), model="tiny", batch_size=8, epochs=2, device="cpu", seed=1)
    for name, head_epochs in (("fit", 2), ("none", 0)):
        train(build_config(**opts, head_epochs=head_epochs, run_dir=str(tmp_path / name)), echo=quiet)
    train(build_config(**opts, head_epochs=2, run_dir=str(tmp_path / "resumed")), stop_after_epochs=1,
          echo=quiet)
    train(build_config(resume=str(tmp_path / "resumed")), echo=quiet)
    # SIGTERM in the head's fit (a batch system's warning just after the last epoch): the trainer's line, the
    # signal's number, no checkpoint half-fitted; --resume fits them all
    real = headfit.fit_checkpoint_head

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(headfit, "fit_checkpoint_head", signalled)
    lines = []
    result = train(build_config(**opts, head_epochs=2, run_dir=str(tmp_path / "stopped")),
                   echo=lambda msg, **k: lines.append(msg))
    assert result["stopped"] == signal.SIGTERM and result["epoch"] == 2
    assert "interrupted by SIGTERM after epoch 2 (training done; in the quantile head's final fit" in lines[-1]
    assert all("head_fit" not in torch.load(p, weights_only=True) for p in (tmp_path / "stopped").glob("*.pt"))
    monkeypatch.setattr(headfit, "fit_checkpoint_head", real)
    train(build_config(resume=str(tmp_path / "stopped")), echo=quiet)
    load = lambda run, name: torch.load(tmp_path / run / name, weights_only=True)   # noqa: E731
    for name in ("last.pt", "best_val_loss.pt", "best_mre.pt"):
        fit, none, resumed, stopped = (load(run, name) for run in ("fit", "none", "resumed", "stopped"))
        assert all(torch.equal(stopped["model"][k], v) for k, v in fit["model"].items())
        assert stopped["head_fit"] == fit["head_fit"]
        assert fit["head_fit"]["epoch"] == fit["epoch"] and fit["head_fit"]["views"] == 4
        assert fit["head_fit"]["jets"] == n_train and "head_fit" not in none
        assert fit["head_fit"]["loss_after"] < fit["head_fit"]["loss_before"]
        for k, v in none["model"].items():   # the trunk and point as without; the head's weights changed
            if not k.startswith("quantile_head.calibration"):
                assert torch.equal(fit["model"][k], v) != k.startswith("quantile_head.net"), k
        assert resumed["model"].keys() == fit["model"].keys()
        assert all(torch.equal(resumed["model"][k], v) for k, v in fit["model"].items())
        assert resumed["head_fit"] == fit["head_fit"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "fit").glob("*.pt")}
    train(build_config(resume=str(tmp_path / "fit")), echo=quiet)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "fit").glob("*.pt")} == stamps


# ---------------------------------------------------------------------------------------------- metrics

def test_coverage_and_pull_on_constructed_arrays():
    pred = np.array([100.0, 100.0, 100.0, 100.0, 100.0])
    true = np.array([95.0, 110.0, 80.0, 100.0, 121.0])
    q16, q84 = pred - 10.0, pred + 20.0                       # res = 15 GeV
    m = quantile_metrics(pred, true, q16, q84)
    assert m["coverage"] == pytest.approx(3 / 5)              # 95, 110, 100 inside; 80, 121 outside
    pulls = (true - pred) / 15.0                              # -1/3, 2/3, -4/3, 0, 7/5
    iqr = np.percentile(pulls, 75) - np.percentile(pulls, 25)
    assert m["pull_width"] == pytest.approx(iqr / 1.349)
    assert m["predicted_resolution"] == pytest.approx(0.15)
    # Gaussian residuals with the right sigma: coverage 0.683, pull width 1
    rng = np.random.default_rng(0)
    sigma = rng.uniform(5, 50, 200_000)
    pred = rng.uniform(100, 400, sigma.size)
    true = pred + sigma * rng.standard_normal(sigma.size)
    m = quantile_metrics(pred, true, pred - sigma, pred + sigma)
    assert m["coverage"] == pytest.approx(0.6827, abs=0.005) and m["pull_width"] == pytest.approx(1, abs=0.01)
    with pytest.raises(ValueError, match="cross"):
        quantile_metrics(pred[:3], true[:3], pred[:3] + 1, pred[:3] - 1)


def test_resolution_quartiles_and_binning_by_another_variable():
    rng = np.random.default_rng(1)
    n = 40_000
    pred = np.full(n, 200.0)
    rel = np.repeat([0.05, 0.1, 0.2, 0.3], n // 4)            # four groups of known relative resolution
    true = pred * (1 + rel * rng.standard_normal(n))
    true = np.where(true > 1, true, 1.0)
    q = resolution_quantiles(pred, true, pred * (1 - rel), pred * (1 + rel), n=4)
    np.testing.assert_allclose(q["predicted"], [0.05, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(q["measured"], [0.05, 0.1, 0.2, 0.3], rtol=0.05)
    assert (q["n"] == n // 4).all() and np.all(np.abs(q["coverage"] - 0.683) < 0.02)
    # binned by pT: rows land in the bins of `by`, not of the true mass
    pt = np.repeat([450.0, 950.0], n // 2)
    table = binned_metrics(pred, true, [400, 700, 1000], by=pt, q16=pred * (1 - rel), q84=pred * (1 + rel))
    assert table["n"].tolist() == [n // 2, n // 2]
    assert table["predicted_resolution"].tolist() == pytest.approx([0.075, 0.25])


# ---------------------------------------------------------------------------------------------- reweighting

def test_flat_weights_on_a_constructed_sample():
    # mass cells: 30 rows in the low half, 10 in the high; one pT value
    mass = np.concatenate([np.full(30, 100.0), np.full(10, 400.0)])
    w = flat_weights(mass, np.full(40, 500.0), bins=(2, 1))
    assert w.mean() == pytest.approx(1.0)
    assert w[:30].sum() == pytest.approx(w[30:].sum())        # each cell weighs the same in the loss
    assert w[35] / w[0] == pytest.approx(3.0)
    # a nearly empty cell is clipped at max_weight x the mean, then renormalised
    mass = np.concatenate([np.full(99, 100.0), [400.0]])
    w = flat_weights(mass, np.full(100, 500.0), bins=(2, 1), max_weight=5.0)
    # before the clip: 1/99 each for 99 rows and 1 for the last, mean 0.02 -> 0.505 and 50; clipped to 5
    assert w.mean() == pytest.approx(1.0) and w[-1] / w[0] == pytest.approx(5.0 / (50 / 99))
    with pytest.raises(ValueError):
        flat_weights(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


# ---------------------------------------------------------------------------------------------- flips

def test_flip_averaging_is_the_mean_over_the_four_flips():
    torch.manual_seed(3)
    model = build_model(model_config("tiny", channels=2, num_aux=0, quantiles=True)).eval()
    images = torch.randn(5, 2, 125, 125).half()
    batch = {"images": images, "m": torch.full((5,), 100.0), "index": torch.arange(5)}

    def norm(images):                           # the normaliser: float16 -> float32, nothing else
        return images.float()
    got = engine.forward(model, batch, normalizer=norm, aux_scaler=None, device=torch.device("cpu"),
                         amp=False, tta=True)
    x = images.float()
    want = sum(model(x.flip(d) if d else x) for d in ((), (2,), (3,), (2, 3))) / 4
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    plain = engine.forward(model, batch, normalizer=norm, aux_scaler=None, device=torch.device("cpu"), amp=False)
    assert not torch.allclose(got, plain)


# ---------------------------------------------------------------------------------------------- outputs

@pytest.fixture(scope="module")
def quantile_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    data = make_file(d / "d.h5", 60, seed=5)
    return data, make_checkpoint(d / "q.pt", [data], quantiles=True, seed=1), make_checkpoint(d / "p.pt", [data])


def test_predict_writes_the_resolution_for_checkpoints_and_onnx(quantile_setup, tmp_path):
    pytest.importorskip("onnxruntime")
    from massreg.export import ExportConfig, export
    from massreg.predict import PredictConfig, predict

    data, qckpt, pckpt = quantile_setup
    export(ExportConfig(checkpoint=str(qckpt), out=str(tmp_path / "q.onnx")))
    for tta in (False, True):
        a = predict(PredictConfig(checkpoint=str(qckpt), inputs=[str(data)], out=str(tmp_path / f"a{tta}.csv"),
                                  device="cpu", tta=tta))
        b = predict(PredictConfig(onnx=str(tmp_path / "q.onnx"), inputs=[str(data)],
                                  out=str(tmp_path / f"b{tta}.csv"), tta=tta))
        assert list(a.columns) == ["source", "row", "m_pred", "m_q16", "m_q84", "m_res", "m_true"]
        assert list(b.columns) == list(a.columns)
        assert (a["m_q16"] < a["m_pred"]).all() and (a["m_pred"] < a["m_q84"]).all()
        np.testing.assert_allclose(a["m_res"], (a["m_q84"] - a["m_q16"]) / 2)
        for col in ("m_pred", "m_q16", "m_q84", "m_res"):
            np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=0.01)
    old = predict(PredictConfig(checkpoint=str(pckpt), inputs=[str(data)], out=str(tmp_path / "p.csv"),
                                device="cpu"))
    assert list(old.columns) == ["source", "row", "m_pred", "m_true"]     # a point-only checkpoint


def test_onnx_graph_with_flips_inside_equals_pytorch_flip_averaging(quantile_setup, tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    from massreg.deploy import OnnxRegressor
    from massreg.export import ExportConfig, export
    from massreg.predict import PredictConfig, predict

    data, qckpt, _ = quantile_setup
    meta = export(ExportConfig(checkpoint=str(qckpt), out=str(tmp_path / "t.onnx"), tta=True))
    assert [o["name"] for o in meta["outputs"]] == ["mass", "mass_q16", "mass_q84"]
    assert meta["flip_averaging"] is True
    assert json.loads((tmp_path / "t.json").read_text())["outputs"] == meta["outputs"]
    assert OnnxRegressor(tmp_path / "t.onnx").outputs == ["mass", "mass_q16", "mass_q84"]
    a = predict(PredictConfig(checkpoint=str(qckpt), inputs=[str(data)], out=str(tmp_path / "a.csv"),
                              device="cpu", tta=True))
    b = predict(PredictConfig(onnx=str(tmp_path / "t.onnx"), inputs=[str(data)], out=str(tmp_path / "b.csv")))
    for col in ("m_pred", "m_q16", "m_q84"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=0.01)


def test_evaluate_reports_coverage_and_quartiles(quantile_setup, tmp_path):
    from massreg.evaluate import EvaluateConfig, evaluate, format_report

    data, qckpt, pckpt = quantile_setup
    report = evaluate(EvaluateConfig(checkpoint=str(qckpt), data=[str(data)], split="all", device="cpu",
                                     out=str(tmp_path / "e"), knn=0))
    res = report["resolution"]
    assert res["quantiles"] and 0 <= res["coverage"] <= 1 and res["pull_width"] > 0
    assert len(res["quartiles"]) == 4 and {"by_predicted_mass", "by_pt"} <= set(res)
    text = format_report(report)
    assert "coverage of [q16, q84]" in text and "quartiles of predicted relative resolution" in text
    assert {"all_coverage.png", "all_resolution_predicted_vs_measured.png"} <= set(report["plots"])
    bins = pd.read_csv(tmp_path / "e" / "bins.csv")
    assert {"coverage", "pull_width"} <= set(bins.columns)
    old = evaluate(EvaluateConfig(checkpoint=str(pckpt), data=[str(data)], split="all", device="cpu",
                                  out=str(tmp_path / "p"), knn=0))
    assert not old["resolution"]["quantiles"] and "coverage" not in old["resolution"]
    assert math.isfinite(old["model"]["mae"])
