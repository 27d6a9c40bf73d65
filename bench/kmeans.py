"""Spherical k-means: mlcd.clustering.kmeans against faiss-cpu on the same data, same process.

    python bench/kmeans.py [--repeats 3] [--cases 1,2]

Cases (L2-normalised standard-normal data, float32):
  1: 200,000 x 128 into 1,024 centers, 10 iterations;
  2: 100,000 x 64 into 16,384 centers, 5 iterations.
faiss: faiss.Kmeans(d, k, niter, spherical=True, seed) with max_points_per_centroid raised so
it uses every point. Ours: kmeans(..., spherical=True) with the data resident on the device,
as exact Lloyd, and as the candidate assignment (`candidates=--candidates`, an exact pass every
`--refresh-every` iterations; 0 candidates skips it) once per `--score-dtypes` entry: 'float32'
("cand 8/5"), 'bfloat16' ("cand 8/5b": the exact passes shortlist in bfloat16 and re-score in
float32, `score_dtype='bfloat16'`). The runs alternate `--repeats` times and
the best time per iteration of each is reported
(the machine may be shared: see the load average printed first). Both final objectives come
from one function, the mean cosine of each point to its nearest center (assign_topk, k=1).
Achieved GFLOP/s counts the assignment matmul only (2 N D K per iteration) over the whole
iteration time (for the candidate rows: the exact-equivalent rate, so it can pass the ceiling);
the ceiling is a float32 4096^3 matmul (best of 5) in the same process.

A second table gives whole calls next to the per-iteration times. The first call of each of
ours runs right after `jax.clear_caches()`, so it includes tracing and compiling every kernel
(what a one-off `kmeans(...)` costs); the warm whole calls (best over the repeats) include the
set-up around the iterations (initial centers, data to the device) but no compile; "s/it"
there is the per-iteration time with compile excluded, ours as in the first table (mean over
the iterations), faiss's from its `iteration_stats` (its cumulative clock, iterations 2 to n:
the first one also carries its set-up; the first table's faiss s/it is its whole call / n).

Prints both tables, then exactly one line for case 1, of the last candidate run (the exact one
with --candidates 0): `kmeans_s_per_iter=X faiss_s_per_iter=Y ratio=Z objective_rel_diff=W`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.machine import cpu_model
from mlcd import clustering
from mlcd.clustering import faiss_backend

CASES = {1: (200_000, 128, 1_024, 10), 2: (100_000, 64, 16_384, 5)}


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Best float32 n^3 matmul throughput of jax on this machine, GFLOP/s."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def mean_best_cosine(x: np.ndarray, centers: np.ndarray) -> float:
    """The shared objective: mean over rows of x of the cosine to the nearest center."""
    _, sims = clustering.assign_topk(x, np.asarray(centers, np.float32), 1, chunk_size=50_000)
    return float(np.mean(sims, dtype=np.float64))


@dataclasses.dataclass
class Run:
    """One k-means call: its wall time, its per-iteration time (compile excluded) and result."""

    whole_s: float
    per_iter_s: float
    centers: np.ndarray


def run_ours(x: np.ndarray, k: int, iters: int, seed: int, **kw) -> Run:
    """One call of ours; per_iter_s is the mean over its iterations. kw: the candidate
    assignment's arguments, or none for exact Lloyd."""
    start = time.perf_counter()
    res = clustering.kmeans(
        x, k, iterations=iters, seed=seed, spherical=True, return_info=True, **kw
    )
    centers = np.asarray(res.centers)
    return Run(time.perf_counter() - start, float(np.mean(res.seconds)), centers)


def first_call_ours(x: np.ndarray, k: int, iters: int, seed: int, **kw) -> float:
    """Seconds of a call of ours with every cache cleared first: tracing and compiling every
    kernel included. It also leaves all of them compiled for the timed runs."""
    jax.clear_caches()
    return run_ours(x, k, iters, seed, **kw).whole_s


def run_faiss(x: np.ndarray, k: int, iters: int, seed: int) -> Run:
    """One faiss.Kmeans call using all points; per_iter_s from its iteration_stats, whose
    clock is cumulative from the start of train(): the mean of iterations 2..n (iteration 1
    also carries faiss's set-up), or the whole iteration clock when n = 1."""
    faiss = faiss_backend.import_faiss()
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iters,
        spherical=True,
        seed=seed,
        max_points_per_centroid=math.ceil(x.shape[0] / k) + 1,
        min_points_per_centroid=1,  # only silences the "too few points" warning of case 2
    )
    start = time.perf_counter()
    km.train(x)
    whole = time.perf_counter() - start
    clock = np.array([s["time"] for s in km.iteration_stats], np.float64)
    per_iter = float(np.mean(np.diff(clock))) if iters > 1 else float(clock[0])
    return Run(whole, per_iter, np.asarray(km.centroids))


def print_whole_calls(lines: list[tuple[str, str, float, list[Run], list[Run]]]) -> None:
    """The second table: per case and method of ours, (name, method, ours first call, ours
    runs, faiss runs), runs being the repeats' Run lists."""
    header = (
        f"{'case':<32} {'ours':<9} {'1st call':>8} {'whole':>7} {'s/it':>7} "
        f"{'faiss 1st':>9} {'whole':>7} {'s/it':>7} {'1st ratio':>9} {'whole ratio':>11}"
    )
    print(
        "\nwhole calls (s): 1st = first call (ours: compile included), whole = best warm call, "
        "s/it = best per-iteration (compile excluded)"
    )
    print(header)
    print("-" * len(header))
    for name, method, first, runs, theirs in lines:
        whole = min(r.whole_s for r in runs)
        whole_f = min(r.whole_s for r in theirs)
        print(
            f"{name:<32} {method:<9} {first:>8.2f} {whole:>7.2f} "
            f"{min(r.per_iter_s for r in runs):>7.3f} {theirs[0].whole_s:>9.2f} {whole_f:>7.2f} "
            f"{min(r.per_iter_s for r in theirs):>7.3f} {first / theirs[0].whole_s:>9.2f} "
            f"{whole / whole_f:>11.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="1,2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--refresh-every", type=int, default=5)
    parser.add_argument(
        "--score-dtypes", default="float32,bfloat16", help="score_dtype of each candidate run"
    )
    args = parser.parse_args()
    methods = {"exact": {}}
    for dtype in args.score_dtypes.split(",") if args.candidates else []:
        kw = {"candidates": args.candidates, "refresh_every": args.refresh_every}
        suffix = {"float32": "", "bfloat16": "b"}[dtype]
        methods[f"cand {args.candidates}/{args.refresh_every}{suffix}"] = kw | {
            "score_dtype": dtype
        }
    faiss = faiss_backend.import_faiss()

    print(f"CPU: {cpu_model()}")
    print(
        f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)"
    )
    ceiling = matmul_gflops()
    print(f"float32 4096^3 matmul: {ceiling:.0f} GFLOP/s")
    header = (
        f"{'case':<32} {'ours':<9} {'ours s/it':>9} {'faiss s/it':>10} {'ratio':>6} {'GFLOP/s':>8} "
        f"{'%ceil':>6} {'obj ours':>9} {'obj faiss':>9} {'rel diff':>9}"
    )
    print(header)
    print("-" * len(header))
    rows, whole_calls = {}, []
    for case in [int(c) for c in args.cases.split(",")]:
        n, d, k, iters = CASES[case]
        x = np.random.default_rng(case).standard_normal((n, d), np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        # Cold first calls, which also compile every kernel before the timed runs.
        first = {
            name: first_call_ours(x, k, iters, args.seed, **kw) for name, kw in methods.items()
        }
        ours = {name: [] for name in methods}
        theirs = []
        for _ in range(args.repeats):
            for name, kw in methods.items():
                ours[name].append(run_ours(x, k, iters, args.seed, **kw))
            theirs.append(run_faiss(x, k, iters, args.seed))
        t_faiss = min(r.whole_s for r in theirs) / iters
        obj_faiss = mean_best_cosine(x, theirs[0].centers)
        name = f"{case}: {n:,}x{d} K={k:,} it={iters}"
        for method, runs in ours.items():
            whole_calls.append((name, method, first[method], runs, theirs))
            t_ours = min(r.per_iter_s for r in runs)
            obj_ours = mean_best_cosine(x, runs[0].centers)
            rel = (obj_ours - obj_faiss) / abs(obj_faiss)
            gflops = 2 * n * d * k / t_ours / 1e9
            rows[case] = (t_ours, t_faiss, rel)  # the last method: candidates when enabled
            print(
                f"{name:<32} {method:<9} {t_ours:>9.3f} {t_faiss:>10.3f} "
                f"{t_ours / t_faiss:>6.2f} {gflops:>8.0f} {100 * gflops / ceiling:>5.0f}% "
                f"{obj_ours:>9.5f} {obj_faiss:>9.5f} {rel:>+9.1e}"
            )
    print_whole_calls(whole_calls)
    print(f"load average {os.getloadavg()}")
    if 1 in rows:
        t_ours, t_faiss, rel = rows[1]
        print(
            f"kmeans_s_per_iter={t_ours:.4f} faiss_s_per_iter={t_faiss:.4f} "
            f"ratio={t_ours / t_faiss:.3f} objective_rel_diff={rel:.2e}"
        )


if __name__ == "__main__":
    main()
