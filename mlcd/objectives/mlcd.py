"""MLCD: multi-label cluster discrimination against a learned class-center matrix.

The method, in one place:
- head `centers` float32 [C, E] (C = objective.num_centers, E = model.embed_dim), split along
  C over every device (Partial-FC layout), started from objective.centers_init (the clustering's
  centroids.npy) or random rows of norm ~1, with its own lr multiplier objective.centers_lr_mult;
- input op `join_cluster_labels`: each example's top-l cluster ids (objective.labels, the
  output directory of python -m mlcd.cluster) as batch field 'cluster_labels' int32 [l];
- the loss `mlcd.losses.mlcd_loss` of the image embedding against the centers (the formula is
  in docs/architecture.md, "Loss formulas").
An image-only model: the config has no text tower and no logit scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import transforms
from mlcd import label_store, losses
from mlcd.clustering import store
from mlcd.objectives import OBJECTIVES, Head, Objective, normal_init, npy_init


@OBJECTIVES.register("mlcd")
class MLCD(Objective):
    """mlcd.losses.mlcd_loss of the image embeddings against the `centers` head.

    Config (config.objective): num_centers (C), centers_init (a [C, E] .npy, or None:
    random), centers_lr_mult (default 1), scale (s, default 64), margin (m, default 0.3),
    margin_type ('arcface' | 'cosface', default 'arcface'), sample_ratio (r in (0, 1],
    default 1; the paper's best at 1M centers is 0.1), labels and top_l (read by the
    join_cluster_labels op). Negatives are drawn afresh each step from the step's rng.
    Metrics (no gradient): pos_loss, neg_loss, pos_cos, neg_cos, num_negatives (mlcd_loss).
    """

    inputs = ("image", "cluster_labels")
    # A mean of per-example terms given the step's rng (which fixes the sampled negatives),
    # so gradient accumulation over microbatches is exact.
    per_example = True

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        cfg = config.objective
        self.num_centers = int(cfg.num_centers)
        self.embed_dim = int(config.model.embed_dim)
        self.centers_init = cfg.get("centers_init")
        self.centers_lr_mult = float(cfg.get("centers_lr_mult", 1.0))
        self.scale = float(cfg.get("scale", 64.0))
        self.margin = float(cfg.get("margin", 0.3))
        self.margin_type = cfg.get("margin_type", "arcface")
        self.sample_ratio = float(cfg.get("sample_ratio", 1.0))

    def heads(self) -> dict[str, Head]:
        if self.centers_init:
            init = npy_init(self.centers_init, "config.objective.centers_init")
        else:
            # Rows of norm ~1 (std 1/sqrt(E)), the scale of spherical k-means centroids: the
            # loss normalises them, but their norm sets how fast AdamW's steps turn them, so
            # random and centroid initialisations train at the same effective rate.
            init = normal_init(self.embed_dim**-0.5)
        shape = (self.num_centers, self.embed_dim)
        return {"centers": Head(shape, init, "partial_fc", self.centers_lr_mult)}

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Adds 'cluster_labels' int32 [B, top_l] (the paper's l = 8 when top_l is unset: the
        labels file decides it at run time)."""
        top_l = self.config.objective.get("top_l") or 8
        labels = jax.ShapeDtypeStruct((batch_size, top_l), jnp.int32)
        return {**super().abstract_batch(batch_size), "cluster_labels": labels}

    def loss(self, out: dict[str, Any], heads, batch, rng: jax.Array):
        # The unnormalised embedding: mlcd_loss normalises it (and the centers) itself.
        return losses.mlcd_loss(
            out["image"]["embedding"],
            heads["centers"],
            batch["cluster_labels"],
            scale=self.scale,
            margin=self.margin,
            margin_type=self.margin_type,
            sample_ratio=self.sample_ratio,
            rng=rng,
            return_metrics=True,
        )


@transforms.TRANSFORMS.register("join_cluster_labels")
class JoinClusterLabels(transforms.Transform):
    """'cluster_labels' int32 [top_l]: the example's nearest cluster ids (-1 pads) from the
    clustering output config.objective.labels, looked up by the example's index in the split
    and checked against its id (label_store.LabelTable). Keeps the top_l nearest
    (config.objective.top_l; None: all l of the file). Memory-mapped: a host reads only the
    rows of its own examples, however large the split."""

    reads = ("index", "id")
    writes = ("cluster_labels",)

    def __init__(self, ctx: transforms.Context):
        cfg = ctx.config.objective
        directory, num_centers = cfg.get("labels"), cfg.get("num_centers")
        if not directory:
            raise ValueError(
                "join_cluster_labels: set config.objective.labels to the output directory of "
                "python -m mlcd.cluster"
            )
        try:
            clusters = store.load_clusters(directory)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"config.objective.labels={directory!r}: {e}") from None
        if clusters.meta["num_centers"] != num_centers:
            raise ValueError(
                f"config.objective.labels={directory!r} has {clusters.meta['num_centers']} "
                f"centers but config.objective.num_centers={num_centers}"
            )
        self.table = label_store.LabelTable(
            directory,
            clusters.labels,
            clusters.id_hashes,
            num_centers,
            cfg.get("top_l"),
            top_l_key="config.objective.top_l",
        )

    def __call__(self, example, rng):
        index = np.asarray([example["index"]])
        labels = self.table.lookup(index, [transforms.to_str(example["id"])])
        return {"cluster_labels": labels[0]}
