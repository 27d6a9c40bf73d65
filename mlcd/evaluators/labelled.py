"""Labelled image sets for the probes and image retrieval: where images and class labels come from.

A `LabelledSource` is one of
  * the training dataset (the evaluator's `builder`; dataset=None): its ClassLabel features are
    the tasks (synthetic_scenes: largest_shape, largest_color, count, background);
  * scikit-learn's bundled handwritten digits (dataset='digits'): 1797 real 8x8 scans with
    values 0..16, mapped to uint8 0..255 (v * 255 / 16, rounded), gray repeated to RGB. Fixed
    split (DIGITS_SPLIT): within each class, a permutation seeded by DIGITS_SEED puts the first
    60% (rounded down) in 'train', the next 20% in 'validation' and the rest in 'test'
    (1074 / 355 / 368 images). The evaluator upsamples them to the encoder's resolution;
  * any tfds image-classification dataset already prepared (ArrayRecord) in a local data_dir
    (dataset='<tfds name>', data_dir=...), read through `tfds.builder(name,
    data_dir=...).as_data_source` without TensorFlow; gray images become RGB. Task: its 'label'.
Task (metric) names: the label key for the training dataset; for another dataset its name
('digits', 'mnist', ...) when the key is 'label', else '<name>_<key>'.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from mlcd.evaluators import common

DIGITS = "digits"
DIGITS_SEED = 0
DIGITS_SPLIT = (("train", 0.6), ("validation", 0.2), ("test", 0.2))
# Seed of the fixed hold-outs carved out of a train split (validation / ridge selection sets).
HOLDOUT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Task:
    """A probe task: which integer label to predict, and its class names."""

    name: str  # metric namespace, e.g. 'largest_shape', 'digits'
    label_key: str
    class_names: tuple[str, ...]


def holdout(n: int, fraction: float, seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of range(n) into (kept, held out), both sorted int64 arrays.

    The held-out part has round(fraction * n) elements, clipped to [1, n - 1].

    Raises:
      ValueError: n < 2 or fraction outside (0, 1).
    """
    if n < 2 or not 0 < fraction < 1:
        raise ValueError(f"cannot hold out a fraction {fraction} of {n} examples")
    size = min(max(round(fraction * n), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[size:]), np.sort(perm[:size])


def _digits_splits() -> dict[str, dict[str, np.ndarray]]:
    """{'train' | 'validation' | 'test': {'image': uint8 [n, 8, 8, 3], 'label': int64 [n]}}."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name, _ in DIGITS_SPLIT}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for i, (name, fraction) in enumerate(DIGITS_SPLIT):
            stop = len(idx) if i == len(DIGITS_SPLIT) - 1 else start + int(fraction * len(idx))
            parts[name].append(idx[start:stop])
            start = stop
    return {
        name: {
            "image": np.repeat(images[np.sort(np.concatenate(p))][..., None], 3, axis=-1),
            "label": labels[np.sort(np.concatenate(p))],
        }
        for name, p in parts.items()
    }


class LabelledSource:
    """Images and labels of one labelled dataset (see the module docstring), read lazily.

    Attributes:
      name: the dataset's name ('digits', the tfds name, or the training builder's name).
      external: False for the training dataset, True for 'digits' and tfds datasets.
      features: {feature name: tfds feature} (ClassLabel features carry the class names).
    """

    def __init__(self, builder: Any, *, dataset: str | None, data_dir: str | None, who: str):
        """Resolves the dataset now, so a missing one fails at start-up.

        Args:
          builder: the training dataset's builder (used when dataset is None).
          dataset: None, 'digits' or a tfds dataset name (tfds syntax, e.g. 'mnist:3.0.1').
          data_dir: where a tfds `dataset` is prepared.
          who: the evaluator's name, for error messages.

        Raises:
          ValueError: a tfds dataset without data_dir, or a name tfds does not know.
        """
        self.who = who
        self.external = dataset is not None
        self._digits: dict[str, dict[str, np.ndarray]] | None = None
        if dataset is None:
            if builder is None:
                raise ValueError(f"{who}: needs the training dataset's builder or a `dataset`")
            self._builder = builder
        elif dataset == DIGITS:
            self._builder = None
            self.name = DIGITS
            self.features = {"label": tfds.features.ClassLabel(names=[str(d) for d in range(10)])}
            return
        else:
            if not data_dir:
                raise ValueError(
                    f"{who}: dataset {dataset!r} needs a data_dir where it is prepared"
                )
            try:
                self._builder = tfds.builder(dataset, data_dir=data_dir)
            except tfds.core.registered.DatasetNotFoundError:
                raise ValueError(f"{who}: tfds does not know dataset {dataset!r}") from None
        self.name = self._builder.name
        self.features = dict(self._builder.info.features.items())

    def has_split(self, split: str) -> bool:
        """Whether the dataset declares `split` (tfds mock data declares none)."""
        if self._builder is None:
            return split in dict(DIGITS_SPLIT)
        return split in self._builder.info.splits.keys()

    def read(
        self, split: str, keys: Sequence[str], max_examples: int | None = None
    ) -> dict[str, np.ndarray]:
        """{'image': uint8 images, key: [N, ...]} of the first `max_examples` examples of `split`.

        Images are as stored (gray or RGB, [N, H, W(, C)], or an object array when their sizes
        vary): `common.as_rgb(images, size)` turns them into the encoder's input.

        Raises:
          FileNotFoundError: a tfds dataset that is not prepared as ArrayRecord in its data_dir.
          KeyError / ValueError: from `common.read_split` (missing feature, empty split).
        """
        where = f"{self.who} on {self.name}/{split}"
        if self._builder is None:
            if self._digits is None:
                self._digits = _digits_splits()
            if split not in self._digits:
                raise ValueError(f"{where}: digits has splits {list(self._digits)}, not {split!r}")
            data = {k: v[:max_examples] for k, v in self._digits[split].items()}
            missing = [k for k in keys if k not in data]
            if missing:
                raise KeyError(
                    f"{where}: no feature {missing[0]!r}; digits examples have 'image' and 'label'"
                )
        else:
            try:
                data = common.read_split(
                    self._builder,
                    split,
                    ["image", *keys],
                    max_examples=max_examples,
                    desc=f"{self.who} {self.name}/{split}: reading",
                )
            except (NotImplementedError, FileNotFoundError, AssertionError) as e:
                raise FileNotFoundError(
                    f"{where}: the dataset is not prepared as ArrayRecord in "
                    f"{self._builder.data_dir} ({e})"
                ) from None
        return data


def probe_tasks(source: LabelledSource, label_keys: Sequence[str] | str | None) -> list[Task]:
    """The probe tasks of `source`: one per label key (default: every top-level ClassLabel
    feature of the training dataset, or 'label' for another dataset).

    Raises:
      ValueError: a key that is not a ClassLabel feature of the dataset (names it and the
        dataset's ClassLabel features), or no task at all.
    """
    class_labels = sorted(
        k for k, f in source.features.items() if isinstance(f, tfds.features.ClassLabel)
    )
    if label_keys is None:
        label_keys = ["label"] if source.external else class_labels
    elif isinstance(label_keys, str):
        label_keys = [label_keys]
    if not label_keys:
        raise ValueError(
            f"{source.who}: dataset {source.name!r} has no ClassLabel feature to probe"
        )
    tasks = []
    for key in label_keys:
        if key not in class_labels:
            raise ValueError(
                f"{source.who}: {key!r} is not a ClassLabel feature of dataset "
                f"{source.name!r}; its ClassLabel features: {class_labels}"
            )
        name = (
            key
            if not source.external
            else source.name
            if key == "label"
            else f"{source.name}_{key}"
        )
        tasks.append(Task(name=name, label_key=key, class_names=tuple(source.features[key].names)))
    return tasks


def check_labels(task: Task, labels: dict[str, np.ndarray], who: str, dataset: str) -> None:
    """Every class present in a non-train part must be present in 'train'.

    Args:
      labels: {part name ('train', 'validation', 'test', or a split name): int [n]}; the
        'train' entry is the set the probe is fitted on.

    Raises:
      ValueError: labels outside [0, C), or a class missing from train (names the task, the
        split where it appears and the class).
    """
    num_classes = len(task.class_names)
    for part, y in labels.items():
        if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= num_classes)):
            raise ValueError(
                f"{who}: task {task.name!r} ({dataset}/{part}) needs one label in "
                f"[0, {num_classes}) per example; got shape {y.shape}, values {np.unique(y)[:8]}"
            )
    present = set(np.unique(labels["train"]).tolist())
    for part, y in labels.items():
        missing = sorted(set(np.unique(y).tolist()) - present)
        if missing:
            raise ValueError(
                f"{who}: task {task.name!r}: class {task.class_names[missing[0]]!r} appears in "
                f"{dataset}/{part} but not in the train examples"
            )
