"""DeepViT (Zhou et al. 2021, arXiv 2103.11886) regressing one scalar (the jet mass) from detector images.

The network of lucidrains' vit-pytorch `vit_pytorch/deepvit.py`, as printed in the original write-up
(../shared/reference/seed-task3a-regression.md): a pre-norm transformer whose attention mixes the heads'
attention maps after the softmax ("re-attention") with a learned heads x heads matrix, then LayerNorms over
the heads. The tests copy vit-pytorch's weights into this model and require equal outputs and gradients.
What differs is how it is computed:

- q, k, v come out of one fused Linear and are split by a single copy; plain `torch.matmul`s replace the
  einsums; the head mixing is one matmul over the head axis and its LayerNorm one `F.layer_norm` on the
  heads-last layout.
- The head reads only the cls token, so the LAST layer runs attention for the cls query alone and its
  feed-forward on the cls token alone (the reference computes every token there and throws them away).
  Same outputs and gradients, about 1/depth less work.
- On the CPU in eager mode, dropout draws integers for its mask instead of the slow `bernoulli_` (`Dropout`).

Two additions, both off by default so that the default is exactly the reference: `num_aux` (scalars such as
pT, ieta, iphi embedded and added to the cls token) and `patch_norm=False` (no LayerNorm over raw patch
pixels). Weights are initialised in one place, `DeepViT.init_weights`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn


class Dropout(nn.Dropout):
    """`nn.Dropout` with the same distribution: keep with probability 1 - p, scale kept values by 1 / (1 - p).

    On the CPU in eager mode the mask is drawn as 31-bit integers r, kept where r >= round(p * 2**31):
    PyTorch's CPU `bernoulli_` draws a double per element in a serial loop and took 18-35% of a training
    step of the `small` preset; `random_` on int32 is one raw Mersenne-Twister draw per element, ~3x
    cheaper. On CUDA and under torch.compile `F.dropout` is fused already and used as is. Both draw from
    the global generator, so torch.manual_seed reproduces the masks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0 or torch.compiler.is_compiling():
            return F.dropout(x, self.p, True)
        threshold = round(self.p * 2 ** 31)                     # P(r < threshold) = p to within 2**-32
        keep = torch.empty(x.shape, dtype=torch.int32).random_() >= threshold   # r uniform in [0, 2**31)
        # x * (mask / (1 - p)): autograd keeps the mask for the backward; torch.where was slower here.
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Dropout, Linear, Dropout (`net` indices as in the reference)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with re-attention (head mixing after the softmax)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.inner_dim = heads * dim_head
        self.scale = dim_head ** -0.5

        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, self.inner_dim * 3, bias=False)   # rows [q; k; v], each (h d)
        self.dropout = Dropout(dropout)
        # attn'[b, g, i, j] = sum_h attn[b, h, i, j] * reattn_weights[h, g]
        self.reattn_weights = nn.Parameter(torch.randn(heads, heads))
        self.reattn_norm = nn.LayerNorm(heads)
        self.to_out = nn.Linear(self.inner_dim, dim)
        self.out_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, *, cls_only: bool = False) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim), or (B, 1, dim) for the first (cls) query only when cls_only."""
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        x = self.norm(x)
        if cls_only:
            # Keys and values of all tokens, the query of token 0 only: Linears on row slices of the weight.
            w = self.to_qkv.weight                                                     # (3 h d, dim)
            q = F.linear(x[:, :1], w[: self.inner_dim]).view(b, 1, h, d).transpose(1, 2)   # (B, h, 1, d)
            k, v = F.linear(x, w[self.inner_dim:]).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4).contiguous()
        else:
            # One copy turns (B, N, 3, h, d) into three contiguous (B, h, N, d) blocks for the matmuls.
            q, k, v = self.to_qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).contiguous()

        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale          # (B, h, Nq, N)
        attn = self.dropout(dots.softmax(dim=-1))

        # Re-attention: mix the heads by one matmul on the heads-last layout (B, Nq, N, h) @ (h, h), LayerNorm
        # over the mixed heads there (the last axis), then back to (B, h, Nq, N) for attn @ v.
        attn = torch.matmul(attn.permute(0, 2, 3, 1), self.reattn_weights)          # (B, Nq, N, h)
        attn = self.reattn_norm(attn).permute(0, 3, 1, 2)                            # (B, h, Nq, N)

        out = torch.matmul(attn, v)                                                  # (B, h, Nq, d)
        out = out.transpose(1, 2).reshape(b, out.shape[2], self.inner_dim)          # (B, Nq, h d)
        return self.out_dropout(self.to_out(out))


class Block(nn.Module):
    """One transformer layer: x + attn(x), then x + ff(x)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, mlp_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, *, cls_only: bool = False) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim); (B, 1, dim), the cls token only, when cls_only."""
        x = self.attn(x, cls_only=cls_only) + (x[:, :1] if cls_only else x)
        return self.ff(x) + x


class Transformer(nn.Module):
    """`depth` Blocks; returns the cls token only, which is all the head reads."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([Block(dim, heads, dim_head, mlp_dim, dropout) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), token 0 the cls token -> (B, dim)."""
        for layer in self.layers[:-1]:
            x = layer(x)
        return self.layers[-1](x, cls_only=True)[:, 0]


class DeepViT(nn.Module):
    """DeepViT regressor: images (B, C, H, W) float32 [, aux (B, num_aux)] -> (B,) float32, one per image.

    The output is 1-D on purpose: a (B, 1) prediction against a (B,) target broadcasts to (B, B) in a loss.
    """

    def __init__(self, *, image_size: int, patch_size: int, channels: int, dim: int, depth: int, heads: int,
                 dim_head: int, mlp_dim: int, dropout: float = 0.0, emb_dropout: float = 0.0,
                 num_aux: int = 0, patch_norm: bool = True):
        super().__init__()
        assert image_size > 0 and patch_size > 0 and image_size % patch_size == 0, (
            f"patch_size {patch_size} must divide image_size {image_size} "
            f"(for 125 = 5^3 only 1, 5, 25 or 125 fit)")
        for name, value in (("channels", channels), ("dim", dim), ("depth", depth), ("heads", heads),
                            ("dim_head", dim_head), ("mlp_dim", mlp_dim)):
            assert value >= 1, f"{name} must be >= 1, got {value}"
        assert num_aux >= 0, f"num_aux must be >= 0, got {num_aux}"
        assert 0.0 <= dropout < 1.0 and 0.0 <= emb_dropout < 1.0, (
            f"dropout {dropout} and emb_dropout {emb_dropout} must be in [0, 1)")
        self.image_size, self.channels, self.num_aux = image_size, channels, num_aux
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size ** 2

        # Patch embedding, as the reference: (B, C, H, W) -> (B, num_patches, p*p*C), pixel order (p1 p2 c).
        self.to_patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)
        # The reference's LayerNorm over each patch's raw pixels: it divides out the patch's energy scale.
        self.patch_norm = nn.LayerNorm(patch_dim) if patch_norm else nn.Identity()
        self.patch_to_embedding = nn.Linear(patch_dim, dim)
        self.embedding_norm = nn.LayerNorm(dim)

        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, num_patches + 1, dim))
        # Auxiliary scalars (normalised by the caller) added to the cls token, so that attention can combine
        # them with the image (mass ~ pT x opening angle: a product a linear head on top could not form).
        self.aux_embedding = nn.Linear(num_aux, dim) if num_aux > 0 else None
        self.dropout = Dropout(emb_dropout)

        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)

        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initial values, in one place, each std chosen on purpose.

        - Linear weights: truncated normal (+-2 std), std 0.02, biases 0 (BERT/ViT). Independent of fan-in,
          so the projection of 2,500 or 5,000 pixels starts on the scale of the 1,024-wide layers; close to
          PyTorch's default (the reference's) U(+-1/sqrt(fan_in)), std 0.011-0.025 for these layers.
        - LayerNorm: weight 1, bias 0.
        - cls token and positions: N(0, 1), as the reference. They sit beside / are added to patch tokens
          just LayerNorm'd to unit RMS; ViT's 0.02 suits small un-normalised patch embeddings and here would
          hide position (the jet axis is always in the central patch) at the start.
        - aux embedding: std 1/sqrt(num_aux): unit-variance inputs give a unit-scale vector, as large as the
          cls token it is added to (at 0.02 it would be ~3% of it and start out ignored).
        - head: std 0.1/sqrt(dim). Its input is LayerNorm'd (unit variance), so the first predictions have
          std ~0.1 around bias 0 = the standardised mean: training starts at the constant-prediction loss.
          Adam's steps do not shrink with the head's scale, so a small head does not slow the trunk.
        - reattn_weights: N(0, 1), the reference's; the LayerNorm over heads after it makes its scale moot.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention):
                nn.init.normal_(module.reattn_weights, std=1.0)
        nn.init.normal_(self.cls_token, std=1.0)
        nn.init.normal_(self.pos_embedding, std=1.0)
        if self.aux_embedding is not None:
            std = 1.0 / math.sqrt(self.num_aux)
            nn.init.trunc_normal_(self.aux_embedding.weight, std=std, a=-2 * std, b=2 * std)
        std = 0.1 / math.sqrt(self.head.in_features)
        nn.init.trunc_normal_(self.head.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, img: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        """img (B, C, H, W) float32, aux (B, num_aux) float32 or None -> (B,) float32."""
        expected = (self.channels, self.image_size, self.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"DeepViT expects images (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(img.shape)}")
        if (aux is None) != (self.aux_embedding is None):
            raise ValueError(f"DeepViT built with num_aux={self.num_aux} was called with "
                             f"{'no aux' if aux is None else 'aux'}; pass aux exactly when num_aux > 0")
        if aux is not None and (aux.dim() != 2 or aux.shape != (img.shape[0], self.num_aux)):
            raise ValueError(f"aux must be (B, {self.num_aux}) = ({img.shape[0]}, {self.num_aux}), "
                             f"got {tuple(aux.shape)}")

        x = self.patch_norm(self.to_patches(img))                             # (B, P, p*p*C)
        x = self.embedding_norm(self.patch_to_embedding(x))                   # (B, P, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                       # (B, 1, dim)
        if self.aux_embedding is not None:
            cls = cls + self.aux_embedding(aux).unsqueeze(1)
        x = torch.cat((cls, x), dim=1) + self.pos_embedding                  # (B, P + 1, dim)
        x = self.dropout(x)

        x = self.transformer(x)                                               # (B, dim), the cls token
        return self.head(self.head_norm(x)).squeeze(-1)                       # (B,)
