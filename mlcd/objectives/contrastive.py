"""Image-text contrastive objectives: CLIP / ALIGN (softmax) and SigLIP (sigmoid)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from mlcd import losses
from mlcd.objectives import register


@register("softmax_contrastive")
class SoftmaxContrastive:
    """CLIP (reduction='mean') or ALIGN (reduction='sum', label_smoothing=0.1).

    Config: label_smoothing (float, default 0), reduction ('mean' | 'sum', default 'mean').
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.label_smoothing = float(cfg.get("label_smoothing", 0.0))
        self.reduction = cfg.get("reduction", "mean")

    def __call__(self, out: dict[str, Any], batch: dict[str, Any], rng: jax.Array):
        del batch, rng
        loss = losses.softmax_contrastive_loss(
            out["zimg"],
            out["ztxt"],
            out["logit_scale"],
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )
        return loss, {"logit_scale": out["logit_scale"]}


@register("sigmoid_contrastive")
class SigmoidContrastive:
    """SigLIP: needs a model with a learnable bias (config.model.logit_bias_init set)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        del cfg

    def __call__(self, out: dict[str, Any], batch: dict[str, Any], rng: jax.Array):
        del batch, rng
        if out.get("logit_bias") is None:
            raise ValueError(
                "objective sigmoid_contrastive needs a logit bias: set config.model.logit_bias_init"
            )
        loss = losses.sigmoid_contrastive_loss(
            out["zimg"], out["ztxt"], out["logit_scale"], out["logit_bias"]
        )
        return loss, {"logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"]}
