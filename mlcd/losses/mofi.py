"""MOFI: entity classification over a sharded weight matrix, and entity-aware CLIP contrastive.

Entity classification (the supervised term). For image i with entity set E_i (its ids, -1
padded, repeats counted once) and cos_ic = normalized(emb_i) . normalized(w_c):

    logits_ic = s * (cos_ic - m * [c in E_i])                      (CosFace margin, default 0)
    L_i       = -(1 / |E_i|) sum_{e in E_i} log_softmax(logits_i)[e]
              = logsumexp_{c in E_i or N'_i}(logits_ic) - (1 / |E_i|) sum_{e in E_i} logits_ie,
    L         = mean of L_i over the rows with |E_i| >= 1   (0 if there is none).

The target is uniform over the image's entities. N'_i are the negatives: every class not in E_i
(sample_ratio r = 1), or with r < 1 a random subset of the classes (a fraction r per shard,
drawn afresh from `rng` on every call) minus E_i; the positives are always in the softmax.

Sharded (under `jax.set_mesh` with more than one device), Partial-FC layout exactly like
`mlcd.losses.mlcd_loss`: weights [C, D] split along C over all devices, the batch split too.
Each device all-gathers the normalised features and the ids, then
- scores every row's positives by gathering their weight rows from the owning shard (a psum
  combines, mlcd.partial_fc.gather_cosines): every positive is kept whether or not it is
  sampled, with static shapes;
- scores its block of negatives [B, C_local] (or [B, k], k = ceil(r * C_local) sampled columns
  shared by the batch) with each row's own positives masked out, so no class counts twice;
- combines the softmax denominator across devices with pmax / psum (a stable log-sum-exp).
No device holds a [B, C] array or the full weight matrix; the weights' gradient stays sharded.

Entity contrastive: CLIP's softmax loss over a batch of (image, entity text) pairs in which a
text naming one of image i's entities is not a negative for image i (see
`entity_contrastive_loss`), sharded like `softmax_contrastive_loss` (local rows against
gathered columns).
"""

import functools
import warnings

import jax
import jax.numpy as jnp

from mlcd import partial_fc as pfc
from mlcd.losses.contrastive import _REDUCTIONS, _check_pair, _check_scalar, _combine
from mlcd.sharding import check_batch_divisible

# ----------------------------------------------------------------------------------------------
# Entity classification.


def entity_classification_loss(
    emb: jax.Array,
    weights: jax.Array,
    entity_ids: jax.Array,
    *,
    scale: float = 32.0,
    margin: float = 0.0,
    sample_ratio: float = 1.0,
    rng: jax.Array | None = None,
    return_metrics: bool = False,
):
    """MOFI's normalised-softmax entity classifier with a uniform target over each image's
    entities (formula in the module doc).

    Args:
      emb: float [B, D] image embeddings; L2-normalised here (any norm accepted).
      weights: float [C, D] entity classifier; each row L2-normalised here. Under a mesh of
        N > 1 devices it should be sharded PartitionSpec(mesh.axis_names) on dim 0 (it is
        resharded otherwise); C must be divisible by N.
      entity_ids: int [B, l] entity ids per row, -1 padding; repeats count once. Rows with no
        valid id are left out of the mean (and get no gradient). Concrete ids outside [-1, C)
        raise a ValueError naming the row; under jit they cannot be checked and such ids are
        ignored like padding.
      scale: s > 0, Python float.
      margin: CosFace margin m >= 0 subtracted from the cosines of the row's own entities,
        Python float.
      sample_ratio: r in (0, 1]. With r < 1 each shard samples k = ceil(r * C_local) of its
        classes (a function of (rng, shard index) only: mlcd.partial_fc.sampled_classes
        reproduces the set) as the candidate negatives shared by the batch; each row's own
        entities are always in its softmax and are excluded from the sampled block. The
        denominator is then over E_i plus the sampled classes not in E_i.
      rng: PRNG key, required when sample_ratio < 1 (pass a fresh one every step); ignored
        otherwise.
      return_metrics: also return a dict of float32 scalars (no gradient):
        pos_cos: mean cosine over the valid (deduplicated) entity ids of the batch;
        neg_cos: mean cosine over the scored negatives (all non-entity classes, or the sampled
          ones minus each row's entities);
        frac_with_entity: fraction of the B rows with at least one entity;
        accuracy: over the rows with at least one entity (0 if none), the fraction whose
          highest-cosine candidate (no margin: the inference-time prediction; candidates =
          the row's entities and its scored negatives, i.e. all C classes when r = 1) is one
          of its entities; a tie with a negative counts as correct;
        num_negatives: mean number of scored negatives per row.

    Returns:
      The scalar loss (float32 or wider), or (loss, metrics) with return_metrics. If no row
      has an entity the loss is 0 with zero (finite) gradients.
    """
    if emb.ndim != 2 or weights.ndim != 2 or emb.shape[1] != weights.shape[1]:
        raise ValueError(
            f"emb must be [B, D] and weights [C, D] with the same D; got emb {emb.shape} and "
            f"weights {weights.shape}."
        )
    if entity_ids.ndim != 2 or entity_ids.shape[0] != emb.shape[0]:
        raise ValueError(
            f"entity_ids must be [B, l] with B={emb.shape[0]}; got {entity_ids.shape}."
        )
    if not jnp.issubdtype(entity_ids.dtype, jnp.integer):
        raise ValueError(f"entity_ids must be integers; got dtype {entity_ids.dtype}.")
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale}.")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0; got {margin}.")
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1]; got {sample_ratio}.")
    if sample_ratio < 1.0 and rng is None:
        raise ValueError(
            f"sample_ratio={sample_ratio} < 1 samples random negatives: pass rng (a PRNG key, "
            "a fresh one every step)."
        )
    pfc.check_ids_concrete(entity_ids, weights.shape[0], "entity_ids")
    return _entity_classification_loss(
        emb,
        weights,
        entity_ids,
        rng if sample_ratio < 1.0 else None,
        scale=float(scale),
        margin=float(margin),
        sample_ratio=float(sample_ratio),
        return_metrics=bool(return_metrics),
    )


def _logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(exp(a) + exp(b)) elementwise; -inf inputs allowed (with zero, not NaN, gradients).

    jnp.logaddexp's gradient is NaN where both are -inf; here the shift m is a constant for
    autodiff (the result does not depend on it) and an empty sum gives -inf without a log(0)
    on the differentiated path.
    """
    m = jax.lax.stop_gradient(jnp.maximum(a, b))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.exp(a - m) + jnp.exp(b - m)
    return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)


def _classification_per_device(
    emb, weights, ids, rng, *, num_classes, scale, margin, sample_ratio, metrics, axes
):
    """The loss (and metrics if asked) from one device's rows of emb / ids and its weights.

    emb [b, D], ids [b, l] (this device's batch rows; b = B without axes), weights
    [C_local, D]. Returns device-invariant scalars.
    """
    feats, ids = pfc.gather_rows(emb, ids, num_classes, axes)  # [B, D], [B, l]
    batch = feats.shape[0]
    positive = pfc.first_occurrence(ids)  # [B, l]: E_i as a set
    num_pos = jnp.sum(positive, axis=1)  # |E_i|
    has_entity = num_pos > 0

    # Positives: logits_ie = s (cos_ie - m), each gathered from the shard that owns e.
    cos_pos = pfc.gather_cosines(feats, weights, ids, axes)  # [B, l]
    z_pos = scale * (cos_pos - margin)
    lse_pos = pfc.logsumexp(z_pos, positive, None)  # [B]; -inf (zero grad) if E_i is empty

    # Negatives: this shard's (sampled) columns, shared by the batch, minus each row's E_i
    # (already counted above).
    cos_neg, negative = pfc.negative_block(feats, weights, ids, rng, sample_ratio, axes)  # [B, k]
    lse_neg = pfc.logsumexp(scale * cos_neg, negative, axes)  # [B], over every shard

    # L_i = log(sum_{E_i} exp z_pos + sum_{N'_i} exp z_neg) - mean_{e in E_i} z_pos_ie.
    lse = _logaddexp(lse_pos, lse_neg)
    target = jnp.sum(jnp.where(positive, z_pos, 0.0), axis=1) / jnp.maximum(num_pos, 1)
    per_row = jnp.where(has_entity, lse - target, 0.0)
    num_rows = jnp.sum(has_entity)
    loss = jnp.sum(per_row) / jnp.maximum(num_rows, 1)
    if not metrics:
        return loss

    def total(x):
        return x if axes is None else jax.lax.psum(x, axes)

    cos_neg, cos_pos = jax.lax.stop_gradient((cos_neg, cos_pos))
    neg_count = total(jnp.sum(negative, dtype=jnp.float32))
    # Top-1 without a [B, C] gather: the best entity's cosine against the best negative's,
    # the latter a per-row max over this shard's block combined with pmax.
    best_pos = jnp.max(jnp.where(positive, cos_pos, -jnp.inf), axis=1)
    best_neg = jnp.max(jnp.where(negative, cos_neg, -jnp.inf), axis=1)
    if axes is not None:
        best_neg = jax.lax.pmax(best_neg, axes)
    correct = has_entity & (best_pos >= best_neg)
    return loss, {
        "pos_cos": jnp.sum(jnp.where(positive, cos_pos, 0.0)) / jnp.maximum(jnp.sum(num_pos), 1),
        "neg_cos": total(jnp.sum(jnp.where(negative, cos_neg, 0.0))) / jnp.maximum(neg_count, 1),
        "frac_with_entity": num_rows / batch,
        "accuracy": jnp.sum(correct) / jnp.maximum(num_rows, 1),
        "num_negatives": neg_count / batch,
    }


@functools.partial(jax.jit, static_argnames=("scale", "margin", "sample_ratio", "return_metrics"))
def _entity_classification_loss(
    emb, weights, entity_ids, rng, *, scale, margin, sample_ratio, return_metrics
):
    emb, weights = pfc.as_float32(emb), pfc.as_float32(weights)
    num_classes = weights.shape[0]
    mesh = pfc.batch_mesh()
    num_shards = 1 if mesh is None else mesh.size
    if mesh is not None:
        check_batch_divisible(emb.shape[0], mesh, "global batch size")
        check_batch_divisible(num_classes, mesh, "number of entities C")
    num_local = num_classes // num_shards
    if sample_ratio * num_local < 1:
        warnings.warn(
            f"entity_classification_loss: sample_ratio={sample_ratio} x {num_local} classes per "
            f"shard < 1; sampling 1 class per shard (an effective ratio of 1/{num_local}).",
            stacklevel=3,
        )
    body = functools.partial(
        _classification_per_device,
        num_classes=num_classes,
        scale=scale,
        margin=margin,
        sample_ratio=sample_ratio,
        metrics=return_metrics,
    )
    return pfc.apply_sharded(body, (emb, weights, entity_ids), (rng,))


# ----------------------------------------------------------------------------------------------
# Entity contrastive.


def entity_contrastive_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    image_entities: jax.Array,
    text_entities: jax.Array,
    logit_scale: jax.Array | float,
    *,
    reduction: str = "mean",
) -> jax.Array:
    """CLIP softmax loss on (image, entity text) pairs where texts naming an image's entities
    are not its negatives.

    With logits_ij = s * zimg_i . ztxt_j, valid rows V = {j : text_entities[j] >= 0} and the
    candidate set
        K_ij = [i in V] [j in V] ([i == j] or text_entities[j] not in image_entities[i]),
    i.e. a pair (i, j), i != j, is removed from BOTH softmaxes when text j names one of image
    i's entities (the diagonal pair is always kept):
        L_i2t = (1 / |V|) sum_{i in V} -log( exp(logits_ii) / sum_{j: K_ij} exp(logits_ij) ),
        L_t2i = (1 / |V|) sum_{j in V} -log( exp(logits_jj) / sum_{i: K_ij} exp(logits_ij) ).
    A row j with text_entities[j] == -1 has no real text: pair j is left out entirely, i.e.
    image j and text j are neither anchors in either direction nor candidates in any other
    row's softmax (its image_entities are then irrelevant). With no valid row the loss is 0
    with zero (finite) gradients.

    Args:
      zimg: float [B, D] image embeddings, already L2-normalised (not renormalised here).
      ztxt: float [B, D] embeddings of the entity texts, already L2-normalised; row i pairs
        with zimg[i].
      image_entities: int [B, l] entity ids of each image, -1 padding (repeats harmless).
      text_entities: int [B], the entity whose name (or name + description) text j is; -1: row
        j has no entity text.
      logit_scale: scalar s, the multiplier itself (already exponentiated and clipped).
      reduction: "mean" -> (L_i2t + L_t2i) / 2 (CLIP); "sum" -> L_i2t + L_t2i (ALIGN), as in
        `softmax_contrastive_loss`; each direction is a mean over the |V| valid anchors.

    Returns:
      float32 (or wider) scalar. Concrete ids below -1 raise a ValueError naming the row (under
      jit they are treated as -1). Under `jax.set_mesh` with more than one device the batch
      must be divisible by the device count (ValueError otherwise) and the loss runs sharded:
      local rows against all-gathered columns, O(b * B * l) memory per device.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got reduction={reduction!r}.")
    batch = _check_pair(zimg, ztxt)
    if image_entities.ndim != 2 or image_entities.shape[0] != batch:
        raise ValueError(
            f"image_entities must be [B, l] with B={batch}; got {image_entities.shape}."
        )
    if text_entities.shape != (batch,):
        raise ValueError(f"text_entities must be [B] with B={batch}; got {text_entities.shape}.")
    for name, ids in (("image_entities", image_entities), ("text_entities", text_entities)):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers; got dtype {ids.dtype}.")
        pfc.check_ids_concrete(ids, None, name)
    _check_scalar(logit_scale, "logit_scale")
    return _entity_contrastive_loss(
        zimg, ztxt, image_entities, text_entities, logit_scale, reduction=reduction
    )


def _masked_ce_sum(logits, keep, labels, anchor):
    """sum over anchor rows of -log softmax over the kept columns, at the label column.

    logits [r, c], keep bool [r, c] (the label column kept on anchor rows), labels int [r] in
    [0, c), anchor bool [r]. Non-anchor rows contribute 0 with zero gradients (their kept set
    may be empty: pfc.logsumexp gives -inf with a zero gradient there).
    """
    lse = pfc.logsumexp(logits, keep, None)
    own = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(anchor, lse - own, 0.0))


def _names_entity_of(text_ids, image_ids):
    """bool [r, c]: text_ids[a] (>= 0) is one of image_ids[b]'s entities, for the pairing
    [r] x [c, l] (or transposed by the caller). O(r * c * l) booleans, l ~ 8."""
    return jnp.any(text_ids[:, None, None] == image_ids[None, :, :], axis=2) & (
        text_ids[:, None] >= 0
    )


def _contrastive_per_device(zimg, ztxt, image_ids, text_ids, scale, *, reduction, axes):
    """Both directions for this device's b rows against all B gathered columns.

    zimg, ztxt [b, D], image_ids [b, l], text_ids [b] (b = B without axes); scale scalar.
    Returns a device-invariant scalar.
    """
    local = zimg.shape[0]
    if axes is None:
        zimg_all, ztxt_all, image_all, text_all = zimg, ztxt, image_ids, text_ids
    else:
        zimg_all = jax.lax.all_gather(zimg, axes, tiled=True)  # [B, D]; grad: reduce-scatter
        ztxt_all = jax.lax.all_gather(ztxt, axes, tiled=True)
        image_all = jax.lax.all_gather(image_ids, axes, tiled=True, to="invarying")  # [B, l]
        text_all = jax.lax.all_gather(text_ids, axes, tiled=True, to="invarying")  # [B]
    # Local row k is global pair shard * b + k: its positive column among the gathered ones.
    own = pfc.shard_index(axes) * local + jnp.arange(local)
    diagonal = own[:, None] == jnp.arange(ztxt_all.shape[0])[None, :]  # [b, B]
    valid, valid_all = text_ids >= 0, text_all >= 0
    both_valid = valid[:, None] & valid_all[None, :]

    # Image -> text: local images (rows i) against all texts (columns j); drop text j if it
    # names one of image i's entities.
    named = _names_entity_of(text_all, image_ids).T  # [b, B]: text j names an entity of i
    keep = both_valid & (diagonal | ~named)
    l_i2t = _masked_ce_sum(scale * zimg @ ztxt_all.T, keep, own, valid)
    # Text -> image: local texts (rows j) against all images (columns i); the same pairs.
    named = _names_entity_of(text_ids, image_all)  # [b, B]: text j names an entity of i
    keep = both_valid & (diagonal | ~named)
    l_t2i = _masked_ce_sum(scale * ztxt @ zimg_all.T, keep, own, valid)

    if axes is not None:
        l_i2t, l_t2i = jax.lax.psum((l_i2t, l_t2i), axes)
    num_valid = jnp.maximum(jnp.sum(valid_all), 1)  # gathered: device-invariant
    return _combine(l_i2t, l_t2i, reduction) / num_valid


@functools.partial(jax.jit, static_argnames=("reduction",))
def _entity_contrastive_loss(zimg, ztxt, image_entities, text_entities, logit_scale, *, reduction):
    zimg, ztxt = pfc.as_float32(zimg), pfc.as_float32(ztxt)
    logit_scale = pfc.as_float32(logit_scale)
    mesh = pfc.batch_mesh()
    if mesh is not None:
        check_batch_divisible(zimg.shape[0], mesh, "global batch size")
    body = functools.partial(_contrastive_per_device, reduction=reduction)
    return pfc.apply_sharded(body, (zimg, ztxt, image_entities, text_entities), (logit_scale,))
