"""The last stage of `python -m mlcd.annotate`: label files, entity table, quality, plot.

Quality (when config.data.ground_truth names a feature holding each example's true entity ids,
as synthetic_scenes' 'entity_ids'): micro-averaged over the split, with P the (example,
entity) pairs of the labels and T the true pairs, precision = |P & T| / |P| and recall =
|P & T| / |T|. It is computed for the run's own selection, for the same selection without the
teacher ("no filter": every candidate, in mention order), and for each of
config.report.thresholds, each a full selection (filter, top-k, rare entities) of its own.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mlcd import label_store
from mlcd.annotation import selection, store
from mlcd.entities import EntityTable

_SCORE_BINS = np.linspace(-1.0, 1.0, 201)


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def quality(labels: selection.Labels) -> dict[str, Any]:
    """Precision, recall and coverage of one selection against the ground truth (one pass)."""
    hits = predicted = true = with_labels = examples = 0
    for shard, rows, _ in labels.rows():
        pred = selection.label_pairs(rows, labels.source_ids)
        truth = selection.truth_pairs(shard)
        hits += len(np.intersect1d(pred, truth, assume_unique=True))
        predicted, true = predicted + len(pred), true + len(truth)
        with_labels += int(np.count_nonzero((rows >= 0).any(axis=1)))
        examples += len(rows)
    precision, recall = _ratio(hits, predicted), _ratio(hits, true)
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "threshold": labels.rule.threshold,
        "filtered": labels.rule.use_scores,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "images_with_entities": _ratio(with_labels, examples),
        "labels_per_image": _ratio(predicted, examples),
        "num_entities": len(labels),
    }


def write(
    out_dir: str, labels: selection.Labels, table: EntityTable, num_examples: int, id_width: int
) -> dict[str, Any]:
    """Writes the label files (num_examples rows; id_width: the longest example id) and
    entities.json (the vocabulary of `labels`, renumbered, from the source `table`); returns
    the statistics of the labels (counts, histograms, the digest of entities.json) for
    annotations.json and the plot."""
    rule = labels.rule
    stats: dict[str, Any] = {
        "labels_per_image": np.zeros(rule.max_labels + 1, np.int64),
        "score_hist": np.zeros(len(_SCORE_BINS) - 1, np.int64),
        "score_hist_correct": None,
        "candidates": 0,
        "examples_with_candidates": 0,
        "num_examples": 0,
    }

    def chunks():
        for shard, rows, sims in labels.rows():
            stats["num_examples"] += len(rows)
            stats["labels_per_image"] += np.bincount(
                (rows >= 0).sum(axis=1), minlength=rule.max_labels + 1
            )
            stats["candidates"] += len(shard.entities)
            stats["examples_with_candidates"] += int(np.count_nonzero(np.diff(shard.offsets)))
            if shard.scores is not None:
                stats["score_hist"] += np.histogram(shard.scores, _SCORE_BINS)[0]
                if shard.truth is not None:
                    correct = selection.candidate_correct(shard)
                    hist = np.histogram(shard.scores[correct], _SCORE_BINS)[0]
                    if stats["score_hist_correct"] is None:
                        stats["score_hist_correct"] = np.zeros_like(hist)
                    stats["score_hist_correct"] += hist
            yield shard.ids, rows, sims

    label_store.write_label_files(out_dir, num_examples, rule.max_labels, id_width, chunks())
    out_table = table.subset(labels.source_ids.tolist())
    out_table.save(os.path.join(out_dir, store.ENTITIES_FILE))
    stats["entities_digest"] = out_table.digest()
    return stats


def plot(
    path: str, stats: dict[str, Any], counts: np.ndarray, threshold: float | None, title: str
) -> None:
    """annotations.png: labels per image, images per entity, candidate scores (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    ax_per, ax_freq, ax_score = fig.subplots(1, 3)
    per_image = stats["labels_per_image"]
    n = max(int(per_image.sum()), 1)
    ax_per.bar(np.arange(len(per_image)), per_image)
    ax_per.set_title(
        f"labels per image: {1 - per_image[0] / n:.1%} of {n} images have >= 1 entity",
        fontsize=9,
    )
    ax_per.set_xlabel("entities per image")
    ax_per.set_ylabel("images")
    ranked = np.sort(counts)[::-1]
    if len(ranked):
        ax_freq.plot(np.arange(1, len(ranked) + 1), ranked, marker=".")
        ax_freq.set_yscale("log")
    ax_freq.set_title(f"entity frequency: {len(ranked)} entities", fontsize=9)
    ax_freq.set_xlabel("entity rank")
    ax_freq.set_ylabel("images labelled with it")
    if stats["score_hist"].any():
        correct = stats["score_hist_correct"]
        if correct is not None:
            ax_score.stairs(correct, _SCORE_BINS, label="true entity of the image")
            ax_score.stairs(stats["score_hist"] - correct, _SCORE_BINS, label="not in the image")
        else:
            ax_score.stairs(stats["score_hist"], _SCORE_BINS, label="candidates")
        seen = np.nonzero(stats["score_hist"])[0]
        ax_score.set_xlim(_SCORE_BINS[seen[0]] - 0.02, _SCORE_BINS[seen[-1] + 1] + 0.02)
        if threshold is not None:
            ax_score.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold}")
        ax_score.legend(fontsize=8)
        ax_score.set_title("teacher cosine of the candidates", fontsize=9)
    else:
        ax_score.set_title("no teacher scores (filter disabled)", fontsize=9)
    ax_score.set_xlabel("cos(image, entity text)")
    for ax in (ax_per, ax_freq, ax_score):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with label_store.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
