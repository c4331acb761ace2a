"""The model registry: the ModelConfig dataclass saved with every checkpoint, named presets, the builder.

    cfg = model_config("small", channels=8, num_aux=3); model = build_model(cfg)
    cfg = model_config("resnet", channels=8, num_aux=3); model = build_model(cfg)   # same inputs, same (B,)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from torch import nn

from massreg.model import DeepViT, ResNet, conv_grid

FAMILIES = ("deepvit", "resnet")
STEMS = ("patch", "conv")
REATTN_INITS = ("reference", "scaled")
# The fields a ResNet reads; it ignores the DeepViT's (patch_size, dim, depth, heads, dim_head, mlp_dim,
# emb_dropout, reattn_init), which its presets leave at their defaults.
RESNET_FIELDS = ("image_size", "channels", "widths", "blocks", "head_dims", "num_aux", "dropout", "quantiles")


@dataclass
class ModelConfig:
    """What builds a model: the family, and that family's constructor arguments (see build_model).

    asdict(cfg) is what checkpoints and config.json store. A checkpoint written before the family fields
    existed lacks them: `complete(stored)` fills their defaults, which are exactly that older model.
    """

    image_size: int = 125
    patch_size: int = 25      # deepvit: the patch side (stem patch), or the first conv's kernel and stride
    channels: int = 4
    dim: int = 1024
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.1      # deepvit: attention and MLP dropout; resnet: after each hidden head layer
    emb_dropout: float = 0.1
    num_aux: int = 0          # auxiliary scalars (e.g. pt, ieta, iphi, already normalised) fed to the model
    patch_norm: bool = True   # the reference's LayerNorm over raw patch pixels (True = exactly the reference)
    family: str = "deepvit"   # deepvit | resnet
    stem: str = "patch"       # deepvit: patch (the reference's linear embedding) or conv; resnet: conv
    widths: tuple[int, ...] = ()     # channels per conv stage: the resnet's trunk, or the deepvit's conv stem
    blocks: tuple[int, ...] = ()     # residual blocks per conv stage
    head_dims: tuple[int, ...] = ()  # resnet: hidden widths of the MLP head
    reattn_init: str = "reference"   # deepvit: LayerNorm-over-heads gain 1 (reference) or 1/sqrt(tokens + 1)
    quantiles: bool = False   # also the 16 % and 84 % quantiles: the output is (B, 3) [q16, point, q84]

    def __post_init__(self):
        # JSON (config.json) stores tuples as lists: turn them back, so a round trip compares equal.
        for name in ("widths", "blocks", "head_dims"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        # The same checks as the models' asserts, as ValueError so that a CLI can report them in one line.
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        if self.stem not in STEMS:
            raise ValueError(f"model stem {self.stem!r}: choose one of {', '.join(STEMS)}")
        if self.reattn_init not in REATTN_INITS:
            raise ValueError(f"model reattn_init {self.reattn_init!r}: choose one of "
                             f"{', '.join(REATTN_INITS)}")
        if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
            fit = [p for p in range(1, max(self.image_size, 0) + 1) if self.image_size % p == 0]
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}; "
                             f"choose one of {fit}")
        for name in ("channels", "dim", "depth", "heads", "dim_head", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.num_aux < 0:
            raise ValueError(f"model num_aux must be >= 0, got {self.num_aux}")
        for name in ("dropout", "emb_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model {name} must be in [0, 1), got {getattr(self, name)}")
        if self.family == "resnet" and self.stem != "conv":
            raise ValueError("the resnet family has a convolutional stem only: stem must be 'conv'")
        if self.patch_norm and self.stem != "patch":
            raise ValueError("patch_norm (a LayerNorm over raw patch pixels) belongs to stem='patch'; "
                             f"the {self.family} with a conv stem has none: set patch_norm=False")
        if self.stem == "conv":
            if not (len(self.widths) == len(self.blocks) >= 1 and min(self.widths) >= 1
                    and min(self.blocks) >= 1):
                raise ValueError(f"a conv stem needs widths and blocks of one length >= 1, all >= 1; got "
                                 f"widths {self.widths}, blocks {self.blocks}")
        elif self.widths or self.blocks:
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} describe a conv stem; "
                             "stem='patch' has none")
        if self.family == "resnet" and self.reattn_init != "reference":
            raise ValueError("reattn_init belongs to the deepvit family; the resnet has no attention")
        if self.head_dims and (self.family != "resnet" or min(self.head_dims) < 1):
            raise ValueError(f"head_dims {self.head_dims}: hidden head widths >= 1, for the resnet family "
                             "only")

    def tokens(self) -> int | None:
        """Tokens the DeepViT's transformer sees besides the cls token; None for the resnet."""
        if self.family == "resnet":
            return None
        if self.stem == "conv":
            return conv_grid(self.image_size, self.patch_size, len(self.widths)) ** 2
        return (self.image_size // self.patch_size) ** 2


NO_DROPOUT = dict(dropout=0.0, emb_dropout=0.0)
HYBRID = dict(family="deepvit", stem="conv", patch_norm=False, patch_size=5, reattn_init="scaled")
PRESETS: dict[str, ModelConfig] = {
    # The original write-up's model (docs/data.md, "Earlier results and their pitfalls"): 40,397,161
    # parameters (4 channels).
    "seed": ModelConfig(),
    # A quarter of the width: ~3.8 M parameters; a GPU model for quick studies, a slow one on a CPU.
    "small": ModelConfig(dim=256, depth=6, heads=8, dim_head=32, mlp_dim=512),
    # Trains on a CPU in minutes (~0.3 M parameters); no dropout, which small data and few epochs do not need.
    "tiny": ModelConfig(dim=64, depth=4, heads=4, dim_head=16, mlp_dim=128, dropout=0.0, emb_dropout=0.0),
    # Hybrid DeepViTs: tokens from a conv stem (5 x 5 stride-5 conv to 25 x 25, residual blocks, stride-2
    # stages), the LayerNorm over heads started at 1/sqrt(tokens + 1) (DeepViT.init_weights says why).
    # `hybrid`: tiny's transformer on 13 x 13 = 169 tokens (~0.23 M parameters).
    "hybrid": ModelConfig(**HYBRID, widths=(32, 64), blocks=(1, 1), dim=64, depth=4, heads=4, dim_head=16,
                          mlp_dim=128, **NO_DROPOUT),
    # One more stride-2 stage at 128 channels: 7 x 7 = 49 tokens at twice tiny's width (~0.87 M).
    "hybrid49": ModelConfig(**HYBRID, widths=(32, 64, 128), blocks=(1, 1, 1), dim=128, depth=4, heads=4,
                            dim_head=32, mlp_dim=256, **NO_DROPOUT),
    # GPU size: a wider, deeper stem and a transformer between `small` and `seed` (~13 M parameters).
    "hybrid-seed": ModelConfig(**HYBRID, widths=(64, 128), blocks=(2, 2), dim=512, depth=6, heads=8,
                               dim_head=64, mlp_dim=1024, dropout=0.1, emb_dropout=0.1),
    # The ResNet baseline (CPU / demo size, ~0.41 M parameters with 8 channels and 3 aux).
    "resnet": ModelConfig(family="resnet", stem="conv", patch_norm=False, widths=(16, 32, 64, 128),
                          blocks=(1, 2, 2, 1), head_dims=(64,), **NO_DROPOUT),
    # Twice the width, two blocks per stage (~2.8 M parameters): for GPU studies.
    "resnet-wide": ModelConfig(family="resnet", stem="conv", patch_norm=False, widths=(32, 64, 128, 256),
                               blocks=(2, 2, 2, 2), head_dims=(128,), **NO_DROPOUT),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """A copy of PRESETS[preset] with `overrides` (ModelConfig field names) applied and validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return replace(PRESETS[preset], **overrides)


def describe(cfg: ModelConfig) -> str:
    """One short line on what a config builds (massreg.train's help lists the presets with it)."""
    def slash(values):
        return "/".join(map(str, values))

    if cfg.family == "resnet":
        return (f"ResNet: {slash(cfg.widths)} channels x {slash(cfg.blocks)} blocks, "
                f"head {slash(cfg.head_dims)}")
    tokens = (f"conv stem {slash(cfg.widths)}" if cfg.stem == "conv"
              else f"{cfg.patch_size}x{cfg.patch_size} patches")
    dropout = f", dropout {cfg.dropout:g}" if cfg.dropout or cfg.emb_dropout else ""
    return f"DeepViT: {cfg.tokens()} tokens ({tokens}), dim {cfg.dim}, depth {cfg.depth}{dropout}"


def complete(stored: dict) -> dict:
    """A stored model_config dict with the fields it lacks (added since it was written) at their defaults and
    lists as tuples, so that an old checkpoint compares equal to the same model asked for today."""
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in {**defaults, **stored}.items()}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of cfg.family from cfg's fields, freshly initialised (its init_weights)."""
    kwargs = asdict(cfg)
    if kwargs.pop("family") == "resnet":
        return ResNet(**{k: kwargs[k] for k in RESNET_FIELDS})
    del kwargs["head_dims"]
    return DeepViT(**kwargs)
