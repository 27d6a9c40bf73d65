"""The stages of `python -m mlcd.annotate`: candidates -> entity texts -> scores -> labels.

Each stage reads the previous one's files and resumes from its own (layout: store.py):
  candidates  the entities named in each example's text (matcher.py), shard by shard.
  texts       the teacher's embedding of every entity that is a candidate anywhere, once.
  scores      cos(image, entity text) of every candidate, shard by shard (only the images
              that have candidates are embedded).
  labels      selection.py over all shards: the label files, entities.json, the plot, and
              annotations.json last (always redone in full: cheap next to the teacher).
A crash loses at most the shard in progress; a resumed run gives the same files as an
uninterrupted one (the teacher sees the same batches: they start at shard boundaries).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import ml_collections
import numpy as np

from mlcd import label_store, labelling
from mlcd.annotation import store
from mlcd.annotation.matcher import PhraseMatcher
from mlcd.encoder import Encoder
from mlcd.entities import EntityTable

log = logging.getLogger("mlcd.annotate")

_READ_CHUNK = 512  # records read at a time while matching (bounds memory at any shard size)


def num_shards(num_examples: int, shard_size: int) -> int:
    return max(math.ceil(num_examples / shard_size), 1)


def shard_range(s: int, shard_size: int, num_examples: int) -> tuple[int, int]:
    return s * shard_size, min((s + 1) * shard_size, num_examples)


# ----------------------------------------------------------------------------------------------
# Stage 1: candidates.


def check_source_table(out_dir: str, table: EntityTable, path: str) -> None:
    """Records the source table's digest on the first run; refuses a table edited since (the
    candidate shards on disk were matched against the old one)."""
    record = os.path.join(out_dir, store.SOURCE_TABLE_FILE)
    if not os.path.exists(record):
        info = {"path": os.path.abspath(path), "digest": table.digest(), "num_entities": len(table)}
        label_store.save_json(record, info)
        return
    with open(record) as f:
        before = json.load(f)
    if before["digest"] != table.digest():
        raise ValueError(
            f"config.entities.path: the entity table {path} changed since {out_dir} was "
            f"annotated with it (digest {before['digest'][:12]}... in {record}, now "
            f"{table.digest()[:12]}...): restore it, or use a new config.out_dir"
        )


def _csr(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lists) + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    flat = np.fromiter((v for x in lists for v in x), np.int32, count=int(offsets[-1]))
    return offsets, flat


def _truth(value: Any) -> list[int]:
    """The ground-truth entity ids of one example: unique, non-negative, in order."""
    return list(dict.fromkeys(int(v) for v in np.asarray(value).ravel() if v >= 0))


def write_candidates(path: str, ids: np.ndarray, found: list, truth: list | None) -> None:
    """candidates/shard_*.npz (atomically): see store.py."""
    offsets, entities = _csr(found)
    arrays = {"ids": ids, "offsets": offsets, "entities": entities}
    if truth is not None:
        arrays["truth_offsets"], arrays["truth"] = _csr(truth)
    label_store.save_npz(path, **arrays)


def match_candidates(
    config: ml_collections.ConfigDict, out_dir: str, source, matcher: PhraseMatcher
) -> list[str]:
    """Writes the missing candidates/shard_*.npz; returns every shard's path."""
    n, size = len(source), int(config.shard_size)
    paths = [store.shard_path(out_dir, store.CANDIDATES_DIR, s) for s in range(num_shards(n, size))]
    todo = [s for s in range(len(paths)) if not os.path.exists(paths[s])]
    log.info("candidates: %d of %d shards on disk", len(paths) - len(todo), len(paths))
    text_key, truth_key = config.data.text_key, config.data.ground_truth
    done = n - sum(hi - lo for lo, hi in (shard_range(s, size, n) for s in todo))
    bar = labelling.progress(n, done, "candidates", "text", config.verbose)
    for s in todo:
        lo, hi = shard_range(s, size, n)
        ids, found, truth = [], [], []
        for start in range(lo, hi, _READ_CHUNK):
            records = source.__getitems__(list(range(start, min(start + _READ_CHUNK, hi))))
            for record in records:
                ids.append(labelling.to_str(record["id"]))
                found.append(matcher.entities(labelling.to_str(record[text_key])))
                if truth_key:
                    truth.append(_truth(record[truth_key]))
            bar.update(len(records))
        write_candidates(paths[s], np.array(ids, str), found, truth if truth_key else None)
    bar.close()
    return paths


def read_candidates(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------
# Stages 2 and 3: the teacher.


class Teacher:
    """The teacher encoder, loaded on first use (a resumed run whose scores are all on disk
    never loads it), with the check that it is the one that wrote the files on disk."""

    def __init__(self, out_dir: str, load: Callable[[], tuple[Encoder, dict[str, Any]]]):
        self._out_dir, self._load = out_dir, load
        self._encoder: Encoder | None = None
        self._spec: dict[str, Any] = {}

    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder, self._spec = self._load()
        return self._encoder

    def check(self, dim: int) -> None:
        path = os.path.join(self._out_dir, store.TEACHER_FILE)
        what = f"the text embeddings and scores in {self._out_dir}"
        labelling.check_same_teacher(path, self._spec, dim, what)


def candidate_entities(paths: Sequence[str]) -> np.ndarray:
    """int32 [E]: every source id that is a candidate of some example, ascending."""
    union = np.zeros(0, np.int32)
    for path in paths:
        with np.load(path) as z:
            union = np.union1d(union, z["entities"]).astype(np.int32)
    return union


def embed_entity_texts(
    config: ml_collections.ConfigDict,
    out_dir: str,
    table: EntityTable,
    paths: Sequence[str],
    teacher: Teacher,
) -> tuple[np.ndarray, np.ndarray]:
    """(entities int32 [E], emb float32 [E, D]): text_embeddings.npz, computed if missing."""
    path = os.path.join(out_dir, store.TEXT_EMBEDDINGS_FILE)
    if os.path.exists(path):
        with np.load(path) as z:
            return z["entities"], z["emb"]
    entities = candidate_entities(paths)
    with_description = config.filter.text == "name_description"
    texts = [table.text(e, with_description) for e in entities.tolist()]
    encoder, batch = teacher.encoder(), int(config.filter.batch_size)
    bar = labelling.progress(len(texts), 0, "entity texts", "text", config.verbose)
    parts = []
    for start in range(0, max(len(texts), 1), batch):
        chunk = texts[start : start + batch]
        parts.append(encoder.embed_texts(chunk)["embedding"].astype(np.float32))
        bar.update(len(chunk))
    bar.close()
    emb = np.concatenate(parts)
    teacher.check(emb.shape[1])
    label_store.save_npz(path, entities=entities, emb=emb)
    return entities, emb


def write_scores(path: str, scores: np.ndarray) -> None:
    """scores/shard_*.npz (atomically): see store.py."""
    label_store.save_npz(path, scores=np.asarray(scores, np.float32))


def score_candidates(
    config: ml_collections.ConfigDict,
    out_dir: str,
    source,
    paths: Sequence[str],
    text_emb: tuple[np.ndarray, np.ndarray],
    teacher: Teacher,
) -> None:
    """Writes the missing scores/shard_*.npz: cos(image, entity text) of every candidate."""
    out = [store.shard_path(out_dir, store.SCORES_DIR, s) for s in range(len(paths))]
    todo = [s for s in range(len(paths)) if not os.path.exists(out[s])]
    log.info("scores: %d of %d shards on disk", len(paths) - len(todo), len(paths))
    if not todo:
        return
    size, n = int(config.shard_size), len(source)
    text_ids, text_vecs = text_emb
    counts = []  # examples with candidates, per shard
    for path in paths:
        with np.load(path) as z:
            counts.append(int(np.count_nonzero(np.diff(z["offsets"]))))
    bar = labelling.progress(
        sum(counts), sum(counts) - sum(counts[s] for s in todo), "teacher", "img", config.verbose
    )
    batch, checked = int(config.filter.batch_size), False
    with (
        futures.ThreadPoolExecutor(1) as reader,
        futures.ThreadPoolExecutor(config.data.num_threads) as pool,
    ):
        for s in todo:
            cand = read_candidates(paths[s])
            lo, _ = shard_range(s, size, n)
            per_example = np.diff(cand["offsets"])
            rows = np.nonzero(per_example)[0]  # the examples of the shard that need the teacher
            encoder = teacher.encoder() if len(rows) else None
            image_emb = np.zeros((len(per_example), text_vecs.shape[1]), np.float32)
            tasks = [rows[k : k + batch] for k in range(0, len(rows), batch)]

            def read(indices, encoder=encoder):
                return labelling.read_examples(source, indices, encoder.image_size, None, pool)

            # Batch k + 1 is read and decoded while the teacher embeds batch k.
            pending = reader.submit(read, (lo + tasks[0]).tolist()) if tasks else None
            for k, task in enumerate(tasks):
                ids, images, _ = pending.result()
                if k + 1 < len(tasks):
                    pending = reader.submit(read, (lo + tasks[k + 1]).tolist())
                if ids.tolist() != cand["ids"][task].tolist():
                    raise ValueError(
                        f"{paths[s]}: its ids do not match examples {lo + task[0]}... of the "
                        "split (did the dataset change since the candidates were found?): use "
                        "a new config.out_dir"
                    )
                emb = encoder.embed_images(images, keys=("embedding",))["embedding"]
                if not checked:  # a resumed run must score with the teacher of the texts
                    teacher.check(emb.shape[1])
                    checked = True
                image_emb[task] = emb
                bar.update(len(task))
            example = np.repeat(np.arange(len(per_example)), per_example)
            text_rows = np.searchsorted(text_ids, cand["entities"])
            scores = np.einsum("md,md->m", image_emb[example], text_vecs[text_rows])
            write_scores(out[s], scores)
    bar.close()
