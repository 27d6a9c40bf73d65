"""Transformer building blocks shared by the image and text towers.

Parameters are always float32; ``dtype`` is the compute dtype of matmuls and
activations. In bfloat16 compute, layer-norm statistics and the attention softmax still run in
float32 (see ``LayerNorm``, ``dot_product_attention`` and ``fused_attention``).

Two model-level switches trade memory and speed without changing the parameters
(config.model.attention, ATTENTIONS; config.model.remat, REMATS; docs/architecture.md).

Parameter paths are stable and regex-friendly, e.g. ``blocks/0/attn/qkv/kernel`` [W, 3W],
``blocks/0/mlp/fc1/kernel`` [W, M]; sharding rules match on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

# big_vision / ViT initialisation: xavier-uniform kernels, zero biases.
_KERNEL_INIT = nnx.initializers.xavier_uniform()

# config.model.attention: 'xla' is dot_product_attention below (einsum logits, float32 softmax;
# the default); 'fused' is jax.nn.dot_product_attention (fused_attention), cuDNN's flash
# attention on a GPU in bf16 / fp16, which never writes the [B, H, Nq, Nk] logits to memory.
ATTENTIONS = ("xla", "fused")
# config.model.remat: what the backward pass of each encoder block may read from its forward
# pass; the rest is recomputed (run_blocks).
REMATS = ("none", "full", "dots_saveable")

# MLP activations. 'gelu_tanh': GELU's tanh approximation (big_vision's default, and ours);
# 'gelu': the exact erf form (PyTorch's nn.GELU, open_clip's LAION models); 'quick_gelu':
# u * sigmoid(1.702 u) (OpenAI's CLIP weights were trained with it). Imported weights need the
# activation they were trained with: the three differ by up to ~0.02 per unit.
ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    """Returns value if it is one of choices; else a ValueError naming ``key``, the full config
    key the value was read from (e.g. 'config.model.image.act')."""
    if value not in choices:
        raise ValueError(f"Unknown {key}={value!r}; expected one of {choices}.")
    return value


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """How one tower's transformer layers compute: the tower passes it whole to its encoder
    blocks and MAP head, and they to their attention and MLP. None of it changes the
    parameters' shapes or paths.

    act: the MLP activation, one of ACTIVATIONS (config.model.<tower>.act).
    ln_eps: the eps of every LayerNorm, > 0 (config.model.<tower>.ln_eps); 1e-6 is big_vision's,
      1e-5 PyTorch's (open_clip's weights).
    attention: the attention implementation, one of ATTENTIONS (config.model.attention, one
      setting for both towers).
    tower: 'image' or 'text' for settings read from config.model.<tower>; used only to name
      the config keys in errors ('' for settings built in code: errors name the fields).
    """

    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    attention: str = "xla"
    tower: str = ""

    def __post_init__(self):
        # Checked here, once per tower, so that a bad value fails when the model is built and
        # the error names the config key it came from.
        prefix = f"config.model.{self.tower}." if self.tower else ""
        check_choice(prefix + "act", self.act, ACTIVATIONS)
        if not self.ln_eps > 0:
            raise ValueError(f"{prefix}ln_eps={self.ln_eps!r} must be > 0.")
        check_choice(
            "config.model.attention" if self.tower else "attention", self.attention, ATTENTIONS
        )


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


def resolve_tower(
    tower: str,
    variants: Mapping[str, Mapping[str, Any]],
    cfg: Mapping[str, Any],
    *,
    attention: str,
) -> tuple[dict[str, Any], BlockSettings]:
    """A tower's constructor arguments from its config: (resolve_variant's settings less act
    and ln_eps, the BlockSettings of those two and the model-level ``attention``)."""
    kwargs = resolve_variant(tower, variants, cfg)
    settings = BlockSettings(
        act=kwargs.pop("act"), ln_eps=kwargs.pop("ln_eps"), attention=attention, tower=tower
    )
    return kwargs, settings


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


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query attends to, in a form both ATTENTIONS take.

    causal: query i attends to keys j <= i (static: a Python bool, part of the pytree's
      structure). key_valid: bool [B, Nk] or None; False = a padding key, not attended.
    """

    causal: bool = False
    key_valid: Array | None = None

    def dense(self, nq: int, nk: int) -> Array | None:
        """bool, broadcastable to [B, 1, nq, nk] (dot_product_attention's mask); None when
        every key is attended."""
        mask = jnp.tril(jnp.ones((nq, nk), bool))[None, None] if self.causal else None
        if self.key_valid is not None:
            padding = self.key_valid[:, None, None, :]
            mask = padding if mask is None else mask & padding
        return mask

    def key_lengths(self) -> Array:
        """int32 [B]: 1 + the position of the row's last valid key (0 if none).

        The fused kernels take padding as a length: keys from there on are not attended. A
        padding key before the last valid one is attended (a tokenizer's pad id can be a real
        token, e.g. '!' = 0 in CLIP's BPE; only trailing pads are padding).
        """
        positions = jnp.arange(1, self.key_valid.shape[1] + 1, dtype=jnp.int32)
        return jnp.max(jnp.where(self.key_valid, positions, 0), axis=1)


# A pytree, so that a mask passes through jax.checkpoint / nnx.remat as an argument.
jax.tree_util.register_dataclass(AttentionMask, data_fields=["key_valid"], meta_fields=["causal"])


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


def fused_implementation(dtype: Any, backend: str | None = None) -> str | None:
    """jax.nn.dot_product_attention's `implementation` for q of `dtype` on `backend` (default:
    jax.default_backend()): 'cudnn' (flash attention) on a GPU in bf16 / fp16, None elsewhere.

    Why explicit: implementation=None is jax's XLA path on every backend (jax 0.10 selects no
    kernel by itself), and cuDNN's kernel takes bf16 / fp16 / fp8 only, so float32 compute
    stays on the XLA path on a GPU too.
    """
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend == "gpu" and half else None


def fused_attention(q: Array, k: Array, v: Array, mask: AttentionMask | None = None) -> Array:
    """softmax(q k^T / sqrt(D) + mask) v by jax.nn.dot_product_attention ([B, T, N, H] there is
    our [B, N, H, D]: batch, tokens, heads, head dim).

    The mask goes in as is_causal and key lengths (AttentionMask.key_lengths), the forms
    cuDNN's flash attention skips work for; a dense mask would become an additive [B, 1, T, S]
    bias, which cuDNN refuses for odd lengths in training (CLIP's 77 text tokens).

    Numerics: logits and softmax in float32 in every implementation (jax's XLA path computes
    bf16 logits with float32 accumulation and output, BF16_BF16_F32; cuDNN keeps its running
    softmax in float32); the probabilities are cast to v's dtype before the second matmul, as
    in dot_product_attention. The 1/sqrt(D) scale multiplies the float32 logits here, the bf16
    queries there, so bf16 results can differ at bf16 resolution; float32 ones by ~1e-7.

    Returns:
      [B, Nq, H, D] in q's dtype.
    """
    causal = mask is not None and mask.causal
    lengths = None if mask is None or mask.key_valid is None else mask.key_lengths()
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=causal,
        key_value_seq_lengths=lengths,
        implementation=fused_implementation(q.dtype),
    )


def attention(
    q: Array, k: Array, v: Array, mask: AttentionMask | None, implementation: str
) -> Array:
    """Attention of q [B, Nq, H, D] over k, v [B, Nk, H, D] by `implementation` (ATTENTIONS)."""
    if implementation == "fused":
        return fused_attention(q, k, v, mask)
    return dot_product_attention(
        q, k, v, None if mask is None else mask.dense(q.shape[1], k.shape[1])
    )


class SelfAttention(nnx.Module):
    """Multi-head self-attention with one fused QKV projection.

    ``qkv/kernel`` is [W, 3W] laid out as (q|k|v) x heads x head_dim, so one matmul produces all
    three and a model-parallel rule can shard its output dimension. Reads settings.attention.
    """

    def __init__(
        self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs, settings: BlockSettings
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.attention = settings.attention
        self.qkv = Dense(width, 3 * width, dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: AttentionMask | None = None) -> Array:
        """x: [B, N, W] -> [B, N, W]."""
        b, n, w = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, w // self.num_heads)
        y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, self.attention)
        return self.out(y.reshape(b, n, w))


class CrossAttention(nnx.Module):
    """Multi-head attention of queries [B, Nq, W] over inputs [B, Nk, W] (used by MAP pooling);
    reads settings.attention."""

    def __init__(
        self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs, settings: BlockSettings
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.attention = settings.attention
        self.q = Dense(width, width, dtype=dtype, rngs=rngs)
        self.kv = Dense(width, 2 * width, dtype=dtype, rngs=rngs)
        self.out = Dense(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, queries: Array, x: Array) -> Array:
        """queries: [B, Nq, W], x: [B, Nk, W] -> [B, Nq, W]."""
        b, nq, w = queries.shape
        h, d = self.num_heads, w // self.num_heads
        q = self.q(queries).reshape(b, nq, h, d)
        kv = self.kv(x).reshape(b, x.shape[1], 2, h, d)
        y = attention(q, kv[:, :, 0], kv[:, :, 1], None, self.attention)
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


def activation(name: str, u: Array) -> Array:
    """The activation `name` (one of ACTIVATIONS) applied to u, elementwise. (Towers check their
    act in BlockSettings; the error below is for direct callers.)"""
    if name == "gelu_tanh":
        return jax.nn.gelu(u, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(u, approximate=False)
    if name == "quick_gelu":
        return u * jax.nn.sigmoid(1.702 * u)
    raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")


class Mlp(nnx.Module):
    """fc1 -> activation (settings.act, ACTIVATIONS) -> fc2."""

    def __init__(
        self, width: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs, settings: BlockSettings
    ):
        self.fc1 = Dense(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, dtype=dtype, rngs=rngs)
        self.act = settings.act

    def __call__(self, x: Array) -> Array:
        """x: [..., W] -> [..., W]."""
        if self.act == "gelu_tanh":
            h = bias_gelu(self.fc1.matmul(x), self.fc1.bias[...])  # [T, hidden]
        else:
            h = activation(self.act, self.fc1(x))
        return self.fc2(h).reshape(x.shape)


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x)), computed as `settings` says."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: int,
        *,
        dtype: Any,
        rngs: nnx.Rngs,
        settings: BlockSettings,
    ):
        self.ln1 = LayerNorm(width, dtype=dtype, eps=settings.ln_eps)
        self.attn = SelfAttention(width, num_heads, dtype=dtype, rngs=rngs, settings=settings)
        self.ln2 = LayerNorm(width, dtype=dtype, eps=settings.ln_eps)
        self.mlp = Mlp(width, mlp_ratio * width, dtype=dtype, rngs=rngs, settings=settings)

    def __call__(self, x: Array, mask: AttentionMask | None = None) -> Array:
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
    settings: BlockSettings,
) -> nnx.List:
    """``depth`` pre-LN blocks; a tower holds them as ``blocks`` (paths ``blocks/<i>/...``)."""
    return nnx.List(
        [
            EncoderBlock(width, num_heads, mlp_ratio, dtype=dtype, rngs=rngs, settings=settings)
            for _ in range(depth)
        ]
    )


def _call_block(block: EncoderBlock, x: Array, mask: AttentionMask | None) -> Array:
    return block(x, mask)


# jax.checkpoint policy of each REMATS value but 'none' (None: save nothing but the block's
# inputs). 'dots_saveable' keeps the outputs of matmuls without batch dimensions, which with
# Dense's 2-D [T, din] @ [din, dout] are the QKV / output / MLP projections (nearly all of a
# block's FLOPs, O(T W) memory), and recomputes the rest: LayerNorms, GELU and attention, whose
# batched einsums give the [B, H, N, N] logits, the largest activations at long sequences.
# (jax's dots_saveable would keep those logits too.)
_REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_blocks(
    blocks: nnx.List, x: Array, mask: AttentionMask | None = None, *, remat: str = "none"
) -> Array:
    """x [B, N, W] through every block of `blocks` in order -> [B, N, W].

    remat (REMATS) sets what each block's backward pass reads from its forward pass: 'none'
    everything autodiff saves (the fastest step, the most memory); 'full' only the block's
    input, the whole block recomputed (the blocks' inputs plus one block's activations in
    memory instead of every block's, ~1/3 more FLOPs); 'dots_saveable' the projection and MLP matmul outputs (_REMAT_POLICIES).
    It is nnx.remat (jax.checkpoint) per block, the usual granularity. The math is the same in
    every mode: float32 gradients agree to rounding (~1e-7 relative); in bf16 the recomputed
    block rounds where XLA fuses it differently (~1% of the gradient, bf16's own resolution).
    bias_gelu's custom VJP composes: its residuals (the fc1 output and bias) are recomputed or
    saved like any other value.
    """
    call = _call_block
    if remat != "none":
        call = nnx.remat(_call_block, policy=_REMAT_POLICIES[remat], prevent_cse=True)
    for block in blocks:
        x = call(block, x, mask)
    return x
