"""Model configuration: the dataclass saved with every checkpoint, named presets, and the model builder.

    cfg = model_config("small", channels=8, num_aux=3); model = build_model(cfg)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from massreg.model import DeepViT


@dataclass
class ModelConfig:
    """Every constructor argument of `massreg.model.DeepViT` (asdict(cfg) is its keyword arguments)."""

    image_size: int = 125
    patch_size: int = 25
    channels: int = 4
    dim: int = 1024
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.1
    emb_dropout: float = 0.1
    num_aux: int = 0          # auxiliary scalars (e.g. pt, ieta, iphi, already normalised) fed to the model
    patch_norm: bool = True   # the reference's LayerNorm over raw patch pixels (True = exactly the reference)

    def __post_init__(self):
        # The same checks as the model's asserts, as ValueError so that a CLI can report them in one line.
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


PRESETS: dict[str, ModelConfig] = {
    # The original write-up's model (reference/seed-task3a-regression.md): 40,397,161 parameters (4 channels).
    "seed": ModelConfig(),
    # A quarter of the width: ~3.8 M parameters; a GPU model for quick studies, a slow one on a CPU.
    "small": ModelConfig(dim=256, depth=6, heads=8, dim_head=32, mlp_dim=512),
    # Trains on a CPU in minutes (~0.3 M parameters); no dropout, which small data and few epochs do not need.
    "tiny": ModelConfig(dim=64, depth=4, heads=4, dim_head=16, mlp_dim=128, dropout=0.0, emb_dropout=0.0),
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


def build_model(cfg: ModelConfig) -> DeepViT:
    """DeepViT(**asdict(cfg)), freshly initialised (DeepViT.init_weights)."""
    return DeepViT(**asdict(cfg))
