"""Vision Transformer image tower (ViT, Dosovitskiy et al. 2021; CLIP / big_vision shapes).

images [B, R, R, 3] -> patch embedding (a stride-P conv, computed as a matmul; or a convolutional
stem) -> (+ cls token) -> + learned position embedding -> pre-LN blocks -> final LayerNorm -> pool
-> projection.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd.models import layers

Array = jax.Array

POOLS = ("cls", "gap", "map")
STEMS = ("patch", "conv")
# How patch tokens reach the embedding space ('patch_embeddings'): through the pooled
# embedding's projection ('shared', MaskCLIP's reading of a CLIP tower) or a projection of
# their own ('separate', DreamLIP's grouping loss can then shape them without moving `proj`).
PATCH_PROJS = ("shared", "separate")

# Complete settings per named size; a config's keys override them (layers.resolve_variant).
# CLIP's towers (Radford et al. 2021, Table 19): S/16 = 384 wide x 12 deep x 6 heads,
# B = 768 x 12 x 12, L = 1024 x 24 x 16; MLP ratio 4.
# act / ln_eps / ln_pre / patch_bias: big_vision's choices by default; weights imported from
# OpenAI / open_clip (mlcd/open_clip_format.py) set QuickGELU or exact GELU, PyTorch's 1e-5,
# a LayerNorm before the blocks (CLIP's ln_pre) and a patch embedding without bias.
_BASE = dict(
    image_size=224,
    mlp_ratio=4,
    pool="cls",
    stem="patch",
    patch_proj="shared",
    act="gelu_tanh",
    ln_eps=1e-6,
    ln_pre=False,
    patch_bias=True,
)
VARIANTS: dict[str, dict[str, Any]] = {
    # CPU try-out: 64 px / patch 8 = 64 patches + cls; ~130 images/s per train step on 2 cores.
    "tiny": dict(_BASE, image_size=64, patch_size=8, width=128, depth=4, num_heads=4),
    # The fixed shape that bench/train_step.py measures (see docs/benchmarks.md).
    "bench-tiny": dict(_BASE, image_size=64, patch_size=8, width=192, depth=6, num_heads=3),
    "S/16": dict(_BASE, patch_size=16, width=384, depth=12, num_heads=6),
    "B/32": dict(_BASE, patch_size=32, width=768, depth=12, num_heads=12),
    "B/16": dict(_BASE, patch_size=16, width=768, depth=12, num_heads=12),
    "L/14": dict(_BASE, patch_size=14, width=1024, depth=24, num_heads=16),
}


class PatchEmbed(nnx.Module):
    """Non-overlapping P x P patches -> W features: a stride-P 'VALID' convolution, computed as
    one [B * N, P * P * 3] @ [P * P * 3, W] matmul. (On XLA:CPU the strided convolution plus
    its kernel gradient took ~1.5x the matmul's time; the kernel keeps the convolution's
    [P, P, 3, W] layout so checkpoints stay interchangeable.)"""

    def __init__(
        self, patch_size: int, width: int, *, dtype: Any, rngs: nnx.Rngs, use_bias: bool = True
    ):
        self.patch_size, self.dtype = patch_size, dtype
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = nnx.Param(init(rngs.params(), (patch_size, patch_size, 3, width)))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32)) if use_bias else None

    def __call__(self, images: Array) -> Array:
        """images [B, R, R, 3] -> [B, (R / P)^2, W], patches in row-major (y, x) order."""
        b, _, _, c = images.shape
        p, g = self.patch_size, images.shape[1] // self.patch_size
        patches = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b * g * g, p * p * c).astype(self.dtype)  # 2-D: see Dense
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        y = patches @ kernel
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, g * g, -1)


class ConvStem(nnx.Module):
    """Convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better"):
    log2(P) 3x3 stride-2 convolutions, each followed by LayerNorm over channels and ReLU, with
    channels doubling up to W, then a 1x1 projection to W: [B, R, R, 3] -> [B, (R/P)^2, W].

    Why: a stride-P patch embedding gives the transformer only a linear map of each P x P patch;
    edge and corner detectors that work at every patch offset are then left to attention to
    learn. Supervised shape classification of single-object synthetic_scenes images (tiny ViT,
    batch 64, lr 1e-3): 26% (chance 17%) at step 400 with patch embedding, 79% with this stem.
    Select it with model.image.stem='conv'. (In the 300-step CLIP tiny run it did not make the
    image features carry shape, and it scored lower on retrieval and probes, so the tiny variant
    keeps the patch embedding; see docs/evaluation.md.) Costs ~5 MFLOP per 64 px image for
    W = 128, against ~330 MFLOP (forward) for the tiny transformer blocks.

    Each convolution runs as im2col + one 2-D matmul (9 strided slices of the padded input
    concatenated on channels), for the same reason as PatchEmbed; kernels keep the [3, 3, Cin,
    Cout] convolution layout. Padding is SAME: 0 before, 1 after (R even, stride 2).
    """

    def __init__(
        self, patch_size: int, width: int, *, dtype: Any, rngs: nnx.Rngs, ln_eps: float = 1e-6
    ):
        num_convs = patch_size.bit_length() - 1
        if patch_size != 2**num_convs or num_convs < 1:
            raise ValueError(
                f"the conv stem needs a power-of-two patch_size >= 2, got {patch_size}"
            )
        channels = [3] + [max(width >> (num_convs - i), 8) for i in range(1, num_convs + 1)]
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernels = nnx.List(
            nnx.Param(init(rngs.params(), (3, 3, cin, cout)))
            for cin, cout in itertools.pairwise(channels)
        )
        self.norms = nnx.List(layers.LayerNorm(c, dtype=dtype, eps=ln_eps) for c in channels[1:])
        self.proj = layers.Dense(channels[-1], width, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, images: Array) -> Array:
        """images [B, R, R, 3] -> [B, (R / P)^2, W], tokens in row-major (y, x) order."""
        x = images.astype(self.dtype)
        for kernel, norm in zip(self.kernels, self.norms, strict=True):
            b, r, _, c = x.shape
            xp = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            cols = [xp[:, dy : dy + r : 2, dx : dx + r : 2] for dy in range(3) for dx in range(3)]
            cols = jnp.concatenate(cols, axis=-1).reshape(b * (r // 2) ** 2, 9 * c)
            x = cols @ kernel[...].reshape(9 * c, -1).astype(self.dtype)
            x = jax.nn.relu(norm(x)).reshape(b, r // 2, r // 2, -1)
        b, g, _, c = x.shape
        return self.proj(x.reshape(b, g * g, c))


class MapHead(nnx.Module):
    """Multihead attention pooling (big_vision's MAP head): a learned probe attends over the
    tokens, then a residual pre-LN MLP; returns the probe's output [B, W]. Computed as
    `settings` (the tower's layers.BlockSettings) says."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: int,
        *,
        dtype: Any,
        rngs: nnx.Rngs,
        settings: layers.BlockSettings,
    ):
        self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, width)))
        self.attn = layers.CrossAttention(
            width, num_heads, dtype=dtype, rngs=rngs, settings=settings
        )
        self.norm = layers.LayerNorm(width, dtype=dtype, eps=settings.ln_eps)
        self.mlp = layers.Mlp(width, mlp_ratio * width, dtype=dtype, rngs=rngs, settings=settings)

    def __call__(self, x: Array) -> Array:
        """x: [B, N, W] -> [B, W]."""
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        y = self.attn(probe, x)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class ViT(nnx.Module):
    """Image tower. Parameter paths: ``patch_embed/kernel`` [P, P, 3, W] and ``patch_embed/bias``
    [W] (``stem="patch"``, the bias only with patch_bias; the conv stem has
    ``patch_embed/kernels/<i>``, ``norms/<i>``, ``proj``), ``cls`` [1, 1, W] (cls pooling only),
    ``pos_embed`` [1, N, W], ``ln_pre`` (ln_pre only), ``blocks/<i>/...``, ``norm``,
    ``map_head/...`` (map pooling only), ``proj/kernel`` [W, E] (no bias),
    ``patch_proj/kernel`` [W, E] (no bias; patch_proj="separate" only).

    ``settings`` (layers.BlockSettings: act, ln_eps, attention) holds for every block, the MAP
    head and every LayerNorm, the conv stem's too; ``remat`` (layers.REMATS) and
    ``settings.attention`` change memory and speed, not the parameters."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: int,
        pool: str,
        embed_dim: int,
        stem: str = "patch",
        patch_proj: str = "shared",
        ln_pre: bool = False,
        patch_bias: bool = True,
        settings: layers.BlockSettings,
        dtype: Any = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"Unknown image pool {pool!r}; expected one of {POOLS}.")
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}."
            )
        if stem not in STEMS:
            raise ValueError(f"Unknown image stem {stem!r}; expected one of {STEMS}.")
        if patch_proj not in PATCH_PROJS:
            raise ValueError(
                f"Unknown image patch_proj {patch_proj!r}; expected one of {PATCH_PROJS}."
            )
        self.image_size, self.patch_size = image_size, patch_size
        self.pool, self.dtype = pool, dtype
        self.remat = layers.check_choice("config.model.remat", remat, layers.REMATS)
        if stem == "patch":
            self.patch_embed = PatchEmbed(
                patch_size, width, dtype=dtype, rngs=rngs, use_bias=patch_bias
            )
        else:
            self.patch_embed = ConvStem(
                patch_size, width, dtype=dtype, rngs=rngs, ln_eps=settings.ln_eps
            )
        num_tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        if pool == "cls":
            self.cls = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, num_tokens, width))
        )
        # CLIP normalises the embedded tokens once more before the first block (ln_pre).
        self.ln_pre = layers.LayerNorm(width, dtype=dtype, eps=settings.ln_eps) if ln_pre else None
        self.blocks = layers.encoder_blocks(
            width, depth, num_heads, mlp_ratio, dtype=dtype, rngs=rngs, settings=settings
        )
        self.norm = layers.LayerNorm(width, dtype=dtype, eps=settings.ln_eps)
        if pool == "map":
            self.map_head = MapHead(
                width, num_heads, mlp_ratio, dtype=dtype, rngs=rngs, settings=settings
            )
        self.proj = layers.Dense(width, embed_dim, use_bias=False, dtype=dtype, rngs=rngs)
        if patch_proj == "separate":
            self.patch_proj = layers.Dense(width, embed_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.separate_patch_proj = patch_proj == "separate"

    def __call__(self, images: Array) -> dict[str, Array]:
        """images: float32 [B, R, R, 3], already normalised.

        Returns float32 {'embedding' [B, E] (not normalised), 'pre_logits' [B, W] (pooled, before
        the projection), 'patch_tokens' [B, (R/P)^2, W] (after the final LN, no cls token),
        'patch_embeddings' [B, (R/P)^2, E] (patch tokens projected to the embedding space by
        `proj` or `patch_proj`, see PATCH_PROJS; not normalised)}. Under jit an output nobody
        reads costs nothing (XLA drops it), so CLIP pays nothing for 'patch_embeddings'.
        """
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"images must be [B, {self.image_size}, {self.image_size}, 3], got {images.shape}."
            )
        x = self.patch_embed(images)
        if self.pool == "cls":
            # zeros_like(x[:, :1]) + cls rather than broadcast_to: the cls column then carries
            # x's batch sharding, which concatenate needs on an Explicit-axes mesh.
            cls = jnp.zeros_like(x[:, :1]) + self.cls[...].astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed[...].astype(x.dtype)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = layers.run_blocks(self.blocks, x, remat=self.remat)
        x = self.norm(x)

        patch_tokens = x[:, 1:] if self.pool == "cls" else x
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "gap":
            pooled = jnp.mean(patch_tokens, axis=1, dtype=jnp.float32).astype(x.dtype)
        else:
            pooled = self.map_head(x)
        patch_proj = self.patch_proj if self.separate_patch_proj else self.proj
        return {
            "embedding": self.proj(pooled).astype(jnp.float32),
            "pre_logits": pooled.astype(jnp.float32),
            "patch_tokens": patch_tokens.astype(jnp.float32),
            "patch_embeddings": patch_proj(patch_tokens).astype(jnp.float32),
        }


def build_vit(
    cfg: Mapping[str, Any],
    *,
    embed_dim: int,
    dtype: Any,
    rngs: nnx.Rngs,
    remat: str = "none",
    attention: str = "xla",
) -> ViT:
    """ViT from a config dict: 'variant' plus optional overrides of ``VARIANTS[variant]``'s keys
    (image_size, patch_size, width, depth, num_heads, mlp_ratio, pool, stem, patch_proj, act,
    ln_eps, ln_pre, patch_bias); remat and attention are model-level (config.model). act,
    ln_eps and attention make the tower's layers.BlockSettings."""
    kwargs, settings = layers.resolve_tower("image", VARIANTS, cfg, attention=attention)
    return ViT(
        **kwargs, settings=settings, embed_dim=embed_dim, dtype=dtype, remat=remat, rngs=rngs
    )
