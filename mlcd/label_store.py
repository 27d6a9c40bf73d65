"""The label store: per-example labels of a dataset split, on disk, and its reader `LabelTable`.

A label store is a directory written by a labeller (`python -m mlcd.cluster`: cluster ids,
layout of its other files in mlcd/clustering/store.py; entity annotation for MOFI: entity ids)
and read by the training input pipeline. Its label files, plain .npy arrays:

    <dir>/labels.npy        int32 [N, l]: example i's l labels, class ids in [0, C), best
                            first; -1 pads a row that has fewer than l labels
    <dir>/similarities.npy  float32 [N, l]: a score per label (mlcd.cluster: the cosine
                            similarity to the center), aligned with labels.npy
    <dir>/ids.npy           str [N] ('<U{width}'): the dataset's 'id' of each example
    <dir>/id_hashes.npy     uint64 [N]: id_hash() of each example's id
    <dir>/<meta>.json       the writer's own meta JSON (mlcd.cluster: clusters.json), written
                            LAST by every writer, with "complete": true

Row i of every file is example i of the split (source[i], the dataset's index order); N is the
size of the split. `id_hash(id)` is the first 8 bytes, little-endian, of blake2b of the id's
UTF-8 bytes: stable across processes, hosts and Python versions.

Readers memory-map the files (`open_arrays`, `LabelTable`): a host reads only the rows of its
own examples, whatever N is (at 400M examples labels.npy is 13 GB and ids.npy tens of GB, which
no host should hold). A reader looks a row up by the example's index in the split and compares
the row's id_hashes.npy entry, a fixed 8 bytes per row, with the hash of the example's id, so a
store written for another dataset, split or order fails on the first example instead of
training on another example's labels; ids.npy is for people and tools, never read per example.

Every file is written under a temporary name in its final directory ("<name>.tmp-<pid>") and
renamed into place (`os.replace` is atomic on POSIX), so a file is either complete or absent,
whenever the process dies (`atomic_file`; `save_npy_streaming` streams arrays larger than
memory). The label files are renamed one by one after all their rows are written; the meta
JSON comes after them all, so a reader trusts the directory only when the meta JSON exists
with "complete": true (the writer's loader checks it, e.g. mlcd.clustering.store.load_clusters).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

LABELS_FILE = "labels.npy"
SIMILARITIES_FILE = "similarities.npy"
IDS_FILE = "ids.npy"
ID_HASHES_FILE = "id_hashes.npy"
LABEL_FILES = (IDS_FILE, ID_HASHES_FILE, LABELS_FILE, SIMILARITIES_FILE)
TMP_INFIX = ".tmp-"  # temporary files are "<final name>.tmp-<pid>"

_HASH_DTYPE = np.dtype("<u8")


# ----------------------------------------------------------------------------------------------
# Atomic writes.


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[Any]:
    """A binary file object whose contents appear at `path` only if the block completes."""
    tmp = f"{path}{TMP_INFIX}{os.getpid()}"
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


def remove_stale_temporaries(directory: str, subdirs: Sequence[str] = ()) -> None:
    """Deletes the temporary files ("*.tmp-*") in `directory` and its `subdirs`, left by a
    writer that died while writing them. Only for a directory no live process is writing."""
    for sub in ("", *subdirs):
        for path in glob.glob(os.path.join(directory, sub, f"*{TMP_INFIX}*")):
            os.remove(path)


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


def write_label_files(
    directory: str,
    num_examples: int,
    num_labels: int,
    id_width: int,
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """The four label files (LABEL_FILES) of `num_examples` rows, streamed atomically
    (`save_npy_streaming`): `chunks` yields (ids str [n], labels int [n, num_labels],
    similarities float [n, num_labels]) of the next n examples of the split, in index order;
    the id hashes are computed here. id_width: the longest id, in characters (ids.npy is
    '<U{id_width}'). The caller writes its meta JSON after this returns."""

    def rows():
        for ids, labels, similarities in chunks:
            ids = np.asarray(ids, str)
            if ids.dtype.itemsize // 4 > id_width:  # UCS-4; a cast would cut the ids short
                raise ValueError(
                    f"{directory}/{IDS_FILE}: id {str(max(ids.tolist(), key=len))!r} is longer "
                    f"than id_width={id_width}"
                )
            yield {
                IDS_FILE: ids,
                ID_HASHES_FILE: id_hash(ids),
                LABELS_FILE: labels,
                SIMILARITIES_FILE: similarities,
            }

    n, per_row, id_width = int(num_examples), int(num_labels), max(int(id_width), 1)
    specs = {
        IDS_FILE: (np.dtype(f"<U{id_width}"), (n,)),
        ID_HASHES_FILE: (_HASH_DTYPE, (n,)),
        LABELS_FILE: (np.dtype(np.int32), (n, per_row)),
        SIMILARITIES_FILE: (np.dtype(np.float32), (n, per_row)),
    }
    save_npy_streaming(directory, specs, rows())


# ----------------------------------------------------------------------------------------------
# Reading.


def id_hash(ids: Iterable[str]) -> np.ndarray:
    """uint64 [n]: a 64-bit hash of each example id, the first 8 bytes (little-endian) of
    blake2b of its UTF-8 bytes (of str(id)). Stable across processes, hosts and Python versions
    (Python's hash() of a str is salted per process)."""
    digests = b"".join(hashlib.blake2b(str(i).encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(digests, _HASH_DTYPE)


def _id_hash_int(example_id: str) -> int:
    """id_hash([example_id])[0], as a Python int."""
    digest = hashlib.blake2b(str(example_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def npy_header(path: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `name` in the .npz at `path`, reading only its header."""
    with zipfile.ZipFile(path) as z, z.open(name + ".npy") as f:
        if np.lib.format.read_magic(f) == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def open_arrays(directory: str, what: str) -> tuple[np.memmap, np.memmap]:
    """(labels np.memmap int32 [N, l], id_hashes np.memmap uint64 [N]) of the label store
    `directory`, memory-mapped read-only (no row is read). FileNotFoundError / ValueError,
    prefixed with `what` (the config key that named the directory, e.g.
    "config.objective.labels") and naming the file, when a file is missing or its dtype or
    shape is wrong. Whether the store is complete is the writer's meta JSON's to say: check it
    first (e.g. mlcd.clustering.store.load_clusters does it, and these checks, itself)."""
    arrays = {}
    for name, dtype, ndim, shape_text in (
        (LABELS_FILE, np.dtype(np.int32), 2, "[N, l]"),
        (ID_HASHES_FILE, _HASH_DTYPE, 1, "[N]"),
    ):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: {path} is missing (is {directory} a label store?)")
        array = np.load(path, mmap_mode="r")
        if array.dtype != dtype or array.ndim != ndim:
            raise ValueError(
                f"{what}: {path}: {array.dtype} {array.shape} is not {dtype.name} {shape_text}"
            )
        arrays[name] = array
    labels, hashes = arrays[LABELS_FILE], arrays[ID_HASHES_FILE]
    if len(hashes) != len(labels):
        raise ValueError(
            f"{what}: {os.path.join(directory, ID_HASHES_FILE)} has {len(hashes)} rows but "
            f"{os.path.join(directory, LABELS_FILE)} has {len(labels)}"
        )
    return labels, hashes


class LabelTable:
    """Per-example labels memory-mapped from a label store, looked up by example index in the split."""

    def __init__(
        self,
        directory: str,
        labels: np.ndarray,
        id_hashes: np.ndarray,
        num_classes: int,
        top_l: int | None = None,
        *,
        what: str = "labels",
        top_l_key: str = "top_l",
    ):
        """directory: the label store (for messages). labels int32 [N, l], id_hashes uint64 [N]:
        its arrays, memory-mapped (`open_arrays`, or the writer's loader). num_classes: C, the
        labels must be in [-1, C). top_l: keep only each example's first (best) top_l labels
        (None: all l); top_l_key: its config key, for messages. what: the config key that named
        the store (e.g. "config.objective.labels"), prefixed to the errors about its arrays.

        Opening reads no row; the label values are range-checked per lookup (a full check would
        read all N rows on every host)."""
        self.path = os.path.join(directory, LABELS_FILE)
        self.hashes_path = os.path.join(directory, ID_HASHES_FILE)
        if labels.dtype != np.int32 or labels.ndim != 2:
            raise ValueError(
                f"{what}: {self.path}: {labels.dtype} {labels.shape} is not int32 [N, l]"
            )
        if id_hashes.dtype != _HASH_DTYPE or id_hashes.shape != labels.shape[:1]:
            raise ValueError(
                f"{what}: {self.hashes_path}: {id_hashes.dtype} {id_hashes.shape} is not uint64 "
                f"[N] with the N = {len(labels)} rows of {self.path}"
            )
        self.labels = labels  # kept as given: np.memmap int32 [N, l]
        self.id_hashes = id_hashes  # np.memmap uint64 [N]
        self.num_classes = int(num_classes)
        num_labels = labels.shape[1]
        top_l = num_labels if top_l is None else int(top_l)
        if not 1 <= top_l <= num_labels:
            raise ValueError(
                f"{top_l_key}={top_l}: {self.path} has {num_labels} labels per example"
            )
        self.top_l = top_l
        # Plain ndarray views of the same mapped pages (np.asarray copies nothing): indexing
        # a np.memmap subclass costs more per call, and lookup runs once per example.
        self._rows = np.asarray(labels)[:, :top_l]
        self._hashes = np.asarray(id_hashes)
        self._num_rows = len(self._rows)

    def lookup(self, indices: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """int [b] indices of examples in the split, str [b] their ids -> int32 [b, top_l].

        ValueError naming the example id and the file when the file has no row for an index,
        when a row was written for another id, or when a label is not in [-1, num_classes).
        Reads only the b rows (and b id hashes).
        """
        indices = np.asarray(indices, np.int64)
        if indices.shape == (1,):
            # The common call: one example, from an input-pipeline thread. Python scalars cost
            # a fraction of numpy's per-call overhead on 1-element arrays; on any failure the
            # general path below raises the error.
            i = int(indices[0])
            if 0 <= i < self._num_rows and int(self._hashes[i]) == _id_hash_int(ids[0]):
                labels = self._rows[i : i + 1].copy()
                row = labels[0].tolist()
                if min(row) >= -1 and max(row) < self.num_classes:
                    return labels
        elif not len(indices):
            return np.empty((0, self.top_l), np.int32)
        if indices.min() < 0 or indices.max() >= self._num_rows:
            k = int(np.argmax((indices < 0) | (indices >= self._num_rows)))
            raise ValueError(
                f"example id {str(ids[k])!r} of the dataset has no labels in {self.path}: it is "
                f"example {indices[k]} of the split, the file has {self._num_rows} rows (was the "
                "label store written for this dataset and split?)"
            )
        wrong = self._hashes[indices] != id_hash(ids)
        if wrong.any():
            k = int(np.argmax(wrong))
            raise ValueError(
                f"labels file does not match this dataset/split: example id {str(ids[k])!r} is "
                f"example {indices[k]} of the split, but row {indices[k]} of "
                f"{self.hashes_path} is another example's (was the label store written for "
                "this dataset and split, and did its order change since?)"
            )
        labels = self._rows[indices]
        if labels.min() < -1 or labels.max() >= self.num_classes:
            bad = (labels < -1) | (labels >= self.num_classes)
            k = int(np.argmax(bad.any(axis=1)))
            raise ValueError(
                f"{self.path}: labels must be class ids in [0, {self.num_classes}) or -1 "
                f"(padding); example {str(ids[k])!r} has {labels[k].tolist()}"
            )
        return labels
