"""The split hash and the exact combination of shard statistics in pipeline.layout."""
import numpy as np
import pytest

from pipeline import layout


def test_split_codes_fractions_and_determinism():
    rows = np.arange(200_000)
    codes = layout.split_codes("top_0.parquet", rows, seed=42, val_fraction=0.1, test_fraction=0.2)
    frac = np.bincount(codes, minlength=3) / rows.size
    # binomial noise at n=2e5 is ~0.001; 0.005 is five sigma
    np.testing.assert_allclose(frac, [0.7, 0.1, 0.2], atol=0.005)
    again = layout.split_codes("top_0.parquet", rows, seed=42, val_fraction=0.1, test_fraction=0.2)
    np.testing.assert_array_equal(codes, again)


def test_split_codes_depend_on_file_row_and_seed_only():
    rows = np.arange(5_000)
    a = layout.split_codes("a.parquet", rows, seed=1, val_fraction=0.1, test_fraction=0.2)
    # a subset of rows asked for on its own gets the same codes (no dependence on what else is converted)
    sub = rows[1234:1300]
    np.testing.assert_array_equal(layout.split_codes("a.parquet", sub, seed=1, val_fraction=0.1,
                                                     test_fraction=0.2), a[sub])
    b = layout.split_codes("b.parquet", rows, seed=1, val_fraction=0.1, test_fraction=0.2)
    c = layout.split_codes("a.parquet", rows, seed=2, val_fraction=0.1, test_fraction=0.2)
    assert (a != b).mean() > 0.3 and (a != c).mean() > 0.3


def test_split_codes_nested_fractions():
    # growing the test fraction only moves rows into test, never shuffles the others
    rows = np.arange(10_000)
    small = layout.split_codes("f", rows, seed=0, val_fraction=0.1, test_fraction=0.1)
    large = layout.split_codes("f", rows, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert np.all(large[small == 2] == 2)


@pytest.mark.parametrize("val,test", [(0.5, 0.5), (-0.1, 0.2), (0.2, 1.0)])
def test_split_codes_rejects_bad_fractions(val, test):
    with pytest.raises(ValueError, match="fraction"):
        layout.split_codes("f", np.arange(3), seed=0, val_fraction=val, test_fraction=test)


def _stats(x: np.ndarray, m: np.ndarray) -> dict:
    # x: (n, C, H, W) channel values, m: (n,) masses -> the /stats dict as the converter stores it
    c = x.shape[0] * x.shape[2] * x.shape[3]
    out = {"n_train": x.shape[0], "channel_count": np.full(x.shape[1], float(c)),
           "channel_sum": x.sum(axis=(0, 2, 3)), "channel_sumsq": (x ** 2).sum(axis=(0, 2, 3)),
           "channel_max": x.max(axis=(0, 2, 3)), "m_count": float(m.size), "m_sum": m.sum(),
           "m_sumsq": (m ** 2).sum(), "m_min": m.min(), "m_max": m.max(),
           "reference_scale": np.array([0.01, 0.1])}
    out["channel_mean"], out["channel_std"] = layout.finish_stats(out["channel_count"], out["channel_sum"],
                                                                  out["channel_sumsq"])
    out["m_mean"], out["m_std"] = layout.finish_stats(out["m_count"], out["m_sum"], out["m_sumsq"])
    return out


def test_combine_stats_equals_stats_of_the_union():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=(30, 2, 5, 5))
    m = rng.uniform(85, 500, size=30)
    parts = [_stats(x[a:b], m[a:b]) for a, b in [(0, 7), (7, 19), (19, 30)]]
    whole = _stats(x, m)
    combined = layout.combine_stats(parts)
    assert combined["n_train"] == 30
    for key in ("channel_mean", "channel_std", "channel_max", "m_mean", "m_std", "m_min", "m_max"):
        np.testing.assert_allclose(combined[key], whole[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(combined["channel_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(combined["m_std"], m.std(), rtol=1e-12)
    np.testing.assert_array_equal(combined["reference_scale"], [0.01, 0.1])
