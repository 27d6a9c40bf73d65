"""k-means (spherical by default) with centers sharded along K and data streamed in chunks.

Lloyd iterations. Spherical (for L2-normalised embeddings, MLCD's clustering):
    assign  a_i = argmax_c x_i . c_c          (unit vectors: the largest cosine)
    update  c_c = normalise(sum_{i: a_i = c} x_i)
Euclidean (spherical=False):
    assign  a_i = argmin_c |x_i - c_c|^2 = argmax_c (x_i . c_c - |c_c|^2 / 2)
    update  c_c = mean_{i: a_i = c} x_i
Ties go to the lower center id. The objective of iteration t is measured in its assignment
step, i.e. for the centers entering iteration t: spherical, the mean cosine of each point to its
center (maximised; it never decreases: the assignment picks each point's best center, the
normalised sum maximises sum_i x_i . c over unit vectors c, and re-seeding only replaces centers
that have no points); Euclidean, the mean squared distance (minimised). `faiss_objective` is the
same sum not divided by N, which is what faiss reports.

Candidate assignment (`candidates=k_c`, an approximation; default off): the assignment of
iteration t is exact only when t % refresh_every == 0, and that pass also records each row's
k_c best centers. In the iterations between, a row is scored only against those k_c centers
(at their new positions): k_c * D multiply-adds per row instead of K * D. Rows rarely move
further than a few neighbouring centers from one iteration to the next: on the uniform data of
bench/kmeans.py (200,000 x 128, K = 1,024) the new best center was among a row's previous 8
best in 96.5% of rows after the first iteration and in 99.9% or more from the fourth on, and
among its previous 16 in 99.9% or more from the first. The k_c recorded are the best center of
each of the row's k_c best groups of CANDIDATE_GROUP consecutive center ids (the exact top-k_c
unless two share a group): a full top-k costs more than the pass's matmul on a CPU. The
objective still never decreases (a row's own center is always among its candidates); a
re-seeded center takes part from the next exact pass on. Ties among candidates go to the earlier (better-ranked) candidate.

Empty clusters (no point assigned) are re-seeded with distinct random data rows, drawn by a
generator seeded with (seed, iteration), in increasing center id order: a deterministic result.

Data (see _data.py): x may be a jax.Array, a NumPy array or a memmap. With chunk_size=None all
rows go to the devices once and stay there across iterations (the fast path); with chunk_size
each iteration streams the rows chunk by chunk from the host, accumulating per-center sums and
counts, so N is bounded by the host's storage, not device memory. Chunk i + 1 is read and
transferred while chunk i is computed (jax dispatch is asynchronous), and no further: at most
two chunks are on the devices at a time.

Sharded (under `jax.set_mesh` with n > 1 devices): the centers [K, D] are split along K over all
devices (K / n rows each; K must be divisible by n). Each device all-gathers the chunk's rows,
scores them against its own centers one [block, center_tile] tile at a time and keeps each row's
local best; an all-gather of the n local bests [n, rows] names the owner of each row's global
best (lowest shard, hence lowest id, on ties), and each device accumulates sums and counts
(segment_sum) only for the rows its own centers won. A refresh pass of the candidate assignment
also keeps each row's local k_c candidates, and `partial_fc.merge_top_k(..., split_rows=True)`
gives each device the global k_c candidates of its own rows. The update is row-wise, so it stays
local. No device holds the full center matrix or a [rows, K] score block.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mlcd import partial_fc
from mlcd.clustering import _data, _init, assign, faiss_backend
from mlcd.sharding import batch_spec

BACKENDS = ("jax", "faiss")
# Exact passes of the candidate assignment record, as a row's candidates, the best center of
# each of its k_c best groups of this many consecutive center ids (assign.block_topk).
CANDIDATE_GROUP = 8
_TINY = float(np.finfo(np.float32).tiny)


class KMeansResult(NamedTuple):
    """What `kmeans(..., return_info=True)` returns.

    centers: float32 [K, D] (unit rows when spherical), sharded along K under a mesh.
    objective: float64 [iterations]: mean cosine to the assigned center (spherical) or mean
      squared distance to it (Euclidean), for the centers entering each iteration.
    faiss_objective: float64 [iterations]: the same sums, not divided by N (faiss's `obj`).
    num_reseeded: int64 [iterations]: empty clusters re-seeded after each iteration (the jax
      backend; zeros for faiss, which splits large clusters instead).
    seconds: float64 [iterations]: wall time of each iteration.
    """

    centers: jax.Array
    objective: np.ndarray
    faiss_objective: np.ndarray
    num_reseeded: np.ndarray
    seconds: np.ndarray


# ----------------------------------------------------------------------------------------------
# Device kernels: one chunk's statistics, and the center update.


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
    """
    k_local = centers.shape[0]
    offset = jax.lax.axis_index(axes) * k_local if axes else 0
    if axes:
        x = jax.lax.all_gather(x, axes, tiled=True)  # [padded, D]
    bias = None if spherical else -0.5 * jnp.sum(centers * centers, axis=1)
    new_candidates = None
    if mode == "exact":
        best, idx = assign.block_top1(x, centers, bias, plan)
    elif mode == "refresh":
        kk = min(num_candidates, k_local)
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
    static_argnames=("plan", "spherical", "mode", "num_candidates", "group"),
    donate_argnames=("sums", "counts"),
)
def _accumulate(
    x, num_valid, centers, sums, counts, candidates, *, plan, spherical, mode, num_candidates, group
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

    seeds: float32 [E, D] replicated data rows (E >= the global number of empty clusters), or
    None when no cluster is empty. The e-th empty cluster in global id order gets seeds[e].
    """
    empty = counts == 0
    if spherical:
        norm = jnp.linalg.norm(sums, axis=1, keepdims=True)
        new = sums / jnp.maximum(norm, _TINY)
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
        rows = rows / jnp.maximum(jnp.linalg.norm(rows, axis=1, keepdims=True), _TINY)
    return jnp.where(empty[:, None], rows, new)


@functools.partial(jax.jit, static_argnames=("spherical",), donate_argnames=("centers",))
def _update(centers, sums, counts, seeds, *, spherical):
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
def _normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows, e.g. padding, stay zero); row-wise, so a
    row-sharded input stays sharded."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), _TINY)


# ----------------------------------------------------------------------------------------------
# Host side: data chunks, seeds for empty clusters, the Lloyd loop.


class _Chunks:
    """The rows of x as device chunks of one static padded shape, unit rows when spherical.

    A single chunk (chunk_size None or >= N) is put on the devices once and reused by every
    iteration; otherwise each pass reads and transfers the chunks again.
    """

    def __init__(self, x: Any, chunk_size: int | None, spherical: bool, sharding):
        self._x, self._spherical, self._sharding = x, spherical, sharding
        self.rows = x.shape[0]
        self.chunk_rows = self.rows if chunk_size is None else min(chunk_size, self.rows)
        self.plan = _data.plan_rows(self.chunk_rows, _data.num_shards())
        self._resident = self._load(x) if self.chunk_rows == self.rows else None

    def _load(self, rows: Any) -> jax.Array:
        chunk = _data.to_device(rows, self.plan.padded, self._sharding)
        return _normalize(chunk) if self._spherical else chunk

    def __iter__(self):
        if self._resident is not None:
            yield self._resident, self.rows
            return
        for _, chunk in _data.iter_chunks(self._x, self.chunk_rows):
            yield self._load(chunk), chunk.shape[0]


def _seeds(x: Any, num_empty: int, num_centers: int, seed: int, iteration: int, sharding):
    """Replicated float32 [E, D] distinct random rows of x, E = num_empty rounded up to a power
    of two (capped at K) so that few shapes get compiled; extra rows are never used."""
    rng = np.random.default_rng((seed, iteration))
    rows = _init.gather_rows(x, _init.sample_rows(x.shape[0], num_empty, rng))
    bucket = min(num_centers, 1 << (num_empty - 1).bit_length())
    rows = np.pad(rows, ((0, bucket - num_empty), (0, 0)))
    if sharding is None:
        return jax.device_put(rows)
    return jax.device_put(rows, NamedSharding(sharding.mesh, P()))


def _mode(iteration: int, candidates: int | None, refresh_every: int) -> str:
    """The assignment of an iteration: 'exact', 'refresh' (exact, recording candidates) or
    'candidates' (see the module docstring)."""
    if candidates is None:
        return "exact"
    return "refresh" if iteration % refresh_every == 0 else "candidates"


def _lloyd(
    x, centers, *, iterations, seed, spherical, chunk_size, candidates, refresh_every, verbose
) -> KMeansResult:
    """Lloyd iterations from `centers` (float32 [K, D] on the devices, sharded along K)."""
    num_centers, dim = centers.shape
    sharding = _data.row_sharding()
    data = _Chunks(x, chunk_size, spherical, sharding)
    # Per chunk: int32 [padded, k_c] candidate ids, row-sharded like the chunk (N * k_c * 4
    # bytes over all devices, k_c / D of the data's size), set by each 'refresh' pass.
    chunk_candidates = {}
    objective, reseeded, seconds = [], [], []
    bar = tqdm(range(iterations), desc="k-means", unit="it", disable=not verbose)
    for it in bar:
        start = time.perf_counter()
        mode = _mode(it, candidates, refresh_every)
        sums = jnp.zeros((num_centers, dim), jnp.float32, device=sharding)
        counts = jnp.zeros((num_centers,), jnp.int32, device=sharding)
        parts = []
        for c, (chunk, num_valid) in enumerate(data):
            sums, counts, part, new = _accumulate(
                chunk,
                num_valid,
                centers,
                sums,
                counts,
                chunk_candidates.get(c) if mode == "candidates" else None,
                plan=data.plan,
                spherical=spherical,
                mode=mode,
                num_candidates=candidates if mode == "refresh" else None,
                group=CANDIDATE_GROUP if mode == "refresh" else 1,
            )
            if mode == "refresh":
                chunk_candidates[c] = new
            parts.append(part)
            if len(parts) > 1:
                # Back-pressure: dispatch is asynchronous, and without this wait the host would
                # queue every chunk's transfer at once. One chunk computes, the next one loads.
                parts[-2].block_until_ready()
        num_empty = int(jnp.sum(counts == 0))
        # Chunk sums are float32; their total is taken in float64 on the host.
        objective.append(float(np.sum([np.float64(p) for p in parts])))
        seeds = _seeds(x, num_empty, num_centers, seed, it, sharding) if num_empty else None
        centers = _update(centers, sums, counts, seeds, spherical=spherical)
        centers.block_until_ready()
        seconds.append(time.perf_counter() - start)
        reseeded.append(num_empty)
        bar.set_postfix(objective=f"{objective[-1] / data.rows:.6f}", reseeded=num_empty)
    sums = np.asarray(objective, np.float64)
    reseeded = np.asarray(reseeded, np.int64)
    return KMeansResult(centers, sums / data.rows, sums, reseeded, np.asarray(seconds))


def _check_args(rows, num_centers, iterations, init, init_sample_size, chunk_size, backend):
    if not isinstance(num_centers, int | np.integer) or not 1 <= num_centers <= rows:
        raise ValueError(
            f"num_centers={num_centers} must be an int in [1, N] with N={rows} rows of x."
        )
    _data.check_centers_divisible(int(num_centers), "num_centers")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}.")
    if isinstance(init, str) and init not in _init.INITS:
        raise ValueError(f"init must be one of {_init.INITS} or a [K, D] array; got {init!r}.")
    if init_sample_size is not None and not num_centers <= init_sample_size <= rows:
        raise ValueError(
            f"init_sample_size={init_sample_size} must be in [num_centers, N] = "
            f"[{num_centers}, {rows}]."
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows; got {chunk_size}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got backend={backend!r}.")
    if backend == "faiss" and chunk_size is not None:
        raise ValueError("backend='faiss' needs all of x in host memory: leave chunk_size=None.")


def _check_candidates(candidates, refresh_every, num_centers, backend):
    if candidates is not None:
        if not isinstance(candidates, int | np.integer) or not 1 <= candidates <= num_centers:
            raise ValueError(
                f"candidates={candidates} must be None (exact) or an int in [1, num_centers] = "
                f"[1, {num_centers}]."
            )
        if not isinstance(refresh_every, int | np.integer) or refresh_every < 1:
            raise ValueError(f"refresh_every={refresh_every} must be an int >= 1.")
        if backend != "jax":
            raise ValueError("candidates needs backend='jax' (faiss runs exact Lloyd).")


def kmeans(
    x: Any,
    num_centers: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    spherical: bool = True,
    init: str | Any = "random",
    init_sample_size: int | None = None,
    chunk_size: int | None = None,
    candidates: int | None = None,
    refresh_every: int = 5,
    backend: str = "jax",
    verbose: bool = False,
    return_info: bool = False,
) -> jax.Array | KMeansResult:
    """k-means of the rows of x (spherical by default), deterministic for a given seed.

    Args:
      x: [N, D] data, any float dtype (computed in float32): a jax.Array, a NumPy array or a
        NumPy memmap. Rows are L2-normalised internally when `spherical`.
      num_centers: K, 1 <= K <= N; under `jax.set_mesh` with n > 1 devices K must be divisible
        by n (the centers are sharded along K over all devices).
      iterations: Lloyd iterations (assignment + update).
      seed: seeds the initial centers and the re-seeding of empty clusters.
      spherical: True: cosine assignment, centers are normalised sums (unit rows).
        False: squared Euclidean distance, centers are means.
      init: 'random' (K distinct data rows), 'kmeans++' (D^2 sampling on a subsample), or
        an array [K, D] of starting centers (e.g. a previous run's; normalised if spherical).
      init_sample_size: rows k-means++ chooses among; default min(N, 8 K). Cost O(K S D).
      chunk_size: None keeps all rows on the devices across iterations (fastest, needs the
        memory; under a mesh every device also gathers all N rows during a pass); an int
        streams x from the host in chunks of that many rows every iteration, which bounds
        device memory by the chunk (gathered on every device) and the K / n local centers.
      candidates: None for exact Lloyd; an int k_c for the candidate assignment (module
        docstring): exact passes every `refresh_every` iterations (starting with the first),
        and in between each row scored against its k_c best centers of the last exact pass.
        An approximation: on bench/kmeans.py's data k_c = 8, refresh_every = 5 ended 0.2%
        below exact Lloyd's objective, k_c = 16, refresh_every = 4 0.04% below.
      refresh_every: iterations from one exact pass to the next (with `candidates`).
      backend: 'jax' (this module; sharded under a mesh) or 'faiss' (faiss-cpu on the host; an
        optional extra, `pip install -e .[faiss]`; same init, result placed like the jax one).
      verbose: show a tqdm progress bar with the objective of each iteration.
      return_info: return a KMeansResult (centers and per-iteration objective, re-seeded count,
        seconds) instead of the centers alone.

    Returns:
      centers float32 [K, D] (a jax.Array sharded along K under a mesh), or a KMeansResult.
    """
    rows, dim = _data.check_data(x, "x")
    _check_args(rows, num_centers, iterations, init, init_sample_size, chunk_size, backend)
    _check_candidates(candidates, refresh_every, num_centers, backend)
    num_centers = int(num_centers)
    rng = np.random.default_rng(seed)
    if not isinstance(init, str):
        start = np.asarray(init, np.float32)
        if start.shape != (num_centers, dim):
            raise ValueError(
                f"init centers must have shape [num_centers, D] = [{num_centers}, {dim}]; got "
                f"{start.shape}."
            )
    elif init == "random":
        start = _init.random_init(x, num_centers, rng)
    else:
        sample_size = init_sample_size or min(rows, 8 * num_centers)
        start = _init.kmeans_plus_plus(x, num_centers, rng, sample_size, spherical)
    if spherical:
        start = _init.normalize_rows(start)
    sharding = _data.row_sharding()

    if backend == "jax":
        result = _lloyd(
            x,
            jax.device_put(start, sharding),
            iterations=iterations,
            seed=seed,
            spherical=spherical,
            chunk_size=chunk_size,
            candidates=None if candidates is None else int(candidates),
            refresh_every=int(refresh_every),
            verbose=verbose,
        )
    else:
        data = np.ascontiguousarray(np.asarray(x), np.float32)
        if spherical:
            data = _init.normalize_rows(data)
        centers, faiss_obj, seconds = faiss_backend.faiss_kmeans(
            data,
            num_centers,
            iterations=iterations,
            seed=seed,
            spherical=spherical,
            init_centers=start,
            verbose=verbose,
        )
        result = KMeansResult(
            jax.device_put(centers, sharding),
            faiss_obj / rows,
            faiss_obj,
            np.zeros(len(faiss_obj), np.int64),
            seconds,
        )
    return result if return_info else result.centers
