"""Transformer building blocks shared by the image and text towers.

Parameters are always float32; ``dtype`` is the compute dtype of matmuls and
activations. In bfloat16 compute, layer-norm statistics and the attention softmax still run in
float32 (see ``LayerNorm`` and ``dot_product_attention``).

Parameter paths are stable and regex-friendly, e.g. ``blocks/0/attn/qkv/kernel`` [W, 3W],
``blocks/0/mlp/fc1/kernel`` [W, M]; sharding rules match on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
    transposed [dout, T] activation gradient first (docs/benchmarks.md, "Train step").
    """

    def __init__(self, din: int, dout: int, *, dtype: Any, rngs: nnx.Rngs, use_bias: bool = True):
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if use_bias else None
        self.dtype = dtype

    def matmul(self, x: Array) -> Array:
        """x: [..., din] -> x @ kernel as [T, dout] (T = prod of the leading axes), no bias."""
        return x.reshape(-1, x.shape[-1]).astype(self.dtype) @ self.kernel[...].astype(self.dtype)

    def __call__(self, x: Array) -> Array:
        """x: [..., din] -> [..., dout] in the compute dtype."""
        y = self.matmul(x)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, params ``scale`` [W] and ``bias`` [W] (float32); eps 1e-6
    by default (big_vision's; PyTorch's, hence open_clip's, is 1e-5).

    y = (x - mean) / sqrt(var + eps) * scale + bias, mean and var in float32, the variance from
    the centred values (nnx.LayerNorm's default E[x^2] - E[x]^2 loses precision when |mean| >>
    std). Written out, the train step also compiles to fewer XLA:CPU kernels (1,082 vs 1,172
    fusions for the bench-tiny step; no measurable time difference on 2 cores).
    """

    def __init__(self, width: int, *, dtype: Any, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))
        self.dtype, self.eps = dtype, eps

    def __call__(self, x: Array) -> Array:
        """x: [..., W] -> [..., W] in the compute dtype."""
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return ((centred * rstd) * self.scale[...] + self.bias[...]).astype(self.dtype)


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


def _gelu_tanh(u: Array) -> tuple[Array, Array]:
    """GELU, tanh approximation, and its derivative (Hendrycks & Gimpel 2016):
    g(u) = u/2 (1 + t),  t = tanh(c (u + 0.044715 u^3)),  c = sqrt(2 / pi);
    g'(u) = (1 + t)/2 + u/2 (1 - t^2) c (1 + 3 * 0.044715 u^2)."""
    c, a = (2 / np.pi) ** 0.5, 0.044715
    t = jnp.tanh(c * (u + a * u**3))
    return 0.5 * u * (1 + t), 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * c * (1 + 3 * a * u * u)


@jax.custom_vjp
def bias_gelu(z: Array, bias: Array) -> Array:
    """gelu_tanh(z + bias) for z [T, H] in the compute dtype and a float32 bias [H].

    Same values and gradients as ``jax.nn.gelu(z + bias, approximate=True)``; only the saved
    state differs. Autodiff keeps tanh(...) as a residual, which XLA:CPU writes out as an extra
    [T, H] array in the forward pass and reads back in the backward pass. Here the backward
    pass recomputes it from z and the bias, which exist anyway (the fc1 matmul output and the
    parameter), so the forward is one pass over [T, H] and the backward one more.
    """
    return _gelu_tanh(z + bias.astype(z.dtype))[0]


def _bias_gelu_fwd(z, bias):
    return bias_gelu(z, bias), (z, bias)


def _bias_gelu_bwd(res, g):
    # The barrier keeps XLA from merging (CSE) the recomputed tanh with the forward one, which
    # would bring the saved [T, H] array back.
    z, bias = jax.lax.optimization_barrier(res)
    dz = g * _gelu_tanh(z + bias.astype(z.dtype))[1]
    return dz, jnp.sum(dz, axis=0, dtype=jnp.float32).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


# MLP activations. 'gelu_tanh': GELU's tanh approximation (big_vision's default, and ours);
# 'gelu': the exact erf form (PyTorch's nn.GELU, open_clip's LAION models); 'quick_gelu':
# u * sigmoid(1.702 u) (OpenAI's CLIP weights were trained with it). Imported weights need the
# activation they were trained with: the three differ by up to ~0.02 per unit.
ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu")


def activation(name: str, u: Array) -> Array:
    """The activation `name` (one of ACTIVATIONS) applied to u, elementwise."""
    if name == "gelu_tanh":
        return jax.nn.gelu(u, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(u, approximate=False)
    if name == "quick_gelu":
        return u * jax.nn.sigmoid(1.702 * u)
    raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")


class Mlp(nnx.Module):
    """fc1 -> activation (ACTIVATIONS; default GELU's tanh approximation, as in big_vision) ->
    fc2."""

    def __init__(
        self, width: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs, act: str = "gelu_tanh"
    ):
        if act not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {act!r}; expected one of {ACTIVATIONS}.")
        self.fc1 = Dense(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: Array) -> Array:
        """x: [..., W] -> [..., W]."""
        if self.act == "gelu_tanh":
            h = bias_gelu(self.fc1.matmul(x), self.fc1.bias[...])  # [T, hidden]
        else:
            h = activation(self.act, self.fc1(x))
        return self.fc2(h).reshape(x.shape)


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: int,
        *,
        dtype: Any,
        rngs: nnx.Rngs,
        act: str = "gelu_tanh",
        ln_eps: float = 1e-6,
    ):
        self.ln1 = LayerNorm(width, dtype=dtype, eps=ln_eps)
        self.attn = SelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
        self.ln2 = LayerNorm(width, dtype=dtype, eps=ln_eps)
        self.mlp = Mlp(width, mlp_ratio * width, dtype=dtype, rngs=rngs, act=act)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


def encoder_blocks(
    width: int,
    depth: int,
    num_heads: int,
    mlp_ratio: int,
    *,
    dtype: Any,
    rngs: nnx.Rngs,
    act: str = "gelu_tanh",
    ln_eps: float = 1e-6,
) -> nnx.List:
    """``depth`` pre-LN blocks; a tower holds them as ``blocks`` (paths ``blocks/<i>/...``)."""
    return nnx.List(
        [
            EncoderBlock(
                width, num_heads, mlp_ratio, dtype=dtype, rngs=rngs, act=act, ln_eps=ln_eps
            )
            for _ in range(depth)
        ]
    )
