"""Two-tower (CLIP / ALIGN / SigLIP) model: an image tower, an optional text tower, and the
learnable logit scale (and bias) the contrastive losses use. With `num_centers` (MLCD) the model
also holds a class-center matrix, a training-only head that exports leave out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd.models.text import TextTransformer, build_text
from mlcd.models.vit import ViT, build_vit

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_TRAINING_ONLY_KEYS = ("num_centers", "centers_init")
_MODEL_KEYS = (
    "image",
    "text",
    "embed_dim",
    "logit_scale_init",
    "logit_bias_init",
    "max_logit_scale",
    "dtype",
    *_TRAINING_ONLY_KEYS,
)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||_2, eps) along the last axis (eps keeps the zero vector finite)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TwoTower(nnx.Module):
    """``image`` (ViT), ``text`` (TextTransformer or None), ``t`` (scalar, log of the logit
    scale; absent when logit_scale_init is None), ``b`` (scalar logit bias, SigLIP; absent when
    logit_bias_init is None) and ``centers`` (float32 [C, E] class centers, MLCD; absent when
    num_centers is None)."""

    def __init__(
        self,
        image: ViT,
        text: TextTransformer | None,
        *,
        logit_scale_init: float | None,
        logit_bias_init: float | None = None,
        max_logit_scale: float = 100.0,
        num_centers: int | None = None,
        embed_dim: int | None = None,
        rngs: nnx.Rngs | None = None,
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
        if num_centers is not None:
            # Rows of norm ~1 (std 1/sqrt(E)), the scale of spherical k-means centroids: the
            # loss normalises them, but their norm sets how fast AdamW's steps turn them, so
            # random and centroid initialisations train at the same effective rate.
            init = nnx.initializers.normal(stddev=embed_dim**-0.5)
            self.centers = nnx.Param(init(rngs.params(), (num_centers, embed_dim), jnp.float32))
        self.has_centers = num_centers is not None

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
        'centers' float32 [C, E] as stored, not normalised (if the model has them);
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
        if self.has_centers:
            out["centers"] = self.centers[...]
        return out


def build_model(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> TwoTower:
    """TwoTower from a model config.

    model_cfg keys: image (dict, see vit.build_vit), text (dict, see text.build_text, or None),
    embed_dim, logit_scale_init (t, the log of the initial scale, or None for no scale: MLCD),
    logit_bias_init (None or float), max_logit_scale (default 100), dtype ('float32' |
    'bfloat16': compute dtype; params are float32 either way), num_centers (None, or C: a
    [C, E] class-center matrix), centers_init (path of a [C, E] .npy the trainer loads into
    the centers, see mlcd.train.init_params; not read here).
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
    dtype = DTYPES[dtype_name]
    embed_dim = cfg["embed_dim"]
    image = build_vit(cfg["image"], embed_dim=embed_dim, dtype=dtype, rngs=rngs)
    text_cfg = cfg.get("text")
    text = (
        None
        if text_cfg is None
        else build_text(text_cfg, embed_dim=embed_dim, dtype=dtype, rngs=rngs)
    )
    return TwoTower(
        image,
        text,
        logit_scale_init=cfg.get("logit_scale_init"),
        logit_bias_init=cfg.get("logit_bias_init"),
        max_logit_scale=cfg.get("max_logit_scale", 100.0),
        num_centers=cfg.get("num_centers"),
        embed_dim=embed_dim,
        rngs=rngs,
    )


def encoder_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model config of the exported encoder: `model_cfg` without the training-only class
    centers (num_centers, centers_init), as a plain dict."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return {k: v for k, v in cfg.items() if k not in _TRAINING_ONLY_KEYS}
