"""Text transformer tower (CLIP's text encoder, Radford et al. 2021).

tokens [B, L] -> token + learned position embeddings -> pre-LN blocks (causal mask as in CLIP, or
bidirectional with padding masked) -> final LayerNorm -> pool -> projection (no bias).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd.models import layers

Array = jax.Array

POOLS = ("eos", "first", "mean")

# CLIP's text towers: 77 tokens, 49408 BPE vocabulary, MLP ratio 4; widths/depths/heads per
# image size (S/16: 384/12/6, B: 512/12/8, L/14: 768/12/12). eos_id and pad_id come from the
# tokenizer and have no default.
_CLIP = dict(
    context_length=77,
    vocab_size=49408,
    mlp_ratio=4,
    causal=True,
    pool="eos",
    eos_id=None,
    pad_id=None,
    # As in vit.py: big_vision's activation and LayerNorm eps unless weights were trained with
    # others (OpenAI's QuickGELU, PyTorch's eps 1e-5).
    act="gelu_tanh",
    ln_eps=1e-6,
)
_TINY = dict(_CLIP, context_length=32, vocab_size=1024)
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY, width=128, depth=4, num_heads=4),
    "bench-tiny": dict(_TINY, width=192, depth=4, num_heads=3),
    "S/16": dict(_CLIP, width=384, depth=12, num_heads=6),
    "B/32": dict(_CLIP, width=512, depth=12, num_heads=8),
    "B/16": dict(_CLIP, width=512, depth=12, num_heads=8),
    "L/14": dict(_CLIP, width=768, depth=12, num_heads=12),
}
# Size-only names: B/32 and B/16 (and S/16, L/14) share their text tower.
VARIANTS.update(S=VARIANTS["S/16"], B=VARIANTS["B/16"], L=VARIANTS["L/14"])


def first_eos_index(tokens: Array, eos_id: int) -> Array:
    """int32 [B]: position of the first ``eos_id`` in each row; the last position when a row
    has none (a truncated sequence: its last token has seen the most text)."""
    is_eos = tokens == eos_id
    return jnp.where(is_eos.any(axis=-1), jnp.argmax(is_eos, axis=-1), tokens.shape[-1] - 1)


class TextTransformer(nnx.Module):
    """Text tower. Parameter paths: ``token_embed/embedding`` [V, W], ``pos_embed`` [L, W],
    ``blocks/<i>/...``, ``norm``, ``proj/kernel`` [W, E] (no bias). ``settings``
    (layers.BlockSettings: act, ln_eps, attention) holds for every block and LayerNorm;
    ``remat`` (layers.REMATS) and ``settings.attention`` change memory and speed, not the
    parameters."""

    def __init__(
        self,
        *,
        context_length: int,
        vocab_size: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: int,
        causal: bool,
        pool: str,
        eos_id: int | None,
        pad_id: int | None,
        embed_dim: int,
        settings: layers.BlockSettings,
        dtype: Any = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"Unknown text pool {pool!r}; expected one of {POOLS}.")
        if pad_id is None:
            raise ValueError("text config needs 'pad_id' (the tokenizer's padding id).")
        if pool == "eos" and eos_id is None:
            raise ValueError("text pool 'eos' needs 'eos_id' (the tokenizer's end-of-text id).")
        self.context_length, self.causal, self.pool = context_length, causal, pool
        self.eos_id, self.pad_id, self.dtype = eos_id, pad_id, dtype
        self.remat = layers.check_choice("config.model.remat", remat, layers.REMATS)
        # CLIP's initialisation scales: token embedding std 0.02, position embedding std 0.01.
        self.token_embed = nnx.Embed(
            vocab_size,
            width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.01)(rngs.params(), (context_length, width))
        )
        self.blocks = layers.encoder_blocks(
            width, depth, num_heads, mlp_ratio, dtype=dtype, rngs=rngs, settings=settings
        )
        self.norm = layers.LayerNorm(width, dtype=dtype, eps=settings.ln_eps)
        self.proj = layers.Dense(width, embed_dim, use_bias=False, dtype=dtype, rngs=rngs)

    def token_features(self, tokens: Array) -> Array:
        """tokens: int [B, L] (L <= context_length), padded with pad_id -> [B, L, W] per-token
        features after the final LayerNorm, in the compute dtype.

        Sequences shorter than context_length use the first L position embeddings (big_vision
        does the same): DreamLIP's sentence-long sub-captions need a fraction of a long
        caption's tokens, and attention costs O(L^2).
        """
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.context_length:
            raise ValueError(
                f"tokens must be [B, L] with L <= {self.context_length}, got {tokens.shape}."
            )
        length = tokens.shape[1]
        if self.causal:
            # Query i sees keys j <= i. Padding follows the real tokens, so no real token ever
            # sees a pad, and pad positions are never pooled: no padding mask is needed.
            mask = layers.AttentionMask(causal=True)
        else:
            # Pads not attended. attention='xla' masks every pad_id token; 'fused' only the
            # trailing ones (AttentionMask.key_lengths), the same for [BOS] text [EOS] pad...
            # unless the text itself holds the pad id (CLIP's BPE pads with '!').
            mask = layers.AttentionMask(key_valid=tokens != self.pad_id)
        x = self.token_embed(tokens) + self.pos_embed[:length].astype(self.dtype)
        x = layers.run_blocks(self.blocks, x, mask, remat=self.remat)
        return self.norm(x)

    def __call__(self, tokens: Array) -> dict[str, Array]:
        """tokens: int [B, L] (L <= context_length), padded with pad_id.

        Returns float32 {'embedding' [B, E] (not normalised), 'pre_logits' [B, W] (pooled)}.
        'eos' pools the position of the first eos_id, 'first' position 0, 'mean' the mean over
        tokens != pad_id.
        """
        x = self.token_features(tokens)
        if self.pool == "eos":
            idx = first_eos_index(tokens, self.eos_id)
            pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        elif self.pool == "first":
            pooled = x[:, 0]
        else:
            w = (tokens != self.pad_id).astype(jnp.float32)[..., None]
            pooled = (x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
            pooled = pooled.astype(x.dtype)
        return {
            "embedding": self.proj(pooled).astype(jnp.float32),
            "pre_logits": pooled.astype(jnp.float32),
        }


def build_text(
    cfg: Mapping[str, Any],
    *,
    embed_dim: int,
    dtype: Any,
    rngs: nnx.Rngs,
    remat: str = "none",
    attention: str = "xla",
) -> TextTransformer:
    """TextTransformer from a config dict: 'variant' plus optional overrides of
    ``VARIANTS[variant]``'s keys (context_length, vocab_size, width, depth, num_heads,
    mlp_ratio, causal, pool, eos_id, pad_id, act, ln_eps); remat and attention are
    model-level (config.model). act, ln_eps and attention make the tower's
    layers.BlockSettings."""
    kwargs, settings = layers.resolve_tower("text", VARIANTS, cfg, attention=attention)
    return TextTransformer(
        **kwargs, settings=settings, embed_dim=embed_dim, dtype=dtype, remat=remat, rngs=rngs
    )
