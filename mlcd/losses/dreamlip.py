"""DreamLIP losses: image to several sub-captions (multi-positive contrastive) and sub-caption
to patch regions (grouping).

Each image i of a global batch of B comes with K sub-caption slots zsub_ik (sentences of its long
caption; a slot is valid where sub_mask_ik, padding otherwise). V = number of valid (n, k).

Multi-positive contrastive. With l_i,(n,k) = s * zimg_i . zsub_nk (s = logit_scale):
    L_t2i = (1 / V) sum_{valid (n,k)} -log( exp(l_n,(n,k)) / sum_{i<B} exp(l_i,(n,k)) ),
    L_i2t = (1 / V) sum_{valid (i,k)} -log( exp(l_i,(i,k)) / sum_{valid (n,k')} exp(l_i,(n,k')) ),
    L     = (L_t2i + L_i2t) / 2.
Every sub-caption picks its image among all B images; every image scores each of its valid
sub-captions against every valid sub-caption of the batch (its own other positives included:
each positive is a separate term with the full denominator).

Grouping. With p_in = patches_in / ||patches_in|| (P patches of image i) and valid (i, k):
    a_n  = p_in . zsub_ik,                                    n < P (the sub-caption's map)
    a'_n = (a_n - min_m a_m) / (max_m a_m - min_m a_m)        in [0, 1]; a'_n = 1 for all n if
                                                              max == min (uniform weights)
    w_n  = [a'_n >= sigma] a'_n / sum_m [a'_m >= sigma] a'_m   (sigma = threshold in [0, 1))
    r_ik = normalise(sum_n w_n p_in)                          (the sub-caption's region)
    L_ik = -log( exp(s cos(r_ik, zsub_ik)) / sum_{valid (n,k') in S_ik} exp(s cos(r_nk', zsub_ik)) ),
    L    = (1 / V) sum_{valid (i,k)} L_ik,
with S_ik = image i's own valid slots (scope "image", the paper) or every valid slot of the
batch (scope "batch", the released code). The selection [a'_n >= sigma] is a hard mask (no
gradient); the kept a'_n carry gradient, through the min-max normalisation, into the patches
and zsub_ik.

Both losses are 0 with zero (finite) gradients when V == 0. Called under `jax.set_mesh(mesh)`
with a mesh of more than one device, they run sharded with `jax.shard_map`, the batch split over
all mesh axes (b = B / N images per device, with their sub-captions, masks and patches):

- multi-positive: like `softmax_contrastive_loss`, local rows against gathered columns: the b*K
  local sub-captions against the B gathered images [b*K, B], and the b local images against the
  B*K gathered sub-captions [b, B*K]; the sums and V are combined with psum;
- grouping: the regions are computed where the patches are (never gathered). Scope "image" is
  entirely local but for the psum of the sum and of V; scope "batch" gathers the regions [B*K, D]
  and scores the local sub-captions against them, [b*K, B*K].
No device holds a [B, B*K] or [B*K, B*P] array. The gathers' transposes are reduce-scatters, so
the gradients reach the owning devices without extra code; `logit_scale` is a replicated scalar
(its gradient is the psum over devices, see mlcd.losses.contrastive).
"""

import functools

import jax
import jax.numpy as jnp

from mlcd import partial_fc as pfc
from mlcd.losses.contrastive import _check_scalar
from mlcd.losses.mofi import _masked_ce_sum
from mlcd.sharding import check_batch_divisible

_SCOPES = ("image", "batch")


def _check_subs(zsub: jax.Array, sub_mask: jax.Array, batch: int, dim: int, other: str) -> int:
    """Validates zsub [B, K, D] and sub_mask [B, K] against the batch B and width D of `other`;
    returns K."""
    if zsub.ndim != 3 or zsub.shape[0] != batch or zsub.shape[2] != dim:
        raise ValueError(
            f"zsub must be [B, K, D] with the B={batch} and D={dim} of {other}; got zsub "
            f"{zsub.shape}."
        )
    if jnp.shape(sub_mask) != zsub.shape[:2]:
        raise ValueError(
            f"sub_mask must be [B, K] = {zsub.shape[:2]} like zsub; got {jnp.shape(sub_mask)}."
        )
    return zsub.shape[1]


def _gather(x: jax.Array, axes: pfc.Axes, *, invariant: bool = False) -> jax.Array:
    """x [b, ...] gathered over the batch axes into [B, ...] in global order (x without axes).

    invariant: for masks (no gradient), a device-invariant result, so that counts taken from it
    need no psum; float values stay varying, so that the gather transposes to a reduce-scatter.
    """
    if axes is None:
        return x
    return jax.lax.all_gather(x, axes, tiled=True, **({"to": "invarying"} if invariant else {}))


# ----------------------------------------------------------------------------------------------
# Multi-positive contrastive.


def multi_positive_contrastive_loss(
    zimg: jax.Array,
    zsub: jax.Array,
    sub_mask: jax.Array,
    logit_scale: jax.Array | float,
) -> jax.Array:
    """DreamLIP's image / sub-caption contrastive loss: every valid sub-caption of an image is
    one of its positives (formula in the module doc).

    Args:
      zimg: float [B, D] image embeddings, already L2-normalised (not renormalised here).
      zsub: float [B, K, D] sub-caption embeddings, already L2-normalised; zsub[i, k] is the
        k-th sub-caption of image i.
      sub_mask: bool (or 0/1) [B, K]; True / nonzero = valid sub-caption, False / 0 = padding.
        Padded slots are neither anchors nor candidates (their zsub gets no gradient). An image
        without a valid sub-caption is still a candidate in every text -> image softmax.
      logit_scale: scalar s, the multiplier itself (already exponentiated and clipped).

    Returns:
      float32 (or wider) scalar (L_t2i + L_i2t) / 2, each direction a mean over the V valid
      sub-captions; 0 with zero gradients if V == 0. Under `jax.set_mesh` with more than one
      device the batch must be divisible by the device count (ValueError otherwise) and the
      loss runs sharded: O(b * B * K) logits per device.
    """
    if zimg.ndim != 2:
        raise ValueError(f"zimg must be [B, D]; got {zimg.shape}.")
    _check_subs(zsub, sub_mask, zimg.shape[0], zimg.shape[1], f"zimg {zimg.shape}")
    _check_scalar(logit_scale, "logit_scale")
    return _multi_positive_loss(zimg, zsub, sub_mask, logit_scale)


def _multi_positive_per_device(zimg, zsub, valid, scale, *, axes):
    """Both directions for this device's b images and their b*K sub-captions.

    zimg [b, D], zsub [b, K, D], valid bool [b, K] (b = B without axes); scale scalar. Returns a
    device-invariant scalar.
    """
    local, k, dim = zsub.shape
    zsub_flat, valid_flat = zsub.reshape(local * k, dim), valid.reshape(local * k)
    # Local image j is global image shard * b + j; its slot k is global column (that) * K + k of
    # the gathered sub-captions (tiled gathers list devices in shard order, pfc module doc).
    own = pfc.shard_index(axes) * local + jnp.arange(local)  # [b]

    # Text -> image: row (j, k) is a softmax over all B images, its label image j.
    zimg_all = _gather(zimg, axes)  # [B, D]
    logits = scale * zsub_flat @ zimg_all.T  # [b*K, B]
    every_image = jnp.ones((1, logits.shape[1]), bool)
    l_t2i = _masked_ce_sum(logits, every_image, jnp.repeat(own, k), valid_flat)

    # Image -> text: one denominator per image, sum over every valid (n, k') of the batch, shared
    # by its K positive terms: sum_k valid_jk (lse_j - l_j,(j,k)).
    zsub_all = _gather(zsub_flat, axes)  # [B*K, D]
    valid_all = _gather(valid_flat, axes, invariant=True)  # [B*K]
    logits = scale * zimg @ zsub_all.T  # [b, B*K]
    lse = pfc.logsumexp(logits, valid_all[None, :], None)  # [b]; -inf (zero grad) if V == 0
    positives = jnp.take_along_axis(logits, own[:, None] * k + jnp.arange(k), axis=1)  # [b, K]
    l_i2t = jnp.sum(jnp.where(valid, lse[:, None] - positives, 0.0))

    if axes is not None:
        l_t2i, l_i2t = jax.lax.psum((l_t2i, l_i2t), axes)
    num_valid = jnp.maximum(jnp.sum(valid_all), 1)  # gathered: device-invariant
    return (l_t2i + l_i2t) / (2 * num_valid)


# Jitted so that an eager call is one compiled program (see contrastive._softmax_loss).
@jax.jit
def _multi_positive_loss(zimg, zsub, sub_mask, logit_scale):
    zimg, zsub = pfc.as_float32(zimg), pfc.as_float32(zsub)
    logit_scale = pfc.as_float32(logit_scale)
    if (mesh := pfc.batch_mesh()) is not None:
        check_batch_divisible(zimg.shape[0], mesh, "global batch size")
    return pfc.apply_sharded(
        _multi_positive_per_device, (zimg, zsub, jnp.asarray(sub_mask) != 0), (logit_scale,)
    )


# ----------------------------------------------------------------------------------------------
# Grouping.


def grouping_loss(
    zsub: jax.Array,
    patches: jax.Array,
    sub_mask: jax.Array,
    logit_scale: jax.Array | float,
    *,
    threshold: float = 0.0,
    scope: str = "image",
) -> jax.Array:
    """DreamLIP's fine-grained grouping loss: each sub-caption against the region its own
    similarity map selects among the image's patches (formula in the module doc).

    Args:
      zsub: float [B, K, D] sub-caption embeddings, already L2-normalised (not renormalised
        here).
      patches: float [B, P, D] patch tokens projected to the embedding dim, any norm: each
        patch is L2-normalised here (an all-zero patch stays 0).
      sub_mask: bool (or 0/1) [B, K]; True / nonzero = valid sub-caption, False / 0 = padding.
        Padded slots are neither anchors nor candidates (no gradient reaches them).
      logit_scale: scalar s_loc, the multiplier itself (already exponentiated; the learnable
        local scale, separate from the global contrastive one).
      threshold: sigma in [0, 1), Python float: patches whose min-max normalised similarity is
        below it get weight 0. The largest one (a' = 1) is always kept, so the weights never sum
        to 0. A constant map (max == min, e.g. identical patches) has no ordering: every patch
        gets weight 1 / P.
      scope: "image" (the paper): sub-caption k of image i picks its region among the regions
        of image i's valid sub-captions; an image with a single valid sub-caption contributes
        0 terms (still counted in V). "batch" (the released code): among the regions of every
        valid sub-caption of the batch.

    Returns:
      float32 (or wider) scalar, the mean over the V valid sub-captions; 0 with zero gradients
      if V == 0. Under `jax.set_mesh` with more than one device the batch must be divisible by
      the device count (ValueError otherwise) and the loss runs sharded: patches stay on their
      device; O(b * K * P) similarities and, for scope "batch", [b*K, B*K] logits per device.
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}; got scope={scope!r}.")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1); got threshold={threshold}.")
    if patches.ndim != 3:
        raise ValueError(f"patches must be [B, P, D]; got {patches.shape}.")
    _check_subs(zsub, sub_mask, patches.shape[0], patches.shape[2], f"patches {patches.shape}")
    _check_scalar(logit_scale, "logit_scale")
    return _grouping_loss(
        zsub, patches, sub_mask, logit_scale, threshold=float(threshold), scope=scope
    )


def _regions(zsub: jax.Array, patches: jax.Array, threshold: float) -> jax.Array:
    """r_ik = normalise(sum_n w_ikn p_in) [b, K, D] from zsub [b, K, D] and patches [b, P, D].

    Computed for every slot, padded ones included (their regions are masked out downstream).
    """
    p = patches * pfc.inverse_norm(patches)[..., None]  # p_in, unit (or 0) rows
    a = jnp.einsum("bkd,bpd->bkp", zsub, p)  # a_n for every (i, k)
    lo = jnp.min(a, axis=-1, keepdims=True)
    span = jnp.max(a, axis=-1, keepdims=True) - lo
    # Min-max to [0, 1]. A constant map (span exactly 0) has no best patch: a' = 1 everywhere,
    # which every sigma < 1 keeps, i.e. uniform weights 1 / P (and no 0 / 0). The safe
    # denominator keeps the unselected branch, hence the gradient, finite. A nearly constant map
    # is still min-max normalised: a' and its gradient grow like 1 / span, as in the formula.
    flat = span == 0
    scaled = jnp.where(flat, 1.0, (a - lo) / jnp.where(flat, 1.0, span))
    # Threshold: [a' >= sigma] is a hard selection, a constant for autodiff (a boolean: nothing
    # flows through the comparison); the kept a' themselves carry gradient into a, i.e. into
    # the patches and zsub. The max has a' = 1 >= sigma, so the sum below is >= 1.
    kept = jnp.where(scaled >= threshold, scaled, 0.0)
    weights = kept / jnp.sum(kept, axis=-1, keepdims=True)  # w_n, sums to 1 over the P patches
    region = jnp.einsum("bkp,bpd->bkd", weights, p)
    return region * pfc.inverse_norm(region)[..., None]


def _grouping_per_device(zsub, patches, valid, scale, *, threshold, scope, axes):
    """The loss from this device's b images: their sub-captions, patches and masks.

    zsub [b, K, D], patches [b, P, D], valid bool [b, K] (b = B without axes); scale scalar.
    Returns a device-invariant scalar.
    """
    local, k, dim = zsub.shape
    regions = _regions(zsub, patches, threshold)  # [b, K, D]
    valid_flat = valid.reshape(local * k)
    if scope == "image":
        # logits[i, k, k'] = s cos(r_ik', zsub_ik): sub-caption k against the regions of the
        # same image's slots, the valid ones kept; its label is its own region k' = k.
        logits = scale * jnp.einsum("bkd,bjd->bkj", zsub, regions)  # [b, K, K]
        keep = jnp.broadcast_to(valid[:, None, :], logits.shape)
        total = _masked_ce_sum(
            logits.reshape(local * k, k),
            keep.reshape(local * k, k),
            jnp.tile(jnp.arange(k), local),
            valid_flat,
        )
        num_valid = jnp.sum(valid)
        if axes is not None:
            total, num_valid = jax.lax.psum((total, num_valid), axes)
    else:
        # The local sub-captions [b*K] against every valid region of the batch [B*K]; row
        # (j, k) has label column (shard * b + j) * K + k = shard * b*K + its local row.
        regions_all = _gather(regions.reshape(local * k, dim), axes)  # [B*K, D]
        valid_all = _gather(valid_flat, axes, invariant=True)  # [B*K]
        logits = scale * zsub.reshape(local * k, dim) @ regions_all.T  # [b*K, B*K]
        labels = pfc.shard_index(axes) * local * k + jnp.arange(local * k)
        total = _masked_ce_sum(logits, valid_all[None, :], labels, valid_flat)
        if axes is not None:
            total = jax.lax.psum(total, axes)
        num_valid = jnp.sum(valid_all)  # gathered: device-invariant
    return total / jnp.maximum(num_valid, 1)


@functools.partial(jax.jit, static_argnames=("threshold", "scope"))
def _grouping_loss(zsub, patches, sub_mask, logit_scale, *, threshold: float, scope: str):
    zsub, patches = pfc.as_float32(zsub), pfc.as_float32(patches)
    logit_scale = pfc.as_float32(logit_scale)
    if (mesh := pfc.batch_mesh()) is not None:
        check_batch_divisible(zsub.shape[0], mesh, "global batch size")
    body = functools.partial(_grouping_per_device, threshold=threshold, scope=scope)
    return pfc.apply_sharded(body, (zsub, patches, jnp.asarray(sub_mask) != 0), (logit_scale,))
