"""What the labelling tools (python -m mlcd.cluster, python -m mlcd.annotate) share.

Both label every example of a dataset split with a teacher model and write a label store
(mlcd/label_store.py) into config.out_dir, resumably. This module holds their common parts:

- the teacher: config.teacher.export (an export directory) or config.teacher.workdir (a
  training run, at checkpoint config.teacher.step, default the latest), exactly one; cheap
  checks before anything is written, loading, and the check that a resumed run continues with
  the teacher that wrote the files on disk;
- the output directory: created with the run's config, and refused when a resumed run's config
  differs (naming the first differing key) or when it holds something else;
- the split: a random-access source with undecoded images, its features checked by config key;
- reading batches of examples (images decoded on a thread pool) and progress bars.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from configs import common as config_lib
from input_pipeline import datasets, preprocess
from mlcd import label_store, runs
from mlcd.encoder import Encoder

# ----------------------------------------------------------------------------------------------
# The teacher.


def teacher_source(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """('export' | 'workdir', path) of config.teacher; an empty string counts as unset."""
    given = [(k, config.teacher[k]) for k in ("export", "workdir") if config.teacher[k]]
    if len(given) != 1:
        raise ValueError(
            "config.teacher: set exactly one of teacher.export (an export directory) and "
            f"teacher.workdir (a training run); got {dict(given) or 'neither'} "
            "(unset one with --config.teacher.workdir= )"
        )
    if given[0][0] == "export" and config.teacher.step is not None:
        raise ValueError("config.teacher.step applies to teacher.workdir only, not to an export")
    return given[0]


def check_teacher_files(
    config: ml_collections.ConfigDict, *, text_tower: str | None = None
) -> None:
    """FileNotFoundError / ValueError naming config.teacher.* unless the teacher looks complete
    (cheap: reads export.json or the run's config.json; the parameters load later).

    text_tower: when set, the teacher must also have a text tower; the string says what needs
    it (e.g. "config.filter embeds entity texts"), for the message.
    """
    kind, path = teacher_source(config)
    try:
        if kind == "export":
            meta = runs.read_export_meta(path)
            has_text = bool(meta["model"].get("text")) and bool(meta.get("tokenizer"))
        else:
            has_text = bool(runs.load_run_config(path).model.get("text"))
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"config.teacher.{kind}={path}: {e}") from e
    if text_tower and not has_text:
        raise ValueError(
            f"config.teacher.{kind}={path} has no text tower (an image-only model), but "
            f"{text_tower}: use a two-tower (CLIP-style) teacher"
        )


def load_teacher(
    config: ml_collections.ConfigDict, batch_size: int, *, text_tower: bool = False
) -> tuple[Encoder, dict[str, Any]]:
    """(encoder, {'kind', 'path' (absolute), 'step'}) of config.teacher; errors name the key.
    text_tower: check that the encoder can embed texts (raises if the teacher has no text
    tower)."""
    kind, path = teacher_source(config)
    try:
        encoder, spec = runs.load_model(
            **{"checkpoint" if kind == "export" else "workdir": path},
            step=config.teacher.step,
            batch_size=batch_size,
        )
        if text_tower:
            encoder.embed_texts(["a"])  # raises if the teacher has no text tower
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"config.teacher.{kind}={path}: {e}") from e
    return encoder, {"kind": kind, "path": os.path.abspath(path), "step": int(spec["step"])}


def check_same_teacher(path: str, teacher: dict[str, Any], dim: int, what: str) -> None:
    """Records the teacher (load_teacher's dict) and its embedding size in the JSON `path` the
    first time; afterwards raises unless it is the same (a resumed run must not mix teachers).
    what: the files that teacher wrote, for the message (e.g. "the shards in DIR")."""
    if not os.path.exists(path):
        label_store.save_json(path, {**teacher, "embed_dim": dim})
        return
    with open(path) as f:
        before = json.load(f)
    if before["embed_dim"] != dim:
        raise ValueError(
            f"teacher {teacher['path']} gives {dim}-dim embeddings, but {what} hold "
            f"{before['embed_dim']}-dim ones ({path}): a different teacher cannot continue "
            "them; use a new config.out_dir"
        )
    if before["step"] != teacher["step"]:
        fix = (
            f"set config.teacher.step={before['step']} to continue them"
            if teacher["kind"] == "workdir"
            else "use a new config.out_dir"
        )
        raise ValueError(
            f"config.teacher.{teacher['kind']}: {teacher['path']} is now at step "
            f"{teacher['step']}, but {what} were embedded at step {before['step']} ({path}): "
            f"{fix}"
        )


# ----------------------------------------------------------------------------------------------
# The output directory and the split.


def prepare_out_dir(
    out_dir: str,
    config: ml_collections.ConfigDict,
    *,
    config_file: str,
    runtime_keys: Sequence[str],
    subdirs: Sequence[str],
    what: str,
) -> None:
    """Creates out_dir with `config_file` (the run's config as JSON), or checks that a resumed
    run has the same config, up to `runtime_keys` (keys that change neither the outputs nor
    their meaning); removes temporary files of a crashed run. A non-empty directory without
    `config_file` is refused: it holds something else (`what`: the kind of output, for the
    message, e.g. "clustering outputs")."""
    path = os.path.join(out_dir, config_file)
    if os.path.exists(path):
        with open(path) as f:
            changed = config_lib.changed_keys(json.load(f), config, runtime_keys)
        if changed:
            key, before, now = changed[0]
            raise ValueError(
                f"config.{key}={now!r} differs from {before!r} in {path}: resume with the "
                "same config, or use a new config.out_dir"
            )
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(
            f"config.out_dir={out_dir} is not empty and has no {config_file}: "
            f"refusing to write {what} into it"
        )
    else:
        os.makedirs(out_dir, exist_ok=True)
        label_store.save_json(path, json.loads(config.to_json()))
    for sub in subdirs:
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    label_store.remove_stale_temporaries(out_dir, subdirs)


def open_split(data: ml_collections.ConfigDict, needed: Mapping[str, str]):
    """(builder, random-access source of data.split with undecoded images) of config.data.

    needed: {feature: the config key that asks for it}; a missing feature is a ValueError
    naming that key and the dataset's features."""
    builder = datasets.get_builder(data.name, data.data_dir, **data.build.to_dict())
    features = builder.info.features
    for feature, key in needed.items():
        if feature not in features:
            raise ValueError(
                f"config.{key}: dataset {builder.name!r} has no feature {feature!r} "
                f"(features: {sorted(features)})"
            )
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in features else None
    try:
        source = builder.as_data_source(split=data.split, decoders=decoders)
    except ValueError as e:
        raise ValueError(f"config.data.split={data.split!r}: {e}") from e
    return builder, source


# ----------------------------------------------------------------------------------------------
# Reading examples, progress.


def progress(total: int, initial: int, desc: str, unit: str, verbose: bool) -> tqdm:
    """A progress bar (rate and ETA) on stderr; disabled when not verbose."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, disable=not verbose, dynamic_ncols=True
    )


def to_str(value: bytes | str | np.ndarray) -> str:
    """A text feature as a Python str (tfds gives bytes, or a 0-d array of them)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_image(record: dict[str, Any], size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the record's image decoded, resized and centre-cropped (a large
    JPEG decoded at a reduced DCT scale that keeps it >= size: preprocess.resize_center_crop)."""
    try:
        return preprocess.resize_center_crop(record["image"], size)
    except preprocess.UndecodableImageError as e:
        raise ValueError(f"example {to_str(record['id'])!r}: cannot decode its image: {e}") from e


def read_examples(
    source,
    indices: Sequence[int],
    size: int,
    text_key: str | None,
    pool: futures.Executor,
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(ids [b] str, images uint8 [b, size, size, 3], texts or None) of source[indices];
    images are decoded on `pool`'s threads (PIL releases the GIL)."""
    records = source.__getitems__(list(indices))
    images = np.stack(list(pool.map(lambda r: load_image(r, size), records)))
    ids = np.array([to_str(r["id"]) for r in records], dtype=str)
    texts = [to_str(r[text_key]) for r in records] if text_key else None
    return ids, images, texts
