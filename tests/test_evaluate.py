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
