"""A physicist's habits: TensorBoard event files read back with tensorboard's own reader, a new run from a
previous run's config.json, and input columns carried into predictions (--keep)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import make_checkpoint, run_cli, write_layout_file
from massreg.predict import PredictConfig, PredictError, predict
from pipeline.convert import ConvertConfig, convert
from pipeline.synth import SynthConfig, generate

TIMING = ["seconds", "samples_per_s"]
SMALL = ["--model", "tiny", "--batch-size", "8", "--device", "cpu", "--seed", "4"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_layout_file(tmp_path_factory.mktemp("data") / "top.h5", n=48)


# ---------------------------------------------------------------------------------------------- tensorboard

def scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_tensorboard_scalars_equal_metrics_csv_and_resume_appends(tmp_path, data_file):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    # 3 epochs in two calls: SIGTERM-free stand-in for a time limit, stop after epoch 1, then --resume
    from massreg.recipes import build_config
    from massreg.trainer import train

    train(build_config(data=(str(data_file),), model="tiny", batch_size=8, epochs=3, device="cpu", seed=4,
                       run_dir=str(run), tensorboard=True), stop_after_epochs=1, echo=lambda *a, **k: None)
    result = run_cli(["--resume", run])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(run / "metrics.csv")
    acc, val_mae = scalars(run, "epoch/val_mae")
    assert [v for _, v in val_mae] == pytest.approx(metrics["val_mae"].tolist(), rel=1e-6)   # float32 in TB
    _, loss = scalars(run, "train/loss")
    steps = [s for s, _ in loss]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % 3 == 0   # every step once, 3 epochs
    _, epochs = scalars(run, "epoch/epoch")
    assert [v for _, v in epochs] == [1.0, 2.0, 3.0]
    assert "val/pred_vs_true" in acc.Tags()["images"] and "plots/history" in acc.Tags()["images"]
    assert json.loads((run / "config.json").read_text())["train"]["tensorboard"] is True


def test_tensorboard_is_off_by_default(tmp_path, data_file):
    result = run_cli([data_file, *SMALL, "--epochs", "1", "--run-dir", tmp_path / "r"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "r" / "tensorboard").exists()


# ---------------------------------------------------------------------------------------------- --config

def test_a_run_from_another_runs_config_reproduces_it(tmp_path, data_file):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    result = run_cli([data_file, *SMALL, "--epochs", "2", "--lr", "3e-4", "--no-flips", "--run-dir", a])
    assert result.exit_code == 0, result.output
    result = run_cli(["--config", a / "config.json", "--run-dir", b])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(a / "metrics.csv").drop(columns=TIMING),
                                  pd.read_csv(b / "metrics.csv").drop(columns=TIMING), check_exact=True)
    stored_a = json.loads((a / "config.json").read_text())["train"]
    stored_b = json.loads((b / "config.json").read_text())["train"]
    assert stored_b["config_from"] == str(a / "config.json")
    same = {k: v for k, v in stored_a.items() if k not in ("run_dir", "config_from")}
    assert {k: stored_b[k] for k in same} == same
    # an explicit option overrides the stored value, and is recorded among the overrides
    assert run_cli(["--config", a / "config.json", "--run-dir", c, "--epochs", "1"]).exit_code == 0
    stored_c = json.loads((c / "config.json").read_text())["train"]
    assert stored_c["epochs"] == 1 and stored_c["lr"] == 3e-4 and "epochs" in stored_c["overrides"]
    # a config.json from before an option existed: the option's old behaviour, not today's recipe value
    from massreg.recipes import config_from_run

    old = json.loads((a / "config.json").read_text())
    del old["train"]["quantiles"], old["train"]["reweight"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    config = config_from_run(tmp_path / "old.json", run_dir=str(tmp_path / "d"))
    assert config.quantiles is False and config.reweight == "none" and config.lr == 3e-4


def test_config_errors_are_one_line(tmp_path, data_file):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "tiny"}')
    result = run_cli(["--config", bad, "--run-dir", tmp_path / "x"])
    assert result.exit_code == 1 and "no 'train' section" in result.output
    bad.write_text("not json")
    result = run_cli(["--config", bad, "--run-dir", tmp_path / "x"])
    assert result.exit_code == 1 and "cannot read it as JSON" in result.output


# ---------------------------------------------------------------------------------------------- --keep

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("keep")
    raw = generate(d / "raw", SynthConfig(process="top", rows=12, files=1, seed=3, legacy_names=True))
    h5 = d / "top.h5"
    convert(ConvertConfig(inputs=[str(d / "raw")], output=str(h5), cuts="none", channels=(0, 1, 2, 3),
                          val_fraction=0.2, test_fraction=0.3, progress=False))
    return d, str(raw[0]), str(h5), str(make_checkpoint(d / "c.pt", [str(h5)]))


def test_keep_copies_input_columns_row_for_row(world, tmp_path):
    d, raw, h5, ckpt = world
    out = predict(PredictConfig(checkpoint=ckpt, inputs=[raw], out=str(tmp_path / "p.csv"),
                                keep=("apt", "pt", "ieta", "m")))
    table = pq.read_table(raw).to_pandas()       # legacy names: apt, am
    for col, source in (("apt", "apt"), ("pt", "apt"), ("ieta", "ieta"), ("m", "am")):
        np.testing.assert_array_equal(out[col].to_numpy(), table[source].to_numpy()[out["row"]])
    out = predict(PredictConfig(checkpoint=ckpt, inputs=[h5], split="test", out=str(tmp_path / "h.csv"),
                                keep=("pt", "iphi", "source_row")))
    import h5py
    with h5py.File(h5, "r") as f:
        for col in ("pt", "iphi", "source_row"):
            np.testing.assert_array_equal(out[col].to_numpy(), f["labels"][col][()][out["row"]])
    assert list(out.columns)[-3:] == ["pt", "iphi", "source_row"]


def test_keep_errors_name_the_file_and_its_columns(world, tmp_path):
    from massreg.predict import main

    d, raw, h5, ckpt = world
    with pytest.raises(PredictError, match=r"no column 'event' to --keep; its columns: .*apt"):
        predict(PredictConfig(checkpoint=ckpt, inputs=[raw], out=str(tmp_path / "p.csv"), keep=("event",)))
    result = CliRunner().invoke(main, [ckpt, h5, "--out", str(tmp_path / "h.csv"), "--keep", "pt,nope"])
    assert result.exit_code == 1 and "top.h5: no column 'nope' to --keep; its labels:" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "h.csv").exists()
    with pytest.raises(PredictError, match="own"):
        PredictConfig(checkpoint=ckpt, inputs=[h5], out=str(tmp_path / "x.csv"), keep=("row",)).validate()
