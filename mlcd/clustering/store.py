"""On-disk layout of a clustering run (`python -m mlcd.cluster`) and its reader.

    <out>/cluster_config.json         the run's config; a resumed run must use the same one
    <out>/embeddings/shard_00000.npz  ids str [n], emb float32 [n, D] (L2-normalised rows)
    <out>/embeddings/teacher.json     the teacher that wrote them: kind, path, step, embed_dim
    <out>/kmeans_state.npz            centroids float32 [C, D], iteration int64 (completed),
                                      objective float64 [iteration] (mean cosine, per iteration)
    <out>/centroids.npy               float32 [C, D], unit rows: the final k-means centers
    <out>/assign/shard_00000.npz      labels int32 [n, l], similarities float32 [n, l] of the
                                      embedding shard with the same number
    <out>/labels.npy, similarities.npy, ids.npy, id_hashes.npy
                                      the label store (format: mlcd/label_store.py): per
                                      example, the top-l center ids (best first; l <= C, so
                                      never padded) and their cosine similarities
    <out>/clusters.png                histograms of cluster sizes and of top-1 / top-l similarity
    <out>/clusters.json               written LAST: {"num_centers", "top_l", "embed_dim",
                                      "num_examples", "teacher", "dataset", "split", "features",
                                      "complete": true, ...}

The label files are in DATASET INDEX ORDER (row i is example i of the split): the embedding
shards hold the split in index order, shard after shard, and assign shard s has the rows of
embedding shard s. Every file is written atomically (mlcd.label_store.atomic_file), so a file
is either complete or absent, whenever the process dies. A reader trusts the directory only
when clusters.json exists with complete = true (`load_clusters` checks it).

A directory written by an older version holds labels.npz (keyed by id) instead of the label
files; it is refused (`check_not_older_version`): cluster again into a new out_dir.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from mlcd import label_store
from mlcd.label_store import ID_HASHES_FILE, IDS_FILE, LABELS_FILE, SIMILARITIES_FILE

CONFIG_FILE = "cluster_config.json"
EMBEDDINGS_DIR = "embeddings"
ASSIGN_DIR = "assign"
KMEANS_STATE_FILE = "kmeans_state.npz"
CENTROIDS_FILE = "centroids.npy"
PLOT_FILE = "clusters.png"
META_FILE = "clusters.json"
OLD_LABELS_FILE = "labels.npz"  # what versions before the label store wrote instead


def shard_path(out_dir: str, subdir: str, index: int) -> str:
    """<out_dir>/<subdir>/shard_<index:05d>.npz."""
    return os.path.join(out_dir, subdir, f"shard_{index:05d}.npz")


def check_not_older_version(out_dir: str) -> None:
    """ValueError when out_dir was written by a version before the label store (labels.npz,
    no labels.npy): neither `python -m mlcd.cluster` nor the trainer reads it any more."""
    if os.path.exists(os.path.join(out_dir, OLD_LABELS_FILE)) and not os.path.exists(
        os.path.join(out_dir, LABELS_FILE)
    ):
        raise ValueError(
            f"{out_dir} holds {OLD_LABELS_FILE} but no {LABELS_FILE}: it was written by an "
            "older version of python -m mlcd.cluster; cluster again into a new config.out_dir"
        )


class EmbeddingShards:
    """The rows of the embedding shards as one read-only float32 [N, D] array-like.

    Supports what `mlcd.clustering.kmeans` / `assign_topk` use on host data: `.shape`,
    `x[a:b]`, `x[int_index_array]` and `np.asarray(x)`. Shards are read whole (an .npz member
    cannot be memory-mapped) and the last one read is kept, so a sequential pass in chunks
    reads each shard about once.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        sizes, dims = [], set()
        for path in self.paths:
            shape, _ = label_store.npy_header(path, "emb")
            sizes.append(shape[0])
            dims.add(shape[1])
        if len(dims) != 1:
            raise ValueError(f"embedding shards under {os.path.dirname(paths[0])} mix dims {dims}")
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), dims.pop())
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def shard(self, index: int) -> np.ndarray:
        """float32 [n_index, D]: the embeddings of shard `index`."""
        if self._cached is None or self._cached[0] != index:
            with np.load(self.paths[index]) as z:
                self._cached = (index, z["emb"])
        return self._cached[1]

    def ids(self, index: int) -> np.ndarray:
        """str [n_index]: the example ids of shard `index`."""
        with np.load(self.paths[index]) as z:
            return z["ids"]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("EmbeddingShards supports contiguous slices only")
            parts = []
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            for s in range(max(first, 0), len(self.paths)):
                lo, hi = self.offsets[s], self.offsets[s + 1]
                if lo >= stop:
                    break
                parts.append(self.shard(s)[max(start, lo) - lo : min(stop, hi) - lo])
            return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), np.float32)
        index = np.asarray(key)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise IndexError("EmbeddingShards takes a slice or a 1-D integer index array")
        out = np.empty((len(index), self.shape[1]), np.float32)
        owner = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(owner):
            rows = owner == s
            out[rows] = self.shard(int(s))[index[rows] - self.offsets[s]]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        del copy  # the result is always a new array
        return np.asarray(self[:], dtype)


class Clusters(NamedTuple):
    """A complete clustering output (see the module docstring for shapes and dtypes); every
    array is memory-mapped read-only (np.memmap), so opening one reads no rows."""

    meta: dict[str, Any]
    centroids: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    similarities: np.ndarray
    id_hashes: np.ndarray


def load_clusters(out_dir: str) -> Clusters:
    """Opens a finished clustering directory; FileNotFoundError / ValueError naming the file
    when it is incomplete (no clusters.json with complete = true, a file missing), written by
    an older version (`check_not_older_version`), or an array's shape or dtype does not match
    clusters.json."""
    meta_path = os.path.join(out_dir, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{out_dir} is not a complete clustering: {META_FILE} is missing")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("complete") is not True:
        raise ValueError(f"{meta_path}: complete is not true")
    check_not_older_version(out_dir)
    n, top_l = meta["num_examples"], meta["top_l"]
    expected = {  # name -> (shape, dtype); ids: any '<U{width}'
        CENTROIDS_FILE: ((meta["num_centers"], meta["embed_dim"]), np.dtype(np.float32)),
        IDS_FILE: ((n,), np.dtype(str)),
        ID_HASHES_FILE: ((n,), np.dtype(np.uint64)),
        LABELS_FILE: ((n, top_l), np.dtype(np.int32)),
        SIMILARITIES_FILE: ((n, top_l), np.dtype(np.float32)),
    }
    arrays = {}
    for name, (shape, dtype) in expected.items():
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{out_dir} is not a complete clustering: {name} is missing")
        # Memory-mapped: at 400M examples these files are tens of GB (module docstring).
        array = np.load(path, mmap_mode="r")
        same_dtype = array.dtype.kind == "U" if dtype.kind == "U" else array.dtype == dtype
        if array.shape != shape or not same_dtype:
            raise ValueError(
                f"{path}: {array.dtype} {array.shape} does not match {META_FILE}, which needs "
                f"{dtype.name} {shape} ((num_centers, embed_dim) = ({meta['num_centers']}, "
                f"{meta['embed_dim']}), (num_examples, top_l) = ({n}, {top_l}))"
            )
        arrays[name] = array
    return Clusters(
        meta,
        centroids=arrays[CENTROIDS_FILE],
        ids=arrays[IDS_FILE],
        labels=arrays[LABELS_FILE],
        similarities=arrays[SIMILARITIES_FILE],
        id_hashes=arrays[ID_HASHES_FILE],
    )
