"""On-disk layout of a clustering run (`python -m mlcd.cluster`) and its reader.

    <out>/cluster_config.json         the run's config; a resumed run must use the same one
    <out>/embeddings/shard_00000.npz  ids str [n], emb float32 [n, D] (L2-normalised rows)
    <out>/embeddings/teacher.json     the teacher that wrote them: kind, path, step, embed_dim
    <out>/kmeans_state.npz            centroids float32 [C, D], iteration int64 (completed),
                                      objective float64 [iteration] (mean cosine, per iteration)
    <out>/centroids.npy               float32 [C, D], unit rows: the final k-means centers
    <out>/assign/shard_00000.npz      labels int32 [n, l], similarities float32 [n, l] of the
                                      embedding shard with the same number
    <out>/ids.npy                     str [N] ('<U{width}'), the dataset's 'id' of each row
    <out>/id_hashes.npy               uint64 [N], id_hash() of each row's id
    <out>/labels.npy                  int32 [N, l]: the top-l center ids, best first
    <out>/similarities.npy            float32 [N, l]: cosine similarity to those centers
    <out>/clusters.png                histograms of cluster sizes and of top-1 / top-l similarity
    <out>/clusters.json               written LAST: {"num_centers", "top_l", "embed_dim",
                                      "num_examples", "teacher", "dataset", "split", "features",
                                      "complete": true, ...}

The four label files are plain .npy arrays in DATASET INDEX ORDER: row i is example i of the
split (source[i]; the embedding shards hold the split in index order, shard after shard). They
are memory-mapped by their readers (`load_clusters`, input_pipeline.labels): a training host
reads only the rows of its batches, whatever N is (at 400M examples labels.npy is 13 GB and
ids.npy tens of GB, which no host should hold). A reader looks a row up by the example's index
and checks its id against id_hashes.npy, a fixed 8 bytes per row, without reading ids.npy.

Every file is written under a temporary name in its final directory and renamed into place
(`os.replace` is atomic on POSIX), so a file is either complete or absent, whenever the process
dies. A reader trusts the directory only when clusters.json exists with complete = true
(`load_clusters` checks it).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
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
IDS_FILE = "ids.npy"
ID_HASHES_FILE = "id_hashes.npy"
LABELS_FILE = "labels.npy"
SIMILARITIES_FILE = "similarities.npy"
LABEL_FILES = (IDS_FILE, ID_HASHES_FILE, LABELS_FILE, SIMILARITIES_FILE)
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


def save_npy_streaming(
    out_dir: str,
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]],
    chunks: Iterable[dict[str, np.ndarray]],
) -> None:
    """Writes the .npy files `out_dir/<name>` of `specs` (name -> (dtype, shape)), whose rows
    arrive together in chunks (name -> the next rows, cast to the dtype), atomically.

    The chunks, concatenated along dim 0, must fill each shape exactly. Only one chunk is in
    memory at a time, so N is bounded by the disk (400M labels do not fit in RAM). The files
    are renamed into place one by one after the last chunk: a crash before leaves none of them.
    """
    with contextlib.ExitStack() as stack:
        files = {
            name: stack.enter_context(atomic_file(os.path.join(out_dir, name))) for name in specs
        }
        for name, (dtype, shape) in specs.items():
            descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
            header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_2_0(files[name], header)
        rows = dict.fromkeys(specs, 0)
        for chunk in chunks:
            for name, (dtype, _) in specs.items():
                part = np.ascontiguousarray(chunk[name], dtype)
                rows[name] += part.shape[0]
                files[name].write(part.tobytes())
        for name, (_, shape) in specs.items():
            if rows[name] != shape[0]:
                raise ValueError(f"{out_dir}/{name}: got {rows[name]} rows, expected {shape[0]}")


def id_hash(ids: Iterable[str]) -> np.ndarray:
    """uint64 [n]: a 64-bit hash of each example id, the first 8 bytes (little-endian) of
    blake2b of its UTF-8 bytes. Stable across processes, hosts and Python versions (Python's
    hash() of a str is salted per process)."""
    digests = b"".join(hashlib.blake2b(str(i).encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(digests, np.dtype("<u8"))


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
    when it is incomplete (no clusters.json with complete = true, a file missing) or an array's
    shape or dtype does not match clusters.json."""
    meta_path = os.path.join(out_dir, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{out_dir} is not a complete clustering: {META_FILE} is missing")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("complete") is not True:
        raise ValueError(f"{meta_path}: complete is not true")
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
            raise FileNotFoundError(
                f"{out_dir} is not a complete clustering: {name} is missing (re-run "
                "python -m mlcd.cluster with its config: it writes the missing files)"
            )
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
