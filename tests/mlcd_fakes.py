"""A fake cluster output directory, in the format python -m mlcd.cluster writes
(mlcd.clustering.store), for the tests that train MLCD or join labels without clustering."""

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from mlcd.clustering import store


def dataset_ids(builder, split: str = "train") -> np.ndarray:
    """str [N]: the example ids of a split, in source order."""
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return np.asarray([source[i]["id"].decode() for i in range(len(source))])


def write_cluster_output(
    path: str, ids: np.ndarray, labels: np.ndarray, centroids: np.ndarray, complete: bool = True
) -> str:
    """Writes clusters.json, labels.npz and centroids.npy under `path`; returns `path`."""
    os.makedirs(path, exist_ok=True)
    labels = np.asarray(labels, np.int32)
    np.savez(
        os.path.join(path, store.LABELS_FILE),
        ids=np.asarray(ids, str),
        labels=labels,
        similarities=np.linspace(1.0, 0.5, labels.shape[1], dtype=np.float32)[None].repeat(
            len(labels), 0
        ),
    )
    np.save(os.path.join(path, store.CENTROIDS_FILE), np.asarray(centroids, np.float32))
    meta = {
        "num_centers": int(centroids.shape[0]),
        "top_l": int(labels.shape[1]),
        "embed_dim": int(centroids.shape[1]),
        "num_examples": len(ids),
        "complete": complete,
    }
    with open(os.path.join(path, store.META_FILE), "w") as f:
        json.dump(meta, f)
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
