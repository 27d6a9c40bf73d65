"""On-disk layout of an entity annotation (`python -m mlcd.annotate`) and its reader.

    <out>/annotate_config.json        the run's config; a resumed run must use the same one
    <out>/source_table.json           the entity table matched: path, digest, size (a resumed
                                      run refuses a table edited since)
    <out>/candidates/shard_00000.npz  ids str [n]; offsets int64 [n + 1]; entities int32 [m]:
                                      example j's candidates (ids of the SOURCE table, in order
                                      of first mention) are entities[offsets[j]:offsets[j+1]];
                                      truth_offsets, truth: the same for the ground-truth
                                      feature config.data.ground_truth, when it is set
    <out>/teacher.json                the teacher of the scores: kind, path, step, embed_dim
    <out>/text_embeddings.npz         entities int32 [E] (the source ids that are candidates
                                      anywhere, ascending), emb float32 [E, D] (unit rows):
                                      each entity's text embedded once
    <out>/scores/shard_00000.npz      scores float32 [m]: cos(image, entity text) of each
                                      candidate of the candidates shard with the same number
    <out>/labels.npy, similarities.npy, ids.npy, id_hashes.npy
                                      the label store (format: mlcd/label_store.py): per
                                      example, up to l entity ids of entities.json (best first),
                                      -1 padded; similarities = the teacher's cosine, NaN where
                                      there is none (padding, or the filter disabled)
    <out>/entities.json               the table of the labels: the entities kept, renumbered
                                      0..C-1 in source-id order, each with its "source_id"
    <out>/annotations.png             images with entities, labels per image, entity frequency
    <out>/annotations.json            written LAST: {"num_entities", "dataset", "split",
                                      "entities_digest", "num_examples", "max_labels",
                                      "complete": true, counts, quality, ...}

Rows of the label files are in DATASET INDEX ORDER (row i is example i of the split); shard s
holds examples [s * shard_size, (s + 1) * shard_size). Every file is written atomically
(mlcd.label_store.atomic_file): a file is complete or absent whenever the process dies, and a
reader trusts the directory only when annotations.json says complete = true.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from mlcd.label_store import ID_HASHES_FILE, IDS_FILE, LABELS_FILE, SIMILARITIES_FILE

CONFIG_FILE = "annotate_config.json"
SOURCE_TABLE_FILE = "source_table.json"
CANDIDATES_DIR = "candidates"
SCORES_DIR = "scores"
TEACHER_FILE = "teacher.json"
TEXT_EMBEDDINGS_FILE = "text_embeddings.npz"
ENTITIES_FILE = "entities.json"
PLOT_FILE = "annotations.png"
META_FILE = "annotations.json"


def shard_path(out_dir: str, subdir: str, index: int) -> str:
    """<out_dir>/<subdir>/shard_<index:05d>.npz."""
    return os.path.join(out_dir, subdir, f"shard_{index:05d}.npz")


class Annotations(NamedTuple):
    """A complete annotation (module docstring); arrays memory-mapped read-only (np.memmap),
    so opening one reads no rows. entities_path: its entity table (mlcd.entities.load_table),
    whose ids are the labels' (0..num_entities-1)."""

    meta: dict[str, Any]
    ids: np.ndarray
    labels: np.ndarray
    similarities: np.ndarray
    id_hashes: np.ndarray
    entities_path: str


def load_annotations(directory: str) -> Annotations:
    """Opens a finished annotation directory; FileNotFoundError / ValueError naming the
    directory and the file when it is incomplete (no annotations.json with complete = true, a
    file missing) or an array's shape or dtype does not match annotations.json."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{directory} is not a complete entity annotation: {META_FILE} is missing"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("complete") is not True:
        raise ValueError(f"{meta_path}: complete is not true")
    n, width = meta["num_examples"], meta["max_labels"]
    expected = {  # name -> (shape, dtype); ids: any '<U{width}'
        IDS_FILE: ((n,), np.dtype(str)),
        ID_HASHES_FILE: ((n,), np.dtype(np.uint64)),
        LABELS_FILE: ((n, width), np.dtype(np.int32)),
        SIMILARITIES_FILE: ((n, width), np.dtype(np.float32)),
    }
    arrays = {}
    for name, (shape, dtype) in expected.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{directory} is not a complete entity annotation: {name} is missing"
            )
        array = np.load(path, mmap_mode="r")  # tens of GB at web scale: never read whole
        same_dtype = array.dtype.kind == "U" if dtype.kind == "U" else array.dtype == dtype
        if array.shape != shape or not same_dtype:
            raise ValueError(
                f"{path}: {array.dtype} {array.shape} does not match {META_FILE}, which needs "
                f"{dtype.name} {shape} ((num_examples, max_labels) = ({n}, {width}))"
            )
        arrays[name] = array
    entities_path = os.path.join(directory, ENTITIES_FILE)
    if not os.path.isfile(entities_path):
        raise FileNotFoundError(
            f"{directory} is not a complete entity annotation: {ENTITIES_FILE} is missing"
        )
    return Annotations(
        meta,
        ids=arrays[IDS_FILE],
        labels=arrays[LABELS_FILE],
        similarities=arrays[SIMILARITIES_FILE],
        id_hashes=arrays[ID_HASHES_FILE],
        entities_path=entities_path,
    )
