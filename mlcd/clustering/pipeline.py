"""The stages of `python -m mlcd.cluster`: embed -> k-means -> assign -> label files.

Each stage reads the previous one's files and resumes from its own (layout: store.py; the
label files: mlcd/label_store.py):
  embed    teacher embeddings of every example, shard by shard; a shard on disk is complete.
  kmeans   spherical k-means in blocks of `save_every` iterations, the state saved after each.
  assign   the top-l centers of every example, one embedding shard at a time.
  finalize the label files (ids, id_hashes, labels, similarities .npy in dataset index order,
           streamed from the shards), clusters.png, and clusters.json last.
A crash loses at most the shard or the block of iterations in progress.

Resumed == uninterrupted, bit for bit: the teacher sees the same batches (batches start at
shard boundaries), and every k-means block is a call `kmeans(..., init=<the previous block's
centroids>, seed=<derived from (seed, first iteration of the block)>)` whether or not the
process stopped in between (the seed drives the re-seeding of empty clusters).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import jax
import ml_collections
import numpy as np

from mlcd import label_store, labelling
from mlcd.clustering import _data, store
from mlcd.clustering.assign import assign_topk
from mlcd.clustering.kmeans import kmeans
from mlcd.encoder import Encoder

log = logging.getLogger("mlcd.cluster")

TEACHER_FILE = "teacher.json"  # in embeddings/: the teacher that wrote the shards
_SIM_BINS = np.linspace(-1.0, 1.0, 201)  # histogram bins of cosine similarities


# ----------------------------------------------------------------------------------------------
# Stage 1: embeddings.


def _embed(encoder: Encoder, images: np.ndarray, texts: list[str] | None) -> np.ndarray:
    """float32 [b, D] unit rows: image embeddings, or normalise(image + text embedding)."""
    emb = encoder.embed_images(images, keys=("embedding",))["embedding"]
    if texts is not None:
        # The mean of two unit vectors, L2-normalised: normalise(a + b) (the 1/2 cancels).
        emb = emb + encoder.embed_texts(texts)["embedding"]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32)


def embed(
    config: ml_collections.ConfigDict,
    out_dir: str,
    source: Sequence[dict[str, Any]],
    load_teacher: Callable[[], tuple[Encoder, dict[str, Any]]],
) -> store.EmbeddingShards:
    """Writes the missing shards of embeddings/ and returns all of them as one array-like.

    Shard s holds examples s * shard_size ... of `source` in index order, so the rows of all
    shards, concatenated, are the split in index order (the label files rely on it).

    Args:
      config: the clustering config (embed.*, data.caption_key, data.num_threads, verbose).
      source: random-access examples of the split (ids, encoded images, captions).
      load_teacher: () -> (encoder, {'path', 'step'}); called only if a shard is missing.
    """
    n, size = len(source), int(config.embed.shard_size)
    num_shards = math.ceil(n / size)
    paths = [store.shard_path(out_dir, store.EMBEDDINGS_DIR, s) for s in range(num_shards)]
    todo = [s for s in range(num_shards) if not os.path.exists(paths[s])]
    log.info("embed: %d of %d shards on disk", num_shards - len(todo), num_shards)
    if todo:
        encoder, teacher = load_teacher()
        text_key = config.data.caption_key if config.embed.features == "image_text_mean" else None
        batch = int(config.embed.batch_size)
        tasks = [
            (s, lo, min(lo + batch, (s + 1) * size, n))
            for s in todo
            for lo in range(s * size, min((s + 1) * size, n), batch)
        ]
        done = n - sum(min((s + 1) * size, n) - s * size for s in todo)
        bar = labelling.progress(n, done, "embed", "img", config.verbose)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        with (
            futures.ThreadPoolExecutor(1) as reader,
            futures.ThreadPoolExecutor(config.data.num_threads) as pool,
        ):

            def read(task):
                indices = range(task[1], task[2])
                return labelling.read_examples(source, indices, encoder.image_size, text_key, pool)

            # Batch k + 1 is read and decoded while the teacher embeds batch k.
            pending = reader.submit(read, tasks[0])
            for k, (s, _, hi) in enumerate(tasks):
                ids, images, texts = pending.result()
                if k + 1 < len(tasks):
                    pending = reader.submit(read, tasks[k + 1])
                emb = _embed(encoder, images, texts)
                if k == 0:
                    # A resumed run must continue the shards with the teacher that wrote them.
                    teacher_path = os.path.join(out_dir, store.EMBEDDINGS_DIR, TEACHER_FILE)
                    where = f"the shards in {os.path.dirname(teacher_path)}"
                    labelling.check_same_teacher(teacher_path, teacher, emb.shape[1], where)
                parts.append((ids, emb))
                bar.update(len(ids))
                if hi == min((s + 1) * size, n):  # the shard is complete: write it
                    write_embedding_shard(
                        paths[s],
                        np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1] for p in parts]),
                    )
                    parts = []
        bar.close()
    return store.EmbeddingShards(paths)


def write_embedding_shard(path: str, ids: np.ndarray, emb: np.ndarray) -> None:
    """embeddings/shard_*.npz: ids str [n], emb float32 [n, D] (atomically)."""
    label_store.save_npz(path, ids=ids, emb=emb)


# ----------------------------------------------------------------------------------------------
# Stage 2: k-means.


def block_seed(seed: int, first_iteration: int) -> int:
    """The `kmeans` seed of the block of iterations starting at `first_iteration`, in
    [0, 2^31) (faiss takes a C int)."""
    return int(np.random.SeedSequence([seed, first_iteration]).generate_state(1)[0] >> 1)


def _load_state(path: str, shape: tuple[int, int]) -> tuple[np.ndarray, int, list[float]]:
    with np.load(path) as z:
        centroids, iteration, objective = z["centroids"], int(z["iteration"]), z["objective"]
    if centroids.shape != shape:
        raise ValueError(
            f"{path} holds centroids of shape {centroids.shape}, but the run needs "
            f"[num_centers, embed_dim] = {list(shape)} (the teacher's embedding size or "
            "config.kmeans.num_centers changed): use a new config.out_dir"
        )
    return centroids, iteration, list(objective)


def save_kmeans_state(path: str, centroids: np.ndarray, iteration: int, objective) -> None:
    """kmeans_state.npz after `iteration` completed iterations (atomically)."""
    label_store.save_npz(
        path,
        centroids=centroids,
        iteration=np.int64(iteration),
        objective=np.asarray(objective, np.float64),
    )


def run_kmeans(
    config: ml_collections.ConfigDict, out_dir: str, emb: store.EmbeddingShards
) -> tuple[np.ndarray, list[float]]:
    """(centroids float32 [C, D] unit rows, mean-cosine objective per iteration), resumed
    from kmeans_state.npz; writes centroids.npy when all iterations are done."""
    cfg = config.kmeans
    shape = (int(cfg.num_centers), emb.shape[1])
    state_path = os.path.join(out_dir, store.KMEANS_STATE_FILE)
    final_path = os.path.join(out_dir, store.CENTROIDS_FILE)
    centroids, done, objective = None, 0, []
    if os.path.exists(state_path):
        centroids, done, objective = _load_state(state_path, shape)
    if os.path.exists(final_path):
        return _checked(np.load(final_path), shape, final_path), objective
    total = int(cfg.iterations)
    log.info("k-means: %d of %d iterations done (%s)", done, total, state_path)
    # The resident path (chunk_size None) needs all rows in memory anyway: read the shards once.
    x = emb if cfg.chunk_size else np.asarray(emb)
    bar = labelling.progress(total, done, "k-means", "it", config.verbose)
    while done < total:
        block = min(int(cfg.save_every), total - done)
        result = kmeans(
            x,
            shape[0],
            iterations=block,
            seed=block_seed(cfg.seed, done),
            init=cfg.init if centroids is None else centroids,
            init_sample_size=cfg.init_sample_size,
            chunk_size=cfg.chunk_size,
            candidates=cfg.candidates,
            refresh_every=cfg.refresh_every,
            backend=cfg.backend,
            return_info=True,
        )
        centroids = np.asarray(result.centers, np.float32)
        done += block
        objective += [float(v) for v in result.objective]
        save_kmeans_state(state_path, centroids, done, objective)
        bar.update(block)
        bar.set_postfix(objective=f"{objective[-1]:.5f}")
    bar.close()
    label_store.save_npy(final_path, centroids)
    return centroids, objective


def _checked(array: np.ndarray, shape: tuple[int, int], path: str) -> np.ndarray:
    if array.shape != shape:
        raise ValueError(
            f"{path} has shape {array.shape}, but the run needs [num_centers, embed_dim] = "
            f"{list(shape)} (the teacher's embedding size changed?): use a new config.out_dir"
        )
    return array


# ----------------------------------------------------------------------------------------------
# Stage 3: assignment, and the final files.


def assign(
    config: ml_collections.ConfigDict,
    out_dir: str,
    emb: store.EmbeddingShards,
    centroids: np.ndarray,
) -> None:
    """Writes the missing assign/shard_*.npz: each row's top-l centers and similarities."""
    paths = [store.shard_path(out_dir, store.ASSIGN_DIR, s) for s in range(len(emb.paths))]
    todo = [s for s in range(len(paths)) if not os.path.exists(paths[s])]
    log.info("assign: %d of %d shards on disk", len(paths) - len(todo), len(paths))
    if not todo:
        return
    # Sharded along C under the mesh from the start: no device ever holds all the centers.
    centers = jax.device_put(centroids, _data.row_sharding())
    done = len(emb) - sum(emb.sizes[s] for s in todo)
    bar = labelling.progress(len(emb), done, "assign", "img", config.verbose)
    for s in todo:
        labels, sims = assign_topk(
            emb.shard(s), centers, int(config.assign.top_l), chunk_size=config.assign.chunk_size
        )
        label_store.save_npz(paths[s], labels=labels.astype(np.int32), similarities=sims)
        bar.update(emb.sizes[s])
    bar.close()


def labels_written(out_dir: str) -> bool:
    """Whether every label file (label_store.LABEL_FILES) is on disk."""
    return all(os.path.exists(os.path.join(out_dir, name)) for name in label_store.LABEL_FILES)


def _label_shard(
    out_dir: str, emb: store.EmbeddingShards, s: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids str [n], labels int32 [n, l], similarities float32 [n, l]) of shard `s`."""
    with np.load(store.shard_path(out_dir, store.ASSIGN_DIR, s)) as z:
        labels, sims = z["labels"], z["similarities"]
    return emb.ids(s), labels, sims


def write_labels(out_dir: str, emb: store.EmbeddingShards, top_l: int) -> None:
    """The label files (label_store.LABEL_FILES), streamed shard by shard from the stage files.

    Row i is example i of the split: embedding shard s holds examples [s * shard_size, ...) in
    index order (`embed`), and assign shard s has the same rows.
    """
    width = max(label_store.npy_header(p, "ids")[1].itemsize // 4 for p in emb.paths)  # UCS-4
    chunks = (_label_shard(out_dir, emb, s) for s in range(len(emb.paths)))
    label_store.write_label_files(out_dir, len(emb), top_l, width, chunks)


def label_stats(out_dir: str, num_shards: int, num_centers: int) -> dict[str, Any]:
    """Top-1 cluster sizes [C] and histograms of the top-1 / top-l similarity (one pass)."""
    sizes = np.zeros(num_centers, np.int64)
    top1 = np.zeros(len(_SIM_BINS) - 1, np.int64)
    last = np.zeros_like(top1)
    top1_sum = 0.0
    for s in range(num_shards):
        with np.load(store.shard_path(out_dir, store.ASSIGN_DIR, s)) as z:
            labels, sims = z["labels"], z["similarities"]
        sizes += np.bincount(labels[:, 0], minlength=num_centers)
        top1 += np.histogram(sims[:, 0], _SIM_BINS)[0]
        last += np.histogram(sims[:, -1], _SIM_BINS)[0]
        top1_sum += float(np.sum(sims[:, 0], dtype=np.float64))
    return {
        "sizes": sizes,
        "top1_hist": top1,
        "last_hist": last,
        "mean_top1_similarity": top1_sum / int(sizes.sum()),
    }


def plot(path: str, stats: dict[str, Any], objective: list[float], top_l: int) -> None:
    """clusters.png: cluster sizes, top-1 / top-l similarity, k-means objective (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    ax_size, ax_sim, ax_obj = fig.subplots(1, 3)
    sizes = stats["sizes"]
    ax_size.hist(sizes, bins=min(100, max(10, int(sizes.max()) + 1)), log=True)
    ax_size.set_title(
        f"cluster sizes (top-1): {len(sizes)} centers, {int(np.sum(sizes == 0))} empty, "
        f"max {int(sizes.max())}",
        fontsize=9,
    )
    ax_size.set_xlabel("examples in the cluster")
    ax_size.set_ylabel("clusters")
    ax_sim.stairs(stats["top1_hist"], _SIM_BINS, label="top-1")
    ax_sim.stairs(stats["last_hist"], _SIM_BINS, label=f"top-{top_l}")
    seen = np.nonzero(stats["top1_hist"] + stats["last_hist"])[0]
    ax_sim.set_xlim(_SIM_BINS[seen[0]] - 0.02, _SIM_BINS[seen[-1] + 1] + 0.02)
    ax_sim.set_title("cosine similarity to the assigned centers", fontsize=9)
    ax_sim.set_xlabel("cosine similarity")
    ax_sim.set_ylabel("examples")
    ax_sim.legend()
    ax_obj.plot(np.arange(len(objective)), objective, marker=".")
    ax_obj.set_title("k-means objective (mean cosine to the center)", fontsize=9)
    ax_obj.set_xlabel("iteration")
    for ax in (ax_size, ax_sim, ax_obj):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with label_store.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
