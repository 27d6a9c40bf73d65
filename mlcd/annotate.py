"""Entity annotation for MOFI (the I2E step).

    python -m mlcd.annotate --config configs/annotate.py:PRESET [--config.key=value ...]

Finds the names and aliases of an entity table (mlcd/entities.py) in the text feature
config.data.text_key of every example of config.data.split (normalised text, whole words,
leftmost-longest: mlcd/annotation/matcher.py), scores each candidate with a CLIP teacher
(cos(image, entity text); the text is the name, or "name: description") and keeps those at or
above config.filter.threshold, best first, at most config.filter.top_k per image; entities
labelling fewer than config.labels.min_images_per_entity examples are dropped and the rest
renumbered 0..C-1 (mlcd/annotation/selection.py). Writes to config.out_dir (formats:
mlcd/annotation/store.py):

    labels.npy        int32 [N, l] entity ids (best first, -1 padded), row i = example i of the
                      split; with similarities.npy float32 [N, l] (the teacher's cosine; NaN
                      where none), ids.npy str [N] and id_hashes.npy uint64 [N] (checked by the
                      trainer's label join): the label store of mlcd/label_store.py
    entities.json     the entity table of the labels, each entry with its "source_id"
    annotations.png   entities per image, entity frequency, candidate scores
    annotations.json  written last, {"complete": true, "num_entities", "entities_digest", ...}

Re-running the same command resumes after a crash from the last complete shard of candidates
or teacher scores, and gives the same files as an uninterrupted run. A different config on
resume is refused, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from mlcd import cli, label_store, labelling
from mlcd.annotation import outputs, pipeline, selection, store
from mlcd.annotation.matcher import PhraseMatcher
from mlcd.entities import EntityTable, load_table

log = logging.getLogger("mlcd.annotate")

ENTITY_TEXTS = ("name", "name_description")
# Keys that change neither the outputs nor their meaning: they may differ on resume.
RUNTIME_KEYS = ("out_dir", "verbose", "data.num_threads")


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the config key of the first invalid value (no file is read)."""
    if config.filter.enabled:
        labelling.teacher_source(config)
    positive = {
        "shard_size": config.shard_size,
        "filter.batch_size": config.filter.batch_size,
        "labels.max_labels": config.labels.max_labels,
        "data.num_threads": config.data.num_threads,
    }
    if config.filter.top_k is not None:
        positive["filter.top_k"] = config.filter.top_k
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be a positive integer")
    minimum = config.labels.min_images_per_entity
    if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 0:
        raise ValueError(f"config.labels.min_images_per_entity={minimum!r} must be an integer >= 0")
    if config.filter.text not in ENTITY_TEXTS:
        raise ValueError(f"config.filter.text={config.filter.text!r}: one of {ENTITY_TEXTS}")
    for key, value in (
        ("filter.threshold", config.filter.threshold),
        *((f"report.thresholds[{k}]", t) for k, t in enumerate(config.report.thresholds)),
    ):
        if not isinstance(value, int | float) or isinstance(value, bool) or not -1 <= value <= 1:
            raise ValueError(f"config.{key}={value!r} must be a cosine in [-1, 1]")
    if config.report.thresholds and not config.data.ground_truth:
        raise ValueError("config.report.thresholds needs config.data.ground_truth (a feature)")


def rule(config: ml_collections.ConfigDict, threshold: float | None = None) -> selection.Rule:
    """The selection of config (at `threshold` instead of config.filter.threshold if given;
    use_scores False for the unfiltered one: `threshold` None and no filter)."""
    top_k = config.filter.top_k
    per_image = min(top_k, config.labels.max_labels) if top_k else config.labels.max_labels
    filtered = bool(config.filter.enabled)
    return selection.Rule(
        use_scores=filtered,
        threshold=float(config.filter.threshold if threshold is None else threshold),
        per_image=int(per_image),
        min_images=int(config.labels.min_images_per_entity),
        max_labels=int(config.labels.max_labels),
    )


def open_table(config: ml_collections.ConfigDict, builder) -> tuple[EntityTable, str]:
    """(the source entity table, its path): config.entities.path, or the dataset's own."""
    path = config.entities.path
    if not path:
        path = os.path.join(os.fspath(builder.data_dir), store.ENTITIES_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"config.entities.path is unset and dataset {builder.name!r} has no "
                f"{store.ENTITIES_FILE} beside its data ({path}): set config.entities.path"
            )
    try:
        return load_table(path), path
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"config.entities.path: {e}") from None


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) every stage; returns the contents of annotations.json."""
    check_config(config)
    if jax.process_count() > 1:
        # Every stage writes its files from one process; the teacher uses all local devices.
        raise ValueError("python -m mlcd.annotate runs in a single process (one host)")
    filtered = bool(config.filter.enabled)
    if filtered:
        labelling.check_teacher_files(config, text_tower="config.filter embeds entity texts")
    needed = {"id": "data.name", config.data.text_key: "data.text_key"}
    if filtered:
        needed["image"] = "data.name"
    if config.data.ground_truth:
        needed[config.data.ground_truth] = "data.ground_truth"
    builder, source = labelling.open_split(config.data, needed)
    table, table_path = open_table(config, builder)
    out_dir = os.path.abspath(config.out_dir)
    labelling.prepare_out_dir(
        out_dir,
        config,
        config_file=store.CONFIG_FILE,
        runtime_keys=RUNTIME_KEYS,
        subdirs=(store.CANDIDATES_DIR, store.SCORES_DIR),
        what="entity annotations",
    )
    meta_path = os.path.join(out_dir, store.META_FILE)
    if os.path.exists(meta_path):
        log.info("%s is complete; nothing to do", out_dir)
        return store.load_annotations(out_dir).meta
    pipeline.check_source_table(out_dir, table, table_path)

    matcher = PhraseMatcher.from_table(table, aliases=config.entities.aliases)
    log.info("matcher: %d phrases of %d entities (%s)", len(matcher), len(table), table_path)
    candidate_paths = pipeline.match_candidates(config, out_dir, source, matcher)
    score_paths, teacher_spec = None, None
    if filtered:
        teacher = pipeline.Teacher(
            out_dir, lambda: labelling.load_teacher(config, config.filter.batch_size)
        )
        text_emb = pipeline.embed_entity_texts(config, out_dir, table, candidate_paths, teacher)
        pipeline.score_candidates(config, out_dir, source, candidate_paths, text_emb, teacher)
        score_paths = [
            store.shard_path(out_dir, store.SCORES_DIR, s) for s in range(len(candidate_paths))
        ]
        teacher_spec = _read_json(os.path.join(out_dir, store.TEACHER_FILE))

    shards = selection.shard_reader(candidate_paths, score_paths)
    labels = selection.Labels(shards, table, rule(config))
    width = max(label_store.npy_header(p, "ids")[1].itemsize // 4 for p in candidate_paths)
    stats = outputs.write(out_dir, labels, table, len(source), width)
    meta = {
        "num_entities": len(labels),
        "max_labels": int(config.labels.max_labels),
        "num_examples": len(source),
        "dataset": config.data.name,
        "dataset_full_name": builder.info.full_name,
        "split": config.data.split,
        "text_key": config.data.text_key,
        "entities_digest": stats["entities_digest"],
        "source_entities": os.path.abspath(table_path),
        "source_entities_digest": table.digest(),
        "source_num_entities": len(table),
        "aliases": bool(config.entities.aliases),
        "filter": {
            "enabled": filtered,
            "threshold": float(config.filter.threshold) if filtered else None,
            "top_k": config.filter.top_k,
            "text": config.filter.text,
        },
        "teacher": teacher_spec,
        "min_images_per_entity": int(config.labels.min_images_per_entity),
        "counts": {
            "candidates": stats["candidates"],
            "examples_with_candidates": stats["examples_with_candidates"],
            "labels": int(labels.counts.sum()),
            "examples_with_labels": int(stats["num_examples"] - stats["labels_per_image"][0]),
            "examples_over_top_k": labels.truncated,
            "labels_per_image": stats["labels_per_image"].tolist(),
            "images_per_entity_min": int(labels.counts.min()) if len(labels) else 0,
            "images_per_entity_max": int(labels.counts.max()) if len(labels) else 0,
        },
        "quality": _quality(config, shards, table, labels),
        "complete": True,
    }
    if not len(labels):
        log.warning("no entity is left: every candidate was filtered out (config.filter.*)")
    title = f"{config.data.name} {config.data.split}: {os.path.basename(table_path)}"
    outputs.plot(
        os.path.join(out_dir, store.PLOT_FILE),
        stats,
        labels.counts,
        meta["filter"]["threshold"],
        title,
    )
    label_store.save_json(meta_path, meta)  # last: it marks the directory complete
    return meta


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _quality(config, shards, table: EntityTable, labels: selection.Labels) -> dict | None:
    """Precision / recall rows (mlcd/annotation/outputs.py) when data.ground_truth is set."""
    if not config.data.ground_truth:
        return None
    unfiltered = dataclasses.replace(rule(config), use_scores=False)
    rows = {"no filter": outputs.quality(selection.Labels(shards, table, unfiltered))}
    if config.filter.enabled:
        for t in config.report.thresholds:
            rows[f"threshold {t}"] = outputs.quality(
                selection.Labels(shards, table, rule(config, t))
            )
    rows["this run"] = outputs.quality(labels)
    return {"ground_truth": config.data.ground_truth, "rows": rows}


def format_report(meta: dict[str, Any], out_dir: str) -> str:
    """The summary printed at the end: counts, and the quality table when there is one."""
    counts = meta["counts"]
    n = max(meta["num_examples"], 1)
    rows = [
        ("examples", meta["num_examples"]),
        ("source entities", meta["source_num_entities"]),
        ("entities kept (C)", meta["num_entities"]),
        ("candidates", counts["candidates"]),
        ("examples with candidates", f"{counts['examples_with_candidates'] / n:.1%}"),
        ("labels", counts["labels"]),
        ("examples with labels", f"{counts['examples_with_labels'] / n:.1%}"),
        ("filter threshold", meta["filter"]["threshold"]),
    ]
    lines = ["", f"{'entity annotation':<32} {'value':>10}", f"{'-' * 32} {'-' * 10}"]
    lines += [f"{k:<32} {v!s:>10}" for k, v in rows]
    quality = meta.get("quality")
    if quality:
        lines += [
            "",
            f"quality against {quality['ground_truth']!r} (micro-averaged over the split):",
            f"{'selection':<20} {'precision':>9} {'recall':>7} {'F1':>6} {'imgs w/ ent':>11} "
            f"{'labels/img':>10} {'entities':>8}",
        ]
        for name, q in quality["rows"].items():
            cells = [q["precision"], q["recall"], q["f1"], q["images_with_entities"]]
            text = [f"{v:.3f}" if v is not None else "-" for v in cells]
            lines.append(
                f"{name:<20} {text[0]:>9} {text[1]:>7} {text[2]:>6} {text[3]:>11} "
                f"{q['labels_per_image']:>10.3f} {q['num_entities']:>8}"
            )
    files = (*label_store.LABEL_FILES, store.ENTITIES_FILE, store.PLOT_FILE, store.META_FILE)
    lines += ["", f"outputs:  {out_dir}", "  " + "    ".join(files)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cli.setup_logging(log.name)
    return cli.config_tool_main("python -m mlcd.annotate", __doc__, run, format_report, argv)


if __name__ == "__main__":
    cli.start_process()
    sys.exit(main())
