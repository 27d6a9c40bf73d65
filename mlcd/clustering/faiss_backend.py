"""k-means with faiss-cpu (`kmeans(..., backend='faiss')`): an optional, host-only backend.

faiss is an optional extra (`pip install -e .[faiss]`), imported only when this backend is used.
It clusters data held in host memory on the CPU threads; the result is placed on the devices
like the jax backend's. `max_points_per_centroid` is raised so that faiss uses every point
instead of its default subsample of 256 points per center, which makes the objectives of the
two backends comparable.
"""

from __future__ import annotations

import math
import time

import numpy as np


def import_faiss():
    """The faiss module; ImportError with the install command when it is missing."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "kmeans(..., backend='faiss') needs the optional faiss-cpu package: "
            "pip install -e .[faiss]  (or: pip install faiss-cpu)"
        ) from e
    return faiss


def faiss_kmeans(
    x: np.ndarray,
    num_centers: int,
    *,
    iterations: int,
    seed: int,
    spherical: bool,
    init_centers: np.ndarray | None,
    verbose: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs faiss.Kmeans on host data.

    Args:
      x: float32 [N, D] C-contiguous, already L2-normalised when `spherical` (faiss
        normalises the centers, not the data).
      num_centers: K <= N.
      iterations, seed, spherical, verbose: as in `mlcd.clustering.kmeans`.
      init_centers: float32 [K, D] starting centers, or None for faiss's own random rows.

    Returns:
      (centers float32 [K, D], objective float64 [iterations], seconds float64 [iterations]).
      objective[t] is faiss's own: the sum over points of the inner product with (spherical)
      or the squared distance to (Euclidean) the nearest center entering iteration t.
    """
    faiss = import_faiss()
    n, d = x.shape
    km = faiss.Kmeans(
        d,
        num_centers,
        niter=iterations,
        seed=seed,
        spherical=spherical,
        verbose=verbose,
        max_points_per_centroid=math.ceil(n / num_centers) + 1,
        min_points_per_centroid=1,
    )
    start = time.perf_counter()
    km.train(x, init_centroids=init_centers)
    total = time.perf_counter() - start
    objective = np.array([s["obj"] for s in km.iteration_stats], np.float64)
    # faiss reports cumulative times; the first iteration also absorbs the set-up.
    cumulative = np.array([s["time"] for s in km.iteration_stats], np.float64)
    seconds = np.diff(cumulative, prepend=0.0)
    seconds[0] += max(total - cumulative[-1], 0.0)
    return np.asarray(km.centroids, np.float32), objective, seconds
