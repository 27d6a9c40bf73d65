"""DreamLIP (Zheng et al., ECCV 2024): long captions as several positives per image, and a
grouping loss that ties each sub-caption to the image patches it describes.

The method, in one place:
- sub-captions (the op `sample_sub_captions`): the pool of an example is its long caption(s)
  split into sentences (config.objective.long_caption_keys; `sentences_per_sub_caption`
  consecutive sentences merged into one), plus its short caption(s) when `include_short`; K
  (`num_sub_captions`) are drawn per example and epoch, seeded by (seed, example index, epoch),
  without replacement when the pool has K, else the whole pool padded and masked. A long caption
  with no sentence falls back to the short caption(s) (counted: train/frac_empty_long_caption).
  Batch fields 'sub_tokens' int32 [B, K, Ls] and 'sub_mask' bool [B, K].
- towers: the text tower embeds the [B * K, Ls] sub-captions in one pass; the image tower gives
  the pooled embedding and the patch tokens projected into the embedding space
  (out['image']['patch_embeddings'] [B, P, E]; model.image.patch_proj picks a projection shared
  with the pooled one or a separate one).
- loss = w_clip * L_clip(short caption, config.data.text_keys: the CLIP softmax loss)
       + w_mp * L_mp   (mlcd.losses.multi_positive_contrastive_loss: every sub-caption a
                        positive of its image, over the global batch)
       + w_sub * L_sub (mlcd.losses.grouping_loss: each sub-caption pools the patches it
                        matches into a region, contrasted with the image's other regions)
  L_clip and L_mp share the model's logit scale; L_sub has its own learnable local scale, the
  head 'local_scale' (its log, like the model's t; training-only, so an export is the plain
  two-tower encoder).

The paper's ablation rows are presets of configs/dreamlip.py. Any weight may be 0; the inputs
and heads a zero term would need are then not built.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import sentences, transforms
from mlcd import losses
from mlcd.models.two_tower import l2_normalize
from mlcd.objectives import OBJECTIVES, Head, Objective, loss_weights

SCOPES = ("image", "batch")
# Examples read, when the op is built, to check num_sub_captions against the pools.
_PEEK_EXAMPLES = 256


def _constant_init(value: float):
    """Head initialiser filling the array with `value` (created with its sharding)."""

    def init(key: jax.Array, shape: tuple[int, ...], sharding: jax.sharding.Sharding):
        del key
        return jax.jit(lambda: jnp.full(shape, value, jnp.float32), out_shardings=sharding)()

    return init


@OBJECTIVES.register("dreamlip")
class DreamLIP(Objective):
    """w_clip * CLIP(short caption) + w_mp * multi-positive contrastive + w_sub * grouping.

    Config (config.objective): w_clip, w_mp, w_sub (weights >= 0); num_sub_captions (K);
    long_caption_keys, short_caption_keys, include_short, sentences_per_sub_caption,
    sub_caption_length (the op's, see SampleSubCaptions); grouping: threshold (sigma in
    [0, 1)), scope ('image': the paper's denominator over the image's own regions; 'batch':
    the released code's, over every region of the batch), local_scale_init (log of the
    initial local scale), max_local_scale. Needs a text tower and config.model.logit_scale_init.

    Metrics (no gradient): clip_loss, mp_loss, sub_loss (the terms that are on), logit_scale,
    local_scale, sub_captions_per_image (mean valid K), frac_empty_long_caption.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        cfg = config.objective
        self.weights = loss_weights(cfg, ("clip", "mp", "sub"))
        if config.model.get("text") is None or config.model.get("logit_scale_init") is None:
            raise ValueError(
                "objective dreamlip needs a text tower and a logit scale: set config.model.text "
                "and config.model.logit_scale_init"
            )
        self.threshold = float(cfg.get("threshold", 0.0))
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"config.objective.threshold must be in [0, 1); got {self.threshold}")
        self.scope = cfg.get("scope", "image")
        if self.scope not in SCOPES:
            raise ValueError(f"config.objective.scope={self.scope!r}: expected one of {SCOPES}")
        self.local_scale_init = float(cfg.get("local_scale_init", math.log(1 / 0.07)))
        self.max_local_scale = float(cfg.get("max_local_scale", 100.0))
        self.uses_sub_captions = self.weights["mp"] > 0 or self.weights["sub"] > 0
        inputs = ["image"]
        if self.weights["clip"] > 0:
            inputs.append("tokens")
        if self.uses_sub_captions:
            inputs += ["sub_tokens", "sub_mask", "sub_fallback"]
        self.inputs = tuple(inputs)

    def heads(self) -> dict[str, Head]:
        if self.weights["sub"] == 0:
            return {}
        return {"local_scale": Head((), _constant_init(self.local_scale_init))}

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Adds 'sub_tokens' int32 [B, K, Ls], 'sub_mask' bool [B, K] and 'sub_fallback'
        int32 [B] when the sub-caption terms are on."""
        batch = super().abstract_batch(batch_size)
        if self.uses_sub_captions:
            k, length = sub_caption_shape(self.config)
            batch["sub_tokens"] = jax.ShapeDtypeStruct((batch_size, k, length), jnp.int32)
            batch["sub_mask"] = jax.ShapeDtypeStruct((batch_size, k), jnp.bool_)
            batch["sub_fallback"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        return batch

    def forward(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """The model on images and short-caption tokens (w_clip > 0), plus 'zsub' [B, K, E]:
        the normalised sub-caption embeddings, all B * K of them in one text-tower pass."""
        out = super().forward(model, batch)
        if self.uses_sub_captions:
            b, k, length = batch["sub_tokens"].shape
            flat = batch["sub_tokens"].reshape(b * k, length)
            zsub = l2_normalize(model.encode_text(flat)["embedding"])
            out["zsub"] = zsub.reshape(b, k, -1)
        return out

    def loss(self, out: dict[str, Any], heads, batch, rng: jax.Array):
        del rng  # nothing is sampled in the loss
        w = self.weights
        total = jnp.zeros((), jnp.float32)
        metrics: dict[str, jax.Array] = {"logit_scale": out["logit_scale"]}
        if w["clip"] > 0:
            clip = losses.softmax_contrastive_loss(out["zimg"], out["ztxt"], out["logit_scale"])
            total += w["clip"] * clip
            metrics["clip_loss"] = clip
        if w["mp"] > 0:
            mp = losses.multi_positive_contrastive_loss(
                out["zimg"], out["zsub"], batch["sub_mask"], out["logit_scale"]
            )
            total += w["mp"] * mp
            metrics["mp_loss"] = mp
        if w["sub"] > 0:
            # Capped like the model's scale: exp(t) unbounded lets the local softmax saturate.
            local_scale = jnp.minimum(jnp.exp(heads["local_scale"]), self.max_local_scale)
            sub = losses.grouping_loss(
                out["zsub"],
                out["image"]["patch_embeddings"],
                batch["sub_mask"],
                local_scale,
                threshold=self.threshold,
                scope=self.scope,
            )
            total += w["sub"] * sub
            metrics.update(sub_loss=sub, local_scale=local_scale)
        if self.uses_sub_captions:
            metrics["sub_captions_per_image"] = jnp.mean(jnp.sum(batch["sub_mask"], axis=1))
            metrics["frac_empty_long_caption"] = jnp.mean(batch["sub_fallback"].astype(jnp.float32))
        return total, jax.lax.stop_gradient(metrics)


def sub_caption_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(K, Ls): config.objective.num_sub_captions and the sub-caption token length
    (config.objective.sub_caption_length, default config.pp.context_length), checked."""
    cfg = config.objective
    k = int(cfg.get("num_sub_captions", 0))
    if k < 1:
        raise ValueError(f"config.objective.num_sub_captions must be >= 1; got {k}")
    length = int(cfg.get("sub_caption_length") or config.pp.context_length)
    if not 2 <= length <= config.pp.context_length:
        raise ValueError(
            f"config.objective.sub_caption_length={length}: must be in [2, "
            f"config.pp.context_length={config.pp.context_length}] (the text tower's positions)"
        )
    return k, length


@transforms.TRANSFORMS.register("sample_sub_captions")
class SampleSubCaptions(transforms.Transform):
    """'sub_tokens' int32 [K, Ls], 'sub_mask' bool [K] and 'sub_fallback' int32: K sub-captions
    of the example (see the module docstring), tokenized to Ls tokens.

    The draw is a function of (config.seed, the example's index in the split, its epoch) only,
    not of the op's position-keyed stream: so a resumed run draws exactly what an uninterrupted
    one would, and so would a run on another number of hosts.

    Config (config.objective): num_sub_captions (K), long_caption_keys (fields split into
    sentences), short_caption_keys (the fallback, and pool members when include_short),
    include_short, sentences_per_sub_caption (m >= 1), sub_caption_length (Ls).
    """

    writes = ("sub_tokens", "sub_mask", "sub_fallback")

    def __init__(self, ctx: transforms.Context):
        if ctx.tokenizer is None:
            raise ValueError("sample_sub_captions: the model has no text tower, so no tokenizer")
        cfg = ctx.config.objective
        self.tokenizer = ctx.tokenizer
        self.k, self.length = sub_caption_shape(ctx.config)
        self.seed = int(ctx.config.seed)
        self.long_keys = tuple(cfg.get("long_caption_keys") or ())
        self.short_keys = tuple(cfg.get("short_caption_keys") or ())
        self.include_short = bool(cfg.get("include_short", True))
        self.merge = int(cfg.get("sentences_per_sub_caption", 1))
        if self.merge < 1:
            raise ValueError(
                f"config.objective.sentences_per_sub_caption must be >= 1; got {self.merge}"
            )
        for name, keys in (("long", self.long_keys), ("short", self.short_keys)):
            if not keys:
                raise ValueError(
                    f"config.objective.{name}_caption_keys is empty: name the dataset's "
                    f"{name}-caption field(s) (features of {ctx.dataset}: {sorted(ctx.features)})"
                )
            for key in keys:
                if key not in ctx.features:
                    raise ValueError(
                        f"config.objective.{name}_caption_keys: {key!r} is not a feature of "
                        f"{ctx.dataset} (features: {sorted(ctx.features)})"
                    )
        self.reads = (*self.long_keys, *self.short_keys, "index", "epoch")
        if ctx.peek is not None:
            self._check_pools(ctx)

    def pool(self, example: dict[str, Any]) -> tuple[list[str], bool]:
        """(the example's sub-caption pool, True when its long caption(s) had no sentence and
        it fell back to the short caption(s))."""
        shorts = [t for t in (transforms.to_str(example[k]).strip() for k in self.short_keys) if t]
        found = []
        for key in self.long_keys:
            found += sentences.split_sentences(transforms.to_str(example[key]))
        merged = sentences.merge_sentences(found, self.merge)
        if not merged:
            return shorts, True
        return (shorts + merged if self.include_short else merged), False

    def _check_pools(self, ctx: transforms.Context) -> None:
        """A K larger than every pool of the first examples is a configuration error (every
        example would be padding), not something to discover in the loss curves."""
        examples = ctx.peek(_PEEK_EXAMPLES)
        if not examples:
            return
        largest = max(len(self.pool(ex)[0]) for ex in examples)
        if self.k > largest:
            raise ValueError(
                f"config.objective.num_sub_captions={self.k} is larger than every sub-caption "
                f"pool among the first {len(examples)} examples of {ctx.dataset} (largest: "
                f"{largest}, from {self.long_keys} split into sentences"
                f"{' plus ' + str(self.short_keys) if self.include_short else ''}); use at most "
                f"{largest}"
            )

    def __call__(self, example, rng):
        del rng  # keyed by (seed, index, epoch) instead: see the class docstring
        pool, fallback = self.pool(example)
        draw_rng = sentences.subcaption_rng(self.seed, int(example["index"]), int(example["epoch"]))
        texts, mask = sentences.draw_subcaptions(pool, self.k, draw_rng)
        return {
            "sub_tokens": self.tokenizer.encode(texts, self.length),
            "sub_mask": np.asarray(mask, bool),
            "sub_fallback": np.int32(fallback),
        }
