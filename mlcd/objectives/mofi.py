"""MOFI (Wu et al., ICLR 2024): image representations from noisy entity labels.

The method, in one place:
- labels: each example's entity ids from an entity annotation store (`objective.annotations`,
  the output directory of python -m mlcd.annotate), joined by the input op `join_entities` as
  batch field 'entity_ids' int32 [l] (-1 pads; the same memory-mapped, id-hash-checked store
  MLCD's cluster labels use);
- supervised term (w_sup): `mlcd.losses.entity_classification_loss` of the image embedding
  against the head `entities` float32 [C, E], split along C over every device (Partial-FC
  layout, like MLCD's centers);
- entity-name contrastive term (w_con): the op `choose_entity_text` draws one of the example's
  entities per example and step (seeded: a resumed run draws the same) and renders it as its
  name, or name + ": " + description (objective.entity_text); the CLIP softmax of
  `mlcd.losses.entity_contrastive_loss` then leaves out the pairs (i, j) whose text entity is one
  of image i's entities, which are not negatives;
- alt-text contrastive term (w_clip): the ordinary CLIP loss on the example's own caption
  (config.data.text_keys), which every image feeds, with or without entities.

    loss = w_sup * L_sup + w_con * L_con + w_clip * L_clip

Any weight may be 0 (the paper's three variants are three presets of configs/mofi.py); the
inputs, heads and towers a zero term would need are then not built. Both contrastive terms use
the model's one learnable logit scale. An export is the plain two-tower encoder.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import transforms
from mlcd import entities, label_store, losses
from mlcd.annotation import store
from mlcd.models.two_tower import l2_normalize
from mlcd.objectives import OBJECTIVES, Head, Objective, loss_weights, normal_init

ENTITY_TEXTS = ("name", "name_description")


@OBJECTIVES.register("mofi")
class MOFI(Objective):
    """w_sup * entity classification + w_con * entity-name contrastive + w_clip * CLIP.

    Config (config.objective): num_entities (C, the annotation store's), annotations (its
    directory), top_l (entities per image kept, None: all of the store's l), w_sup, w_con,
    w_clip (weights >= 0), scale (s, default 32), margin (CosFace m, default 0),
    sample_ratio (r in (0, 1], default 1), classifier_lr_mult (default 1), entity_text
    ('name' | 'name_description'). Reads config.model.embed_dim; the contrastive terms need a
    text tower and config.model.logit_scale_init.

    Metrics (no gradient): sup_loss, con_loss, clip_loss (the terms that are on), logit_scale,
    and the classifier's pos_cos / neg_cos / frac_with_entity.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        cfg = config.objective
        self.weights = loss_weights(cfg, ("sup", "con", "clip"))
        self.num_entities = int(cfg.num_entities)
        if self.num_entities < 1:
            raise ValueError(f"config.objective.num_entities must be >= 1; got {cfg.num_entities}")
        self.embed_dim = int(config.model.embed_dim)
        self.scale = float(cfg.get("scale", 32.0))
        self.margin = float(cfg.get("margin", 0.0))
        self.sample_ratio = float(cfg.get("sample_ratio", 1.0))
        self.classifier_lr_mult = float(cfg.get("classifier_lr_mult", 1.0))
        contrastive = self.weights["con"] > 0 or self.weights["clip"] > 0
        if contrastive and config.model.get("text") is None:
            raise ValueError(
                "objective mofi: w_con / w_clip > 0 need a text tower: set config.model.text "
                "(or set both weights to 0 for the classifier-only variant)"
            )
        if contrastive and config.model.get("logit_scale_init") is None:
            raise ValueError(
                "objective mofi: w_con / w_clip > 0 need config.model.logit_scale_init"
            )
        inputs = ["image"]
        if self.weights["clip"] > 0:
            inputs.append("tokens")
        if self.weights["sup"] > 0 or self.weights["con"] > 0:
            inputs.append("entity_ids")
        if self.weights["con"] > 0:
            inputs += ["entity_tokens", "text_entity"]
        self.inputs = tuple(inputs)
        # Only the classifier is a mean of per-example terms (given the step's rng, which fixes
        # the sampled classes); an in-batch softmax over a slice would see fewer negatives.
        self.per_example = not contrastive

    def heads(self) -> dict[str, Head]:
        if self.weights["sup"] == 0:
            return {}
        # Rows of norm ~1 (std 1/sqrt(E)): the loss normalises them; their norm sets how fast
        # AdamW's steps turn them (the same choice as MLCD's random centers).
        init = normal_init(self.embed_dim**-0.5)
        shape = (self.num_entities, self.embed_dim)
        return {"entities": Head(shape, init, "partial_fc", self.classifier_lr_mult)}

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Adds 'entity_ids' int32 [B, top_l] (8 when top_l is unset: the store decides it at
        run time), 'entity_tokens' int32 [B, L] and 'text_entity' int32 [B] as declared."""
        top_l = self.config.objective.get("top_l") or 8
        length = self.config.pp.context_length
        known = {
            "entity_ids": jax.ShapeDtypeStruct((batch_size, top_l), jnp.int32),
            "entity_tokens": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
            "text_entity": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }
        batch = super().abstract_batch(batch_size)
        return {**batch, **{k: v for k, v in known.items() if k in self.inputs}}

    def forward(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """The model on images and alt-text tokens (when w_clip > 0), plus 'zent' [B, E]: the
        normalised text embeddings of the drawn entity texts (when w_con > 0)."""
        out = super().forward(model, batch)
        if "entity_tokens" in batch:
            out["zent"] = l2_normalize(model.encode_text(batch["entity_tokens"])["embedding"])
        return out

    def loss(self, out: dict[str, Any], heads, batch, rng: jax.Array):
        w = self.weights
        total = jnp.zeros((), jnp.float32)
        metrics: dict[str, jax.Array] = {}
        if w["sup"] > 0:
            # The unnormalised embedding: the loss normalises it (and the classifier rows).
            sup, sup_metrics = losses.entity_classification_loss(
                out["image"]["embedding"],
                heads["entities"],
                batch["entity_ids"],
                scale=self.scale,
                margin=self.margin,
                sample_ratio=self.sample_ratio,
                rng=rng,
                return_metrics=True,
            )
            total += w["sup"] * sup
            metrics.update(sup_loss=sup, **sup_metrics)
        if w["con"] > 0:
            con = losses.entity_contrastive_loss(
                out["zimg"],
                out["zent"],
                batch["entity_ids"],
                batch["text_entity"],
                out["logit_scale"],
            )
            total += w["con"] * con
            metrics["con_loss"] = con
        if w["clip"] > 0:
            clip = losses.softmax_contrastive_loss(out["zimg"], out["ztxt"], out["logit_scale"])
            total += w["clip"] * clip
            metrics["clip_loss"] = clip
        if "logit_scale" in out:
            metrics["logit_scale"] = out["logit_scale"]
        return total, jax.lax.stop_gradient(metrics)


def _annotations(ctx: transforms.Context, op: str) -> store.Annotations:
    """The annotation store of config.objective.annotations, checked against num_entities."""
    cfg = ctx.config.objective
    directory = cfg.get("annotations")
    if not directory:
        raise ValueError(
            f"{op}: set config.objective.annotations to the output directory of "
            "python -m mlcd.annotate"
        )
    try:
        ann = store.load_annotations(directory)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"config.objective.annotations={directory!r}: {e}") from None
    if ann.meta["num_entities"] != cfg.num_entities:
        raise ValueError(
            f"config.objective.annotations={directory!r} has {ann.meta['num_entities']} "
            f"entities but config.objective.num_entities={cfg.num_entities}"
        )
    return ann


@transforms.TRANSFORMS.register("join_entities")
class JoinEntities(transforms.Transform):
    """'entity_ids' int32 [top_l]: the example's entity ids (-1 pads) from the annotation store
    config.objective.annotations, looked up by the example's index in the split and checked
    against its id (label_store.LabelTable: a store written for another dataset, split or order
    fails on the first example, as does an id >= num_entities). Keeps the first top_l
    (config.objective.top_l; None: all l of the store). Memory-mapped."""

    reads = ("index", "id")
    writes = ("entity_ids",)

    def __init__(self, ctx: transforms.Context):
        cfg = ctx.config.objective
        ann = _annotations(ctx, "join_entities")
        self.table = label_store.LabelTable(
            cfg.annotations,
            ann.labels,
            ann.id_hashes,
            cfg.num_entities,
            cfg.get("top_l"),
            what="config.objective.annotations",
            top_l_key="config.objective.top_l",
        )

    def __call__(self, example, rng):
        index = np.asarray([example["index"]])
        labels = self.table.lookup(index, [transforms.to_str(example["id"])])
        return {"entity_ids": labels[0]}


@transforms.TRANSFORMS.register("choose_entity_text")
class ChooseEntityText(transforms.Transform):
    """'entity_text' (str) and 'text_entity' (int32): one of the example's entities, drawn
    uniformly per example and step from its valid 'entity_ids', rendered from the store's
    entity table as its name (text='name') or name + ": " + description
    (text='name_description'); default config.objective.entity_text. An example without
    entities gets text_entity = -1 and an empty text (the loss leaves it out)."""

    reads = ("entity_ids",)
    writes = ("entity_text", "text_entity")

    def __init__(self, ctx: transforms.Context, text: str | None = None):
        text = text or ctx.config.objective.get("entity_text", "name")
        if text not in ENTITY_TEXTS:
            raise ValueError(
                f"config.objective.entity_text={text!r}: expected one of {ENTITY_TEXTS}"
            )
        ann = _annotations(ctx, "choose_entity_text")
        table = entities.load_table(ann.entities_path)
        if (
            table.digest() != ann.meta["entities_digest"]
            or len(table) != ctx.config.objective.num_entities
        ):
            raise ValueError(
                f"{ann.entities_path}: the entity table does not match the annotation store "
                f"{ctx.config.objective.annotations!r} (its digest or size differs from the "
                "store's annotations meta): was it edited after python -m mlcd.annotate?"
            )
        with_description = text == "name_description"
        # Rendered once: the op runs per example on input threads.
        self.texts = [table.text(i, with_description) for i in range(len(table))]

    def __call__(self, example, rng):
        ids = [int(i) for i in np.asarray(example["entity_ids"]) if i >= 0]
        if not ids:
            return {"entity_text": "", "text_entity": np.int32(-1)}
        entity = ids[int(rng.integers(len(ids)))]
        return {"entity_text": self.texts[entity], "text_entity": np.int32(entity)}
