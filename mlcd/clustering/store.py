"""On-disk layout of a clustering run (`python -m mlcd.cluster`) and its reader.

    <out>/cluster_config.json         the run's config; a resumed run must use the same one
    <out>/embeddings/shard_00000.npz  ids str [n], emb float32 [n, D] (L2-normalised rows)
    <out>/embeddings/teacher.json     the teacher that wrote them: kind, path, step, embed_dim
    <out>/kmeans_state.npz            centroids float32 [C, D], iteration int64 (completed),
                                      objective float64 [iteration] (mean cosine, per iteration)
    <out>/centroids.npy               float32 [C, D], unit rows: the final k-means centers
    <out>/assign/shard_00000.npz      labels int32 [n, l], similarities float32 [n, l] of the
                                      embedding shard with the same number
    <out>/labels.npz                  ids str [N], labels int32 [N, l] (best first),
                                      similarities float32 [N, l]
    <out>/clusters.png                histograms of cluster sizes and of top-1 / top-l similarity
    <out>/clusters.json               written LAST: {"num_centers", "top_l", "embed_dim",
                                      "num_examples", "teacher", "dataset", "split", "features",
                                      "complete": true, ...}

Every file is written under a temporary name in its final directory and renamed into place
(`os.replace` is atomic on POSIX), so a file is either complete or absent, whenever the process
dies. A reader trusts the directory only when clusters.json exists with complete = true
(`load_clusters` checks it).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

CONFIG_FILE = "cluster_config.json"
EMBEDDINGS_DIR = "embeddings"
ASSIGN_DIR = "assign"
KMEANS_STATE_FILE = "kmeans_state.npz"
CENTROIDS_FILE = "centroids.npy"
LABELS_FILE = "labels.npz"
PLOT_FILE = "clusters.png"
META_FILE = "clusters.json"
_TMP = ".tmp-"  # infix of temporary files: "<final name>.tmp-<pid>"


def shard_path(out_dir: str, subdir: str, index: int) -> str:
    """<out_dir>/<subdir>/shard_<index:05d>.npz."""
    return os.path.join(out_dir, subdir, f"shard_{index:05d}.npz")


def remove_stale_temporaries(out_dir: str) -> None:
    """Deletes temporary files left by a run that died while writing them."""
    for pattern in ("*", f"{EMBEDDINGS_DIR}/*", f"{ASSIGN_DIR}/*"):
        for path in glob.glob(os.path.join(out_dir, pattern + _TMP + "*")):
            os.remove(path)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[Any]:
    """A binary file object whose contents appear at `path` only if the block completes."""
    tmp = f"{path}{_TMP}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez(path, **arrays), atomically."""
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def save_npy(path: str, array: np.ndarray) -> None:
    """np.save(path, array), atomically."""
    with atomic_file(path) as f:
        np.save(f, array)


def save_json(path: str, obj: Any) -> None:
    """JSON (indented) at `path`, atomically."""
    with atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


def save_npz_streaming(
    path: str, members: dict[str, tuple[np.dtype, tuple[int, ...], Iterable[np.ndarray]]]
) -> None:
    """Writes an .npz (readable by np.load) whose arrays arrive in row chunks, atomically.

    members: name -> (dtype, shape, chunks); the chunks, concatenated along dim 0, must fill
    `shape` exactly (each is cast to `dtype`, e.g. str ids to the common '<U{width}'). Only one
    chunk is in memory at a time, so N is bounded by the disk (400M labels do not fit in RAM).
    """
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, (dtype, shape, chunks) in members.items():
            dtype = np.dtype(dtype)
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            rows = 0
            # The size is unknown to zipfile up front: force_zip64 allows members > 2 GiB.
            with z.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {**header, "shape": tuple(shape)})
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype)
                    rows += chunk.shape[0]
                    member.write(chunk.tobytes())
            if rows != shape[0]:
                raise ValueError(f"{path}: {name} got {rows} rows, expected {shape[0]}")


def npy_header(path: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `name` in the .npz at `path`, reading only its header."""
    with zipfile.ZipFile(path) as z, z.open(name + ".npy") as f:
        if np.lib.format.read_magic(f) == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


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
            shape, _ = npy_header(path, "emb")
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
    """A complete clustering output (see the module docstring for shapes)."""

    meta: dict[str, Any]
    centroids: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    similarities: np.ndarray


def load_clusters(out_dir: str) -> Clusters:
    """Reads a finished clustering directory; FileNotFoundError / ValueError naming the file
    when it is incomplete (no clusters.json with complete = true) or inconsistent."""
    meta_path = os.path.join(out_dir, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{out_dir} is not a complete clustering: {META_FILE} is missing")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("complete") is not True:
        raise ValueError(f"{meta_path}: complete is not true")
    centroids = np.load(os.path.join(out_dir, CENTROIDS_FILE))
    with np.load(os.path.join(out_dir, LABELS_FILE)) as z:
        ids, labels, sims = z["ids"], z["labels"], z["similarities"]
    expected = (meta["num_centers"], meta["embed_dim"])
    if centroids.shape != expected or labels.shape != (meta["num_examples"], meta["top_l"]):
        raise ValueError(
            f"{out_dir}: centroids {centroids.shape} / labels {labels.shape} do not match "
            f"{META_FILE} (num_centers, embed_dim) = {expected}, "
            f"(num_examples, top_l) = ({meta['num_examples']}, {meta['top_l']})"
        )
    return Clusters(meta, centroids, ids, labels, sims)
