"""Clustering for MLCD labels.

    python -m mlcd.cluster --config configs/cluster.py:PRESET [--config.key=value ...]

Embeds every example of config.data.split with a teacher encoder (an export, or a training
run's checkpoint), runs spherical k-means on the L2-normalised embeddings into
config.kmeans.num_centers centers, and gives every example its config.assign.top_l nearest
centers. Writes to config.out_dir (formats: mlcd/clustering/store.py):

    centroids.npy   float32 [C, D], unit rows
    labels.npy      int32 [N, l] (best first), row i = example i of the split; with
                    similarities.npy float32 [N, l], ids.npy str [N] (the dataset's 'id')
                    and id_hashes.npy uint64 [N] (checked by the trainer's label join)
    clusters.png    cluster sizes, similarities, k-means objective
    clusters.json   written last, {"complete": true, ...}: trust the directory only then

Re-running the same command resumes after a crash from the last complete embedding shard,
k-means block (config.kmeans.save_every iterations) or assignment shard, and gives the same
files as an uninterrupted run. A different config on resume is refused, naming the key.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from mlcd import cli, label_store, labelling, sharding
from mlcd.clustering import pipeline, store
from mlcd.clustering.kmeans import BACKENDS
from mlcd.encoder import Encoder

log = logging.getLogger("mlcd.cluster")

FEATURES = ("image", "image_text_mean")
# Keys that change neither the outputs nor their meaning: they may differ on resume.
RUNTIME_KEYS = ("out_dir", "verbose", "data.num_threads")


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the config key of the first invalid value (no file is read)."""
    labelling.teacher_source(config)
    positive = {
        "embed.shard_size": config.embed.shard_size,
        "embed.batch_size": config.embed.batch_size,
        "kmeans.num_centers": config.kmeans.num_centers,
        "kmeans.iterations": config.kmeans.iterations,
        "kmeans.save_every": config.kmeans.save_every,
        "assign.top_l": config.assign.top_l,
        "assign.chunk_size": config.assign.chunk_size,
        "data.num_threads": config.data.num_threads,
    }
    if config.kmeans.chunk_size is not None:
        positive["kmeans.chunk_size"] = config.kmeans.chunk_size
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be a positive integer")
    if config.embed.features not in FEATURES:
        raise ValueError(f"config.embed.features={config.embed.features!r}: one of {FEATURES}")
    if config.kmeans.backend not in BACKENDS:
        raise ValueError(f"config.kmeans.backend={config.kmeans.backend!r}: one of {BACKENDS}")
    if config.kmeans.backend == "faiss" and config.kmeans.chunk_size is not None:
        raise ValueError("config.kmeans.backend='faiss' holds all rows in memory: unset chunk_size")
    if config.assign.top_l > config.kmeans.num_centers:
        raise ValueError(
            f"config.assign.top_l={config.assign.top_l} exceeds "
            f"config.kmeans.num_centers={config.kmeans.num_centers}"
        )


def prepare_out_dir(out_dir: str, config: ml_collections.ConfigDict) -> None:
    """Creates out_dir with cluster_config.json, or checks that a resumed run has the same
    config (up to RUNTIME_KEYS); removes temporary files of a crashed run."""
    labelling.prepare_out_dir(
        out_dir,
        config,
        config_file=store.CONFIG_FILE,
        runtime_keys=RUNTIME_KEYS,
        subdirs=(store.EMBEDDINGS_DIR, store.ASSIGN_DIR),
        what="clustering outputs",
    )


def open_split(config: ml_collections.ConfigDict):
    """(builder, random-access source of config.data.split with undecoded images)."""
    needed = {"id": "data.name", "image": "data.name"}
    if config.embed.features == "image_text_mean":
        needed[config.data.caption_key] = "data.caption_key"
    return labelling.open_split(config.data, needed)


def _load_teacher(config: ml_collections.ConfigDict) -> tuple[Encoder, dict[str, Any]]:
    text_tower = config.embed.features == "image_text_mean"
    return labelling.load_teacher(config, config.embed.batch_size, text_tower=text_tower)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) every stage; returns the contents of clusters.json."""
    check_config(config)
    if jax.process_count() > 1:
        # Every stage writes its files from one process; the teacher uses all local devices.
        raise ValueError("python -m mlcd.cluster runs in a single process (one host)")
    out_dir = os.path.abspath(config.out_dir)
    mesh = sharding.make_mesh(config.mesh)
    num_centers, top_l = int(config.kmeans.num_centers), int(config.assign.top_l)
    if num_centers % mesh.size:
        raise ValueError(
            f"config.kmeans.num_centers={num_centers} must be divisible by the {mesh.size} "
            f"devices of config.mesh={config.mesh}: the centers are sharded over all of them"
        )
    text_tower = None
    if config.embed.features == "image_text_mean":
        text_tower = "config.embed.features='image_text_mean' embeds the captions"
    labelling.check_teacher_files(config, text_tower=text_tower)
    builder, source = open_split(config)
    if not num_centers <= len(source):
        raise ValueError(
            f"config.kmeans.num_centers={num_centers} exceeds the {len(source)} examples of "
            f"{builder.name} split {config.data.split!r}"
        )
    store.check_not_older_version(out_dir)  # before anything is written into it
    prepare_out_dir(out_dir, config)
    meta_path = os.path.join(out_dir, store.META_FILE)
    if os.path.exists(meta_path):
        log.info("%s is complete; nothing to do", out_dir)
        with open(meta_path) as f:
            return json.load(f)

    with jax.set_mesh(mesh):
        emb = pipeline.embed(config, out_dir, source, lambda: _load_teacher(config))
        centroids, objective = pipeline.run_kmeans(config, out_dir, emb)
        pipeline.assign(config, out_dir, emb, centroids)
    if not pipeline.labels_written(out_dir):
        pipeline.write_labels(out_dir, emb, top_l)
    stats = pipeline.label_stats(out_dir, len(emb.paths), num_centers)
    pipeline.plot(os.path.join(out_dir, store.PLOT_FILE), stats, objective, top_l)
    with open(os.path.join(out_dir, store.EMBEDDINGS_DIR, pipeline.TEACHER_FILE)) as f:
        teacher = json.load(f)
    meta = {
        "num_centers": num_centers,
        "top_l": top_l,
        "embed_dim": emb.shape[1],
        "num_examples": len(emb),
        "teacher": teacher["path"],
        "teacher_kind": teacher["kind"],
        "teacher_step": teacher["step"],
        "dataset": config.data.name,
        "dataset_full_name": builder.info.full_name,
        "split": config.data.split,
        "features": config.embed.features,
        "kmeans_objective": objective,
        "empty_clusters": int((stats["sizes"] == 0).sum()),
        "largest_cluster": int(stats["sizes"].max()),
        "mean_top1_similarity": stats["mean_top1_similarity"],
        "complete": True,
    }
    label_store.save_json(meta_path, meta)  # last: it marks the directory complete
    return meta


def format_report(meta: dict[str, Any], out_dir: str) -> str:
    rows = [
        ("examples", meta["num_examples"]),
        ("centers", meta["num_centers"]),
        ("top_l", meta["top_l"]),
        ("embed_dim", meta["embed_dim"]),
        ("k-means objective (mean cos)", f"{meta['kmeans_objective'][-1]:.4f}"),
        ("empty clusters (top-1)", meta["empty_clusters"]),
        ("largest cluster (top-1)", meta["largest_cluster"]),
        ("mean top-1 similarity", f"{meta['mean_top1_similarity']:.4f}"),
    ]
    lines = ["", f"{'clustering':<32} {'value':>10}", f"{'-' * 32} {'-' * 10}"]
    lines += [f"{k:<32} {v!s:>10}" for k, v in rows]
    files = (store.CENTROIDS_FILE, *label_store.LABEL_FILES, store.PLOT_FILE, store.META_FILE)
    lines += ["", f"outputs:  {out_dir}", "  " + "    ".join(files)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cli.setup_logging(log.name)
    return cli.config_tool_main("python -m mlcd.cluster", __doc__, run, format_report, argv)


if __name__ == "__main__":
    cli.start_process()
    sys.exit(main())
