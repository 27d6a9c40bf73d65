"""MLCD: multi-label cluster discrimination loss over a sharded class-center matrix.

For image i with positive clusters P_i (its top-l center ids, -1 padded) and
cos_ic = normalized(emb_i) . normalized(center_c):

    z+_ic = s * cos(theta_ic + m)  (ArcFace)   or   s * (cos_ic - m)  (CosFace),  c in P_i
    z-_ic = s * cos_ic,                                                           c in N'_i
    L_i   = log(1 + sum_{c in P_i} exp(-z+_ic)) + log(1 + sum_{c in N'_i} exp(z-_ic))
          = softplus(logsumexp_{P_i}(-z+)) + softplus(logsumexp_{N'_i}(z-)),
    L     = mean_i L_i.

N'_i is a random subset of the classes (a fraction r, drawn afresh from `rng` on every call)
minus i's own positives; with r = 1 it is every class except i's positives.

Sharded (under `jax.set_mesh` with more than one device), Partial-FC layout: centers [C, D]
split along C over all devices (C_local = C / N rows each), the batch split over all devices.
Each device all-gathers the features and labels, then
- positives: gathers the [B, l] center rows of the positives it owns and scores them; a psum
  combines (mlcd.partial_fc.gather_cosines). Every positive is always scored,
  however many positives the batch holds and whether or not its class is sampled: no overflow,
  static shapes.
- negatives: samples k = ceil(r * C_local) of its classes (shared by the whole batch), scores
  them [B, k], masks each row's own positives, and the row log-sum-exp is combined across
  devices with pmax / psum.
No device holds a [B, C] array or the full center matrix; the centers' gradient stays sharded.
Gradients are the exact gradients of the formula (including d cos(theta + m) / d cos), not
Partial FC's straight-through margin.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from mlcd import partial_fc as pfc
from mlcd.sharding import check_batch_divisible

# Below 1 - cos^2 = 1e-6 (theta < ~1e-3 rad) the sin(theta) factor of the ArcFace margin is
# held constant for autodiff. d cos(theta + m) / d cos = cos m + cos * sin m / sin(theta) grows
# without bound as theta -> 0 (the gradient w.r.t. the embedding stays bounded only through a
# cancellation that float32 cannot resolve); above the threshold it is at most ~300 cos m.
_ARCFACE_SIN2_FLOOR = 1e-6


def _arcface(cos: jax.Array, m: float) -> jax.Array:
    """cos(theta + m) with theta = arccos(clip(cos, -1, 1)), elementwise.

    Expanded as cos * cos(m) - sin(theta) * sin(m), sin(theta) = sqrt(1 - cos^2): no arccos
    (whose derivative is infinite at +-1). Where theta + m > pi (cos < cos(pi - m)) the
    function would turn back and reward pushing the positive further away; there we follow
    ArcFace's reference implementation (insightface) and use cos - m * sin(m), which keeps z+
    increasing in cos (slope 1; it jumps by at most 0.05 at the switch for m = 0.3).
    Gradients are exact except for theta < ~1e-3 rad (see _ARCFACE_SIN2_FLOOR), where only the
    cos * cos(m) part is differentiated.
    """
    sin2 = 1.0 - cos * cos
    big = sin2 > _ARCFACE_SIN2_FLOOR
    # Double where: sqrt only ever sees values above the floor on the differentiated branch.
    sin_theta = jnp.where(
        big,
        jnp.sqrt(jnp.where(big, sin2, 1.0)),
        jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sin2, 0.0))),
    )
    phi = cos * math.cos(m) - sin_theta * math.sin(m)
    return jnp.where(cos > math.cos(math.pi - m), phi, cos - m * math.sin(m))


def _cosface(cos: jax.Array, m: float) -> jax.Array:
    """cos - m, elementwise."""
    return cos - m


MARGINS = {"arcface": _arcface, "cosface": _cosface}


def mlcd_loss(
    emb: jax.Array,
    centers: jax.Array,
    labels: jax.Array,
    *,
    scale: float = 64.0,
    margin: float = 0.3,
    margin_type: str = "arcface",
    sample_ratio: float = 1.0,
    rng: jax.Array | None = None,
    return_metrics: bool = False,
):
    """MLCD multi-label margin loss (An et al., ECCV 2024, Eq. 5); formula in the module doc.

    Args:
      emb: float [B, D] image embeddings; L2-normalised here (any norm accepted).
      centers: float [C, D] class centers; each row L2-normalised here. Under a mesh of N > 1
        devices it should be sharded PartitionSpec(mesh.axis_names) on dim 0 (it is resharded
        otherwise); C must be divisible by N.
      labels: int [B, l] positive class ids per row, -1 padding; repeats count once. A row with
        no valid id contributes only its negative term. Concrete labels outside [-1, C) raise a
        ValueError; under jit they cannot be checked and such ids are ignored like padding.
      scale: s, Python float (32 and 64 are both used by the authors' code).
      margin: m >= 0, Python float (radians for ArcFace, < pi).
      margin_type: "arcface" (z+ = s cos(theta + m); see _arcface for theta + m > pi and
        theta ~ 0) or "cosface" (z+ = s (cos - m)).
      sample_ratio: r in (0, 1]. With r < 1 each shard samples k = ceil(r * C_local) of its
        classes as negatives (Partial FC; the paper's best is 0.1), a function of (rng, shard
        index) only, so the sampled set depends on the number of devices: the same rng on 1
        and on 8 devices gives different (equally distributed) subsets. See
        mlcd.partial_fc.sampled_classes for a reproduction.
      rng: PRNG key, required when sample_ratio < 1 (pass a fresh one every step); ignored
        otherwise.
      return_metrics: also return a dict of float32 scalars (no gradient): pos_loss and
        neg_loss (batch means of the two terms), pos_cos (mean cosine over valid positives),
        neg_cos (mean cosine over the sampled negatives, own positives excluded),
        num_negatives (mean number of negatives per row).

    Returns:
      The scalar loss (float32 or wider), or (loss, metrics) with return_metrics.
    """
    if emb.ndim != 2 or centers.ndim != 2 or emb.shape[1] != centers.shape[1]:
        raise ValueError(
            f"emb must be [B, D] and centers [C, D] with the same D; got emb {emb.shape} and "
            f"centers {centers.shape}."
        )
    if labels.ndim != 2 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must be [B, l] with B={emb.shape[0]}; got {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
    if margin_type not in MARGINS:
        raise ValueError(f"margin_type must be one of {tuple(MARGINS)}; got {margin_type!r}.")
    if not 0.0 <= margin < (math.pi if margin_type == "arcface" else math.inf):
        raise ValueError(f"margin must be >= 0 (and < pi for arcface); got {margin}.")
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1]; got {sample_ratio}.")
    if sample_ratio < 1.0 and rng is None:
        raise ValueError(
            f"sample_ratio={sample_ratio} < 1 samples random negatives: pass rng (a PRNG key, "
            "a fresh one every step)."
        )
    pfc.check_ids_concrete(labels, centers.shape[0])
    return _mlcd_loss(
        emb,
        centers,
        labels,
        rng if sample_ratio < 1.0 else None,
        scale=float(scale),
        margin=float(margin),
        margin_type=margin_type,
        sample_ratio=float(sample_ratio),
        return_metrics=bool(return_metrics),
    )


def _per_device(
    emb, centers, labels, rng, *, num_classes, scale, margin_fn, sample_ratio, metrics, axes
):
    """The loss (and metrics if asked) from one device's rows of emb / labels and its centers.

    emb [b, D], labels [b, l] (this device's batch rows; b = B without axes), centers
    [C_local, D]. Returns device-invariant scalars.
    """
    feats, labels = pfc.gather_rows(emb, labels, num_classes, axes)  # [B, D], [B, l]
    batch = feats.shape[0]

    # Positive term: every row's l centers gathered directly from their owners.
    positive = pfc.first_occurrence(labels)  # P_i is a set: a repeated id counts once
    cos_pos = pfc.gather_cosines(feats, centers, labels, axes)  # [B, l]
    z_pos = scale * margin_fn(cos_pos)
    pos_term = jax.nn.softplus(pfc.logsumexp(-z_pos, positive, None))  # [B]; 0 if P_i empty

    # Negative term: this shard's sampled (or all) classes, shared by the batch, minus each
    # row's own positives.
    cos_neg, negative = pfc.negative_block(
        feats, centers, labels, rng, sample_ratio, axes
    )  # [B, k]
    neg_term = jax.nn.softplus(pfc.logsumexp(scale * cos_neg, negative, axes))  # [B]

    loss = jnp.mean(pos_term + neg_term)
    if not metrics:
        return loss

    def total(x):
        return x if axes is None else jax.lax.psum(x, axes)

    cos_neg, cos_pos = jax.lax.stop_gradient((cos_neg, cos_pos))
    neg_count = total(jnp.sum(negative, dtype=jnp.float32))
    return loss, {
        "pos_loss": jnp.mean(jax.lax.stop_gradient(pos_term)),
        "neg_loss": jnp.mean(jax.lax.stop_gradient(neg_term)),
        "pos_cos": jnp.sum(jnp.where(positive, cos_pos, 0.0)) / jnp.maximum(jnp.sum(positive), 1),
        "neg_cos": total(jnp.sum(jnp.where(negative, cos_neg, 0.0))) / jnp.maximum(neg_count, 1),
        "num_negatives": neg_count / batch,
    }


def _warn_degenerate_sampling(sample_ratio, num_local, num_shards, num_labels) -> None:
    k = pfc.num_sampled(num_local, sample_ratio)
    if sample_ratio * num_local < 1:
        warnings.warn(
            f"mlcd_loss: sample_ratio={sample_ratio} x {num_local} classes per shard < 1; "
            f"sampling 1 class per shard (an effective ratio of 1/{num_local}).",
            stacklevel=4,
        )
    if sample_ratio < 1.0 and num_shards * k <= num_labels:
        warnings.warn(
            f"mlcd_loss: sample_ratio={sample_ratio} samples only {num_shards * k} negative "
            f"classes per step, no more than the {num_labels} labels per row: rows whose "
            "positives cover the sample get no negative term.",
            stacklevel=4,
        )


@functools.partial(
    jax.jit,
    static_argnames=("scale", "margin", "margin_type", "sample_ratio", "return_metrics"),
)
def _mlcd_loss(
    emb, centers, labels, rng, *, scale, margin, margin_type, sample_ratio, return_metrics
):
    emb, centers = pfc.as_float32(emb), pfc.as_float32(centers)
    num_classes = centers.shape[0]
    body = functools.partial(
        _per_device,
        num_classes=num_classes,
        scale=scale,
        margin_fn=functools.partial(MARGINS[margin_type], m=margin),
        sample_ratio=sample_ratio,
        metrics=return_metrics,
    )
    mesh = pfc.batch_mesh()
    num_shards = 1 if mesh is None else mesh.size
    if mesh is not None:
        check_batch_divisible(emb.shape[0], mesh, "global batch size")
        check_batch_divisible(num_classes, mesh, "number of centers C")
    _warn_degenerate_sampling(sample_ratio, num_classes // num_shards, num_shards, labels.shape[1])
    return pfc.apply_sharded(body, (emb, centers, labels), (rng,))
