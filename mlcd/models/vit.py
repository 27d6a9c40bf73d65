"""Vision Transformer image tower (ViT, Dosovitskiy et al. 2021; CLIP / big_vision shapes).

images [B, R, R, 3] -> patch embedding (a stride-P conv, computed as a matmul) -> (+ cls token)
-> + learned position embedding -> pre-LN blocks -> final LayerNorm -> pool -> projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd.models import layers

Array = jax.Array

POOLS = ("cls", "gap", "map")

# Complete settings per named size; a config's keys override them (layers.resolve_variant).
# CLIP's towers (Radford et al. 2021, Table 19): S/16 = 384 wide x 12 deep x 6 heads,
# B = 768 x 12 x 12, L = 1024 x 24 x 16; MLP ratio 4.
_BASE = dict(image_size=224, mlp_ratio=4, pool="cls")
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

    def __init__(self, patch_size: int, width: int, *, dtype: Any, rngs: nnx.Rngs):
        self.patch_size, self.dtype = patch_size, dtype
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = nnx.Param(init(rngs.params(), (patch_size, patch_size, 3, width)))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))

    def __call__(self, images: Array) -> Array:
        """images [B, R, R, 3] -> [B, (R / P)^2, W], patches in row-major (y, x) order."""
        b, _, _, c = images.shape
        p, g = self.patch_size, images.shape[1] // self.patch_size
        patches = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b * g * g, p * p * c).astype(self.dtype)  # 2-D: see Dense
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        y = patches @ kernel + self.bias[...].astype(self.dtype)
        return y.reshape(b, g * g, -1)


class MapHead(nnx.Module):
    """Multihead attention pooling (big_vision's MAP head): a learned probe attends over the
    tokens, then a residual pre-LN MLP; returns the probe's output [B, W]."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, dtype: Any, rngs: nnx.Rngs):
        self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, width)))
        self.attn = layers.CrossAttention(width, num_heads, dtype=dtype, rngs=rngs)
        self.norm = layers.LayerNorm(width, dtype=dtype)
        self.mlp = layers.Mlp(width, mlp_ratio * width, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """x: [B, N, W] -> [B, W]."""
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        y = self.attn(probe, x)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class ViT(nnx.Module):
    """Image tower. Parameter paths: ``patch_embed/kernel`` [P, P, 3, W], ``cls`` [1, 1, W] (cls
    pooling only), ``pos_embed`` [1, N, W], ``blocks/<i>/...``, ``norm``, ``map_head/...`` (map
    pooling only), ``proj/kernel`` [W, E] (no bias)."""

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
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"Unknown image pool {pool!r}; expected one of {POOLS}.")
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}."
            )
        self.image_size, self.patch_size = image_size, patch_size
        self.pool, self.dtype = pool, dtype
        self.patch_embed = PatchEmbed(patch_size, width, dtype=dtype, rngs=rngs)
        num_tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        if pool == "cls":
            self.cls = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, num_tokens, width))
        )
        self.blocks = layers.encoder_blocks(
            width, depth, num_heads, mlp_ratio, dtype=dtype, rngs=rngs
        )
        self.norm = layers.LayerNorm(width, dtype=dtype)
        if pool == "map":
            self.map_head = MapHead(width, num_heads, mlp_ratio, dtype=dtype, rngs=rngs)
        self.proj = layers.Dense(width, embed_dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, images: Array) -> dict[str, Array]:
        """images: float32 [B, R, R, 3], already normalised.

        Returns float32 {'embedding' [B, E] (not normalised), 'pre_logits' [B, W] (pooled, before
        the projection), 'patch_tokens' [B, (R/P)^2, W] (after the final LN, no cls token)}.
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
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)

        patch_tokens = x[:, 1:] if self.pool == "cls" else x
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "gap":
            pooled = jnp.mean(patch_tokens, axis=1, dtype=jnp.float32).astype(x.dtype)
        else:
            pooled = self.map_head(x)
        return {
            "embedding": self.proj(pooled).astype(jnp.float32),
            "pre_logits": pooled.astype(jnp.float32),
            "patch_tokens": patch_tokens.astype(jnp.float32),
        }


def build_vit(cfg: Mapping[str, Any], *, embed_dim: int, dtype: Any, rngs: nnx.Rngs) -> ViT:
    """ViT from a config dict: 'variant' plus optional overrides of ``VARIANTS[variant]``'s keys
    (image_size, patch_size, width, depth, num_heads, mlp_ratio, pool)."""
    return ViT(
        **layers.resolve_variant("image", VARIANTS, cfg),
        embed_dim=embed_dim,
        dtype=dtype,
        rngs=rngs,
    )
