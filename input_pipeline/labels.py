"""Cluster labels (the output of `python -m mlcd.cluster`, read with
mlcd.clustering.store.load_clusters: labels.npz ids str [N], labels int32 [N, l] nearest first,
-1 pads) joined to training examples by id.

The join is a pure function of the example id, so it adds no state to the input pipeline and a
resumed run reads the same labels.
"""

from __future__ import annotations

import os

import numpy as np

from mlcd.clustering import store


class ClusterLabels:
    """Looks up examples' cluster labels by id: `labels_for(ids)` -> int32 [b, top_l].

    Ids are kept sorted and searched with np.searchsorted: memory is the ids and labels arrays
    themselves, no per-id Python objects (a dict over 400M ids would not fit in host memory).
    """

    def __init__(self, labels_dir: str, num_centers: int, top_l: int | None = None):
        """labels_dir: a cluster output directory (config.data.labels). num_centers: C of the
        model (config.model.num_centers); it must match the clustering's. top_l: keep only each
        example's first (nearest) top_l labels (config.data.top_l; None = all l)."""
        try:
            clusters = store.load_clusters(labels_dir)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"config.data.labels={labels_dir!r}: {e}") from None
        self.path = os.path.join(labels_dir, store.LABELS_FILE)
        if clusters.meta["num_centers"] != num_centers:
            raise ValueError(
                f"config.data.labels={labels_dir!r} has {clusters.meta['num_centers']} centers "
                f"but config.model.num_centers={num_centers}"
            )
        ids, labels = clusters.ids, clusters.labels
        if ids.shape != labels.shape[:1] or ids.shape[0] == 0:
            raise ValueError(f"{self.path}: ids {ids.shape} do not match labels {labels.shape}")
        num_labels = labels.shape[1]
        top_l = num_labels if top_l is None else int(top_l)
        if not 1 <= top_l <= num_labels:
            raise ValueError(
                f"config.data.top_l={top_l}: {self.path} has {num_labels} labels per example"
            )
        labels = labels[:, :top_l]
        bad = (labels < -1) | (labels >= num_centers)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            raise ValueError(
                f"{self.path}: labels must be center ids in [0, {num_centers}) or -1 (padding); "
                f"example {str(ids[row])!r} has {labels[row].tolist()}"
            )
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order].astype(str)
        repeated = self._ids[1:] == self._ids[:-1]
        if repeated.any():
            raise ValueError(
                f"{self.path}: example id {str(self._ids[1:][repeated][0])!r} appears more than once"
            )
        self._labels = labels[order].astype(np.int32)

    def labels_for(self, ids: np.ndarray) -> np.ndarray:
        """str [b] example ids -> int32 [b, top_l]; an id without labels raises, naming it."""
        ids = np.asarray(ids).astype(str)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        found = self._ids[pos] == ids
        if not found.all():
            raise ValueError(
                f"example id {str(ids[~found][0])!r} of the dataset has no labels in {self.path} "
                "(was the clustering run on this dataset and split?)"
            )
        return self._labels[pos]
