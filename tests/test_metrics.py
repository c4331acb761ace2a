"""metrics.py on hand-made cases whose numbers are worked out by hand in the comments."""
import math

import numpy as np
import pytest

from massreg.metrics import (BIN_COLUMNS, binned_metrics, constant_baseline, mass_edges,
                             regression_metrics)

TRUE = np.array([100.0, 200.0, 300.0, 400.0])
PRED = np.array([110.0, 190.0, 330.0, 400.0])


def test_regression_metrics_by_hand():
    m = regression_metrics(PRED, TRUE)
    # r = [10, -10, 30, 0]
    assert m["n"] == 4
    assert m["mae"] == pytest.approx(50 / 4)                     # 12.5
    assert m["rmse"] == pytest.approx(math.sqrt(1100 / 4))       # sqrt(275)
    assert m["bias"] == pytest.approx(30 / 4)                    # 7.5
    # r / true = [0.1, -0.05, 0.1, 0]: mean |.| = 0.25 / 4
    assert m["mre"] == pytest.approx(0.0625)
    # sorted [-0.05, 0, 0.1, 0.1]; q25 at position 0.75: -0.05 + 0.75 * 0.05 = -0.0125;
    # q75 at position 2.25: 0.1. IQR = 0.1125.
    assert m["resolution"] == pytest.approx(0.1125 / 1.349)


def test_perfect_prediction_is_zero_everywhere():
    m = regression_metrics(TRUE, TRUE)
    assert (m["mae"], m["rmse"], m["mre"], m["bias"], m["resolution"]) == (0, 0, 0, 0, 0)


def test_resolution_is_sigma_of_a_gaussian():
    # Independent oracle: for Gaussian relative residuals of sigma 0.1, IQR / 1.349 estimates 0.1.
    rng = np.random.default_rng(0)
    true = rng.uniform(85, 500, 200_000)
    pred = true * (1 + rng.normal(0.02, 0.1, true.size))
    m = regression_metrics(pred, true)
    assert m["resolution"] == pytest.approx(0.1, rel=0.01)
    assert m["bias"] == pytest.approx(0.02 * true.mean(), rel=0.05)


def test_constant_baseline_by_hand():
    m = constant_baseline(250.0, TRUE)
    # r = [150, 50, -50, -150]
    assert m["mae"] == pytest.approx(100.0)
    assert m["bias"] == pytest.approx(0.0)
    assert m["rmse"] == pytest.approx(math.sqrt(12500.0))
    # r / true = [1.5, 0.25, -1/6, -0.375]
    assert m["mre"] == pytest.approx((1.5 + 0.25 + 1 / 6 + 0.375) / 4)
    # sorted [-0.375, -1/6, 0.25, 1.5]; q25 = -0.375 + 0.75 * (0.375 - 1/6) = -0.21875;
    # q75 = 0.25 + 0.25 * 1.25 = 0.5625
    assert m["resolution"] == pytest.approx((0.5625 + 0.21875) / 1.349)


@pytest.mark.parametrize("pred, true", [
    (np.zeros((4, 1)), np.ones(4)),          # the original attempt's (B, 1) vs (B,): B x B by broadcasting
    (np.zeros(4), np.ones((4, 1))),
    (np.zeros(3), np.ones(4)),
    (np.zeros((2, 2)), np.ones((2, 2))),
])
def test_shape_mismatch_raises(pred, true):
    with pytest.raises(ValueError, match="1-D with the same shape"):
        regression_metrics(pred, true)


def test_bad_values_raise():
    with pytest.raises(ValueError, match="predictions are NaN"):
        regression_metrics(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="true masses"):
        regression_metrics(np.array([1.0, 2.0]), np.array([1.0, 0.0]))


def test_empty_gives_nan():
    m = regression_metrics(np.array([]), np.array([]))
    assert m["n"] == 0 and math.isnan(m["mae"]) and math.isnan(m["resolution"])


def test_binned_metrics_by_hand():
    df = binned_metrics(PRED, TRUE, [100.0, 250.0, 400.0])
    assert list(df.columns) == list(BIN_COLUMNS)
    assert df["n"].tolist() == [2, 2]          # 400 (the top edge) belongs to the last bin
    b0, b1 = df.iloc[0], df.iloc[1]
    # bin 0: true [100, 200], pred [110, 190]: r = [10, -10], pred / true = [1.1, 0.95]
    assert (b0["lo"], b0["hi"]) == (100.0, 250.0)
    assert b0["mae"] == pytest.approx(10.0) and b0["bias"] == pytest.approx(0.0)
    assert b0["response"] == pytest.approx(1.025)
    assert b0["mre"] == pytest.approx(0.075)
    # rel [0.1, -0.05]: q25 = -0.05 + 0.25 * 0.15, q75 = -0.05 + 0.75 * 0.15, IQR = 0.075
    assert b0["resolution"] == pytest.approx(0.075 / 1.349)
    # bin 1: true [300, 400], pred [330, 400]: r = [30, 0], pred / true = [1.1, 1.0]
    assert b1["mae"] == pytest.approx(15.0) and b1["bias"] == pytest.approx(15.0)
    assert b1["rmse"] == pytest.approx(math.sqrt(450.0))
    assert b1["response"] == pytest.approx(1.05)


def test_binned_edges_empty_bins_and_outside_rows():
    true = np.array([50.0, 100.0, 200.0, 250.0, 399.0])
    pred = true + np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    df = binned_metrics(pred, true, [0.0, 100.0, 200.0, 300.0, 400.0, 500.0])
    # [0,100): 50 | [100,200): 100 | [200,300): 200, 250 | [300,400): 399 | [400,500]: none
    assert df["n"].tolist() == [1, 1, 2, 1, 0]
    assert df["bias"].iloc[:4].tolist() == pytest.approx([1.0, 2.0, 3.5, 5.0])
    assert df.iloc[4][["mae", "response", "resolution"]].isna().all()
    # rows outside [edges[0], edges[-1]] are dropped
    assert binned_metrics(pred, true, [60.0, 210.0])["n"].tolist() == [2]
    # the bins together give back the overall MAE when every row is inside
    df = binned_metrics(PRED, TRUE, mass_edges(100.0, 400.0, 3))
    assert (df["mae"] * df["n"]).sum() / df["n"].sum() == pytest.approx(regression_metrics(PRED, TRUE)["mae"])


def test_binned_bad_edges():
    with pytest.raises(ValueError, match="strictly increasing"):
        binned_metrics(PRED, TRUE, [100.0, 100.0, 400.0])
    with pytest.raises(ValueError, match="lo < hi"):
        mass_edges(5.0, 5.0)
