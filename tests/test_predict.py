"""massreg.predict: Parquet input against the converted HDF5 of the same rows, row ids, cuts, formats,
errors."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from massreg.predict import PredictConfig, main, predict
from pipeline.convert import ConvertConfig, convert
from pipeline.synth import SynthConfig, generate
from conftest import make_checkpoint, make_file, oracle_predictions

AUX = ("pt", "ieta")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two raw top files (one row per row group, as the real data), their conversion, a tiny checkpoint."""
    d = tmp_path_factory.mktemp("predict")
    raw = generate(d / "raw", SynthConfig(process="top", rows=21, files=2, seed=5))
    h5 = d / "top.h5"
    convert(ConvertConfig(inputs=[str(d / "raw")], output=str(h5), cuts="none", channels=(0, 1, 2, 3),
                          val_fraction=0.2, test_fraction=0.3, progress=False))
    ckpt = make_checkpoint(d / "best.pt", [str(h5)], aux=AUX)
    return d, [str(p) for p in raw], str(h5), str(ckpt)


def family_checkpoint(world, preset: str) -> str:
    """The world's checkpoint with its model swapped for `preset` (`resnet`, `hybrid49`), its BatchNorm gains
    and last layer made non-trivial (zero-gamma blocks and a small head would give a near-constant prediction that
    hides a wrong input)."""
    from dataclasses import asdict

    from massreg import checkpoint as ck
    from massreg.registry import build_model, model_config

    d, _, _, ckpt = world
    path = d / f"{preset}.pt"
    if not path.exists():
        payload = torch.load(ckpt, weights_only=True)
        cfg = model_config(preset, channels=payload["model_config"]["channels"],
                           num_aux=payload["model_config"]["num_aux"])
        torch.manual_seed(0)
        model = build_model(cfg)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
            head = model.head[-1] if isinstance(model.head, torch.nn.Sequential) else model.head
            head.weight.normal_(0.0, 0.3)
        payload.update(model=model.state_dict(), model_config=asdict(cfg))
        ck.save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return str(path)


@pytest.mark.parametrize("family", ["deepvit", "resnet", "hybrid49"])
def test_parquet_equals_converted_hdf5(world, family):
    d, raw, h5, ckpt = world
    if family != "deepvit":
        ckpt = family_checkpoint(world, family)
        d = d / f"{family}-out"
        d.mkdir(exist_ok=True)
    # odd batch and chunk sizes so that batches straddle chunks and files
    from_pq = predict(PredictConfig(checkpoint=ckpt, inputs=raw, out=str(d / "pq.csv"), batch_size=5,
                                    chunk_size=3))
    from_h5 = predict(PredictConfig(checkpoint=ckpt, inputs=[h5], out=str(d / "h5.parquet"), batch_size=16))
    assert list(from_pq.columns) == ["source", "row", "m_pred", "m_true"]
    # row ids: every Parquet row, in file order, with the file's own mass
    for path in raw:
        part = from_pq[from_pq["source"] == path]
        assert part["row"].tolist() == list(range(21))
        np.testing.assert_array_equal(part["m_true"].to_numpy(),
                                      pq.read_table(path, columns=["m"])["m"].to_numpy())
    assert from_h5["row"].tolist() == list(range(42))
    # join each HDF5 row to its source (file, row) and require the same prediction
    with h5py.File(h5, "r") as f:
        names = [s["name"] for s in json.loads(f.attrs["source_files"])]
        src_file, src_row = f["labels/source_file"][()], f["labels/source_row"][()]
    key_h5 = pd.DataFrame({"name": [names[i] for i in src_file], "src_row": src_row,
                           "m_pred": from_h5["m_pred"], "m_true": from_h5["m_true"]})
    key_pq = from_pq.assign(name=from_pq["source"].map(lambda s: s.rsplit("/", 1)[-1]))
    joined = key_h5.merge(key_pq, left_on=["name", "src_row"], right_on=["name", "row"],
                          suffixes=("_h5", "_pq"))
    assert len(joined) == 42
    np.testing.assert_array_equal(joined["m_true_h5"], joined["m_true_pq"])
    # The ResNet's float32 convolutions round differently with the batch a row sits in (oneDNN picks its
    # kernels by shape): the same row alone, or in a batch of 5 or 16, differs by up to ~2e-6 relative.
    rtol = 1e-6 if family == "deepvit" else 1e-5
    np.testing.assert_allclose(joined["m_pred_h5"], joined["m_pred_pq"], rtol=rtol)
    assert joined["m_pred_h5"].std() > 0  # not a constant: the comparison means something
    # what was written reads back equal, both formats, full precision
    back = pd.read_csv(d / "pq.csv")
    assert back["source"].tolist() == from_pq["source"].tolist()
    pd.testing.assert_frame_equal(back.drop(columns="source"), from_pq.drop(columns="source"))
    back = pd.read_parquet(d / "h5.parquet")
    np.testing.assert_array_equal(back["m_pred"], from_h5["m_pred"])
    assert b"massreg_predict" in pq.read_schema(d / "h5.parquet").metadata
    assert (d / "h5.parquet.json").is_file() and (d / "pq.csv.json").is_file()


def test_hdf5_split_matches_an_independent_oracle(world, tmp_path):
    d, raw, h5, ckpt = world
    res = CliRunner().invoke(main, [ckpt, h5, "--split", "test", "--out", str(tmp_path / "t.csv")])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(tmp_path / "t.csv")
    pred, true = oracle_predictions(ckpt, [h5], "test", aux=AUX)
    with h5py.File(h5, "r") as f:
        rows = f["split/test"][()]
        m = f["labels/m"][()]
    assert got["row"].tolist() == rows.tolist()
    np.testing.assert_array_equal(got["m_true"], m[rows])
    np.testing.assert_allclose(got["m_pred"], pred, rtol=1e-5)


def test_cuts_and_legacy_names(world, tmp_path):
    d, raw, h5, ckpt = world
    full = predict(PredictConfig(checkpoint=ckpt, inputs=raw[1:], out=str(tmp_path / "full.csv")))
    out = tmp_path / "cut.parquet"
    res = CliRunner().invoke(main, [ckpt, raw[1], "--cut", "m < 300", "--cuts", "top", "--out", str(out),
                                    "--chunk-size", "2", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    got = pd.read_parquet(out)
    m = pq.read_table(raw[1], columns=["m"])["m"].to_numpy()
    assert got["row"].tolist() == np.flatnonzero(m < 300).tolist() and len(got) > 0
    ref = full[full["source"] == raw[1]].set_index("row").loc[got["row"]]
    np.testing.assert_allclose(got["m_pred"].to_numpy(), ref["m_pred"].to_numpy(), rtol=1e-6)
    # the write-ups' aliases (X_jets, am, apt) and several rows per row group
    legacy = generate(tmp_path / "legacy", SynthConfig(process="top", rows=7, files=1, seed=9,
                                                       rows_per_group=3, legacy_names=True))[0]
    got = predict(PredictConfig(checkpoint=ckpt, inputs=[str(legacy)], out=str(tmp_path / "l.csv"),
                                chunk_size=1))
    assert got["row"].tolist() == list(range(7))
    np.testing.assert_array_equal(got["m_true"], pq.read_table(legacy, columns=["am"])["am"].to_numpy())


def test_bad_inputs_one_line(world, tmp_path):
    d, raw, h5, ckpt = world
    text = tmp_path / "notes.parquet"
    text.write_text("hello")
    other = str(make_file(tmp_path / "other.h5", 10, channels=("track_pt", "dz", "d0", "hcal")))
    not_ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": {}}, not_ckpt)
    exists = tmp_path / "exists.csv"
    exists.write_text("keep me")
    out = str(tmp_path / "o.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([ckpt, raw[0], "--out", str(exists)], ["exists.csv", "--force"]),
        ([ckpt, raw[0], "--out", str(tmp_path / "o.txt")], [".csv or .parquet"]),
        ([ckpt, str(text), "--out", out], [str(text), "neither a Parquet nor an HDF5"]),
        ([ckpt, str(tmp_path / "gone.parquet"), "--out", out], ["gone.parquet", "no such file"]),
        ([ckpt, raw[0], str(Path(raw[0]).parent), "--out", out], [raw[0], "given twice"]),
        ([ckpt, str(empty), "--out", out], [str(empty), "holds no *.parquet"]),
        ([ckpt, other, "--out", out], [other, "track_pt,dz,d0,ecal", "track_pt,dz,d0,hcal"]),
        ([ckpt, raw[0], "--split", "test", "--out", out], [raw[0], "--split"]),
        ([ckpt, h5, "--cuts", "top", "--out", out], [h5, "--cuts"]),
        ([ckpt, raw[0], "--cut", "eta < 1", "--out", out], ["eta", raw[0]]),
        ([str(not_ckpt), raw[0], "--out", out], [str(not_ckpt), "not a massreg checkpoint"]),
    ]
    for args, needles in cases:
        res = CliRunner().invoke(main, args)
        msg = res.output.strip()
        assert res.exit_code != 0, (args, msg)
        assert msg.startswith("Error:") and len(msg.splitlines()) == 1 and "Traceback" not in res.output, msg
        for needle in needles:
            assert needle in msg, (needle, msg)
    assert exists.read_text() == "keep me" and not (tmp_path / "o.csv").exists()
    res = CliRunner().invoke(main, [ckpt, raw[0], "--out", str(exists), "--force"])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(exists)["row"].tolist() == list(range(21))
