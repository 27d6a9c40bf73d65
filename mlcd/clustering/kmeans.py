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
re-seeded center takes part from the next exact pass on. Ties among candidates go to the earlier
(better-ranked) candidate.

bfloat16 scores (`score_dtype='bfloat16'`, an approximation; default float32): the passes that
score every center (exact Lloyd's, the candidate assignment's refresh passes) do it in bfloat16
(4x float32's matmul rate on CPUs with AMX-BF16) to shortlist each row's best groups of
CANDIDATE_GROUP centers (strided ids, see assign.block_shortlist), re-scored in float32: the
best of the shortlist is the row's center, the exact one unless bfloat16 rounding (~1e-3 of the
cosine) drops it from the shortlist. On bench/kmeans.py case 1 (k_c = 8, refresh_every = 5)
the objective matched float32 scoring's to 1e-4 relative.

Empty clusters (no point assigned) are re-seeded with distinct random data rows, drawn by a
generator seeded with (seed, iteration), in increasing center id order: a deterministic result.

Data (see _data.py): x may be a jax.Array, a NumPy array or a memmap. With chunk_size=None all
rows go to the devices once and stay there across iterations (the fast path); with chunk_size
each iteration streams the rows chunk by chunk from the host, accumulating per-center sums and
counts, so N is bounded by the host's storage, not device memory. Chunk i + 1 is read and
transferred while chunk i is computed (jax dispatch is asynchronous), and no further: at most
two chunks are on the devices at a time. On one CPU device, resident rows are split into one
part per core (_cpu_parts), each scored by its own thread, and the parts' sums are added in the
update: XLA:CPU runs a program on the thread that calls it and most of this one on one core.

A call's kernels (one per assignment mode, and the update) are all compiled at its start, in
parallel threads and while the data is transferred (_precompile): on a CPU, a one-off call's
compilation costs about as much as a few of its iterations.

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

import concurrent.futures
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mlcd.clustering import _data, _init, _kernels, faiss_backend

BACKENDS = ("jax", "faiss")
# Exact passes of the candidate assignment record, as a row's candidates, the best center of
# each of its k_c best groups of this many consecutive center ids (assign.block_topk).
CANDIDATE_GROUP = 8
SCORE_DTYPES = ("float32", "bfloat16")
# Rows per part at least, for resident rows split over the CPU cores (_cpu_parts): below this a
# pass is short enough that threads would not pay.
PARALLEL_MIN_ROWS = 16_384


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
# Host side: data chunks, seeds for empty clusters, the Lloyd loop.


class _Chunks:
    """The rows of x as device chunks of one static padded shape, unit rows when spherical.

    A single chunk (chunk_size None or >= N) is put on the devices once, on the first pass (so
    that the kernels' compilation, started before it, overlaps the transfer), and reused by
    every iteration; otherwise each pass reads and transfers the chunks again.
    """

    def __init__(self, x: Any, chunk_size: int | None, spherical: bool, sharding, parts: int = 1):
        self._x, self._spherical, self.sharding = x, spherical, sharding
        self.rows = x.shape[0]
        self.resident = chunk_size is None or chunk_size >= self.rows
        # Resident rows in `parts` chunks of one shape, scored in parallel by _lloyd's threads.
        self.chunk_rows = -(-self.rows // parts) if self.resident else chunk_size
        self.plan = _data.plan_rows(self.chunk_rows, _data.num_shards())
        self._resident = None

    def _load(self, rows: Any) -> jax.Array:
        if self._spherical and not isinstance(rows, jax.Array):
            # Host rows are normalised on the host, which costs about what the pad copy did;
            # the device kernel would cost a compilation (~0.1 s) on a first call.
            rows = np.asarray(rows, np.float32)
            unit = np.zeros((self.plan.padded, rows.shape[1]), np.float32)  # padding: zero rows
            norm = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
            np.divide(rows, np.maximum(norm, _kernels.TINY), out=unit[: rows.shape[0]])
            return _data.to_device(unit, self.plan.padded, self.sharding)
        chunk = _data.to_device(rows, self.plan.padded, self.sharding)
        return _kernels.normalize(chunk) if self._spherical else chunk

    def __iter__(self):
        if self._resident is not None:
            yield from self._resident
            return
        loaded = []
        for _, chunk in _data.iter_chunks(self._x, self.chunk_rows):
            loaded.append((self._load(chunk), chunk.shape[0]))
            yield loaded[-1]
            if not self.resident:
                loaded.clear()
        self._resident = loaded if self.resident else None


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


def _kernel(mode: str, data: _Chunks, spherical: bool, candidates: int | None, score_dtype: str):
    """`_kernels.accumulate` with the static arguments of an iteration in `mode` bound."""
    grouped = mode == "refresh" or score_dtype == "bfloat16"  # bfloat16: shortlists by group
    return functools.partial(
        _kernels.accumulate,
        plan=data.plan,
        spherical=spherical,
        mode=mode,
        num_candidates=candidates if mode == "refresh" else None,
        group=CANDIDATE_GROUP if grouped else 1,
        score_dtype=score_dtype,
    )


def _precompile(data, centers, *, spherical, candidates, modes, score_dtype, sharding):
    """{kernel name: Future} compiling, on worker threads, every kernel the iterations will
    call: one `accumulate` per assignment mode, and `update` without re-seeding.

    Lowering (tracing, which reads the current mesh) runs here; only XLA's compilation, which
    releases the GIL, runs on the threads, so the kernels compile in parallel with each other
    and with the data transfer. A compiled lowering lands in the cache that the jitted
    function's later call looks up, so the call does not compile again; a warm call finds every
    lowering and compilation cached and costs ~1 ms here.
    """
    num_centers, dim = centers.shape
    x = jax.ShapeDtypeStruct((data.plan.padded, dim), jnp.float32, sharding=sharding)
    sums = jax.ShapeDtypeStruct((num_centers, dim), jnp.float32, sharding=sharding)
    counts = jax.ShapeDtypeStruct((num_centers,), jnp.int32, sharding=sharding)
    lowered = {}
    for mode in modes:
        cand = None
        if mode == "candidates":
            cand = jax.ShapeDtypeStruct(
                (data.plan.padded, candidates), jnp.int32, sharding=sharding
            )
        kernel = _kernel(mode, data, spherical, candidates, score_dtype)
        lowered[mode] = kernel.func.lower(
            x, data.chunk_rows, centers, sums, counts, cand, **kernel.keywords
        )
    parts = _num_parts(data)
    lowered["update"] = _kernels.update.lower(
        centers, (sums,) * parts, (counts,) * parts, None, spherical=spherical
    )
    pool = concurrent.futures.ThreadPoolExecutor(len(lowered))
    futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
    pool.shutdown(wait=False)
    return futures


def _cpu_parts(rows: int) -> int:
    """Parts to split resident rows into, scored by as many threads at once: one per CPU core
    on an unsharded CPU backend with at least PARALLEL_MIN_ROWS rows per part, else 1.

    XLA:CPU runs most of a k-means kernel on one core (the loop over row blocks and its
    reductions), and a program runs on the thread that calls it: two threads running the
    kernel on two halves of the rows took 0.16 s against 0.29 s for one on all of them (the
    bfloat16 shortlist pass of bench/kmeans.py case 1, 2 cores).
    """
    if jax.default_backend() != "cpu" or _data.num_shards() > 1:
        return 1
    return max(1, min(os.cpu_count() or 1, rows // PARALLEL_MIN_ROWS))


def _num_parts(data: _Chunks) -> int:
    """How many chunks a pass runs in parallel: all of them when resident, else 1."""
    return -(-data.rows // data.chunk_rows) if data.resident else 1


def _sequential_pass(data, kernel, centers, chunk_candidates, compiling):
    """One pass over the chunks in turn, sums and counts carried from chunk to chunk; returns
    ((sums,), (counts,), per-chunk objective sums). kernel: `_kernel(...)`, accumulate with its static
    arguments bound."""
    num_centers, dim = centers.shape
    # Zeros from the host: jnp.zeros would compile two small programs on a first call.
    sums = jax.device_put(np.zeros((num_centers, dim), np.float32), data.sharding)
    counts = jax.device_put(np.zeros((num_centers,), np.int32), data.sharding)
    mode = kernel.keywords["mode"]
    parts = []
    for c, (chunk, num_valid) in enumerate(data):
        if mode in compiling:  # after the first chunk's transfer, which overlaps it
            compiling.pop(mode).result()  # also re-raises a compilation error
        cand = chunk_candidates.get(c) if mode == "candidates" else None
        sums, counts, part, new = kernel(chunk, num_valid, centers, sums, counts, cand)
        if mode == "refresh":
            chunk_candidates[c] = new
        parts.append(part)
        if len(parts) > 1:
            # Back-pressure: dispatch is asynchronous, and without this wait the host would
            # queue every chunk's transfer at once. One chunk computes, the next one loads.
            parts[-2].block_until_ready()
    return (sums,), (counts,), parts


def _parallel_pass(data, kernel, centers, chunk_candidates, compiling, pool):
    """One pass over resident chunks, each on its own thread with its own zero sums and counts
    (added by `update`); returns (sums, counts, objective sums), one entry per chunk."""
    num_centers, dim = centers.shape
    chunks = list(data)
    mode = kernel.keywords["mode"]
    if mode in compiling:
        compiling.pop(mode).result()

    def run(c):
        sums = jax.device_put(np.zeros((num_centers, dim), np.float32), data.sharding)
        counts = jax.device_put(np.zeros((num_centers,), np.int32), data.sharding)
        cand = chunk_candidates.get(c) if mode == "candidates" else None
        # Blocking here keeps the computation on this thread (see _cpu_parts).
        return jax.block_until_ready(kernel(*chunks[c], centers, sums, counts, cand))

    outs = list(pool.map(run, range(len(chunks))))
    if mode == "refresh":
        chunk_candidates.update((c, out[3]) for c, out in enumerate(outs))
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs), [o[2] for o in outs]


def _lloyd(
    x,
    centers,
    *,
    iterations,
    seed,
    spherical,
    chunk_size,
    candidates,
    refresh_every,
    score_dtype,
    verbose,
) -> KMeansResult:
    """Lloyd iterations from `centers` (float32 [K, D] on the devices, sharded along K)."""
    num_centers = centers.shape[0]
    sharding = _data.row_sharding()
    data = _Chunks(x, chunk_size, spherical, sharding, parts=_cpu_parts(x.shape[0]))
    pool = None
    if _num_parts(data) > 1:
        pool = concurrent.futures.ThreadPoolExecutor(_num_parts(data))
    modes = sorted({_mode(it, candidates, refresh_every) for it in range(iterations)})
    compiling = _precompile(
        data,
        centers,
        spherical=spherical,
        candidates=candidates,
        modes=modes,
        score_dtype=score_dtype,
        sharding=sharding,
    )
    # Per chunk: int32 [padded, k_c] candidate ids, row-sharded like the chunk (N * k_c * 4
    # bytes over all devices, k_c / D of the data's size), set by each 'refresh' pass.
    chunk_candidates = {}
    objective, reseeded, seconds = [], [], []
    bar = tqdm(range(iterations), desc="k-means", unit="it", disable=not verbose)
    for it in bar:
        start = time.perf_counter()
        mode = _mode(it, candidates, refresh_every)
        kernel = _kernel(mode, data, spherical, candidates, score_dtype)
        if pool is None:
            sums, counts, parts = _sequential_pass(
                data, kernel, centers, chunk_candidates, compiling
            )
        else:
            sums, counts, parts = _parallel_pass(
                data, kernel, centers, chunk_candidates, compiling, pool
            )
        # Counted on the host (K ints): on the device it would compile two more programs.
        num_empty = int(np.count_nonzero(np.sum([np.asarray(c) for c in counts], axis=0) == 0))
        # Chunk sums are float32; their total is taken in float64 on the host.
        objective.append(float(np.sum([np.float64(p) for p in parts])))
        seeds = _seeds(x, num_empty, num_centers, seed, it, sharding) if num_empty else None
        if "update" in compiling:
            compiling.pop("update").result()
        centers = _kernels.update(centers, sums, counts, seeds, spherical=spherical)
        centers.block_until_ready()
        seconds.append(time.perf_counter() - start)
        reseeded.append(num_empty)
        bar.set_postfix(objective=f"{objective[-1] / data.rows:.6f}", reseeded=num_empty)
    if pool is not None:
        pool.shutdown()
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
    score_dtype: str = "float32",
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
      score_dtype: 'float32' scores every center in float32. 'bfloat16' (an approximation, for
        CPUs with AMX-BF16 or accelerators) scores every center in bfloat16 to keep each row's
        best groups of CANDIDATE_GROUP centers (SHORTLIST of them in exact passes, k_c in
        refresh passes) and re-scores those in float32 (assign.block_shortlist): a row's
        center is exact unless bfloat16 rounding (~1e-3 of the cosine) drops its best center
        from the shortlist, a near-tie. The candidate iterations are float32 either way.
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
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}; got {score_dtype!r}.")
    if score_dtype != "float32" and backend != "jax":
        raise ValueError("score_dtype='bfloat16' needs backend='jax'.")
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
            score_dtype=score_dtype,
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
