"""Clustering for MLCD: sharded, streaming spherical k-means and top-k center assignment.

kmeans(x, num_centers, ...) -> centers [K, D]; assign_topk(x, centers, k) -> (ids, sims).
Under `jax.set_mesh` with several devices the centers are sharded along K over all of them.
"""

from mlcd.clustering.assign import assign_topk
from mlcd.clustering.kmeans import KMeansResult, kmeans

__all__ = ["KMeansResult", "assign_topk", "kmeans"]
