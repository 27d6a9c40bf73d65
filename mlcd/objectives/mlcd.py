"""MLCD: multi-label cluster discrimination against the model's class centers.

Needs a model with centers (config.model.num_centers = C) and batches with the cluster labels
of each image (config.data.labels, joined by the input pipeline as batch['cluster_labels']).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from mlcd import losses
from mlcd.objectives import register


@register("mlcd")
class MLCD:
    """mlcd.losses.mlcd_loss of the image embeddings against the centers (DESIGN.md, MLCD).

    Config: scale (s, default 64), margin (m, default 0.3), margin_type ('arcface' |
    'cosface', default 'arcface'), sample_ratio (r in (0, 1], default 1; the paper's best at
    1M centers is 0.1). Negatives are drawn afresh each step from the step's rng.
    Metrics (no gradient): pos_loss, neg_loss, pos_cos, neg_cos, num_negatives (see mlcd_loss).
    """

    # The loss is a mean of per-example terms given the step's rng (which fixes the sampled
    # negatives), so gradient accumulation over microbatches is exact (config.microbatches).
    per_example = True

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.scale = float(cfg.get("scale", 64.0))
        self.margin = float(cfg.get("margin", 0.3))
        self.margin_type = cfg.get("margin_type", "arcface")
        self.sample_ratio = float(cfg.get("sample_ratio", 1.0))

    def __call__(self, out: dict[str, Any], batch: dict[str, Any], rng: jax.Array):
        if "centers" not in out:
            raise ValueError("objective mlcd needs class centers: set config.model.num_centers")
        if "cluster_labels" not in batch:
            raise ValueError(
                "objective mlcd needs batch['cluster_labels']: set config.data.labels to the "
                "output directory of python -m mlcd.cluster"
            )
        # The unnormalised embedding: mlcd_loss normalises it (and the centers) itself.
        return losses.mlcd_loss(
            out["image"]["embedding"],
            out["centers"],
            batch["cluster_labels"],
            scale=self.scale,
            margin=self.margin,
            margin_type=self.margin_type,
            sample_ratio=self.sample_ratio,
            rng=rng,
            return_metrics=True,
        )
