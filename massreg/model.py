"""The model families: a DeepViT (Zhou et al. 2021, arXiv 2103.11886) and a ResNet, each regressing one
scalar (the jet mass) from detector images: `model(images (B, C, 125, 125), aux (B, num_aux) | None) -> (B,)`.

DeepViT: the network of lucidrains' vit-pytorch `vit_pytorch/deepvit.py`, as printed in the original write-up
(docs/data.md, "Earlier results and their pitfalls"): a pre-norm transformer whose attention mixes the heads'
attention maps after the softmax ("re-attention") with a learned heads x heads matrix, then LayerNorms over
the heads. The tests copy vit-pytorch's weights into this model and require equal outputs and gradients.
What differs is how it is computed:

- q, k, v come out of one fused Linear and are split by a single copy; plain `torch.matmul`s replace the
  einsums. The attention maps stay heads-first (B, h, Nq, N) throughout: the head mixing is one batched
  matmul over the head axis and the LayerNorm over the heads a closed-form forward and backward over that
  axis (`HeadNorm`), where the reference permutes to heads-last and back (1.7x faster training step at 169
  tokens on the CPU).
- The head reads only the cls token, so the LAST layer runs attention for the cls query alone and its
  feed-forward on the cls token alone (the reference computes every token there and throws them away).
  Same outputs and gradients, about 1/depth less work.
- On the CPU in eager mode, dropout draws integers for its mask instead of the slow `bernoulli_` (`Dropout`).

Four additions, all off by default so that the default is exactly the reference: `num_aux` (scalars such as
pT, ieta, iphi embedded and added to the cls token), `patch_norm=False` (no LayerNorm over raw patch pixels),
`stem="conv"`: tokens from a convolutional stem of residual blocks instead of the linear patch embedding
(the "hybrid" ViT of Dosovitskiy et al. 2021, sec. 3.1), which sees the two-prong structure inside a sparse
patch that a linear embedding loses, and `reattn_init="scaled"`, which starts the LayerNorm over heads at
gain 1/sqrt(tokens) so that many tokens do not collapse into one at initialisation (`init_weights`).

ResNet: in the style of the CMS end-to-end papers' ResNets: a 3 x 3 stride-2 stem, stages of basic residual
blocks (BatchNorm, ReLU, stride 2 at each stage start), global average pooling, the aux scalars concatenated,
an MLP head. Weights of each model are initialised in one place, its `init_weights`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

from massreg.heads import QuantileHead


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


class HeadNormFunction(torch.autograd.Function):
    """LayerNorm over dim 1 of (B, h, Nq, N), forward and backward written out (see HeadNorm).

    With xhat = (x - mean_h x) * rstd, rstd = 1 / sqrt(var_h x + eps) and y = xhat * weight + bias:
    dweight = sum g * xhat, dbias = sum g (sums over B, Nq, N), and with gy = g * weight
    dx = rstd * (gy - mean_h gy - xhat * mean_h(gy * xhat)): the standard LayerNorm backward, over the heads.
    Under CUDA autocast it runs in float32, as autocast runs F.layer_norm.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x, weight, bias, eps: float):
        xc = x - x.mean(dim=1, keepdim=True)                                   # (B, h, Nq, N)
        rstd = torch.rsqrt(xc.pow(2).mean(dim=1, keepdim=True) + eps)         # (B, 1, Nq, N), biased var
        xhat = xc.mul_(rstd)
        ctx.save_for_backward(xhat, rstd, weight)
        return torch.addcmul(bias.view(1, -1, 1, 1), xhat, weight.view(1, -1, 1, 1))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        xhat, rstd, weight = ctx.saved_tensors
        gweight = (g * xhat).sum(dim=(0, 2, 3))
        gbias = g.sum(dim=(0, 2, 3))
        gy = g * weight.view(1, -1, 1, 1)
        gx = (gy - gy.mean(dim=1, keepdim=True)).sub_(xhat * (gy * xhat).mean(dim=1, keepdim=True))
        return gx.mul_(rstd), gweight, gbias, None


class HeadNorm(nn.LayerNorm):
    """nn.LayerNorm(heads) applied over the heads of attention maps kept heads-first: (B, h, Nq, N), dim 1.

    Same parameters (weight, bias of shape (h,)), eps and result as the reference's LayerNorm on the
    heads-last layout (B, Nq, N, h), without the two permute copies, and without F.layer_norm over rows of
    only 4-8 values, which is slow on the CPU (about a third of a `hybrid` training step at 169 tokens). The
    backward is written out (HeadNormFunction): autograd over the elementary ops makes about twice as many
    passes over these tensors, the largest of the model (a ~20 % slower training step at 169 tokens).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            # An exporter (massreg.export) records ops, and an autograd.Function is opaque to some: the same
            # forward from elementary ops (ReduceMean, Sub, Sqrt, ... in ONNX).
            xc = x - x.mean(dim=1, keepdim=True)                               # (B, h, Nq, N)
            xhat = xc / torch.sqrt(xc.pow(2).mean(dim=1, keepdim=True) + self.eps)
            return xhat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return HeadNormFunction.apply(x, self.weight, self.bias, self.eps)


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
        self.reattn_norm = HeadNorm(heads)                     # over the heads, dim 1 of (B, h, Nq, N)
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
            k, v = F.linear(x, w[self.inner_dim:]).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4).contiguous() \
                .unbind(0)
        else:
            # One copy turns (B, N, 3, h, d) into three contiguous (B, h, N, d) blocks for the matmuls.
            q, k, v = self.to_qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).contiguous().unbind(0)

        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale          # (B, h, Nq, N)
        attn = self.dropout(dots.softmax(dim=-1))

        # Re-attention: mix the heads, (h, h)^T @ (h, Nq*N) per sample, then LayerNorm over the mixed heads.
        # bmm of the expanded matrix: ~3x faster on the CPU than matmul's broadcast of a 2-D (h, h).
        nq = attn.shape[2]
        mix = self.reattn_weights.t().expand(b, h, h)                               # (B, h, h)
        attn = torch.bmm(mix, attn.reshape(b, h, nq * n)).view(b, h, nq, n)          # (B, h, Nq, N)
        attn = self.reattn_norm(attn)                                                # (B, h, Nq, N)

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


# ------------------------------------------------------------------ convolutional pieces (ResNet, conv stem)

def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """Conv (no bias: the BatchNorm after it has one) then BatchNorm."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out))


class ResidualBlock(nn.Module):
    """Basic residual block (He et al. 2016): relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3 x 3.

    The shortcut is the identity, or a 1 x 1 conv + BatchNorm where the shape changes (stride or width).
    (B, c_in, n, n) -> (B, c_out, ceil(n / stride), ceil(n / stride)).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)       # weight 0 at initialisation (init_conv_bn)
        self.shortcut = (conv_bn(c_in, c_out, 1, stride, 0) if stride != 1 or c_in != c_out
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def residual_stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` ResidualBlocks at width c_out; the first one takes the stride (and the change of width)."""
    return nn.Sequential(*[ResidualBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                           for i in range(blocks)])


def conv_grid(image_size: int, patch_size: int, stages: int) -> int:
    """Side of ConvStem's output grid: image_size / patch_size, halved (rounding up) per further stage."""
    n = image_size // patch_size
    for _ in range(stages - 1):
        n = (n + 1) // 2                       # 3 x 3 conv, stride 2, padding 1: ceil(n / 2)
    return n


class ConvStem(nn.Module):
    """Tokens for the hybrid DeepViT: (B, C, H, W) -> (B, widths[-1], g, g), g = conv_grid(H, patch_size, S).

    A learnable patch_size x patch_size stride-patch_size conv (at 5: 125 x 125 -> 25 x 25), BatchNorm, ReLU,
    blocks[0] residual blocks at widths[0]; then each further stage i halves the grid (its first block has
    stride 2: 25 -> 13 -> 7) at widths[i] with blocks[i] blocks. Non-linear before any token is formed: the
    two prongs of a boosted top, a few crystals apart inside one patch, stay distinguishable.
    """

    def __init__(self, channels: int, widths: tuple[int, ...], blocks: tuple[int, ...], patch_size: int):
        super().__init__()
        self.patch = nn.Sequential(
            nn.Conv2d(channels, widths[0], patch_size, stride=patch_size, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.Sequential(
            residual_stage(widths[0], widths[0], blocks[0], stride=1),
            *[residual_stage(widths[i - 1], widths[i], blocks[i], stride=2) for i in range(1, len(widths))])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch(img))


@torch.no_grad()
def init_conv_bn(model: nn.Module) -> None:
    """Initial values of every Conv2d and BatchNorm2d in `model` (called by each family's init_weights).

    - Conv weights: Kaiming normal, fan_out, ReLU gain (He et al. 2015; torchvision's ResNets), std
      sqrt(2 / (c_out k^2)). Every conv feeds a BatchNorm that divides its scale out again, so the value
      matters little; this one keeps pre-BN activations on the input's scale, far above BatchNorm's eps.
    - BatchNorm: weight 1, bias 0, except the LAST BatchNorm of every residual block: weight 0 ("zero-gamma",
      Goyal et al. 2017). Each block then starts as its shortcut, so the network starts as a shallow stack
      (stem and shortcut convs) whose activations do not grow block by block, as a sum x + F(x) of two
      unit-scale branches would; each branch grows in as its gamma is learned (the branch convs get
      gradients from the first step that moves gamma off 0).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, ResidualBlock):
            nn.init.zeros_(module.bn2.weight)


def check_inputs(model: nn.Module, img: torch.Tensor, aux: torch.Tensor | None) -> None:
    """The input contract every family shares; ValueError naming what was expected and what came.

    Skipped while an exporter traces: there the batch size is symbolic, and the exported graph's input shapes
    (massreg.export) carry the same contract."""
    if torch.jit.is_tracing():
        return
    name = type(model).__name__
    expected = (model.channels, model.image_size, model.image_size)
    if img.dim() != 4 or tuple(img.shape[1:]) != expected:
        raise ValueError(f"{name} expects images (B, {', '.join(map(str, expected))}), "
                         f"got {tuple(img.shape)}")
    if (aux is None) != (model.num_aux == 0):
        raise ValueError(f"{name} built with num_aux={model.num_aux} was called with "
                         f"{'no aux' if aux is None else 'aux'}; pass aux exactly when num_aux > 0")
    if aux is not None and (aux.dim() != 2 or aux.shape != (img.shape[0], model.num_aux)):
        raise ValueError(f"aux must be (B, {model.num_aux}) = ({img.shape[0]}, {model.num_aux}), "
                         f"got {tuple(aux.shape)}")


# ---------------------------------------------------------------------------------------------- the models

class DeepViT(nn.Module):
    """DeepViT regressor: images (B, C, H, W) float32 [, aux (B, num_aux)] -> (B,) float32, one per image;
    with quantiles=True (B, 3): [q16, point, q84] (QuantileHead).

    stem="patch": the reference's linear patch embedding (patch_size x patch_size patches, `patch_norm`).
    stem="conv": tokens from ConvStem(widths, blocks), whose first conv has kernel and stride patch_size, then
    a Linear (a 1 x 1 conv) to dim; at patch_size 5 with widths (32, 64): 13 x 13 = 169 tokens.
    The output is 1-D on purpose: a (B, 1) prediction against a (B,) target broadcasts to (B, B) in a loss.
    """

    def __init__(self, *, image_size: int, patch_size: int, channels: int, dim: int, depth: int, heads: int,
                 dim_head: int, mlp_dim: int, dropout: float = 0.0, emb_dropout: float = 0.0,
                 num_aux: int = 0, patch_norm: bool = True, stem: str = "patch",
                 widths: tuple[int, ...] = (), blocks: tuple[int, ...] = (), reattn_init: str = "reference",
                 quantiles: bool = False):
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
        assert stem in ("patch", "conv"), f"stem must be 'patch' or 'conv', got {stem!r}"
        if stem == "patch":
            assert not widths and not blocks, "widths and blocks describe a conv stem; stem='patch' has none"
        else:
            assert len(widths) == len(blocks) >= 1 and min(widths) >= 1 and min(blocks) >= 1, (
                f"a conv stem needs widths and blocks of one length >= 1, all >= 1; got {widths}, {blocks}")
            assert not patch_norm, "patch_norm is the linear patch embedding's; a conv stem has none"
        assert reattn_init in ("reference", "scaled"), (
            f"reattn_init must be 'reference' or 'scaled', got {reattn_init!r}")
        self.image_size, self.channels, self.num_aux = image_size, channels, num_aux
        self.reattn_init = reattn_init

        if stem == "patch":
            num_patches = (image_size // patch_size) ** 2
            patch_dim = channels * patch_size ** 2
            # As the reference: (B, C, H, W) -> (B, num_patches, p*p*C), pixel order (p1 p2 c).
            self.to_patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)",
                                        p1=patch_size, p2=patch_size)
        else:
            num_patches = conv_grid(image_size, patch_size, len(widths)) ** 2
            patch_dim = widths[-1]
            # (B, C, H, W) -> (B, widths[-1], g, g) -> (B, g*g, widths[-1]): one token per grid cell.
            self.to_patches = nn.Sequential(ConvStem(channels, tuple(widths), tuple(blocks), patch_size),
                                            Rearrange("b c h w -> b (h w) c"))
        # The reference's LayerNorm over each patch's raw pixels: it divides out the patch's energy scale.
        self.patch_norm = nn.LayerNorm(patch_dim) if patch_norm else nn.Identity()
        self.patch_to_embedding = nn.Linear(patch_dim, dim)     # with a conv stem: the 1 x 1 conv to dim
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
        # Made after the trunk's init: the trunk's initial weights are those of the model without it.
        self.quantile_head = QuantileHead(dim) if quantiles else None

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
        - reattn_norm (the LayerNorm over heads) weight: 1 with reattn_init="reference" (the reference's).
          Its output is no softmax row any more (entries ~1/N summing to 1) but entries O(1) of either sign,
          so attn @ v is a sum over the N keys that grows with N. At 170 tokens (`hybrid`) the first layer's
          attention output is then ~20x its input, by the fourth layer the tokens point one way (cosine 0.95)
          and training stalls at the constant prediction. reattn_init="scaled": 1/sqrt(N), the fan-in scaling
          of that sum, so that it starts on the scale of v. The 25-token presets keep the reference's.
        - conv stem: `init_conv_bn` (Kaiming convs, zero-gamma residual blocks); the tokens it makes are
          LayerNorm'd like the patch embedding's, so the rules above hold for them too.
        """
        init_conv_bn(self)
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
        if self.reattn_init == "scaled":
            for module in self.modules():
                if isinstance(module, HeadNorm):
                    nn.init.constant_(module.weight, self.pos_embedding.shape[1] ** -0.5)   # 1/sqrt(keys)
        if self.aux_embedding is not None:
            std = 1.0 / math.sqrt(self.num_aux)
            nn.init.trunc_normal_(self.aux_embedding.weight, std=std, a=-2 * std, b=2 * std)
        std = 0.1 / math.sqrt(self.head.in_features)
        nn.init.trunc_normal_(self.head.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, img: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        """img (B, C, H, W) float32, aux (B, num_aux) float32 or None -> (B,) float32."""
        x, z = self.trunk(img, aux)                                           # (B, dim), (B,)
        return z if self.quantile_head is None else self.quantile_head(x, z)  # (B,) or (B, 3)

    def trunk(self, img: torch.Tensor, aux: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img, aux as forward -> (features (B, dim): the normed cls token the heads read, point z (B,))."""
        check_inputs(self, img, aux)
        x = self.patch_norm(self.to_patches(img))                             # (B, P, p*p*C) or (B, P, w)
        x = self.embedding_norm(self.patch_to_embedding(x))                   # (B, P, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                       # (B, 1, dim)
        if self.aux_embedding is not None:
            cls = cls + self.aux_embedding(aux).unsqueeze(1)
        x = torch.cat((cls, x), dim=1) + self.pos_embedding                  # (B, P + 1, dim)
        x = self.dropout(x)

        x = self.head_norm(self.transformer(x))                               # (B, dim), the cls token
        return x, self.head(x).squeeze(-1)                                    # (B, dim), (B,)


class ResNet(nn.Module):
    """ResNet regressor: images (B, C, H, W) float32 [, aux (B, num_aux)] -> (B,) float32, one per image;
    with quantiles=True (B, 3): [q16, point, q84] (QuantileHead on the input of the last Linear).

    A 3 x 3 stride-2 stem to widths[0] (BatchNorm, ReLU; 125 -> 63), then one stage per width, each of
    blocks[i] basic ResidualBlocks whose first has stride 2 (63 -> 32 -> 16 -> 8 -> 4 for four stages),
    global average pooling, the aux scalars concatenated, and an MLP head: Linear-ReLU(-Dropout) per
    head_dims entry, then Linear(., 1). With widths (16, 32, 64, 128), blocks (1, 2, 2, 1), head_dims (64,),
    8 channels and 3 aux: ~0.41 M parameters.
    """

    def __init__(self, *, image_size: int, channels: int, widths: tuple[int, ...], blocks: tuple[int, ...],
                 head_dims: tuple[int, ...] = (), num_aux: int = 0, dropout: float = 0.0,
                 quantiles: bool = False):
        super().__init__()
        assert image_size >= 1 and channels >= 1, f"image_size {image_size}, channels {channels} must be >= 1"
        assert len(widths) == len(blocks) >= 1 and min(widths) >= 1 and min(blocks) >= 1, (
            f"widths and blocks must have one length >= 1, all >= 1; got {widths}, {blocks}")
        assert all(h >= 1 for h in head_dims), f"head_dims must be >= 1, got {head_dims}"
        assert num_aux >= 0, f"num_aux must be >= 0, got {num_aux}"
        assert 0.0 <= dropout < 1.0, f"dropout {dropout} must be in [0, 1)"
        self.image_size, self.channels, self.num_aux = image_size, channels, num_aux

        self.stem = nn.Sequential(*conv_bn(channels, widths[0], 3, stride=2, padding=1), nn.ReLU())
        self.stages = nn.Sequential(*[residual_stage(widths[max(i - 1, 0)], widths[i], blocks[i], stride=2)
                                      for i in range(len(widths))])
        layers, width = [], widths[-1] + num_aux
        for hidden in head_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU(), Dropout(dropout)]
            width = hidden
        self.head = nn.Sequential(*layers, nn.Linear(width, 1))
        self.init_weights()
        self.quantile_head = QuantileHead(width) if quantiles else None   # after the trunk's init, as DeepViT

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initial values, in one place.

        - Convs and BatchNorms: `init_conv_bn` (Kaiming, fan_out; zero-gamma on each block's last BatchNorm,
          so every block starts as its shortcut).
        - Hidden head Linears: Kaiming normal, fan_in, ReLU gain (std sqrt(2 / fan_in)), biases 0: keeps the
          second moment of their input (pooled ReLU features of BatchNorm'd maps, O(1); aux of unit variance).
        - Last Linear: truncated normal, std 0.1/sqrt(fan_in), bias 0. Its input is O(1) by the above, so the
          first predictions have std <~0.1 around 0 = the standardised mean, as DeepViT's head: training
          starts at the constant-prediction loss. Not 0: a zero last layer gives the trunk no gradient at
          step 1.
        """
        init_conv_bn(self)
        linears = [m for m in self.head if isinstance(m, nn.Linear)]
        for layer in linears[:-1]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        last = linears[-1]
        std = 0.1 / math.sqrt(last.in_features)
        nn.init.trunc_normal_(last.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(last.bias)

    def forward(self, img: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        """img (B, C, H, W) float32, aux (B, num_aux) float32 or None -> (B,) float32."""
        x, z = self.trunk(img, aux)                                           # (B, width), (B,)
        return z if self.quantile_head is None else self.quantile_head(x, z)  # (B,) or (B, 3)

    def trunk(self, img: torch.Tensor, aux: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img, aux as forward -> (features (B, width): the input of the last Linear, point z (B,))."""
        check_inputs(self, img, aux)
        x = self.stages(self.stem(img))                                       # (B, widths[-1], 4, 4)
        x = x.mean(dim=(2, 3))                                                # (B, widths[-1])
        if aux is not None:
            x = torch.cat((x, aux), dim=1)                                    # (B, widths[-1] + num_aux)
        x = self.head[:-1](x)                                                 # (B, width): the hidden layers
        return x, self.head[-1](x).squeeze(-1)                                # (B, width), (B,)
