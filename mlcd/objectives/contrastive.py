"""Image-text contrastive objectives: CLIP / ALIGN (softmax) and SigLIP (sigmoid).

Both train the two towers of the model and its learnable logit scale (and bias), which are
model parameters (exported with the towers, as open_clip does), not heads.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from mlcd import losses
from mlcd.objectives import OBJECTIVES, Objective


def _require_model_key(config: ml_collections.ConfigDict, key: str, name: str) -> None:
    if config.model.get(key) is None:
        raise ValueError(f"objective {name} needs config.model.{key} (the model has none)")
    if config.model.get("text") is None:
        raise ValueError(f"objective {name} needs a text tower: set config.model.text")


@OBJECTIVES.register("softmax_contrastive")
class SoftmaxContrastive(Objective):
    """CLIP (reduction='mean') or ALIGN (reduction='sum', label_smoothing=0.1).

    Config: objective.label_smoothing (float, default 0), objective.reduction ('mean' |
    'sum', default 'mean'). Needs config.model.logit_scale_init and a text tower.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        _require_model_key(config, "logit_scale_init", "softmax_contrastive")
        self.label_smoothing = float(config.objective.get("label_smoothing", 0.0))
        self.reduction = config.objective.get("reduction", "mean")

    def loss(self, out: dict[str, Any], heads, batch, rng: jax.Array):
        del heads, batch, rng
        loss = losses.softmax_contrastive_loss(
            out["zimg"],
            out["ztxt"],
            out["logit_scale"],
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )
        return loss, {"logit_scale": out["logit_scale"]}


@OBJECTIVES.register("sigmoid_contrastive")
class SigmoidContrastive(Objective):
    """SigLIP. Needs config.model.logit_scale_init and logit_bias_init, and a text tower."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        _require_model_key(config, "logit_scale_init", "sigmoid_contrastive")
        _require_model_key(config, "logit_bias_init", "sigmoid_contrastive")

    def loss(self, out: dict[str, Any], heads, batch, rng: jax.Array):
        del heads, batch, rng
        loss = losses.sigmoid_contrastive_loss(
            out["zimg"], out["ztxt"], out["logit_scale"], out["logit_bias"]
        )
        return loss, {"logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"]}
