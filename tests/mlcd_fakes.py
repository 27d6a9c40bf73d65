"""A fake cluster output directory, in the format python -m mlcd.cluster writes
(mlcd.clustering.store; its label files through mlcd.label_store), and the config overrides of
a tiny MLCD run on it, for the tests that train MLCD or join labels without clustering."""

import os

import numpy as np
import tensorflow_datasets as tfds
from conftest import image_only, tiny_overrides

from mlcd import label_store
from mlcd.clustering import store


def dataset_ids(builder, split: str = "train") -> np.ndarray:
    """str [N]: the example ids of a split, in source order."""
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return np.asarray([source[i]["id"].decode() for i in range(len(source))])


def write_cluster_output(
    path: str, ids: np.ndarray, labels: np.ndarray, centroids: np.ndarray, complete: bool = True
) -> str:
    """Writes clusters.json, the label files and centroids.npy under `path`; returns `path`.
    Row i of the label files is for ids[i] (the split's example i if ids are in source order)."""
    os.makedirs(path, exist_ok=True)
    labels = np.asarray(labels, np.int32)
    ids = np.asarray(ids, str)
    sims = np.linspace(1.0, 0.5, labels.shape[1], dtype=np.float32)[None].repeat(len(labels), 0)
    width = ids.dtype.itemsize // 4  # UCS-4
    label_store.write_label_files(path, len(ids), labels.shape[1], width, [(ids, labels, sims)])
    label_store.save_npy(
        os.path.join(path, store.CENTROIDS_FILE), np.asarray(centroids, np.float32)
    )
    meta = {
        "num_centers": int(centroids.shape[0]),
        "top_l": int(labels.shape[1]),
        "embed_dim": int(centroids.shape[1]),
        "num_examples": len(ids),
        "complete": complete,
    }
    label_store.save_json(os.path.join(path, store.META_FILE), meta)
    return path


def random_cluster_output(
    path: str, ids: np.ndarray, num_centers: int, top_l: int, embed_dim: int, seed: int = 0
) -> str:
    """Each example's top_l distinct random centers; unit-norm random centroids."""
    rng = np.random.default_rng(seed)
    labels = np.argsort(rng.random((len(ids), num_centers)), axis=1)[:, :top_l]
    centroids = rng.normal(size=(num_centers, embed_dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return write_cluster_output(path, ids, labels, centroids)


def mlcd_overrides(scenes_dir, labels_dir, **extra):
    """tiny_overrides for configs/mlcd.py:tiny, its labels and centroids from `labels_dir`."""
    overrides = tiny_overrides(
        scenes_dir,
        **{"objective.labels": labels_dir, "objective.centers_init": f"{labels_dir}/centroids.npy"},
        **extra,
    )
    return image_only(overrides)  # its evaluators are the image-only ones
