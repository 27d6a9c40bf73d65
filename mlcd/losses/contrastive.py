"""Image-text contrastive losses: softmax (CLIP, ALIGN) and sigmoid (SigLIP).

Both take L2-normalised embeddings of a global batch of B pairs (row i of `zimg` and of `ztxt`
form the positive pair) and return a scalar. Called under `jax.set_mesh(mesh)` with a mesh of
more than one device, they run sharded with `jax.shard_map`, the batch split over all mesh axes
(b = B / N rows per device), and return the same value and gradients as the reference path:

- softmax: each device scores its b local rows against all B gathered columns, in both
  directions; logits memory O(b * B) per device. The gather's transpose is a reduce-scatter, so
  gradients reach the owning device without extra code.
- sigmoid: a ring. Each device scores its b images against its own b texts (the positives on the
  diagonal), then passes the texts to its neighbour N - 1 times, adding negative-only blocks;
  no device ever holds more than a b x b logits block.

`logit_scale` (and `logit_bias`) are replicated scalars. Inside `shard_map` they are device
invariant and get implicitly cast to varying where they meet per-device values (check_vma); the
transpose of that cast is a psum, so their gradients are the sums over all devices.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mlcd import partial_fc
from mlcd.sharding import batch_spec, check_batch_divisible

_REDUCTIONS = ("mean", "sum")


def _check_pair(zimg: jax.Array, ztxt: jax.Array) -> int:
    """Validates two [B, D] embedding matrices; returns B."""
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(
            f"zimg and ztxt must both be [B, D] with the same shape; got zimg {zimg.shape} and "
            f"ztxt {ztxt.shape}."
        )
    return zimg.shape[0]


def _check_scalar(x, name: str) -> None:
    if jnp.ndim(x) != 0:
        raise ValueError(f"{name} must be a scalar; got shape {jnp.shape(x)}.")


# ----------------------------------------------------------------------------------------------
# Softmax (CLIP / ALIGN)


def _smoothed_ce_sum(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Sum over rows of cross-entropy against optax-style smoothed one-hot targets.

    logits [r, C], labels int [r] in [0, C). With e = label_smoothing the target of row i is
    (1 - e) * onehot(labels_i) + e / C, hence
        CE_i = (1 - e) * (-log p_i[labels_i]) + e * mean_j(-log p_i[j]).
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    per_row = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    return jnp.sum(per_row)


def _combine(l_i2t: jax.Array, l_t2i: jax.Array, reduction: str) -> jax.Array:
    return (l_i2t + l_t2i) / 2 if reduction == "mean" else l_i2t + l_t2i


def softmax_contrastive_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    logit_scale: jax.Array | float,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> jax.Array:
    """Softmax (InfoNCE) image-text contrastive loss of CLIP and ALIGN.

    logits = s * zimg @ ztxt.T; L_i2t = mean_i CE(logits[i, :], i); L_t2i = mean_j
    CE(logits[:, j], j); optax-style label smoothing e: target = (1 - e) * onehot + e / B.

    Args:
      zimg: float [B, D] image embeddings, already L2-normalised (not renormalised here).
      ztxt: float [B, D] text embeddings, already L2-normalised; row i pairs with zimg[i].
      logit_scale: scalar s, the multiplier itself (already exponentiated and clipped).
      label_smoothing: Python float e in [0, 1) (ALIGN uses 0.1).
      reduction: "mean" -> (L_i2t + L_t2i) / 2 (CLIP); "sum" -> L_i2t + L_t2i (ALIGN).

    Returns:
      float32 (or wider) scalar. Under `jax.set_mesh` with more than one device the batch must be
      divisible by the device count (ValueError otherwise) and the loss runs sharded.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got reduction={reduction!r}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
    _check_pair(zimg, ztxt)
    _check_scalar(logit_scale, "logit_scale")
    return _softmax_loss(
        zimg, ztxt, logit_scale, label_smoothing=float(label_smoothing), reduction=reduction
    )


# Jitted so that an eager call is one compiled program rather than op-by-op dispatch of the
# shard_map body; inside an outer jit it is inlined. The context mesh is part of jit's cache key.
@functools.partial(jax.jit, static_argnames=("label_smoothing", "reduction"))
def _softmax_loss(zimg, ztxt, logit_scale, *, label_smoothing: float, reduction: str):
    batch = zimg.shape[0]
    zimg, ztxt, logit_scale = (
        partial_fc.as_float32(zimg),
        partial_fc.as_float32(ztxt),
        partial_fc.as_float32(logit_scale),
    )

    mesh = partial_fc.batch_mesh()
    if mesh is None:
        labels = jnp.arange(batch)
        logits = logit_scale * zimg @ ztxt.T
        l_i2t = _smoothed_ce_sum(logits, labels, label_smoothing) / batch
        l_t2i = _smoothed_ce_sum(logits.T, labels, label_smoothing) / batch
        return _combine(l_i2t, l_t2i, reduction)

    local = check_batch_divisible(batch, mesh, "global batch size")
    axes = mesh.axis_names

    def per_device(zi, zt, s):
        # Row k of this device's shard is global pair axis_index * b + k: the label of the local
        # row among the gathered columns.
        labels = jax.lax.axis_index(axes) * local + jnp.arange(local)
        zi_all = jax.lax.all_gather(zi, axes, tiled=True)  # [B, D], transposes to reduce-scatter
        zt_all = jax.lax.all_gather(zt, axes, tiled=True)
        l_i2t = _smoothed_ce_sum(s * zi @ zt_all.T, labels, label_smoothing)  # local rows [b, B]
        l_t2i = _smoothed_ce_sum(s * zt @ zi_all.T, labels, label_smoothing)  # local cols [b, B]
        l_i2t, l_t2i = jax.lax.psum((l_i2t, l_t2i), axes)
        return _combine(l_i2t, l_t2i, reduction) / batch

    spec = batch_spec(mesh)
    zimg, ztxt = partial_fc.shard_batch(zimg, mesh), partial_fc.shard_batch(ztxt, mesh)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P())(
        zimg, ztxt, logit_scale
    )


# ----------------------------------------------------------------------------------------------
# Sigmoid (SigLIP)


def _sigmoid_block_sum(zi, zt, s, bias, positives_on_diagonal: bool) -> jax.Array:
    """-sum_ij log_sigmoid(label_ij * (s * zi_i . zt_j + bias)) over one [r, c] block.

    label_ij = +1 where i == j and `positives_on_diagonal`, -1 everywhere else.
    """
    logits = s * zi @ zt.T + bias
    labels = -jnp.ones_like(logits)
    if positives_on_diagonal:
        labels = labels + 2 * jnp.eye(*logits.shape, dtype=logits.dtype)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_contrastive_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
) -> jax.Array:
    """Sigmoid pairwise loss of SigLIP.

    logits = s * zimg @ ztxt.T + b, label +1 on the diagonal and -1 elsewhere,
    L = -sum_ij log_sigmoid(label_ij * logits_ij) / B.

    Args:
      zimg: float [B, D] image embeddings, already L2-normalised (not renormalised here).
      ztxt: float [B, D] text embeddings, already L2-normalised; row i pairs with zimg[i].
      logit_scale: scalar s, the multiplier itself (already exponentiated and clipped).
      logit_bias: scalar b.

    Returns:
      float32 (or wider) scalar. Under `jax.set_mesh` with more than one device the batch must be
      divisible by the device count (ValueError otherwise) and the loss runs as a ring.
    """
    _check_pair(zimg, ztxt)
    _check_scalar(logit_scale, "logit_scale")
    _check_scalar(logit_bias, "logit_bias")
    return _sigmoid_loss(zimg, ztxt, logit_scale, logit_bias)


@jax.jit
def _sigmoid_loss(zimg, ztxt, logit_scale, logit_bias):
    batch = zimg.shape[0]
    zimg, ztxt = partial_fc.as_float32(zimg), partial_fc.as_float32(ztxt)
    logit_scale, logit_bias = partial_fc.as_float32(logit_scale), partial_fc.as_float32(logit_bias)

    mesh = partial_fc.batch_mesh()
    if mesh is None:
        return _sigmoid_block_sum(zimg, ztxt, logit_scale, logit_bias, True) / batch

    check_batch_divisible(batch, mesh, "global batch size")
    axes, n = mesh.axis_names, mesh.size
    # Device k sends its current text block to device k + 1 (linear index over all axes), so
    # after t steps device k holds the texts of device k - t: every off-diagonal block once.
    ring = [(k, (k + 1) % n) for k in range(n)]
    # Rematerialise each negative block in the backward pass: without it autodiff of the loop
    # would stack the N - 1 [b, b] logits blocks, i.e. O(b * B) memory after all. What is kept
    # per step is the [b, D] text block the loop carries.
    negative_block = jax.checkpoint(
        lambda zi, zt, s, bias: _sigmoid_block_sum(zi, zt, s, bias, False)
    )

    def per_device(zi, zt, s, bias):
        def step(_, carry):
            zt_cur, total = carry
            zt_cur = jax.lax.ppermute(zt_cur, axes, ring)
            return zt_cur, total + negative_block(zi, zt_cur, s, bias)

        own = _sigmoid_block_sum(zi, zt, s, bias, True)
        # Static trip count: fori_loop lowers to a scan, so the compiled size does not grow
        # with N and reverse-mode autodiff works.
        _, total = jax.lax.fori_loop(1, n, step, (zt, own))
        return jax.lax.psum(total, axes) / batch

    spec = batch_spec(mesh)
    zimg, ztxt = partial_fc.shard_batch(zimg, mesh), partial_fc.shard_batch(ztxt, mesh)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
        zimg, ztxt, logit_scale, logit_bias
    )
