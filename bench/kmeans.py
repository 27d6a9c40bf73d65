"""Spherical k-means: mlcd.clustering.kmeans against faiss-cpu on the same data, same process.

    python bench/kmeans.py [--repeats 3] [--cases 1,2]

Cases (L2-normalised standard-normal data, float32):
  1: 200,000 x 128 into 1,024 centers, 10 iterations;
  2: 100,000 x 64 into 16,384 centers, 5 iterations.
faiss: faiss.Kmeans(d, k, niter, spherical=True, seed) with max_points_per_centroid raised so
it uses every point. Ours: kmeans(..., spherical=True) with the data resident on the device,
twice: exact Lloyd, and the candidate assignment (`candidates=--candidates`, an exact pass every
`--refresh-every` iterations; 0 candidates skips it). The runs alternate `--repeats` times and
the best time per iteration of each is reported
(the machine may be shared: see the load average printed first). Both final objectives come
from one function, the mean cosine of each point to its nearest center (assign_topk, k=1).
Achieved GFLOP/s counts the assignment matmul only (2 N D K per iteration) over the whole
iteration time (for the candidate rows: the exact-equivalent rate, so it can pass the ceiling);
the ceiling is a float32 4096^3 matmul (best of 5) in the same process.

Prints a table, then exactly one line for case 1, of the candidate run (the exact one with
--candidates 0): `kmeans_s_per_iter=X faiss_s_per_iter=Y ratio=Z objective_rel_diff=W`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

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


def run_ours(x: np.ndarray, k: int, iters: int, seed: int, **kw) -> tuple[float, np.ndarray]:
    """(seconds per iteration, centers): the mean over iterations of one run; kw: the
    candidate assignment's arguments, or none for exact Lloyd."""
    res = clustering.kmeans(
        x, k, iterations=iters, seed=seed, spherical=True, return_info=True, **kw
    )
    return float(np.mean(res.seconds)), np.asarray(res.centers)


def run_faiss(x: np.ndarray, k: int, iters: int, seed: int) -> tuple[float, np.ndarray]:
    """(seconds per iteration, centers) of faiss.Kmeans using all points."""
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
    return (time.perf_counter() - start) / iters, np.asarray(km.centroids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="1,2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--refresh-every", type=int, default=5)
    args = parser.parse_args()
    methods = {"exact": {}}
    if args.candidates:
        kw = {"candidates": args.candidates, "refresh_every": args.refresh_every}
        methods[f"cand {args.candidates}/{args.refresh_every}"] = kw
    faiss = faiss_backend.import_faiss()

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
    rows = {}
    for case in [int(c) for c in args.cases.split(",")]:
        n, d, k, iters = CASES[case]
        x = np.random.default_rng(case).standard_normal((n, d), np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        for kw in methods.values():  # compile every kernel before timing
            clustering.kmeans(x, k, iterations=min(2, iters), seed=args.seed, **kw)
        ours = {name: [] for name in methods}
        theirs = []
        for _ in range(args.repeats):
            for name, kw in methods.items():
                ours[name].append(run_ours(x, k, iters, args.seed, **kw))
            theirs.append(run_faiss(x, k, iters, args.seed))
        t_faiss = min(t for t, _ in theirs)
        obj_faiss = mean_best_cosine(x, theirs[0][1])
        name = f"{case}: {n:,}x{d} K={k:,} it={iters}"
        for method, runs in ours.items():
            t_ours = min(t for t, _ in runs)
            obj_ours = mean_best_cosine(x, runs[0][1])
            rel = (obj_ours - obj_faiss) / abs(obj_faiss)
            gflops = 2 * n * d * k / t_ours / 1e9
            rows[case] = (t_ours, t_faiss, rel)  # the last method: candidates when enabled
            print(
                f"{name:<32} {method:<9} {t_ours:>9.3f} {t_faiss:>10.3f} "
                f"{t_ours / t_faiss:>6.2f} {gflops:>8.0f} {100 * gflops / ceiling:>5.0f}% "
                f"{obj_ours:>9.5f} {obj_faiss:>9.5f} {rel:>+9.1e}"
            )
    print(f"load average {os.getloadavg()}")
    if 1 in rows:
        t_ours, t_faiss, rel = rows[1]
        print(
            f"kmeans_s_per_iter={t_ours:.4f} faiss_s_per_iter={t_faiss:.4f} "
            f"ratio={t_ours / t_faiss:.3f} objective_rel_diff={rel:.2e}"
        )


if __name__ == "__main__":
    main()
