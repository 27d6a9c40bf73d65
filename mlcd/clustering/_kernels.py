"""Device kernels of k-means (kmeans.py): one chunk's per-center statistics, the center update.

The algorithm, the candidate assignment and the sharded layout are described in kmeans.py; the
host loop there calls `accumulate` once per chunk and `update` once per iteration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mlcd import partial_fc
from mlcd.clustering import assign
from mlcd.sharding import batch_spec

# score_dtype='bfloat16': the exact passes re-score each row's best SHORTLIST groups (bfloat16
# scores) in float32; more than one guards against the bfloat16 rounding reordering near-ties.
SHORTLIST = 4
TINY = float(np.finfo(np.float32).tiny)


def _accumulate_shard(
    x,
    num_valid,
    centers,
    sums,
    counts,
    candidates,
    *,
    plan,
    spherical,
    mode,
    num_candidates,
    group,
    score_dtype,
    axes,
):
    """Adds one chunk's per-center sums and counts; returns them, the chunk's objective sum and,
    in mode 'refresh', each row's new candidates (None otherwise).

    x [padded / n, D] this device's rows of the chunk (all rows when axes is None), padded
    rows last; num_valid: int scalar, the real rows; centers, sums [K / n, D], counts [K / n].
    mode: 'exact' scores every center; 'refresh' too, and also returns int32 [padded / n, k_c]
    global ids of each of this device's rows' k_c = num_candidates best centers (one per group
    of `group` consecutive ids: assign.block_topk); 'candidates' scores only `candidates`, int32
    [padded / n, k_c] global ids per row (None otherwise).
    score_dtype 'bfloat16': 'exact' and 'refresh' shortlist in bfloat16 (groups of `group`) and
    re-score in float32 (assign.block_shortlist; 'exact' keeps a shortlist of SHORTLIST).
    """
    k_local = centers.shape[0]
    offset = jax.lax.axis_index(axes) * k_local if axes else 0
    if axes:
        x = jax.lax.all_gather(x, axes, tiled=True)  # [padded, D]
    bias = None if spherical else -0.5 * jnp.sum(centers * centers, axis=1)
    new_candidates = None
    if mode == "exact" and score_dtype == "bfloat16":
        kk = min(SHORTLIST, k_local)
        best, idx, _, _ = assign.block_shortlist(x, centers, bias, kk, plan, group)
    elif mode == "exact":
        best, idx = assign.block_top1(x, centers, bias, plan)
    elif mode == "refresh":
        kk = min(num_candidates, k_local)
        if score_dtype == "bfloat16":
            # merge_top_k needs each shard's shortlist sorted; one device uses it as it is.
            best, idx, vals, top = assign.block_shortlist(
                x, centers, bias, kk, plan, group, sort=bool(axes)
            )
        else:
            vals, top = assign.block_topk(x, centers, kk, plan, bias, group=group)
            best, idx = vals[:, 0], top[:, 0]
        new_candidates = top + offset
        if axes:
            _, new_candidates = partial_fc.merge_top_k(
                vals, new_candidates, num_candidates, axes, split_rows=True
            )
    else:
        if axes:
            candidates = jax.lax.all_gather(candidates, axes, tiled=True)  # [padded, k_c]
        best, idx = assign.block_candidates_top1(x, centers, bias, candidates, offset, plan)
    mine = jnp.arange(plan.padded) < num_valid
    if axes:
        # Row i's global best lives on the first shard whose local best is the maximum.
        owner, _ = assign.first_argmax(jax.lax.all_gather(best, axes), axis=0)
        mine &= owner == jax.lax.axis_index(axes)
    # Rows another shard won (and padding) get an out-of-range id, which segment_sum drops.
    ids = jnp.where(mine, idx, k_local)
    sums = sums + jax.ops.segment_sum(x, ids, num_segments=k_local)
    counts = counts + jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=k_local)
    # Euclidean: |x - c|^2 = |x|^2 - 2 (x . c - |c|^2 / 2) = |x|^2 - 2 * best.
    per_row = best if spherical else jnp.sum(x * x, axis=1) - 2.0 * best
    # Summed per block, then over blocks: float32 error stays ~1e-7 relative for large chunks.
    per_row = jnp.where(mine, per_row, 0.0).reshape(plan.num_blocks, plan.block)
    objective = jnp.sum(jnp.sum(per_row, axis=1))
    if axes:
        objective = jax.lax.psum(objective, axes)
    return sums, counts, objective, new_candidates


@functools.partial(
    jax.jit,
    static_argnames=("plan", "spherical", "mode", "num_candidates", "group", "score_dtype"),
    donate_argnames=("sums", "counts"),
)
def accumulate(
    x,
    num_valid,
    centers,
    sums,
    counts,
    candidates,
    *,
    plan,
    spherical,
    mode,
    num_candidates,
    group,
    score_dtype,
):
    """Jitted `_accumulate_shard`, under shard_map when a mesh is set; arrays are global
    (`candidates` row-sharded like x)."""
    mesh = partial_fc.batch_mesh()
    body = functools.partial(
        _accumulate_shard,
        plan=plan,
        spherical=spherical,
        mode=mode,
        num_candidates=num_candidates,
        group=group,
        score_dtype=score_dtype,
    )
    args = (x, num_valid, centers, sums, counts, candidates)
    if mesh is None:
        return body(*args, axes=None)
    spec = batch_spec(mesh)
    return jax.shard_map(
        functools.partial(body, axes=mesh.axis_names),
        mesh=mesh,
        in_specs=(spec, P(), spec, spec, spec, None if candidates is None else spec),
        out_specs=(spec, spec, P(), spec if mode == "refresh" else None),
    )(*args)


def _update_shard(centers, sums, counts, seeds, *, spherical, axes):
    """New centers [K / n, D] from this device's sums / counts; empty ones from `seeds`.

    sums, counts: tuples of [K / n, D] and [K / n] partial sums (one per part of the rows run
    in parallel, see _Chunks), added here.

    seeds: float32 [E, D] replicated data rows (E >= the global number of empty clusters), or
    None when no cluster is empty. The e-th empty cluster in global id order gets seeds[e].
    """
    sums, counts = functools.reduce(jnp.add, sums), functools.reduce(jnp.add, counts)
    empty = counts == 0
    if spherical:
        norm = jnp.linalg.norm(sums, axis=1, keepdims=True)
        new = sums / jnp.maximum(norm, TINY)
        # Members that cancel out (sum = 0) give no direction: keep the old center.
        keep = empty | (norm[:, 0] == 0)
    else:
        new = sums / jnp.maximum(counts, 1)[:, None].astype(sums.dtype)
        keep = empty
    new = jnp.where(keep[:, None], centers, new)
    if seeds is None:
        return new
    rank = jnp.cumsum(empty) - 1  # rank of each empty cluster among this shard's empties
    if axes:
        # Offset by the empties of the shards before this one (shards hold consecutive ids).
        per_shard = jax.lax.all_gather(jnp.sum(empty), axes)
        before = jnp.arange(per_shard.shape[0]) < jax.lax.axis_index(axes)
        rank = rank + jnp.sum(jnp.where(before, per_shard, 0))
    rows = seeds[jnp.clip(rank, 0, seeds.shape[0] - 1)]
    if spherical:
        rows = rows / jnp.maximum(jnp.linalg.norm(rows, axis=1, keepdims=True), TINY)
    return jnp.where(empty[:, None], rows, new)


@functools.partial(jax.jit, static_argnames=("spherical",), donate_argnames=("centers",))
def update(centers, sums, counts, seeds, *, spherical):
    """Jitted `_update_shard`, under shard_map when a mesh is set; arrays are global."""
    mesh = partial_fc.batch_mesh()
    body = functools.partial(_update_shard, spherical=spherical)
    if mesh is None:
        return body(centers, sums, counts, seeds, axes=None)
    spec = batch_spec(mesh)
    return jax.shard_map(
        functools.partial(body, axes=mesh.axis_names),
        mesh=mesh,
        in_specs=(spec, spec, spec, None if seeds is None else P()),
        out_specs=spec,
    )(centers, sums, counts, seeds)


@functools.partial(jax.jit, donate_argnums=0)
def normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows, e.g. padding, stay zero); row-wise, so a
    row-sharded input stays sharded."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), TINY)
