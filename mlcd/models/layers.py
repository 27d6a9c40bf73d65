"""Transformer building blocks shared by the image and text towers.

Parameters are always float32 (``param_dtype``); ``dtype`` is the compute dtype of matmuls and
activations. In bfloat16 compute, layer-norm statistics and the attention softmax still run in
float32 (see ``layer_norm`` and ``dot_product_attention``).

Parameter paths are stable and regex-friendly, e.g. ``blocks/0/attn/qkv/kernel`` [W, 3W],
``blocks/0/mlp/fc1/kernel`` [W, M]; sharding rules match on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# big_vision / ViT initialisation: xavier-uniform kernels, zero biases.
_KERNEL_INIT = nnx.initializers.xavier_uniform()


def resolve_variant(
    tower: str, variants: Mapping[str, Mapping[str, Any]], cfg: Mapping[str, Any]
) -> dict[str, Any]:
    """Returns the named variant's settings with the keys of ``cfg`` overriding them.

    Args:
      tower: 'image' or 'text', used in error messages.
      variants: variant name -> complete dict of settings (every allowed key).
      cfg: must hold 'variant'; every other key must be one of the variant's keys.

    Raises:
      ValueError: naming an unknown variant or an unknown override key.
    """
    cfg = dict(cfg)
    name = cfg.pop("variant", None)
    if name not in variants:
        raise ValueError(f"Unknown {tower} variant {name!r}; known: {sorted(variants)}.")
    settings = dict(variants[name])
    unknown = sorted(set(cfg) - set(settings))
    if unknown:
        raise ValueError(
            f"Unknown {tower} config key(s) {unknown} for variant {name!r}; "
            f"allowed: {sorted(settings)}."
        )
    settings.update(cfg)
    return settings


class Dense(nnx.Module):
    """y = x @ kernel + bias over the last axis; ``kernel`` [din, dout], ``bias`` [dout] (float32).

    The leading axes are flattened first, so the matmul is a plain 2-D [T, din] @ [din, dout].
    Why: the weight gradient is then x^T g, a 2-D contraction over T that XLA:CPU runs in
    place; for an N-D input the autodiff contraction over (batch, tokens) made XLA copy a
    transposed [dout, T] activation gradient first (measured in docs/benchmarks.md).
    """

    def __init__(self, din: int, dout: int, *, dtype: Any, rngs: nnx.Rngs, use_bias: bool = True):
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """x: [..., din] -> [..., dout] in the compute dtype."""
        y = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def layer_norm(width: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm (eps 1e-6) whose mean/variance are computed in float32 whatever ``dtype``."""
    return nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(D) + mask) v, per head.

    Args:
      q: [B, Nq, H, D]; k, v: [B, Nk, H, D].
      mask: bool, broadcastable to [B, H, Nq, Nk]; False = not attended.

    Returns:
      [B, Nq, H, D] in q's dtype. Logits and softmax are float32 (bf16 logits lose the small
      differences that decide the attention weights).
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    if mask is not None:
        # A finite minimum, not -inf: a fully masked row gives uniform weights instead of NaN.
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with one fused QKV projection.

    ``qkv/kernel`` is [W, 3W] laid out as (q|k|v) x heads x head_dim, so one matmul produces all
    three and a model-parallel rule can shard its output dimension.
    """

    def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.qkv = Dense(width, 3 * width, dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x: [B, N, W] -> [B, N, W]; mask as in ``dot_product_attention``."""
        b, n, w = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, w // self.num_heads)
        y = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
        return self.out(y.reshape(b, n, w))


class CrossAttention(nnx.Module):
    """Multi-head attention of queries [B, Nq, W] over inputs [B, Nk, W] (used by MAP pooling)."""

    def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.q = Dense(width, width, dtype=dtype, rngs=rngs)
        self.kv = Dense(width, 2 * width, dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, queries: Array, x: Array) -> Array:
        """queries: [B, Nq, W], x: [B, Nk, W] -> [B, Nq, W]."""
        b, nq, w = queries.shape
        h, d = self.num_heads, w // self.num_heads
        q = self.q(queries).reshape(b, nq, h, d)
        kv = self.kv(x).reshape(b, x.shape[1], 2, h, d)
        y = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])
        return self.out(y.reshape(b, nq, w))


class Mlp(nnx.Module):
    """fc1 -> GELU (tanh approximation, as in big_vision's default) -> fc2."""

    def __init__(self, width: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
        self.fc1 = Dense(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, dtype: Any, rngs: nnx.Rngs):
        self.ln1 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
        self.ln2 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_ratio * width, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


def encoder_blocks(
    width: int, depth: int, num_heads: int, mlp_ratio: int, *, dtype: Any, rngs: nnx.Rngs
) -> nnx.List:
    """``depth`` pre-LN blocks; a tower holds them as ``blocks`` (paths ``blocks/<i>/...``)."""
    return nnx.List(
        [EncoderBlock(width, num_heads, mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)]
    )
