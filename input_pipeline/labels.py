"""Cluster labels (the output of `python -m mlcd.cluster`, opened with
mlcd.clustering.store.load_clusters) joined to training examples by their index in the split.

labels.npy int32 [N, l] (nearest first, -1 pads) and id_hashes.npy uint64 [N] hold row i for
example i of the split. Both are memory-mapped: a host's memory does not grow with N (at 400M
examples the labels are 13 GB, and the ids an id-keyed join would search tens of GB, on every
host); a batch reads its own b rows. Each row's stored id hash is compared with the hash of the
example's id, so a file written for another dataset, split or order fails on the first batch
instead of training on another example's labels.

The join is a pure function of the example (index, id), so it adds no state to the input
pipeline and a resumed run reads the same labels.
"""

from __future__ import annotations

import os

import numpy as np

from mlcd.clustering import store


class ClusterLabels:
    """Looks up examples' cluster labels: `labels_for(indices, ids)` -> int32 [b, top_l]."""

    def __init__(self, labels_dir: str, num_centers: int, top_l: int | None = None):
        """labels_dir: a cluster output directory (config.data.labels). num_centers: C of the
        model (config.model.num_centers); it must match the clustering's. top_l: keep only each
        example's first (nearest) top_l labels (config.data.top_l; None = all l).

        Opening reads only headers and clusters.json; the label values are range-checked per
        batch, in `labels_for` (a full check would read all N rows on every host)."""
        try:
            clusters = store.load_clusters(labels_dir)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"config.data.labels={labels_dir!r}: {e}") from None
        self.path = os.path.join(labels_dir, store.LABELS_FILE)
        self._hashes_path = os.path.join(labels_dir, store.ID_HASHES_FILE)
        if clusters.meta["num_centers"] != num_centers:
            raise ValueError(
                f"config.data.labels={labels_dir!r} has {clusters.meta['num_centers']} centers "
                f"but config.model.num_centers={num_centers}"
            )
        num_labels = clusters.labels.shape[1]
        top_l = num_labels if top_l is None else int(top_l)
        if not 1 <= top_l <= num_labels:
            raise ValueError(
                f"config.data.top_l={top_l}: {self.path} has {num_labels} labels per example"
            )
        self._num_centers = num_centers
        self._top_l = top_l
        self._labels = clusters.labels  # np.memmap int32 [N, l]
        self._id_hashes = clusters.id_hashes  # np.memmap uint64 [N]

    def labels_for(self, indices: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """int [b] indices of examples in the split, str [b] their ids -> int32 [b, top_l].

        ValueError naming the example id and the file when the file has no row for an index,
        when a row was written for another id, or when a label is not in [-1, num_centers).
        """
        indices = np.asarray(indices, np.int64)
        ids = [str(i) for i in ids]
        num_examples = len(self._labels)
        outside = (indices < 0) | (indices >= num_examples)
        if outside.any():
            k = int(np.argmax(outside))
            raise ValueError(
                f"example id {ids[k]!r} of the dataset has no labels in {self.path}: it is "
                f"example {indices[k]} of the split, the file has {num_examples} rows (was the "
                "clustering run on this dataset and split?)"
            )
        wrong = self._id_hashes[indices] != store.id_hash(ids)
        if wrong.any():
            k = int(np.argmax(wrong))
            raise ValueError(
                f"labels file does not match this dataset/split: example id {ids[k]!r} is "
                f"example {indices[k]} of the split, but row {indices[k]} of "
                f"{self._hashes_path} is another example's (was the clustering run on this "
                "dataset and split, and did its order change since?)"
            )
        labels = self._labels[indices, : self._top_l]
        bad = (labels < -1) | (labels >= self._num_centers)
        if bad.any():
            k = int(np.argmax(bad.any(axis=1)))
            raise ValueError(
                f"{self.path}: labels must be center ids in [0, {self._num_centers}) or -1 "
                f"(padding); example {ids[k]!r} has {labels[k].tolist()}"
            )
        return labels
