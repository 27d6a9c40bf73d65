"""Two-tower model (registered as 'two_tower'): an image tower, an optional text tower, and the
learnable logit scale (and bias) the contrastive losses use. Everything here is exported;
training-only parameters (class centers, classifiers) are the objectives' heads, never part of
the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd.models import MODELS
from mlcd.models.text import TextTransformer, build_text
from mlcd.models.vit import ViT, build_vit

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_MODEL_KEYS = (
    "name",
    "image",
    "text",
    "embed_dim",
    "logit_scale_init",
    "logit_bias_init",
    "max_logit_scale",
    "dtype",
    "remat",
    "attention",
)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||_2, eps) along the last axis, with a finite gradient everywhere.

    d||x|| / dx = x / ||x|| is 0/0 at the zero vector (and sqrt'(0) is infinite wherever the
    squares underflow), which made the gradient NaN there. Rows whose squared norm is 0 are
    replaced by ones inside the norm only: they still map to 0, and their gradient is finite.
    Every other row gets exactly the values and gradients of x / max(||x||, eps): the norm is
    still jnp.linalg.norm, so XLA compiles the same arithmetic.
    """
    nonzero = jnp.sum(x * x, axis=-1, keepdims=True) > 0
    norm = jnp.linalg.norm(jnp.where(nonzero, x, 1.0), axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


class TwoTower(nnx.Module):
    """``image`` (ViT), ``text`` (TextTransformer or None), ``t`` (scalar, log of the logit
    scale; absent when logit_scale_init is None) and ``b`` (scalar logit bias, SigLIP; absent
    when logit_bias_init is None)."""

    def __init__(
        self,
        image: ViT,
        text: TextTransformer | None,
        *,
        logit_scale_init: float | None,
        logit_bias_init: float | None = None,
        max_logit_scale: float = 100.0,
    ):
        self.image = image
        self.text = text
        if logit_scale_init is not None:
            self.t = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32))
        if logit_bias_init is not None:
            self.b = nnx.Param(jnp.asarray(logit_bias_init, jnp.float32))
        self.has_scale = logit_scale_init is not None
        self.has_bias = logit_bias_init is not None
        self.max_logit_scale = max_logit_scale

    def encode_image(self, images: Array) -> dict[str, Array]:
        """images float32 [B, R, R, 3] -> ViT output dict (see ViT.__call__)."""
        return self.image(images)

    def encode_text(self, tokens: Array) -> dict[str, Array]:
        """tokens int32 [B, L] -> text output dict (see TextTransformer.__call__)."""
        if self.text is None:
            raise ValueError("This model has no text tower (model config text=None).")
        return self.text(tokens)

    def __call__(self, images: Array, tokens: Array | None = None) -> dict[str, Any]:
        """Returns {'zimg' [B, E], 'ztxt' [B, E] (with tokens), both L2-normalised float32;
        'logit_scale' = min(exp(t), max_logit_scale) and 'logit_bias' (if the model has them);
        'image' / 'text': the towers' output dicts}."""
        out: dict[str, Any] = {"image": self.encode_image(images)}
        out["zimg"] = l2_normalize(out["image"]["embedding"])
        if tokens is not None:
            out["text"] = self.encode_text(tokens)
            out["ztxt"] = l2_normalize(out["text"]["embedding"])
        if self.has_scale:
            # min() stops the scale at the cap (CLIP clips at 100 to keep training stable).
            out["logit_scale"] = jnp.minimum(jnp.exp(self.t[...]), self.max_logit_scale)
        if self.has_bias:
            out["logit_bias"] = self.b[...]
        return out


@MODELS.register("two_tower")
def build_two_tower(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> TwoTower:
    """TwoTower from a model config.

    model_cfg keys: name ('two_tower'), image (dict, see vit.build_vit), text (dict, see text.build_text, or None),
    embed_dim, logit_scale_init (t, the log of the initial scale, or None for no scale: MLCD),
    logit_bias_init (None or float), max_logit_scale (default 100), dtype ('float32' |
    'bfloat16': compute dtype; params are float32 either way), remat ('none' | 'full' |
    'dots_saveable', layers.REMATS: recomputation in each encoder block of both towers) and
    attention ('xla' | 'fused', layers.ATTENTIONS: every attention of both towers); the last
    two change memory and speed, not the parameters.
    """
    cfg = dict(model_cfg)
    unknown = sorted(set(cfg) - set(_MODEL_KEYS))
    if unknown:
        raise ValueError(f"Unknown model config key(s) {unknown}; allowed: {sorted(_MODEL_KEYS)}.")
    for key in ("image", "embed_dim"):
        if key not in cfg:
            raise ValueError(f"model config needs {key!r}.")
    dtype_name = cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"Unknown model dtype {dtype_name!r}; expected one of {sorted(DTYPES)}.")
    tower = dict(
        embed_dim=cfg["embed_dim"],
        dtype=DTYPES[dtype_name],
        remat=cfg.get("remat", "none"),
        attention=cfg.get("attention", "xla"),
        rngs=rngs,
    )
    image = build_vit(cfg["image"], **tower)
    text_cfg = cfg.get("text")
    text = None if text_cfg is None else build_text(text_cfg, **tower)
    return TwoTower(
        image,
        text,
        logit_scale_init=cfg.get("logit_scale_init"),
        logit_bias_init=cfg.get("logit_bias_init"),
        max_logit_scale=cfg.get("max_logit_scale", 100.0),
    )
