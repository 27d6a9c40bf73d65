"""Initial k-means centers, computed on the host (NumPy), deterministic from the seed.

- 'random': K distinct data rows drawn uniformly (what faiss does).
- 'kmeans++': D^2 sampling (Arthur & Vassilvitskii, 2007) on a uniform subsample of S rows:
  the first center is a uniform row, each next one is row j with probability
  d_j^2 / sum_i d_i^2, d_j the distance of row j to its nearest center so far. Cost O(K S D):
  it is sequential in K, hence the subsample. For unit vectors |a - b|^2 = 2 - 2 a.b, so the
  same rule serves spherical k-means.

The host holds the [K, D] initial centers once; the caller places them sharded on the devices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mlcd.clustering import _data

INITS = ("random", "kmeans++")


def normalize_rows(a: np.ndarray) -> np.ndarray:
    """Rows of a float32 [M, D] scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norm, np.finfo(np.float32).tiny)


def gather_rows(x: Any, index: np.ndarray) -> np.ndarray:
    """float32 rows x[index] on the host, for a NumPy array, memmap or jax.Array x."""
    index = np.asarray(index)
    if isinstance(x, jax.Array):
        return np.asarray(x[index], np.float32)
    return _data.host_rows(x, index)


def sample_rows(num_rows: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct row indices in [0, num_rows), sorted (sequential memmap reads)."""
    return np.sort(rng.choice(num_rows, size=count, replace=False))


def random_init(x: Any, num_centers: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [K, D]: K distinct rows of x."""
    return gather_rows(x, sample_rows(x.shape[0], num_centers, rng))


def kmeans_plus_plus(
    x: Any, num_centers: int, rng: np.random.Generator, sample_size: int, spherical: bool
) -> np.ndarray:
    """float32 [K, D]: k-means++ centers chosen among `sample_size` uniformly sampled rows."""
    sample = gather_rows(x, sample_rows(x.shape[0], sample_size, rng))
    if spherical:
        sample = normalize_rows(sample)
    sq_norms = np.einsum("ij,ij->i", sample, sample)
    chosen = np.empty(num_centers, np.int64)
    chosen[0] = rng.integers(sample_size)
    # d2[j] = min over chosen centers c of |x_j - c|^2 = |x_j|^2 - 2 x_j.c + |c|^2.
    d2 = np.full(sample_size, np.inf)
    for i in range(1, num_centers):
        c = sample[chosen[i - 1]]
        dist = sq_norms - 2.0 * (sample @ c) + sq_norms[chosen[i - 1]]
        d2 = np.minimum(d2, np.maximum(dist, 0.0))
        d2[chosen[i - 1]] = 0.0  # rounding must not let a chosen row be drawn again
        total = d2.sum()
        if total > 0:
            chosen[i] = rng.choice(sample_size, p=d2 / total)
        else:  # every remaining row duplicates a center: any unused row will do
            unused = np.setdiff1d(np.arange(sample_size), chosen[:i])
            chosen[i] = rng.choice(unused)
    return sample[chosen]
