"""Partial-FC machinery: mesh helpers, sharded class-matrix blocks and the one sharded top-k.

Shared by the losses (mlcd.losses) and the clustering (mlcd.clustering); see
docs/architecture.md, "Sharding".

Mesh convention: code called under `jax.set_mesh(mesh)` with a mesh of more than one device runs
sharded with `jax.shard_map`, every split array (the global batch, a chunk of data rows, the
class centers) split along dim 0 over ALL mesh axes, i.e. dim 0 carries
`PartitionSpec(mesh.axis_names)` (`mlcd.sharding.batch_spec`). Without such a mesh the same
per-device code runs once as a plain single program (the unsharded reference path).

Layout (Partial FC): the centers `[C, D]` are split along C over all N devices of the mesh, so
device k owns the contiguous global classes `[k * C / N, (k + 1) * C / N)` (`C_local = C / N`
rows). Inside `jax.shard_map` each device all-gathers the features (the batch is split too),
computes its own `[B, C_local]` (or sampled `[B, k]`) block of scores, and per-row reductions
(max, sum of exponentials, top-k, the score of a given class) are combined across the blocks
with collectives (pmax, psum, all_gather, all_to_all). Nothing here ever builds a `[B, C]`
array or the full center matrix, and the centers' gradient stays sharded.

Ordering fact everything relies on: for the tuple of axes `axes`, the shard that `P(axes)` gives
a device, its `jax.lax.axis_index(axes)`, and its block's position in
`jax.lax.all_gather(x, axes, tiled=True)` (and the source index of an `all_to_all` over `axes`)
are all the same row-major linear index over `axes` (the first axis is the major one). So device
k's class block is the k-th block of a tiled all_gather, and gathering per-shard results in
shard order lists the classes in increasing global id order. tests/test_contrastive_losses.py
and tests/test_partial_fc.py check it on several mesh shapes.

Every block below takes `axes`: the tuple of mesh axis names to combine over when called inside
`shard_map`, or None for a single program that holds all C classes (the same code with the
collectives left out and shard index 0). Row-wise results combined with psum / pmax come out
device-invariant, as `shard_map(out_specs=P())` requires. A loss writes its per-device body
once and runs it with `apply_sharded`, which picks the path: `jax.set_mesh` with more than one
device -> shard_map, else plain.

Shapes: B rows (the gathered global batch), C_local classes per shard, l ids per row with -1
padding, k sampled columns per shard.
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from mlcd.sharding import batch_spec

Axes = tuple[str, ...] | None

_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Mesh helpers.


def batch_mesh() -> AbstractMesh | None:
    """The mesh set by `jax.set_mesh` when it spans more than one device, else None.

    Works eagerly and inside `jax.jit` (where only the abstract mesh is known).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return mesh


def shard_batch(x: jax.Array, mesh: AbstractMesh) -> jax.Array:
    """Puts dim 0 of `x` on `batch_spec(mesh)` where shard_map would not do it itself.

    With Auto axes (the project's convention) shard_map reshards its inputs as needed. With
    Explicit axes the sharding is part of the type and shard_map rejects a mismatch, so reshard.
    """
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, batch_spec(mesh))
    return x


def as_float32(x: jax.Array) -> jax.Array:
    """x promoted to at least float32. Losses are computed in float32 (or wider): bf16 logits
    lose the small differences that log-softmax / log-sigmoid of scaled cosines depend on."""
    return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))


def apply_sharded(fn: Callable, split: Sequence[jax.Array], replicated: Sequence = ()):
    """fn(*split, *replicated, axes=...) sharded on the context mesh, or unsharded without one.

    split: arrays whose dim 0 is divided over all mesh axes, the global batch [B, ...] and the
    centers [C, D] alike (their sizes must be divisible by the device count: check first, with
    the caller's own error message). replicated: anything every device sees whole (PRNG keys,
    scalars; None allowed). fn's outputs must be device-invariant (combined with psum / pmax):
    they are returned as is. Under a mesh of N > 1 devices fn runs in jax.shard_map over all
    axes with axes=mesh.axis_names; otherwise it is called once with axes=None.
    """
    mesh = batch_mesh()
    if mesh is None:
        return fn(*split, *replicated, axes=None)
    spec = batch_spec(mesh)
    split = [shard_batch(x, mesh) for x in split]
    return jax.shard_map(
        functools.partial(fn, axes=mesh.axis_names),
        mesh=mesh,
        in_specs=(spec,) * len(split) + (P(),) * len(replicated),
        out_specs=P(),
    )(*split, *replicated)


def shard_index(axes: Axes) -> jax.Array | int:
    """This device's position along C (0 without axes)."""
    return 0 if axes is None else jax.lax.axis_index(axes)


# ----------------------------------------------------------------------------------------------
# Scores against this shard's rows.


def inverse_norm(x: jax.Array) -> jax.Array:
    """1 / max(||x||_2, 1e-12) over the last axis; shape x.shape[:-1].

    Scaling scores by it after a matmul normalises without a normalised copy of the rows, and
    the max keeps value and gradient finite for an all-zero row.
    """
    return jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), _NORM_EPS**2))


def cosines(feats: jax.Array, rows: jax.Array) -> jax.Array:
    """feats [B, D] (already unit-norm) against rows [k, D] (any norm) -> cosines [B, k]."""
    return (feats @ rows.T) * inverse_norm(rows)[None, :]


# ----------------------------------------------------------------------------------------------
# Class sampling (Partial FC): a static number of random local classes per shard.


def num_sampled(num_local: int, ratio: float) -> int:
    """k = ceil(ratio * num_local) classes kept per shard, at least 1.

    Rounded to 9 decimals first so that e.g. 0.3 * 20 gives 6, not 7 from float error.
    """
    return min(num_local, max(1, math.ceil(round(ratio * num_local, 9))))


def sample_columns(rng: jax.Array, num_local: int, ratio: float, shard) -> jax.Array:
    """Sorted local indices [k] of the classes a shard samples, k = num_sampled(...).

    A uniformly random k-subset of range(num_local), without replacement, that depends only on
    (rng, shard): the key is fold_in(rng, shard). A reference that knows the number of shards
    reproduces the sampled set of any device (see `sampled_classes`). Sorting keeps the gather
    of center rows in memory order.
    """
    k = num_sampled(num_local, ratio)
    perm = jax.random.permutation(jax.random.fold_in(rng, shard), num_local)
    return jnp.sort(perm[:k]).astype(jnp.int32)


def sampled_classes(rng: jax.Array, num_classes: int, num_shards: int, ratio: float) -> jax.Array:
    """Global class ids int32 [num_shards * k] sampled by all shards for `rng` (a reference).

    Equals the concatenation over shards s of `sample_columns(rng, C / num_shards, ratio, s)`
    offset by s * C / num_shards, i.e. what the sharded path samples on a mesh of num_shards
    devices (num_shards=1 for the unsharded path).
    """
    if num_classes % num_shards:
        raise ValueError(f"num_classes={num_classes} is not divisible by {num_shards} shards")
    num_local = num_classes // num_shards
    return jnp.concatenate(
        [sample_columns(rng, num_local, ratio, s) + s * num_local for s in range(num_shards)]
    )


# ----------------------------------------------------------------------------------------------
# Per-row id sets ([B, l], -1 padding) and their host-side validation.


def gather_rows(
    emb: jax.Array, ids: jax.Array, num_classes: int, axes: Axes
) -> tuple[jax.Array, jax.Array]:
    """The batch every shard scores: (feats [B, D] unit rows, ids [B, l]) from this device's
    emb [b, D] and ids [b, l] (all-gathered over `axes`; as given without axes).

    Rows are normalised before the gather (b rows, not B); the gather's gradient is a
    reduce-scatter. Ids >= num_classes (possible only under jit, where a loss cannot check
    them) are owned by no shard and become padding (-1) everywhere.
    """
    feats = emb * inverse_norm(emb)[:, None]
    if axes is not None:
        feats = jax.lax.all_gather(feats, axes, tiled=True)
        ids = jax.lax.all_gather(ids, axes, tiled=True, to="invarying")
    return feats, jnp.where(ids < num_classes, ids, -1)


def first_occurrence(ids: jax.Array) -> jax.Array:
    """bool [B, l]: valid (>= 0) and not a repeat of an earlier entry of the same row.

    ids int [B, l]. A row's ids are a set: a repeated id would otherwise count twice in a sum
    over the row's positives.
    """
    same = ids[:, :, None] == ids[:, None, :]  # [B, l, l], tiny (l ~ 8)
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)
    return (ids >= 0) & ~jnp.any(same & earlier, axis=2)


def check_ids_concrete(ids, num_classes: int | None, name: str = "labels") -> None:
    """Host-side range check of concrete ids: each in [0, num_classes) or -1 (padding).

    ids int [B, ...] (checked per row of dim 0); num_classes None: no upper bound (only values
    below -1 are errors). Raises ValueError naming `name`, the range of values found and the
    first offending row with its values. Traced ids cannot be inspected here and pass.
    """
    if isinstance(ids, jax.core.Tracer) or ids.size == 0:
        return
    # Concrete ids closed over by a jit trace are checked too: evaluate, do not stage.
    with jax.ensure_compile_time_eval():
        lo, hi = (int(v) for v in jax.device_get((jnp.min(ids), jnp.max(ids))))
        if lo >= -1 and (num_classes is None or hi < num_classes):
            return
        bad = ids < -1 if num_classes is None else (ids < -1) | (ids >= num_classes)
        row = int(jnp.argmax(jnp.any(bad.reshape(ids.shape[0], -1), axis=1)))
        example = jax.device_get(ids[row]).tolist()
    allowed = "ids >= 0" if num_classes is None else f"class ids in [0, {num_classes})"
    raise ValueError(
        f"{name} must be {allowed} or -1 (padding); got values in [{lo}, {hi}], e.g. row "
        f"{row}: {example}."
    )


# ----------------------------------------------------------------------------------------------
# Looking up given class ids: only the owning shard contributes, a psum combines.


def local_ids(ids: jax.Array, num_local: int, axes: Axes) -> tuple[jax.Array, jax.Array]:
    """Maps global class ids (any shape, -1 = padding) to this shard's rows.

    Returns (local, owned): local int32 indices clipped into [0, num_local) (safe to gather
    with) and owned bool, True where the id is a class of this shard. Padding and ids outside
    [0, C) are owned by no shard.
    """
    local = ids - shard_index(axes) * num_local
    owned = (ids >= 0) & (local >= 0) & (local < num_local)
    return jnp.clip(local, 0, num_local - 1).astype(jnp.int32), owned


def gather_cosines(feats: jax.Array, centers: jax.Array, ids: jax.Array, axes: Axes) -> jax.Array:
    """cos(feats_i, center_{ids_ij}) [B, l]; 0 where ids_ij is padding.

    feats [B, D] unit-norm (all rows), centers [C_local, D] this shard's rows (normalised here),
    ids int [B, l] global class ids. Each shard gathers the [B, l, D] rows it owns (zeros
    elsewhere), so every requested class is scored whether or not it is in any sampled set; the
    psum adds the single nonzero contribution. Its gradient reaches only the owner's rows.
    """
    local, owned = local_ids(ids, centers.shape[0], axes)
    rows = centers[local]  # [B, l, D]
    cos = jnp.einsum("bd,bld->bl", feats, rows) * inverse_norm(rows)
    cos = jnp.where(owned, cos, 0.0)
    return cos if axes is None else jax.lax.psum(cos, axes)


def gather_columns(block: jax.Array, ids: jax.Array, axes: Axes) -> jax.Array:
    """block[i, ids_ij] [B, l] of a [B, C] matrix held as [B, C_local] blocks; 0 at padding."""
    local, owned = local_ids(ids, block.shape[1], axes)
    vals = jnp.where(owned, jnp.take_along_axis(block, local, axis=1), 0.0)
    return vals if axes is None else jax.lax.psum(vals, axes)


def negative_block(
    feats: jax.Array, block: jax.Array, ids: jax.Array, rng, sample_ratio: float, axes: Axes
) -> tuple[jax.Array, jax.Array]:
    """This shard's negative candidates for every row: (cos [B, k], negative bool [B, k]).

    feats [B, D] unit rows (gather_rows), block [C_local, D] this shard's class rows, ids
    [B, l] each row's own classes (-1 pads). With sample_ratio < 1 the k = num_sampled(...)
    columns are `sample_columns(rng, ...)` (shared by the batch), else all C_local (rng
    unused). `negative` is False at a row's own classes, which the losses score separately.
    """
    num_local = block.shape[0]
    if sample_ratio < 1.0:
        columns = sample_columns(rng, num_local, sample_ratio, shard_index(axes))
        rows = block[columns]  # [k, D]
    else:
        columns, rows = None, block
    cos = cosines(feats, rows)  # [B, k]: this shard's block only
    return cos, ~id_mask(ids, num_local, axes, columns)


def id_mask(ids: jax.Array, num_local: int, axes: Axes, columns: jax.Array | None = None):
    """bool [B, k]: True where column j of this shard's block is one of row i's ids.

    ids int [B, l] global class ids (-1 padding); columns int [k] local class indices of the
    block's columns (sorted or not), or None for all num_local classes (k = num_local).
    Built by scattering the B * l ids into the block rather than comparing [B, k, l].
    """
    local, hit = local_ids(ids, num_local, axes)
    if columns is not None:
        k = columns.shape[0]
        position = jnp.full((num_local,), k, jnp.int32).at[columns].set(jnp.arange(k))
        local = position[local]  # column of each id in the block, k if not sampled
        hit = hit & (local < k)
    else:
        k = num_local
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    mask = jnp.zeros((ids.shape[0], k), bool)
    return mask.at[rows, jnp.where(hit, local, k)].set(True, mode="drop")


# ----------------------------------------------------------------------------------------------
# Row reductions over all shards' columns.


def logsumexp(logits: jax.Array, mask: jax.Array, axes: Axes) -> jax.Array:
    """log sum_{j: mask_ij} exp(logits_ij) over every shard's columns; float [B].

    logits, mask [B, k] (this shard's block). Stable: M = pmax of the local row maxima,
    lse = M + log psum_k sum_j exp(logits - M). A row with no masked-in column anywhere gives
    -inf with a zero (not NaN) gradient, so softplus(lse) = 0 for it. M is a constant for
    autodiff (lse does not depend on it), so no pmax is differentiated.
    """
    masked = jnp.where(mask, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(masked, axis=1))
    if axes is not None:
        m = jax.lax.pmax(m, axes)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    # exp of the masked array, not where(mask, exp(logits - m), 0): a masked-out logit above m
    # would overflow to inf and turn the discarded branch's gradient into NaN.
    s = jnp.sum(jnp.exp(masked - m[:, None]), axis=1)
    if axes is not None:
        s = jax.lax.psum(s, axes)
    return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)


def merge_top_k(
    values: jax.Array, ids: jax.Array, k: int, axes: Axes, *, split_rows: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Global top-k of each row from every shard's candidates: (values [., k], ids [., k]).

    The one sharded top-k merge, for use inside shard_map (the same (values, ids) order as
    jax.lax.top_k). Each device passes the candidates of its own classes for ALL rows:
    values [rows, k'] and GLOBAL ids int [rows, k'], the shard's candidates sorted descending
    with equal values in increasing id order (what lax.top_k returns, plus the shard's offset;
    k' = min(k, C_local) is enough). Every row keeps the k best of the N * k' candidates of all
    shards (N * k' >= k). Communication is O(rows * N * k'), never O(rows * C).

    split_rows=False: every device gets all rows, [rows, k], device-invariant (the candidates
      are all-gathered along the candidate axis).
    split_rows=True: device r gets its own block of rows, rows [r * rows / N, (r + 1) * rows /
      N) as [rows / N, k] (the row-sharded layout, P(axes) on dim 0); an all_to_all sends row
      block r's candidates to device r, so each device receives 1 / N of what the all-gather
      moves. rows must be divisible by N.
    axes None: one program holds every candidate; returns their top k.

    Ties resolve to the lower global id in both modes, exactly like lax.top_k over the full
    [rows, C] scores, provided the shards own increasing id ranges (the Partial-FC layout:
    shard s holds [s * C_local, (s + 1) * C_local)). The all_gather (tiled) and the
    all_to_all both lay the received candidates out in shard order (the ordering fact of the
    module doc), so in a row's concatenated N * k' candidates every entry of shard s precedes
    every entry of shard s + 1 and has a lower id, and within a shard equal values are in
    increasing id order: among equal values, position order is id order. The final lax.top_k
    keeps the lower position first among equal values, hence the lower id. Nothing is lost by
    the local cut: an entry of the global top-k has fewer than k entries before it in the
    global (value, id) order, hence fewer than k within its shard, so it is among the shard's
    k' = min(k, C_local) best.
    """
    if axes is not None:
        n = jax.lax.axis_size(axes)
        kk = values.shape[1]
        if split_rows:
            # Row block r of every shard goes to device r; afterwards dim 0 is the source shard,
            # in shard order.
            values = jax.lax.all_to_all(values.reshape(n, -1, kk), axes, 0, 0)
            ids = jax.lax.all_to_all(ids.reshape(n, -1, kk), axes, 0, 0)
            rows = values.shape[1]
            values = values.transpose(1, 0, 2).reshape(rows, n * kk)
            ids = ids.transpose(1, 0, 2).reshape(rows, n * kk)
        else:
            values = jax.lax.all_gather(values, axes, axis=1, tiled=True, to="invarying")
            ids = jax.lax.all_gather(ids, axes, axis=1, tiled=True, to="invarying")
    values, pos = jax.lax.top_k(values, k)
    return values, jnp.take_along_axis(ids, pos, axis=1)


def top_k(
    scores: jax.Array, k: int, axes: Axes, *, split_rows: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Per-row top k over every shard's columns: (values [B, k], global ids int32 [B, k]).

    scores [B, C_local] (k <= C_local), this shard's block. Each shard keeps its local top k,
    offsets the indices to global ids and `merge_top_k` combines them (split_rows as there);
    ties resolve to the lower global id, like lax.top_k over the full [B, C] scores.
    Communication O(B * N * k), never O(B * C).
    """
    num_local = scores.shape[1]
    if k > num_local:
        raise ValueError(f"top_k: k={k} exceeds the {num_local} classes of a shard")
    values, idx = jax.lax.top_k(scores, k)
    ids = (idx + shard_index(axes) * num_local).astype(jnp.int32)
    if axes is None:
        return values, ids
    return merge_top_k(values, ids, k, axes, split_rows=split_rows)


def softmax_cross_entropy(logits: jax.Array, ids: jax.Array, axes: Axes) -> jax.Array:
    """Full-softmax CE [B] with a uniform soft target over each row's valid ids.

    logits [B, C_local] this shard's block of the [B, C] logits; ids int [B, l] global ids,
    -1 padding. CE_i = lse_i - (1 / n_i) sum_{j valid} logits[i, ids_ij], n_i = number of
    valid entries (a repeated id counts as often as it appears). Rows without a valid id give
    0 (no target, no gradient). The target logits come from their owner via gather_columns.
    """
    valid = ids >= 0
    lse = logsumexp(logits, jnp.ones(logits.shape, bool), axes)
    target = jnp.sum(gather_columns(logits, ids, axes), axis=1)
    n = jnp.sum(valid, axis=1)
    return jnp.where(n > 0, lse - target / jnp.maximum(n, 1), 0.0)
