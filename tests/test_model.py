"""massreg.model, massreg.config: shapes, equality with vit-pytorch's DeepViT, gradients, dropout, presets,
the model families (DeepViT with a patch or conv stem, ResNet) behind one build_model."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict

import pytest
import torch
from torch import nn

from massreg.registry import PRESETS, ModelConfig, build_model, complete, model_config
from massreg.model import Attention, DeepViT, Dropout, HeadNorm, ResNet, ResidualBlock

TINY = dict(image_size=125, patch_size=25, channels=4, dim=32, depth=3, heads=4, dim_head=8, mlp_dim=64,
            dropout=0.0, emb_dropout=0.0)


def load_reference():
    """vit-pytorch's deepvit.py loaded by file path: its package __init__ imports torchvision, absent here."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        pytest.skip("vit-pytorch is not installed (make setup installs it with --no-deps)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "deepvit.py")
    module_spec = importlib.util.spec_from_file_location("vit_pytorch_deepvit_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def reference_model(cfg: dict) -> nn.Module:
    """vit-pytorch's DeepViT for the same configuration (one output, cls pooling)."""
    keep = ("image_size", "patch_size", "channels", "dim", "depth", "heads", "dim_head", "mlp_dim", "dropout",
            "emb_dropout")
    return load_reference().DeepViT(num_classes=1, pool="cls", **{k: cfg[k] for k in keep})


def name_map(depth: int) -> dict[str, str]:
    """vit-pytorch state_dict name -> ours, written out (Sequential indices there, names here)."""
    names = {
        "to_patch_embedding.1.weight": "patch_norm.weight",   # LayerNorm over the raw patch pixels
        "to_patch_embedding.1.bias": "patch_norm.bias",
        "to_patch_embedding.2.weight": "patch_to_embedding.weight",
        "to_patch_embedding.2.bias": "patch_to_embedding.bias",
        "to_patch_embedding.3.weight": "embedding_norm.weight",
        "to_patch_embedding.3.bias": "embedding_norm.bias",
        "pos_embedding": "pos_embedding",
        "cls_token": "cls_token",
        "mlp_head.0.weight": "head_norm.weight",
        "mlp_head.0.bias": "head_norm.bias",
        "mlp_head.1.weight": "head.weight",
        "mlp_head.1.bias": "head.bias",
    }
    for i in range(depth):
        ref, ours = f"transformer.layers.{i}", f"transformer.layers.{i}"
        names.update({
            f"{ref}.0.norm.weight": f"{ours}.attn.norm.weight",
            f"{ref}.0.norm.bias": f"{ours}.attn.norm.bias",
            f"{ref}.0.to_qkv.weight": f"{ours}.attn.to_qkv.weight",
            f"{ref}.0.reattn_weights": f"{ours}.attn.reattn_weights",
            f"{ref}.0.reattn_norm.1.weight": f"{ours}.attn.reattn_norm.weight",   # 1: between Rearranges
            f"{ref}.0.reattn_norm.1.bias": f"{ours}.attn.reattn_norm.bias",
            f"{ref}.0.to_out.0.weight": f"{ours}.attn.to_out.weight",
            f"{ref}.0.to_out.0.bias": f"{ours}.attn.to_out.bias",
            f"{ref}.1.net.0.weight": f"{ours}.ff.net.0.weight",
            f"{ref}.1.net.0.bias": f"{ours}.ff.net.0.bias",
            f"{ref}.1.net.1.weight": f"{ours}.ff.net.1.weight",
            f"{ref}.1.net.1.bias": f"{ours}.ff.net.1.bias",
            f"{ref}.1.net.4.weight": f"{ours}.ff.net.4.weight",
            f"{ref}.1.net.4.bias": f"{ours}.ff.net.4.bias",
        })
    return names


def paired_models(cfg: dict, seed: int = 0) -> tuple[nn.Module, DeepViT]:
    """The reference with every parameter random (LayerNorm affines too, so a mixed-up axis or affine shows),
    and our model holding the same weights through `name_map`."""
    torch.manual_seed(seed)
    ref = reference_model(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("weight") and p.dim() == 1:       # LayerNorm gains: around 1, never 0
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.3, 0.3)
    ours = DeepViT(**cfg)
    mapping = name_map(cfg["depth"])
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert set(mapping) == set(ref_state), set(mapping) ^ set(ref_state)
    assert set(mapping.values()) == set(our_state), set(mapping.values()) ^ set(our_state)
    ours.load_state_dict({mapping[k]: v for k, v in ref_state.items()})
    return ref, ours


def sparse_images(b: int, c: int, size: int = 125, seed: int = 1) -> torch.Tensor:
    """Mostly-zero images like the detector's: whole empty patches exercise the LayerNorm's eps path."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, size, size, generator=g).abs() * 3
    return x * (torch.rand(b, c, size, size, generator=g) < 0.05)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ shapes / checks

@pytest.mark.parametrize("channels", [4, 8])
@pytest.mark.parametrize("num_aux", [0, 3])
@pytest.mark.parametrize("patch_size", [5, 25])
def test_output_shape(channels, num_aux, patch_size):
    cfg = model_config("tiny", channels=channels, num_aux=num_aux, patch_size=patch_size, depth=1)
    model = build_model(cfg).eval()
    aux = torch.randn(3, num_aux) if num_aux else None
    with torch.no_grad():
        out = model(torch.randn(3, channels, 125, 125), aux)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_patch_size_must_divide_image():
    with pytest.raises(AssertionError, match="patch_size 10 must divide image_size 125"):
        DeepViT(**{**TINY, "patch_size": 10})
    with pytest.raises(ValueError, match=r"patch_size 10 must divide image_size 125; "
                                         r"choose one of \[1, 5, 25, 125\]"):
        model_config("tiny", patch_size=10)


@pytest.mark.parametrize("field,value",
                         [("heads", 0), ("depth", 0), ("dim", 0), ("num_aux", -1), ("dropout", 1.0)])
def test_impossible_configs_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        model_config("tiny", **{field: value})
    with pytest.raises(AssertionError, match=field):
        DeepViT(**{**TINY, field: value})


def test_bad_inputs_named():
    model = DeepViT(**TINY, num_aux=2).eval()
    with pytest.raises(ValueError, match=r"expects images \(B, 4, 125, 125\), got \(2, 8, 125, 125\)"):
        model(torch.zeros(2, 8, 125, 125), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="num_aux=2 was called with no aux"):
        model(torch.zeros(2, 4, 125, 125))
    with pytest.raises(ValueError, match=r"aux must be \(B, 2\)"):
        model(torch.zeros(2, 4, 125, 125), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_aux=0 was called with aux"):
        DeepViT(**TINY).eval()(torch.zeros(2, 4, 125, 125), torch.zeros(2, 2))


# ----------------------------------------------------------------------------- equivalence with vit-pytorch

def max_abs_diff(ref: nn.Module, ours: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = ref(x)                     # (B, 1)
        got = ours(x)                         # (B,)
    assert expected.shape == (x.shape[0], 1) and got.shape == (x.shape[0],)
    return (got - expected[:, 0]).abs().max().item()


@pytest.mark.parametrize("cfg", [
    TINY,
    {**TINY, "channels": 8, "heads": 8, "dim_head": 4},
    {**TINY, "dropout": 0.3, "emb_dropout": 0.2},                       # dropout > 0, eval mode
    {**TINY, "patch_size": 5, "depth": 1},                              # 625 patches of 5 x 5
], ids=["tiny", "8ch-8heads", "dropout-eval", "patch5"])
def test_equals_vit_pytorch_deepvit(cfg):
    ref, ours = paired_models(cfg)
    assert n_params(ours) == n_params(ref)
    ref.eval(), ours.eval()
    x = sparse_images(4, cfg["channels"])
    with torch.no_grad():
        scale = ref(x).abs().max().item()
    assert scale > 0.1                                          # a real signal, not a trivially small output
    assert max_abs_diff(ref, ours, x) < 1e-5


def test_gradients_equal_vit_pytorch_deepvit():
    """Same loss -> same gradient for every parameter: the cls-only last layer changes no gradient."""
    ref, ours = paired_models(TINY, seed=3)
    ref.train(), ours.train()                                   # dropout 0: train mode is deterministic
    x, y = sparse_images(4, 4, seed=2), torch.randn(4)
    torch.nn.functional.mse_loss(ref(x)[:, 0], y).backward()
    torch.nn.functional.mse_loss(ours(x), y).backward()
    ours_params = dict(ours.named_parameters())
    for ref_name, our_name in name_map(TINY["depth"]).items():
        g_ref = dict(ref.named_parameters())[ref_name].grad
        g_ours = ours_params[our_name].grad
        assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-6), ref_name


@pytest.mark.parametrize("mutation", ["no-reattn-norm", "no-head-mixing", "norm-over-keys"])
def test_equivalence_check_catches_mutations(mutation):
    """The comparison above fails when a piece of re-attention is dropped or misplaced."""
    ref, ours = paired_models(TINY)
    ref.eval(), ours.eval()
    x = sparse_images(4, 4)
    for layer in ours.transformer.layers:
        attn = layer.attn
        if mutation == "no-reattn-norm":
            attn.reattn_norm = nn.Identity()
        elif mutation == "no-head-mixing":
            with torch.no_grad():
                attn.reattn_weights.copy_(torch.eye(attn.heads))
        else:  # LayerNorm over the last axis of the (B, h, i, j) layout, i.e. over the keys j
            attn.reattn_norm = NormOverKeys(attn.reattn_norm)
    assert max_abs_diff(ref, ours, x) > 1e-3


class NormOverKeys(nn.Module):
    """Wrong on purpose: applied to (B, h, i, j), normalises over j (the keys) instead of h (the heads)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, attn):                                    # (B, h, i, j)
        z = torch.nn.functional.layer_norm(attn, attn.shape[-1:])
        return z * self.norm.weight.view(1, -1, 1, 1) + self.norm.bias.view(1, -1, 1, 1)


def test_seed_preset_parameter_count_matches_reference():
    with torch.device("meta"):                  # shapes only: no 2 x 40 M values to initialise
        ours, ref = build_model(model_config("seed")), reference_model(asdict(model_config("seed")))
    assert n_params(ours) == n_params(ref) == 40_397_161


# ------------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("options", [dict(), dict(num_aux=3, patch_norm=False, dropout=0.1, emb_dropout=0.1)],
                         ids=["reference", "aux-nopatchnorm-dropout"])
def test_backward_every_parameter_gets_a_gradient(options):
    torch.manual_seed(0)
    model = build_model(model_config("tiny", depth=2, **options)).train()
    aux = torch.randn(4, options["num_aux"]) if options.get("num_aux") else None
    out = model(sparse_images(4, 4), aux)
    torch.nn.functional.mse_loss(out, torch.randn(4)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def test_aux_changes_the_output():
    model = build_model(model_config("tiny", num_aux=3)).eval()
    x = sparse_images(2, 4)
    with torch.no_grad():
        a, b = model(x, torch.zeros(2, 3)), model(x, torch.ones(2, 3))
    assert (a - b).abs().min() > 1e-4


def test_patch_norm_off_keeps_energy_scale():
    """With the pixel LayerNorm, scaling an image's energies cannot change the prediction (LayerNorm is
    scale-invariant up to eps); without it, it can. Only once the projection has a bias, as after training: at
    initialisation (bias 0) the LayerNorm after the projection divides the scale out too."""
    x = sparse_images(1, 4)
    models = {}
    for patch_norm in (True, False):
        torch.manual_seed(0)
        models[patch_norm] = build_model(model_config("tiny", patch_norm=patch_norm)).eval()
        with torch.no_grad():
            models[patch_norm].patch_to_embedding.bias.uniform_(-0.05, 0.05)
    assert "patch_norm.weight" not in models[False].state_dict()
    def tokens(model, images):                                # (B, patches, dim), what the transformer sees
        return model.embedding_norm(model.patch_to_embedding(model.patch_norm(model.to_patches(images))))

    with torch.no_grad():
        assert (tokens(models[True], x) - tokens(models[True], 3 * x)).abs().max().item() < 1e-4
        assert (tokens(models[False], x) - tokens(models[False], 3 * x)).abs().max().item() > 1e-2
        assert (models[True](x) - models[True](3 * x)).abs().item() < 1e-5


# -------------------------------------------------------------------------------------------------- dropout

def test_dropout_distribution_and_gradient():
    p = 0.1
    drop = Dropout(p).train()
    x = torch.rand(1_000_000) + 0.5                                 # never 0, so dropped = exactly 0
    x.requires_grad_(True)
    torch.manual_seed(5)
    y = drop(x)
    kept = y != 0
    # keep fraction 1 - p: binomial std sqrt(p (1-p) / n) = 3e-4, allow 5 std
    assert abs(kept.float().mean().item() - (1 - p)) < 1.5e-3
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))            # d y / d x = mask / (1 - p)
    torch.manual_seed(5)
    assert torch.equal(drop(x.detach()), y.detach())              # the global seed reproduces the mask
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


def test_dropout_masks_are_independent_between_calls():
    drop = Dropout(0.5).train()
    a, b = drop(torch.ones(10_000)) != 0, drop(torch.ones(10_000)) != 0
    # agreement of two independent Bernoulli(0.5) masks: 0.5 +- 0.005 (1 std)
    assert abs((a == b).float().mean().item() - 0.5) < 0.03


# --------------------------------------------------------------------------------------------------- config

def test_presets():
    seed = PRESETS["seed"]
    assert (seed.patch_size, seed.dim, seed.depth, seed.heads, seed.dim_head, seed.mlp_dim, seed.dropout,
            seed.emb_dropout, seed.channels, seed.num_aux, seed.patch_norm) == (
        25, 1024, 6, 8, 64, 2048, 0.1, 0.1, 4, 0, True)             # the write-up's model
    assert PRESETS["tiny"].dropout == 0.0 and n_params(build_model(PRESETS["tiny"])) < 500_000
    assert set(PRESETS) == {"seed", "small", "tiny", "hybrid", "hybrid49", "hybrid-seed", "resnet",
                            "resnet-wide"}


def test_model_config_overrides_copy_and_round_trip():
    cfg = model_config("small", channels=8, num_aux=3)
    assert (cfg.channels, cfg.num_aux, cfg.dim) == (8, 3, PRESETS["small"].dim)
    cfg.dim = 7
    assert PRESETS["small"].dim == 256                               # presets are not shared objects
    assert ModelConfig(**asdict(cfg)) == cfg                         # what a checkpoint stores rebuilds it


def test_model_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model preset 'huge'; choose one of: seed, small, tiny, "):
        model_config("huge")
    with pytest.raises(ValueError, match="unknown model option.*depht"):
        model_config("tiny", depht=3)


# ------------------------------------------------------------------------------------ the model families

# Every preset at a test size: its structure (family, stem, blocks per stage, token grid) kept, widths cut.
SMALL = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=16)
TEST_SIZE = {
    "seed": dict(SMALL),
    "small": dict(SMALL),
    "tiny": dict(SMALL),
    "hybrid": dict(SMALL, widths=(4, 8)),
    "hybrid49": dict(SMALL, widths=(4, 8, 8)),
    "hybrid-seed": dict(SMALL, widths=(4, 8)),
    "resnet": dict(widths=(4, 8, 8, 8), head_dims=(8,)),
    "resnet-wide": dict(widths=(4, 4, 8, 8), head_dims=(8,)),
}


def test_every_preset_has_a_test_size():
    assert set(TEST_SIZE) == set(PRESETS)


@pytest.mark.parametrize("preset", list(TEST_SIZE))
@pytest.mark.parametrize("num_aux", [0, 3])
def test_family_output_shape(preset, num_aux):
    cfg = model_config(preset, channels=8, num_aux=num_aux, **TEST_SIZE[preset])
    model = build_model(cfg).eval()
    assert isinstance(model, ResNet if cfg.family == "resnet" else DeepViT)
    aux = torch.randn(3, num_aux) if num_aux else None
    with torch.no_grad():
        out = model(sparse_images(3, 8), aux)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", list(TEST_SIZE))
def test_family_backward_every_parameter_gets_a_gradient(preset):
    """Train mode (BatchNorm on batch statistics, dropout on where the preset has it). The zero-gamma init
    of each residual block's last BatchNorm gives that block's branch no gradient at step 0 by design, so the
    gammas are set off 0 first: then a parameter without a gradient is one cut off from the output."""
    torch.manual_seed(0)
    model = build_model(model_config(preset, channels=8, num_aux=3, **TEST_SIZE[preset])).train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    out = model(sparse_images(4, 8), torch.randn(4, 3))
    torch.nn.functional.mse_loss(out, torch.randn(4)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("preset", ["hybrid", "resnet"])
def test_family_bad_inputs_named(preset):
    model = build_model(model_config(preset, channels=4, num_aux=2, **TEST_SIZE[preset])).eval()
    expects = rf"{type(model).__name__} expects images \(B, 4, 125, 125\), got"
    name = type(model).__name__
    with pytest.raises(ValueError, match=rf"{expects} \(2, 8, 125, 125\)"):
        model(torch.zeros(2, 8, 125, 125), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=rf"{expects} \(2, 4, 64, 64\)"):
        model(torch.zeros(2, 4, 64, 64), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=f"{name} built with num_aux=2 was called with no aux"):
        model(torch.zeros(2, 4, 125, 125))
    with pytest.raises(ValueError, match=r"aux must be \(B, 2\)"):
        model(torch.zeros(2, 4, 125, 125), torch.zeros(2, 3))
    plain = build_model(model_config(preset, channels=4, **TEST_SIZE[preset])).eval()
    with pytest.raises(ValueError, match="num_aux=0 was called with aux"):
        plain(torch.zeros(2, 4, 125, 125), torch.zeros(2, 2))


# Parameters with 8 channels and 3 aux scalars (the default recipe's inputs), and the transformer's tokens.
PRESET_SIZES = {"tiny": (465_585, 25), "hybrid": (231_649, 169), "hybrid49": (865_569, 49),
                "hybrid-seed": (13_452_641, 169), "resnet": (409_601, None), "resnet-wide": (2_830_977, None)}


@pytest.mark.parametrize("preset", list(PRESET_SIZES))
def test_preset_parameter_counts_and_tokens(preset):
    cfg = model_config(preset, channels=8, num_aux=3)
    with torch.device("meta"):
        model = build_model(cfg)
    assert (n_params(model), cfg.tokens()) == PRESET_SIZES[preset]
    if cfg.family == "deepvit":
        assert model.pos_embedding.shape == (1, cfg.tokens() + 1, cfg.dim)


@pytest.mark.parametrize("preset", ["hybrid", "hybrid49"])
def test_conv_stem_token_grid(preset):
    """The conv stem's output grid is what the position table was sized for: 25 -> 13 (-> 7)."""
    cfg = model_config(preset, channels=8, **TEST_SIZE[preset])
    model = build_model(cfg).eval()
    with torch.no_grad():
        tokens = model.to_patches(sparse_images(2, 8))
    assert tokens.shape == (2, cfg.tokens(), cfg.widths[-1]) and cfg.tokens() == {"hybrid": 169,
                                                                                   "hybrid49": 49}[preset]


def test_resnet_structure_and_init():
    model = build_model(model_config("resnet", channels=8, num_aux=3)).train()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 1 + 2 + 2 + 1
    assert [b.conv1.stride[0] for b in blocks] == [2, 2, 1, 2, 1, 2]          # stride 2 at each stage start
    assert all(torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight)) for b in blocks)   # zero-gamma
    assert [type(b.shortcut).__name__ for b in blocks] == ["Sequential", "Sequential", "Identity",
                                                           "Sequential", "Identity", "Sequential"]
    # At the start every block is its shortcut: a block with an identity shortcut passes its input through
    x = torch.relu(torch.randn(2, 32, 16, 16))
    with torch.no_grad():
        assert torch.equal(blocks[2](x), x)
    # ... and the first predictions sit near 0, the standardised mean (BatchNorm'd features, a small head)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(sparse_images(16, 8, seed=4), torch.randn(16, 3))
    assert out.abs().max() < 0.5 and out.std() > 0


def token_similarity_by_layer(model: DeepViT, images, aux) -> list[float]:
    """Mean cosine similarity of patch token 1 with the others, at the input of each layer's attention."""
    sims = []

    def hook(module, inputs, output):
        x = inputs[0]
        sims.append(torch.nn.functional.cosine_similarity(x[:, 1:2], x[:, 2:], dim=-1).mean().item())

    handles = [layer.attn.register_forward_hook(hook) for layer in model.transformer.layers]
    with torch.no_grad():
        model(images, aux)
    for handle in handles:
        handle.remove()
    return sims


@pytest.mark.parametrize("seed", [0, 1])
def test_scaled_reattention_init_keeps_tokens_apart(seed):
    """After the LayerNorm over heads an attention map is no softmax row: attn @ v sums O(1) weights over
    all keys. At the reference's gain 1 and 170 keys that sum swamps the residual stream and the tokens
    collapse onto one direction layer by layer (on generated top jets `hybrid` then stayed at the constant
    prediction for 3 epochs; with the scaled gain it reached 0.74x the constant's MAE). The hybrids start
    the gain at 1/sqrt(keys)."""
    cfg = model_config("hybrid", channels=8, num_aux=3)
    assert cfg.reattn_init == "scaled" and PRESETS["tiny"].reattn_init == PRESETS["seed"].reattn_init == \
        "reference"
    x, aux = sparse_images(8, 8, seed=seed), torch.randn(8, 3)
    torch.manual_seed(seed)
    scaled = build_model(cfg).train()
    assert torch.allclose(scaled.transformer.layers[0].attn.reattn_norm.weight, torch.full((4,), 170 ** -0.5))
    torch.manual_seed(seed)
    reference = build_model(model_config("hybrid", channels=8, num_aux=3, reattn_init="reference")).train()
    assert torch.equal(reference.transformer.layers[0].attn.reattn_norm.weight, torch.ones(4))
    assert max(token_similarity_by_layer(scaled, x, aux)) < 0.4
    assert token_similarity_by_layer(reference, x, aux)[-1] > 0.8              # the collapse it prevents


# ------------------------------------------------------------------------------- re-attention, written out

def naive_reattention(attn_module: Attention, x: torch.Tensor) -> torch.Tensor:
    """vit-pytorch's Attention.forward, written out with einsums on the heads-last LayerNorm it uses."""
    h, d = attn_module.heads, attn_module.dim_head
    x = attn_module.norm(x)
    q, k, v = (t.reshape(x.shape[0], x.shape[1], h, d).permute(0, 2, 1, 3)
               for t in attn_module.to_qkv(x).chunk(3, dim=-1))                    # (B, h, N, d) each
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * attn_module.scale
    attn = dots.softmax(dim=-1)
    attn = torch.einsum("bhij,hg->bgij", attn, attn_module.reattn_weights)          # mix the heads
    norm = attn_module.reattn_norm
    attn = torch.nn.functional.layer_norm(attn.permute(0, 2, 3, 1), (h,), norm.weight, norm.bias, norm.eps)
    out = torch.einsum("bijh,bhjd->bihd", attn, v).reshape(x.shape[0], x.shape[1], h * d)
    return attn_module.to_out(out)


@pytest.mark.parametrize("heads", [4, 8])
def test_reattention_equals_naive_einsums_float64(heads):
    """HeadNorm's hand-written forward/backward and the heads-first mixing against the plain formula."""
    torch.manual_seed(heads)
    attn = Attention(dim=16, heads=heads, dim_head=4).double()
    with torch.no_grad():
        attn.reattn_norm.weight.uniform_(0.5, 1.5)                 # affines off 1 / 0, so a wrong axis shows
        attn.reattn_norm.bias.uniform_(-0.3, 0.3)
    x = torch.randn(3, 37, 16, dtype=torch.float64)
    w = torch.randn(3, 37, 16, dtype=torch.float64)                # a loss that weighs every output
    grads = []
    for forward in (lambda m, t: m(t), naive_reattention):
        attn.zero_grad()
        out = forward(attn, x)
        (out * w).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (ours, g_ours), (ref, g_ref) = grads
    assert (ours - ref).abs().max() < 1e-12 * ref.abs().max()
    for name in g_ref:
        assert (g_ours[name] - g_ref[name]).abs().max() <= 1e-12 * g_ref[name].abs().max(), name
    with torch.no_grad():                                           # the cls-only path: row 0 of the full one
        assert (attn(x, cls_only=True) - ref[:, :1]).abs().max() < 1e-12 * ref.abs().max()


def test_head_norm_gradcheck():
    norm = HeadNorm(5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x,))
    assert torch.autograd.gradcheck(lambda w, b: torch.nn.functional.layer_norm(
        x.detach().permute(0, 2, 3, 1), (5,), w, b, norm.eps).permute(0, 3, 1, 2), (norm.weight, norm.bias))
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (5,), norm.weight, norm.bias, norm.eps)
    assert torch.allclose(norm(x), expected.permute(0, 3, 1, 2), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------- family config

@pytest.mark.parametrize("options, message", [
    (dict(family="cnn"), "model family 'cnn': choose one of deepvit, resnet"),
    (dict(stem="linear"), "model stem 'linear'"),
    (dict(family="resnet"), "stem must be 'conv'"),
    (dict(stem="conv", widths=(8,), blocks=(1,)), "patch_norm .* belongs to stem='patch'"),
    (dict(stem="conv", patch_norm=False, widths=(8, 16), blocks=(1,)), "widths and blocks of one length"),
    (dict(stem="conv", patch_norm=False), "widths and blocks of one length"),
    (dict(widths=(8,), blocks=(1,)), "stem='patch' has none"),
    (dict(head_dims=(8,)), "for the resnet family only"),
    (dict(reattn_init="small"), "model reattn_init 'small'"),
    (dict(family="resnet", stem="conv", patch_norm=False, widths=(8,), blocks=(1,), reattn_init="scaled"),
     "reattn_init belongs to the deepvit family"),
])
def test_impossible_family_combinations_rejected(options, message):
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig(**options)
    assert "\n" not in str(err.value)


def test_no_patch_norm_on_presets_without_one():
    for preset in ("hybrid", "resnet"):
        with pytest.raises(ValueError, match="patch_norm"):
            model_config(preset, patch_norm=True)


@pytest.mark.parametrize("preset", ["hybrid49", "resnet-wide"])
def test_config_round_trips_json_and_torch(preset, tmp_path):
    cfg = model_config(preset, channels=8, num_aux=3)
    from_json = ModelConfig(**json.loads(json.dumps(asdict(cfg))))      # config.json holds lists
    assert from_json == cfg and isinstance(from_json.widths, tuple)
    torch.save({"model_config": asdict(cfg)}, tmp_path / "c.pt")
    assert ModelConfig(**torch.load(tmp_path / "c.pt", weights_only=True)["model_config"]) == cfg


def test_config_without_family_fields_is_the_old_deepvit():
    """A model_config stored before the families existed (no family/stem/widths/blocks/head_dims/
    reattn_init)."""
    old = {k: v for k, v in asdict(model_config("tiny", channels=8, num_aux=3)).items()
           if k not in ("family", "stem", "widths", "blocks", "head_dims", "reattn_init")}
    assert ModelConfig(**old) == model_config("tiny", channels=8, num_aux=3)
    assert complete(old) == asdict(model_config("tiny", channels=8, num_aux=3))
    assert complete({**old, "widths": [4, 8]})["widths"] == (4, 8)


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_reference_and_bf16_close():
    ref, ours = paired_models(TINY)
    ref, ours = ref.cuda().eval(), ours.cuda().eval()
    x = sparse_images(8, 4).cuda()
    assert max_abs_diff(ref, ours, x) < 1e-4                       # TF32 may be on for matmuls
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        low = ours(x).float()
    with torch.no_grad():
        assert (low - ours(x)).abs().max().item() < 0.1 * ours(x).abs().max().item()
