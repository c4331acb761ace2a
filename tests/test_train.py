"""Checkpoints, the shared forward path (engine) and the trainer (massreg.train)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from massreg import checkpoint as ck
from massreg import engine
from conftest import RESUME_MODELS, register_model, run_cli, write_layout_file


# ---------------------------------------------------------------- checkpoint

def payload(**extra) -> dict:
    base = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "model_config": {"dim": 8, "depth": 1},
            "train_config": {"lr": 1e-3, "channels": (0, 1)}, "optimizer": None, "scheduler": None,
            "epoch": 3, "step": 30, "best": {"val_loss": 0.5, "val_mre": 0.1},
            "normalizer": {"mode": "stats", "mean": [0.0, 1.0], "std": [1.0, 2.0],
                           "reference_scale": [1.0, 1.0], "channels": ["ecal", "hcal"]},
            "target": {"mean": 290.0, "std": 120.0}, "aux": {"names": [], "mean": [], "std": []},
            "data": {"paths": ["a.h5"], "sizes": [10], "channels": ["ecal", "hcal"]},
            "rng": ck.capture_rng(), "metrics_history": [{"epoch": 1, "val_loss": 0.7}]}
    base.update(extra)
    return base


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, ck.to_plain(payload(extra=np.arange(3), scalar=np.float32(2.5), by_id={0: "a"})))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    got = ck.load_checkpoint(path)
    assert got["format"] == ck.FORMAT and got["version"] == ck.VERSION
    assert torch.equal(got["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert got["extra"] == [0, 1, 2] and got["scalar"] == 2.5 and got["epoch"] == 3
    assert got["by_id"] == {0: "a"}  # int keys stay ints: the optimizer's state is keyed by parameter id
    # the same file must load under the strict unpickler, i.e. it holds no arbitrary objects
    torch.load(path, weights_only=True)


@pytest.mark.parametrize("content, message", [
    (b"this is not a checkpoint", "not a massreg checkpoint"),
    ("dict", "no format"),
    ("version", "version 99"),
    ("missing", "lacks"),
])
def test_load_checkpoint_refuses_foreign_files(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content == "dict":
        torch.save({"state_dict": {}}, path)
    elif content == "version":
        torch.save({**payload(), "format": ck.FORMAT, "version": 99}, path)
    elif content == "missing":
        torch.save({"format": ck.FORMAT, "version": ck.VERSION, "model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match=message) as info:
        ck.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no such checkpoint"):
        ck.load_checkpoint(tmp_path / "nope.pt")


def test_check_model_config_names_differences():
    ckpt = payload()
    ck.check_model_config(ckpt, {"dim": 8, "depth": 1})
    with pytest.raises(ck.CheckpointError, match=r"dim: 8 in checkpoint vs 16 asked"):
        ck.check_model_config(ckpt, {"dim": 16, "depth": 1})


NEW_MODEL_FIELDS = ("family", "stem", "widths", "blocks", "head_dims", "reattn_init")   # added by issue 9


def test_check_model_config_fills_fields_an_old_checkpoint_lacks():
    from dataclasses import asdict

    from massreg.registry import model_config

    tiny = asdict(model_config("tiny", channels=8, num_aux=3))
    old = {k: v for k, v in tiny.items() if k not in NEW_MODEL_FIELDS}
    ck.check_model_config(payload(model_config=old), tiny)               # the same model: no error
    hybrid = asdict(model_config("hybrid", channels=8, num_aux=3))
    with pytest.raises(ck.CheckpointError, match=r"stem: 'patch' in checkpoint vs 'conv' asked"):
        ck.check_model_config(payload(model_config=old), hybrid)
    as_json = {**hybrid, "widths": list(hybrid["widths"]), "blocks": list(hybrid["blocks"])}
    ck.check_model_config(payload(model_config=as_json), hybrid)         # lists (JSON) equal tuples


def test_rng_capture_restore_replays_every_generator():
    state = ck.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(7), random.random()  # move every generator on
    ck.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# ---------------------------------------------------------------- engine.predict

class AffineModel(torch.nn.Module):
    """z = 2 * mean(x) + sum(aux): an output we can compute independently."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, aux=None):
        z = 2 * x.mean(dim=(1, 2, 3)) + self.dummy
        return z if aux is None else z + aux.sum(dim=1)


class Halve(torch.nn.Module):
    def forward(self, images):
        return images.float() / 2


class Scaler:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def encode(self, x):
        return (x - self.mean) / self.std

    def decode(self, z):
        return z * self.std + self.mean


def fake_batches(n=10, batch=4, aux=2, seed=0):
    g = np.random.default_rng(seed)
    images = g.normal(size=(n, 2, 5, 5)).astype(np.float16)
    auxv = g.normal(size=(n, aux)).astype(np.float32)
    m = g.uniform(85, 500, n).astype(np.float32)
    out = [{"images": torch.from_numpy(images[i:i + batch]), "aux": torch.from_numpy(auxv[i:i + batch]),
            "m": torch.from_numpy(m[i:i + batch]), "index": torch.arange(i, min(i + batch, n))}
           for i in range(0, n, batch)]
    return out, images, auxv, m


@pytest.mark.parametrize("with_aux", [False, True])
def test_engine_predict_matches_numpy(with_aux):
    batches, images, auxv, m = fake_batches()
    model = AffineModel().train()
    aux_scaler = Scaler(np.float32(0.5), np.float32(2.0)) if with_aux else None
    out = engine.predict(model, batches, normalizer=Halve(), target=Scaler(300.0, 100.0),
                         aux_scaler=aux_scaler, device="cpu", amp=True)  # amp is a no-op on CPU
    z = 2 * (images.astype(np.float64) / 2).mean(axis=(1, 2, 3))
    if with_aux:
        z = z + ((auxv - 0.5) / 2.0).sum(axis=1)
    np.testing.assert_allclose(out["pred"], z * 100 + 300, rtol=1e-5)
    np.testing.assert_array_equal(out["true"], m.astype(np.float64))
    np.testing.assert_array_equal(out["index"], np.arange(10))
    assert out["pred"].shape == (10,) and model.training  # mode restored


def test_engine_predict_empty_loader():
    out = engine.predict(AffineModel(), [], normalizer=Halve(), target=Scaler(0, 1))
    assert out["pred"].shape == out["true"].shape == out["index"].shape == (0,)


# ---------------------------------------------------------------- a small file in the HDF5 layout

# ---------------------------------------------------------------- trainer helpers

def test_lr_schedules_match_torch():
    from massreg.optim import lr_at
    from massreg.recipes import build_config

    seed = build_config("seed", data=("x.h5",), model="tiny")
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=seed.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=seed.gamma)  # the write-up's, stepped per epoch
    steps_per_epoch = 3
    for epoch in range(5):
        for s in range(steps_per_epoch):
            assert lr_at(seed, epoch * steps_per_epoch + s, steps_per_epoch) == pytest.approx(
                opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    c = build_config("default", data=("x.h5",), epochs=10, lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.01)
    lrs = [lr_at(c, s, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up over 10 steps
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))                    # then decays monotonically


def test_recipes_and_overrides():
    from massreg.recipes import TrainConfig, build_config

    seed = build_config("seed", data=("x.h5",))
    # the original write-up, field by field
    assert (seed.optimizer, seed.lr, seed.weight_decay, seed.schedule, seed.gamma, seed.batch_size,
            seed.epochs, seed.loss, seed.norm, seed.aux, seed.flips, seed.model, seed.grad_clip) == \
        ("adam", 1e-3, 1e-4, "exponential", 0.4, 32, 25, "mse", "stats", False, False, "seed", 0.0)
    c = build_config("seed", data=("x.h5",), lr=3e-4, loss="l1", device="cpu")
    assert (c.recipe, c.lr, c.loss, c.batch_size) == ("seed", 3e-4, "l1", 32)
    assert c.overrides == ("device", "loss", "lr")
    assert build_config(data=("x.h5",)).recipe == "default" and TrainConfig().model == "seed"
    # the default recipe's peak lr follows the model (seed 1e-4: 1e-3 barely trains it), unless --lr is given
    assert build_config(data=("x.h5",)).lr == 1e-4
    assert (build_config(data=("x.h5",), model="tiny").lr == build_config(data=("x.h5",), model="small").lr
            == 1e-3)
    from massreg.registry import PRESETS
    from massreg.recipes import DEFAULT_LR
    assert set(DEFAULT_LR) == set(PRESETS)                                   # every preset has its lr
    lrs = {m: build_config(data=("x.h5",), model=m).lr for m in ("resnet", "hybrid", "hybrid-seed")}
    assert lrs == {"resnet": 1e-3, "hybrid": 1e-3, "hybrid-seed": 1e-4}
    c = build_config(data=("x.h5",), model="seed", lr=5e-4)
    assert (c.lr == 5e-4 and "lr" in c.overrides
            and build_config("seed", data=("x.h5",), model="tiny").lr == 1e-3)


@pytest.mark.parametrize("options, message", [
    (dict(batch_size=0), "--batch-size must be > 0"),
    (dict(epochs=0), "--epochs must be > 0"),
    (dict(lr=-1.0), "--lr must be > 0"),
    (dict(loss="l3"), "--loss 'l3'"),
    (dict(model="huge"), "--model 'huge'"),
    (dict(resume="runs/a", force=True), "give one of them"),
    (dict(resume="runs/a", run_dir="runs/b"), "drop --run-dir"),
    (dict(data=()), "at least one DATA.h5"),
    (dict(max_train_samples=0), "--max-train-samples"),
    (dict(model="resnet", patch_norm=False), "--no-patch-norm: the resnet model has no patch norm"),
    (dict(model="hybrid", patch_norm=True), "--patch-norm: the hybrid model has no patch norm"),
])
def test_invalid_options_are_refused_before_work(options, message):
    from massreg.recipes import ConfigError, build_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config("default", **{"data": ("x.h5",), **options})


def test_force_removes_only_run_files(tmp_path):
    from massreg.recipes import ConfigError, build_config
    from massreg.rundir import prepare_run_dir

    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    for name in ("last.pt", "metrics.csv", "notes.txt"):
        (run / name).write_text("x")
    with pytest.raises(ConfigError, match="already holds a run .*--resume"):
        prepare_run_dir(build_config(data=("x.h5",), run_dir=str(run)))
    prepare_run_dir(build_config(data=("x.h5",), run_dir=str(run), force=True))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- the trainer, end to end

TINY = ["--model", "tiny", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_layout_file(tmp_path_factory.mktemp("data") / "top.h5", n=48)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_file):
    """One 2-epoch run of the default recipe (aux, flips, reference norm), recording which splits were
    opened."""
    from massreg import dataset as data

    opened = []
    original = data.H5Images.__init__

    def spy(self, paths, split="train", **kw):
        opened.append(split)
        original(self, paths, split, **kw)

    run = tmp_path_factory.mktemp("runs") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data.H5Images, "__init__", spy)
        result = run_cli([data_file, *TINY, "--epochs", 2, "--run-dir", run, "--amp"])
    assert result.exit_code == 0, result.output
    return run, result.output, opened


def test_run_dir_contents(tiny_run, data_file):
    import pandas as pd

    run, output, opened = tiny_run
    assert "test" not in opened and set(opened) == {"train", "val"}  # the test split is never read
    assert "--amp (bf16 autocast) applies on CUDA only" in output
    assert output.count("epoch 1/2") == 1 and "val_mae" in output
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.csv", "last.pt", "best_val_loss.pt", "best_mre.pt", "plots"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    plots = sorted(p.name for p in (run / "plots").iterdir())
    assert plots == ["history.png", "val_pred_vs_true.png", "val_residuals.png",
                     "val_response_resolution.png"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["recipe"] == "default" and cfg["train"]["model"] == "tiny"
    assert cfg["train"]["batch_size"] == 8 and "batch_size" in cfg["train"]["overrides"]
    assert cfg["train"]["loss"] == "huber" and cfg["model"]["num_aux"] == 3
    df = pd.read_csv(run / "metrics.csv")
    assert list(df.columns) == ["epoch", "train_loss", "val_loss", "val_mae", "val_mre", "val_resolution",
                                "lr", "seconds", "samples_per_s"]
    assert df["epoch"].tolist() == [1, 2] and df.notna().all().all()
    last = ck.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 2 * 3  # 24 train rows / batch 8
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in last["model"])
    assert (last["train_config"]["data"] == [str(data_file)]
            or last["train_config"]["data"] == (str(data_file),))


def test_best_checkpoint_reproduces_logged_val_metrics(tiny_run, data_file):
    """Oracle: rebuild the model from best_val_loss.pt alone, predict val by hand, MAE with numpy."""
    import pandas as pd

    from massreg.dataset import H5Images

    run, _, _ = tiny_run
    ckpt = ck.load_checkpoint(run / "best_val_loss.pt")
    r = ck.restore(ckpt, "cpu")
    val = H5Images(data_file, "val", aux=("pt", "ieta", "iphi"))
    batch = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        z = r.model(r.normalizer(batch["images"]), r.aux_scaler.encode(batch["aux"])).double().numpy()
    z = z[:, 1] if z.ndim == 2 else z              # the default recipe's quantiles: [q16, point, q84]
    pred = z * ckpt["target"]["std"] + ckpt["target"]["mean"]
    true = batch["m"].double().numpy()
    row = pd.read_csv(run / "metrics.csv").set_index("epoch").loc[ckpt["best"]["epoch_val_loss"]]
    assert np.mean(np.abs(pred - true)) == pytest.approx(row["val_mae"], rel=1e-5)
    assert np.mean(np.abs(pred - true) / true) == pytest.approx(row["val_mre"], rel=1e-5)
    assert ckpt["best"]["val_loss"] == pytest.approx(row["val_loss"])


def test_existing_run_dir_is_refused(tiny_run, data_file):
    run, _, _ = tiny_run
    result = run_cli([data_file, *TINY, "--epochs", 1, "--run-dir", run])
    assert result.exit_code == 1 and "already holds a run" in result.output and "--resume" in result.output


def test_resume_with_another_model_is_refused(tiny_run):
    run, _, _ = tiny_run
    result = run_cli(["--resume", run, "--model", "small", "--epochs", 3])
    assert result.exit_code == 1
    assert "holds another model" in result.output and "dim: 64" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert ck.load_checkpoint(run / "last.pt")["epoch"] == 2  # untouched


def test_checkpoint_from_before_the_model_families_restores_and_resumes(tiny_run, tmp_path, monkeypatch):
    """Checkpoints written before ModelConfig had family/stem/widths/blocks/head_dims: the fields they lack
    default to the model they hold (a DeepViT with the linear patch embedding); restore and --resume work."""
    import shutil

    from massreg.model import DeepViT

    run, _, _ = tiny_run
    old_run = tmp_path / "old"
    shutil.copytree(run, old_run)
    for name in ("last.pt", "best_val_loss.pt"):
        ckpt = ck.load_checkpoint(old_run / name)
        ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k not in NEW_MODEL_FIELDS}
        ck.save_checkpoint(old_run / name, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    assert "family" not in ck.load_checkpoint(old_run / "last.pt")["model_config"]
    r = ck.restore(ck.load_checkpoint(old_run / "best_val_loss.pt"))
    assert isinstance(r.model, DeepViT)
    assert (r.model_config.family, r.model_config.stem) == ("deepvit", "patch")
    monkeypatch.setattr("massreg.trainer.make_plots", lambda *a, **k: None)
    result = run_cli(["--resume", old_run, "--epochs", 3])
    assert result.exit_code == 0, result.output
    last = ck.load_checkpoint(old_run / "last.pt")
    assert last["epoch"] == 3 and last["model_config"]["family"] == "deepvit"


def test_resume_with_other_settings_is_refused(tiny_run):
    run, _, _ = tiny_run
    result = run_cli(["--resume", run, "--lr", "0.5", "--epochs", 3])
    assert result.exit_code == 1 and "lr=0.5" in result.output


@pytest.mark.parametrize("kind, message", [("version", "format_version is 2"),
                                           ("missing", "missing /split/val"),
                                           ("text", "not an HDF5 file")])
def test_file_not_in_layout_is_a_one_line_error(tmp_path, kind, message):
    path = tmp_path / "bad.h5"
    if kind == "text":
        path.write_text("hello")
    else:
        write_layout_file(path, n=8, version=2 if kind == "version" else None,
                          drop="split/val" if kind == "missing" else None)
    result = run_cli([path, *TINY, "--epochs", 1, "--run-dir", tmp_path / "run"])
    assert result.exit_code == 1, result.output
    assert message in result.output and str(path) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "config.json").exists()


# Small models of each family with dropout on, registered as presets for the resume tests.


@pytest.mark.parametrize("model", list(RESUME_MODELS))
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, data_file, monkeypatch, model):
    """2 epochs straight vs 1 epoch, stop, --resume for the 2nd: same weights (BatchNorm statistics
    included), optimizer state and metrics.

    The model has dropout and the recipe shuffles, flips and feeds aux, so every RNG path is exercised."""
    import pandas as pd

    from massreg.recipes import build_config

    from massreg.trainer import train

    monkeypatch.setattr("massreg.trainer.make_plots", lambda *a, **k: None)  # plots are tested elsewhere; slow
    register_model(monkeypatch, model)
    opts = dict(data=(str(data_file),), model=model, batch_size=8, epochs=2, device="cpu", seed=3)
    quiet = lambda *a, **k: None  # noqa: E731
    train(build_config(**opts, run_dir=str(tmp_path / "straight")), echo=quiet)
    stopped = train(build_config(**opts, run_dir=str(tmp_path / "resumed")), stop_after_epochs=1, echo=quiet)
    assert stopped["epoch"] == 1 and ck.load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    result = run_cli(["--resume", tmp_path / "resumed"])
    assert result.exit_code == 0, result.output

    a, b = (ck.load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    cols = ["epoch", "train_loss", "val_loss", "val_mae", "val_mre", "val_resolution", "lr"]
    da, db = (pd.read_csv(tmp_path / r / "metrics.csv")[cols] for r in ("straight", "resumed"))
    pd.testing.assert_frame_equal(da, db, check_exact=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_file, monkeypatch):
    calls = {"n": 0}
    real_forward = engine.forward

    def poisoned(model, batch, **kw):
        z = real_forward(model, batch, **kw)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:  # epoch 2, its 2nd step (3 steps per epoch)
                z = z * float("nan")
        return z

    monkeypatch.setattr(engine, "forward", poisoned)
    run = tmp_path / "run"
    result = run_cli([data_file, *TINY, "--epochs", 3, "--run-dir", run])
    assert result.exit_code == 1
    assert "non-finite loss" in result.output and "epoch 2, step 5" in result.output
    assert f"{run}/last.pt (epoch 1)" in result.output
    last = ck.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2  # header + epoch 1


def test_block_order_resumed_with_worker_processes_gives_the_same_weights(tmp_path, data_file, monkeypatch):
    """--shuffle block, 2 epochs straight with reader threads vs 1 epoch, stop, --resume with --workers 1
    (a persistent worker process reading into shared buffers): the same images in the same order, so the
    same weights."""
    from massreg.recipes import build_config
    from massreg.trainer import train

    monkeypatch.setattr("massreg.trainer.make_plots", lambda *a, **k: None)
    register_model(monkeypatch, "tiny-dropout")
    opts = dict(data=(str(data_file),), model="tiny-dropout", batch_size=8, epochs=2, device="cpu", seed=4,
                shuffle="block")
    quiet = lambda *a, **k: None  # noqa: E731
    train(build_config(**opts, run_dir=str(tmp_path / "straight")), echo=quiet)
    train(build_config(**opts, run_dir=str(tmp_path / "resumed")), stop_after_epochs=1, echo=quiet)
    result = run_cli(["--resume", tmp_path / "resumed", "--workers", 1])
    assert result.exit_code == 0, result.output
    a, b = (ck.load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "resumed"))
    assert a["train_config"]["shuffle"] == b["train_config"]["shuffle"] == "block"
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
