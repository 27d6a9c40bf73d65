"""From scored candidates to labels: the teacher filter, top-k, rare entities, the label rows.

For each example, with its candidates c (entities named in its text, in order of first
mention) and their teacher scores cos(image, text(c)):

1. filter: keep c when score >= threshold (threshold None: keep all), best score first (ties:
   the earlier mention first); without the teacher (filter disabled) the mention order stays;
2. per image: keep the first k = min(top_k, max_labels) (top_k None: max_labels);
3. rare entities: an entity kept for fewer than min_images_per_entity examples after 1-2 is
   dropped from the vocabulary and from every example (its slot is not refilled, so each
   entity of the vocabulary labels exactly the examples it was counted in, and at least
   min_images_per_entity of them); min_images_per_entity = 0 keeps the whole source table;
4. the vocabulary (the entities left, in source-id order) is renumbered 0..C-1; each row of
   the label files holds the example's entities in these ids, -1 padded to max_labels, with
   their scores (NaN where there is none: padding, or the filter disabled).

Everything is vectorised per shard (no Python loop per example) and streams shard by shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from mlcd.entities import EntityTable


@dataclasses.dataclass(frozen=True)
class Rule:
    """How candidates become labels (module docstring). use_scores: order and filter by the
    teacher's scores; threshold: None keeps every candidate (with use_scores: ranked)."""

    use_scores: bool
    threshold: float | None
    per_image: int
    min_images: int
    max_labels: int


@dataclasses.dataclass
class Shard:
    """One shard's candidates (store.py's arrays) and scores (None without the teacher)."""

    ids: np.ndarray
    offsets: np.ndarray
    entities: np.ndarray
    scores: np.ndarray | None
    truth_offsets: np.ndarray | None = None
    truth: np.ndarray | None = None

    @property
    def example(self) -> np.ndarray:
        """int64 [m]: the example (row of the shard) of each candidate."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))


def select(shard: Shard, rule: Rule) -> tuple[np.ndarray, int]:
    """(indices into the shard's candidates kept by steps 1-2, grouped by example in order,
    each example's best first; how many examples had more than k candidates passing step 1)."""
    example = shard.example
    if rule.use_scores:
        order = np.lexsort((-shard.scores, example))  # stable: ties keep the mention order
        if rule.threshold is not None:
            order = order[shard.scores[order] >= rule.threshold]
    else:
        order = np.arange(len(example))
    rank = _rank(example[order])
    return order[rank < rule.per_image], int(np.count_nonzero(rank == rule.per_image))


def _rank(grouped: np.ndarray) -> np.ndarray:
    """The position of each element within its run of equal values (`grouped` is sorted)."""
    return np.arange(len(grouped)) - np.searchsorted(grouped, grouped, side="left")


class Labels:
    """The labels of all shards under one rule: the vocabulary (counted over every shard at
    construction) and the label rows, shard by shard (`rows`). shards: () -> a fresh pass over
    the shards (`shard_reader`)."""

    def __init__(self, shards: Callable[[], Iterator[Shard]], table: EntityTable, rule: Rule):
        self.shards, self._table, self.rule = shards, table, rule
        counts = np.zeros(len(table), np.int64)
        self.truncated = 0
        for shard in shards():
            kept, truncated = select(shard, rule)
            counts += np.bincount(table.rows(shard.entities[kept]), minlength=len(table))
            self.truncated += truncated
        keep = counts >= rule.min_images if rule.min_images > 0 else np.ones(len(table), bool)
        self.kept_rows = np.nonzero(keep)[0]  # table rows of the vocabulary, new id = position
        self.counts = counts[self.kept_rows]  # examples labelled with each entity of it
        self.new_id = np.full(len(table), -1, np.int32)
        self.new_id[self.kept_rows] = np.arange(len(self.kept_rows), dtype=np.int32)
        self.source_ids = table.ids[self.kept_rows]  # new id -> id in the source table

    def __len__(self) -> int:
        return len(self.kept_rows)

    def rows(self) -> Iterator[tuple[Shard, np.ndarray, np.ndarray]]:
        """(shard, labels int32 [n, max_labels], similarities float32 [n, max_labels]) per
        shard, in order."""
        width = self.rule.max_labels
        for shard in self.shards():
            kept, _ = select(shard, self.rule)
            new = self.new_id[self._table.rows(shard.entities[kept])]
            kept, new = kept[new >= 0], new[new >= 0]
            example = shard.example[kept]
            position = _rank(example)
            n = len(shard.offsets) - 1
            labels = np.full((n, width), -1, np.int32)
            labels[example, position] = new
            sims = np.full((n, width), np.nan, np.float32)
            if shard.scores is not None:
                sims[example, position] = shard.scores[kept]
            yield shard, labels, sims


def pairs(example: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int64 codes of (example, entity id) pairs, for set operations over a shard."""
    return example.astype(np.int64) << 32 | ids.astype(np.int64)


def label_pairs(labels: np.ndarray, source_ids: np.ndarray) -> np.ndarray:
    """pairs() of the labels of a shard, in SOURCE ids (source_ids: new id -> source id)."""
    example, slot = np.nonzero(labels >= 0)
    return pairs(example, source_ids[labels[example, slot]])


def truth_pairs(shard: Shard) -> np.ndarray:
    example = np.repeat(np.arange(len(shard.truth_offsets) - 1), np.diff(shard.truth_offsets))
    return pairs(example, shard.truth)


def candidate_correct(shard: Shard) -> np.ndarray:
    """bool [m]: whether each candidate is one of its example's ground-truth entities."""
    return np.isin(pairs(shard.example, shard.entities), truth_pairs(shard))


def shard_reader(candidate_paths: Sequence[str], score_paths: Sequence[str] | None):
    """() -> Iterator[Shard] over the files of the candidates (and scores) stages."""

    def read() -> Iterator[Shard]:
        for s, path in enumerate(candidate_paths):
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            scores = None
            if score_paths is not None:
                with np.load(score_paths[s]) as z:
                    scores = z["scores"]
            yield Shard(
                ids=arrays["ids"],
                offsets=arrays["offsets"],
                entities=arrays["entities"],
                scores=scores,
                truth_offsets=arrays.get("truth_offsets"),
                truth=arrays.get("truth"),
            )

    return read
