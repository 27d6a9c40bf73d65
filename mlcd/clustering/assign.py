"""Nearest centers by inner product: blocked per-device kernels and the public `assign_topk`.

Scores are plain dot products s_ic = x_i . c_c (cosines when rows of x and the centers are
L2-normalised; nothing is normalised here). Ties go to the lower center id everywhere, in the
sharded and the unsharded path alike, so both return identical ids.

Sharded (under `jax.set_mesh` with more than one device; the Partial-FC layout of
mlcd.partial_fc): the centers [K, D] are split along K over all n devices (K / n rows each) and
the rows of x over all devices. Each device all-gathers the rows, scores them against its own
centers one tile at a time ([block, center_tile] scores, never [N, K / n]), keeps its local
top-k' (k' = min(k, K / n), so that k > K / n still sees every center), and
`partial_fc.merge_top_k(..., split_rows=True)` (an all_to_all) sends each row's n * k'
candidates to the device that owns the row, which takes the global top-k. No device holds the
full center matrix.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlcd import partial_fc
from mlcd.clustering import _data
from mlcd.sharding import batch_spec


def first_argmax(
    s: jax.Array, axis: int = -1, ids: jax.Array | None = None, num_ids: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(index int32, value) of the maximum along `axis`; ties go to the lowest index.

    Same result as jnp.argmax, computed as a max followed by a min over the matching indices:
    two plain reductions that XLA's CPU backend vectorises, where argmax's variadic
    (value, index) reduction is not. On a score tile still in cache this made the whole k-means
    assignment ~20% faster (bench/kmeans.py, case 1).

    ids: int32 shaped like s, each entry's id (e.g. center ids of a shortlist), returned instead
    of the position and deciding ties (the lowest id wins); num_ids: an id above all of them
    (returned where no entry equals the maximum, e.g. NaN rows). Default: the positions along
    `axis` and their count.
    """
    m = jnp.max(s, axis=axis, keepdims=True)
    if ids is None:
        ids = jax.lax.broadcasted_iota(jnp.int32, s.shape, axis % s.ndim)
        num_ids = s.shape[axis]
    idx = jnp.min(jnp.where(s == m, ids, num_ids), axis=axis)
    return idx, jnp.squeeze(m, axis)


def _blocks(x: jax.Array, plan: _data.Plan) -> jax.Array:
    """[padded, D] -> [num_blocks, block, D]."""
    return x.reshape(plan.num_blocks, plan.block, x.shape[-1])


def _tiles(centers: jax.Array, bias: jax.Array | None, tile: int):
    """Centers as [num_tiles, tile, D] (+ bias [num_tiles, tile] or None), zero-padded.

    Padded centers get bias -inf, so they never win and never enter a top-k.
    """
    k = centers.shape[0]
    num_tiles = -(-k // tile)
    pad = num_tiles * tile - k
    if pad:
        centers = jnp.pad(centers, ((0, pad), (0, 0)))
        bias = jnp.zeros((k,), centers.dtype) if bias is None else bias
        bias = jnp.pad(bias, (0, pad), constant_values=-jnp.inf)
    tiles = centers.reshape(num_tiles, tile, centers.shape[1])
    return tiles, None if bias is None else bias.reshape(num_tiles, tile)


def _scores(xb: jax.Array, centers: jax.Array, bias: jax.Array | None) -> jax.Array:
    """xb [R, D] @ centers [T, D].T (+ bias [T]) -> [R, T]."""
    s = xb @ centers.T
    return s if bias is None else s + bias


def block_top1(
    x: jax.Array, centers: jax.Array, bias: jax.Array | None, plan: _data.Plan
) -> tuple[jax.Array, jax.Array]:
    """Best center of every row, one [block, tile] score tile at a time.

    Args:
      x: float32 [plan.padded, D].
      centers: float32 [K, D] (a device's local block when sharded).
      bias: float32 [K] added to every row's scores, or None. With bias = -|c|^2 / 2 the
        argmax of x.c + bias is the argmin of |x - c|^2 (|x|^2 is the same for every c).
      plan: the tiling of x's rows and of the centers.

    Returns:
      (best float32 [padded], index int32 [padded] into `centers`); ties: lowest index.
    """
    tile = min(centers.shape[0], plan.center_tile)
    c, b = _tiles(centers, bias, tile)
    offsets = jnp.arange(1, c.shape[0], dtype=jnp.int32) * tile

    def one_block(xb):
        # The first tile seeds the running best; later tiles replace it only when strictly
        # better, which keeps the lowest index on ties (tiles come in increasing id order).
        idx, best = first_argmax(_scores(xb, c[0], None if b is None else b[0]))

        def step(carry, tile_in):
            best, idx = carry
            ct, bt, offset = tile_in
            t_idx, t_best = first_argmax(_scores(xb, ct, bt))
            better = t_best > best
            return (jnp.where(better, t_best, best), jnp.where(better, t_idx + offset, idx)), None

        if c.shape[0] > 1:
            (best, idx), _ = jax.lax.scan(
                step, (best, idx), (c[1:], None if b is None else b[1:], offsets)
            )
        return best, idx

    best, idx = jax.lax.map(one_block, _blocks(x, plan))
    return best.reshape(-1), idx.reshape(-1)


def block_topk(
    x: jax.Array,
    centers: jax.Array,
    k: int,
    plan: _data.Plan,
    bias: jax.Array | None = None,
    group: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Top-k scores x @ centers.T (+ bias, see block_top1) of every row, sorted descending, one
    tile at a time.

    x float32 [plan.padded, D], centers float32 [K, D], k <= K. Returns (scores float32
    [padded, k], index int32 [padded, k] into `centers`); equal scores in increasing index
    order (lax.top_k keeps the lower position first; the running top-k precedes each new tile).

    group > 1 (k-means' candidates; used when a score tile splits into at least k groups, else
    exact): the centers are cut into groups of `group` consecutive ids, each group keeps only its
    best center, and the k best of those are returned. Column 0 is still the exact best (ties:
    lowest id); the k are the exact top-k unless two of them share a group, in which case the
    lower one gives way to the next group's best. lax.top_k on a CPU costs ~2.5x the tile's
    matmul; the in-group max is one vectorised pass, and top_k then sorts `group` x fewer.
    """
    tile = min(centers.shape[0], max(plan.center_tile, k))
    c, b = _tiles(centers, bias, tile)
    offsets = jnp.arange(1, c.shape[0], dtype=jnp.int32) * tile
    if group > 1 and not (tile % group == 0 and tile // group >= k):
        group = 1

    def tile_topk(xb, ct, bt):
        s = _scores(xb, ct, bt)
        if group == 1:
            return jax.lax.top_k(s, k)
        within, best = first_argmax(s.reshape(s.shape[0], tile // group, group), axis=2)
        vals, pos = jax.lax.top_k(best, k)
        return vals, pos * group + jnp.take_along_axis(within, pos, axis=1)

    def one_block(xb):
        vals, idx = tile_topk(xb, c[0], None if b is None else b[0])

        def step(carry, tile_in):
            ct, bt, offset = tile_in
            t_vals, t_idx = tile_topk(xb, ct, bt)
            vals = jnp.concatenate([carry[0], t_vals], axis=1)
            idx = jnp.concatenate([carry[1], t_idx + offset], axis=1)
            vals, pos = jax.lax.top_k(vals, k)
            return (vals, jnp.take_along_axis(idx, pos, axis=1)), None

        if c.shape[0] > 1:
            (vals, idx), _ = jax.lax.scan(
                step, (vals, idx), (c[1:], None if b is None else b[1:], offsets)
            )
        return vals, idx

    vals, idx = jax.lax.map(one_block, _blocks(x, plan))
    return vals.reshape(-1, k), idx.reshape(-1, k).astype(jnp.int32)


def _order_keys(s: jax.Array) -> jax.Array:
    """int32 keys in the order of the float32 scores s: key(a) < key(b) iff a < b.

    A non-negative float's bits already order as int32; a negative float's bits order in
    reverse, so all but the sign bit are flipped.
    """
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def block_shortlist(
    x: jax.Array,
    centers: jax.Array,
    bias: jax.Array | None,
    k: int,
    plan: _data.Plan,
    group: int,
    sort: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Best center of every row, and a shortlist of k, from bfloat16 scores re-scored in float32.

    Every center is scored in bfloat16 (inputs rounded to 8-bit mantissas, products summed in
    float32: on CPUs with AMX-BF16 ~4x the float32 matmul's rate). Each [block, tile] score tile
    is cut into `group`-member groups of the ids {j, j + tile / group, ...} (strided, so the
    in-group max is an elementwise max of contiguous slices), each group keeps its best member,
    and the k best groups across all tiles form the row's shortlist. Those k centers are then
    scored exactly in float32, and the best of them is the row's center: the exact best unless
    the bfloat16 rounding (~1e-3 of |x| |c|) pushes it below k other groups' bests.

    The max, its id and the ranking are one int32 max per step: the score's order key
    (_order_keys) with its low bits replaced by the id within the tile, so the shortlist ranks
    scores truncated to ~2^-13 relative (ties by higher id); re-scoring makes that exact.

    Args:
      x: float32 [plan.padded, D].
      centers: float32 [K, D] (a device's local block when sharded); k <= K.
      bias: float32 [K] added to every score (see block_top1), or None.
      k: shortlist length.
      plan: the tiling of x's rows and of the centers.
      group: members per group (1 or a divisor of the tile leaving >= k groups; else 1).
      sort: order each shortlist by descending float32 score, equal scores by increasing id
        (merge_top_k's input); otherwise its order is arbitrary.

    Returns:
      (best float32 [padded], index int32 [padded] into `centers`, shortlist scores float32
      [padded, k], shortlist ids int32 [padded, k] into `centers`); best ties: lowest index.
    """
    num_centers = centers.shape[0]
    tile = min(num_centers, max(plan.center_tile, k))
    c, b = _tiles(centers, bias, tile)
    c16 = c.astype(jnp.bfloat16)
    offsets = jnp.arange(c.shape[0], dtype=jnp.int32) * tile
    if not (tile % group == 0 and tile // group >= k):
        group = 1
    id_mask = (1 << max(1, (tile - 1).bit_length())) - 1
    taken = jnp.iinfo(jnp.int32).min
    # Scores are laid out transposed, [tile, block]: every reduction below (in-group max, the
    # max of each round, the merge) is then an elementwise max across rows of the tile, which
    # vectorises along the block; along the last axis the same rounds took twice as long.

    def tile_top(xb16, ct, bt, offset):
        s = jax.lax.dot_general(
            ct, xb16, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        if bt is not None:
            s = s + bt[:, None]
        keys = (_order_keys(s) & ~id_mask) | jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        keys = jnp.max(keys.reshape(group, tile // group, s.shape[1]), axis=0)

        # k rounds of max-and-remove over the groups: keys are distinct (distinct ids), and
        # each round is one vectorised pass (lax.top_k of [block, 128] took ~6x as long).
        def round_(r, carry):
            keys, top = carry
            m = jnp.max(keys, axis=0)
            return jnp.where(keys == m, taken, keys), top.at[r].set(m)

        top = jnp.zeros_like(keys[:k])  # [k, block], typed like keys (also under shard_map)
        _, top = jax.lax.fori_loop(0, k, round_, (keys, top))  # [k, block]
        return top & ~id_mask, (top & id_mask) + offset

    def select(keys, ids):
        """The k best of [M, block] (truncated keys, global ids); ties: the lowest id."""
        out = []
        for _ in range(k):
            i, _ = first_argmax(keys, axis=0, ids=ids, num_ids=num_centers)
            out.append(i)
            keys = jnp.where(ids == i, taken, keys)
        return jnp.stack(out)

    def one_block(xb):
        xb16 = xb.astype(jnp.bfloat16)
        if c.shape[0] == 1:
            _, ids = tile_top(xb16, c16[0], None if b is None else b[0], offsets[0])
        else:
            # Every tile's k best, then the k best of those: one selection per row block.
            keys, ids = jax.lax.map(
                lambda t: tile_top(xb16, *t), (c16, None if b is None else b, offsets)
            )
            ids = select(keys.reshape(-1, xb.shape[0]), ids.reshape(-1, xb.shape[0]))
        ids = ids.T  # [block, k]
        # Exact float32 scores of the shortlist: k D multiply-adds per row.
        s = jnp.einsum("bd,bkd->bk", xb, centers[ids])
        if bias is not None:
            s = s + bias[ids]
        if sort:
            neg, ids = jax.lax.sort((-s, ids), dimension=1, num_keys=2)
            s = -neg
        idx, best = first_argmax(s, axis=1, ids=ids, num_ids=num_centers)
        return best, idx, s, ids

    best, idx, vals, ids = jax.lax.map(one_block, _blocks(x, plan))
    return best.reshape(-1), idx.reshape(-1), vals.reshape(-1, k), ids.reshape(-1, k)


def block_candidates_top1(
    x: jax.Array,
    centers: jax.Array,
    bias: jax.Array | None,
    candidates: jax.Array,
    offset: jax.Array | int,
    plan: _data.Plan,
) -> tuple[jax.Array, jax.Array]:
    """Best center of every row among its own candidate centers, one row block at a time.

    Scores only s_ij = x_i . c_{candidates[i, j]} (+ bias): k_c D multiply-adds per row instead
    of K D. A candidate is scored by this device only if it lies in this device's block of
    centers, global ids [offset, offset + K_local); the others score -inf (another device
    scores them).

    Args:
      x: float32 [plan.padded, D].
      centers: float32 [K_local, D] (a device's local block when sharded).
      bias: float32 [K_local] (see block_top1) or None.
      candidates: int32 [plan.padded, k_c] global center ids.
      offset: global id of centers[0].
      plan: the row tiling of x.
    Returns:
      (best float32 [padded], index int32 [padded] into `centers`); -inf and an arbitrary
      index for a row none of whose candidates this device holds. Ties: the earlier candidate.
    """
    k_local = centers.shape[0]
    k_c = candidates.shape[1]

    def one_block(args):
        xb, cb = args
        local = cb - offset
        mine = (local >= 0) & (local < k_local)
        local = jnp.clip(local, 0, k_local - 1)
        # [block, k_c, D] gathered rows: block * k_c * D floats (4 MiB at 1024 x 8 x 128).
        s = jnp.einsum("bd,bkd->bk", xb, centers[local])
        if bias is not None:
            s = s + bias[local]
        pos, best = first_argmax(jnp.where(mine, s, -jnp.inf))
        return best, jnp.take_along_axis(local, pos[:, None], axis=1)[:, 0]

    best, idx = jax.lax.map(
        one_block, (_blocks(x, plan), candidates.reshape(plan.num_blocks, plan.block, k_c))
    )
    return best.reshape(-1), idx.reshape(-1)


def _assign_shard(x, centers, *, k: int, plan: _data.Plan, axes: tuple[str, ...]):
    """Per-device body of the sharded assignment: (scores, ids) [padded / n, k], the global
    top-k of this device's rows.

    x [padded / n, D] (this device's rows), centers [K / n, D] (this device's centers).
    """
    k_local = centers.shape[0]
    x = jax.lax.all_gather(x, axes, tiled=True)  # [padded, D]: every row meets every shard
    vals, idx = block_topk(x, centers, min(k, k_local), plan)
    ids = idx + jax.lax.axis_index(axes) * k_local
    return partial_fc.merge_top_k(vals, ids, k, axes, split_rows=True)


@functools.partial(jax.jit, static_argnames=("k", "plan"))
def _assign(
    x: jax.Array, centers: jax.Array, *, k: int, plan: _data.Plan
) -> tuple[jax.Array, jax.Array]:
    """(ids int32 [N, k], scores float32 [N, k]) of x [N, D] against centers [K, D]."""
    rows = x.shape[0]
    x = jnp.pad(x.astype(jnp.float32), ((0, plan.padded - rows), (0, 0)))
    centers = centers.astype(jnp.float32)
    mesh = partial_fc.batch_mesh()
    if mesh is None:
        vals, idx = block_topk(x, centers, k, plan)
        return idx[:rows], vals[:rows]
    spec = batch_spec(mesh)
    x, centers = partial_fc.shard_batch(x, mesh), partial_fc.shard_batch(centers, mesh)
    body = functools.partial(_assign_shard, k=k, plan=plan, axes=mesh.axis_names)
    vals, idx = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))(
        x, centers
    )
    return idx[:rows], vals[:rows]


def assign_topk(x: Any, centers: Any, k: int, *, chunk_size: int | None = None) -> tuple[Any, Any]:
    """The k nearest centers of every row of x by inner product (cosine for unit vectors).

    Args:
      x: [N, D] data: a jax.Array, a NumPy array or a NumPy memmap (any float dtype; computed in
        float32). Not normalised here.
      centers: [K, D] centers (e.g. from `kmeans`), not normalised here. Under `jax.set_mesh`
        with n > 1 devices K must be divisible by n; they are sharded along K.
      k: neighbours per row, 1 <= k <= K.
      chunk_size: None scores all of x in one jitted call (usable inside jit; returns
        jax.Arrays). An int streams x from the host in chunks of that many rows, each chunk put
        on the devices in turn, so N is not bounded by device memory; returns NumPy arrays.

    Returns:
      (ids int32 [N, k], similarities float32 [N, k]), each row sorted by descending
      similarity; equal similarities in increasing id order.
    """
    rows, dim = _data.check_data(x, "x")
    num_centers, cdim = _data.check_data(centers, "centers")
    if cdim != dim:
        raise ValueError(f"x has D={dim} columns but centers have D={cdim}.")
    if not 1 <= k <= num_centers:
        raise ValueError(f"k={k} must be in [1, K] with K={num_centers} centers.")
    _data.check_centers_divisible(num_centers, "the number of centers K")
    shards = _data.num_shards()
    if chunk_size is None:
        return _assign(jnp.asarray(x), centers, k=k, plan=_data.plan_rows(rows, shards))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows; got {chunk_size}.")

    chunk_rows = min(chunk_size, rows)
    plan = _data.plan_rows(chunk_rows, shards)
    sharding = _data.row_sharding()
    centers = jax.device_put(jnp.asarray(centers, jnp.float32), sharding)
    ids = np.empty((rows, k), np.int32)
    sims = np.empty((rows, k), np.float32)
    pending = None  # copy chunk i's result to the host while chunk i + 1 is being scored
    for start, chunk in _data.iter_chunks(x, chunk_rows):
        out = _assign(_data.to_device(chunk, plan.padded, sharding), centers, k=k, plan=plan)
        if pending is not None:
            _store(pending, ids, sims)
        pending = (start, len(chunk), out)
    _store(pending, ids, sims)
    return ids, sims


def _store(pending, ids: np.ndarray, sims: np.ndarray) -> None:
    start, n, (chunk_ids, chunk_sims) = pending
    ids[start : start + n] = np.asarray(chunk_ids[:n])
    sims[start : start + n] = np.asarray(chunk_sims[:n])
