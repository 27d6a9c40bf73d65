"""Zero-shot classification: class names x prompt templates -> text classifier -> top-k accuracy.

Protocol (CLIP): for class c with name n_c and templates t_1..t_T ('a photo of a {}.'),
  w_c = normalize(mean_j normalize(embed_text(t_j(n_c))))        (prompt ensemble)
and an image x ranks the classes by cosine similarity zimg(x) . w_c. Top-k accuracy counts an
image as correct if one of its true labels is among the k best classes; a label may be a set
(int array with -1 pads: multi-label), ties are counted against the truth (see
`common.best_positive_rank`), and examples without any label are skipped.

Tasks: a task is (label_key, templates, single_object). `tasks` is either a mapping
{name: task} or a list of names looked up in the dataset's own table: the module
`input_pipeline.datasets.<builder.name>` exporting `ZEROSHOT_TASKS` (so a new dataset brings its
tasks with it and nothing here changes). A task is any object or mapping with fields
`label_key`, `templates` and optionally `single_object` (default False), which keeps only the
examples whose `num_objects` feature equals 1. Class names are the ClassLabel names of
`label_key` in `builder.info.features`.
"""

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mlcd.evaluators import EVALUATORS, common

# Feature read by tasks with single_object=True (the synthetic_scenes object count).
NUM_OBJECTS_KEY = "num_objects"


@dataclasses.dataclass(frozen=True)
class ResolvedTask:
    """A task with everything needed to score it: prompts per class and how to pick examples."""

    name: str
    label_key: str
    templates: tuple[str, ...]
    single_object: bool
    class_names: tuple[str, ...]


def _field(task: Any, key: str, default: Any = ...) -> Any:
    """Reads `key` from a mapping/ConfigDict (item access) or a dataclass/namedtuple (attribute)."""
    if hasattr(task, "keys"):
        if key in task.keys():
            return task[key]
    elif hasattr(task, key):
        return getattr(task, key)
    if default is ...:
        raise KeyError(key)
    return default


def dataset_tasks(dataset_name: str) -> Mapping[str, Any]:
    """The `ZEROSHOT_TASKS` table of `input_pipeline.datasets.<dataset_name>`.

    Raises:
      ValueError: no such module, or it defines no ZEROSHOT_TASKS.
    """
    module_name = f"input_pipeline.datasets.{dataset_name}"
    hint = "pass tasks explicitly as {name: {label_key, templates, single_object}}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing dataset module means "no task table"; a missing dependency inside it is
        # a real error and must surface unchanged.
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        raise ValueError(
            f"dataset {dataset_name!r} has no zero-shot task table "
            f"(no module {module_name}); {hint}"
        ) from None
    tasks = getattr(module, "ZEROSHOT_TASKS", None)
    if tasks is None:
        raise ValueError(f"{module_name} defines no ZEROSHOT_TASKS; {hint}")
    return tasks


def class_names(builder: Any, label_key: str) -> tuple[str, ...]:
    """ClassLabel names of feature `label_key` (a ClassLabel or a Sequence of ClassLabel).

    Raises:
      ValueError: the feature does not exist, or has no human-readable names (a ClassLabel built
        from `num_classes` alone names its classes '0', '1', ..., useless in a prompt).
    """
    features = builder.info.features
    if label_key not in features.keys():
        raise ValueError(
            f"dataset {builder.name!r} has no feature {label_key!r} (zero-shot label key); "
            f"features: {sorted(features.keys())}"
        )
    names = getattr(features[label_key], "names", None)
    if not names or list(names) == [str(i) for i in range(len(names))]:
        raise ValueError(
            f"dataset {builder.name!r} feature {label_key!r} has no class names; zero-shot "
            "classification needs a ClassLabel feature built with names=[...]"
        )
    return tuple(str(n) for n in names)


def resolve_tasks(
    builder: Any,
    tasks: Sequence[str] | Mapping[str, Any],
    templates: Sequence[str] | None = None,
) -> list[ResolvedTask]:
    """Turns the evaluator's `tasks` (names or definitions) into `ResolvedTask`s.

    Args:
      builder: the dataset builder (class names come from its features).
      tasks: {name: task definition}, or task names (a str is one name) looked up with
        `dataset_tasks(builder.name)`.
      templates: if given, replaces every task's templates.

    Raises:
      ValueError: unknown task name (lists the known ones), a template without '{}', or any
        error of `dataset_tasks` / `class_names`.
    """
    if hasattr(tasks, "keys"):
        table, names = tasks, list(tasks.keys())
    else:
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        table = dataset_tasks(builder.name)
        unknown = [n for n in names if n not in table.keys()]
        if unknown:
            raise ValueError(
                f"unknown zero-shot task(s) {unknown} for dataset {builder.name!r}; "
                f"known: {sorted(table.keys())}"
            )
    if not names:
        raise ValueError("zero-shot evaluator needs at least one task")
    resolved = []
    for name in names:
        task = table[name]
        try:
            label_key = str(_field(task, "label_key"))
            task_templates = tuple(templates or _field(task, "templates"))
        except KeyError as e:
            raise ValueError(f"zero-shot task {name!r} has no {e.args[0]!r}") from None
        bad = [t for t in task_templates if "{}" not in t]
        if not task_templates or bad:
            raise ValueError(f"zero-shot task {name!r}: every template needs '{{}}'; got {bad}")
        resolved.append(
            ResolvedTask(
                name=name,
                label_key=label_key,
                templates=task_templates,
                single_object=bool(_field(task, "single_object", False)),
                class_names=class_names(builder, label_key),
            )
        )
    return resolved


def class_embeddings(
    encoder: Any, names: Sequence[str], templates: Sequence[str], batch_size: int
) -> np.ndarray:
    """Prompt-ensembled class embeddings w_c = normalize(mean_j embed(template_j(name_c))).

    Templates are filled by replacing '{}' (not str.format, so other braces are literal).

    Returns:
      float32 [C, E], rows L2-normalised.
    """
    prompts = [t.replace("{}", n) for n in names for t in templates]  # class-major
    z = common.embed_texts(encoder, prompts, batch_size, desc="zeroshot: prompts")
    w = z.reshape(len(names), len(templates), -1).mean(axis=1)
    # The mean of unit vectors has norm <= 1 (< 1 when prompts disagree): renormalise for cosine.
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def label_positives(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """One-/multi-hot mask of the true classes.

    Args:
      labels: int [N] (one label) or [N, K] (a set of labels padded with -1), values in
        [-1, num_classes).
      num_classes: C.
      where: names the task/key/split in error messages.

    Returns:
      bool [N, C], True at every true class of each example.

    Raises:
      ValueError: a label outside [-1, num_classes).
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    bad = (labels < -1) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad.any(axis=1)))
        raise ValueError(
            f"{where}: example {i} has label(s) {labels[i].tolist()} outside [-1, {num_classes})"
        )
    return (labels[:, :, None] == np.arange(num_classes)).any(axis=1)


@dataclasses.dataclass(frozen=True)
class _TaskData:
    """Cached per-task examples: rows into the shared image cache and the true-class mask."""

    rows: np.ndarray  # int [n] indices into the evaluator's cached images
    positives: np.ndarray  # bool [n, C]


@EVALUATORS.register("zeroshot")
class ZeroShotEvaluator:
    """Zero-shot top-1 (and top-5 when C > 5) accuracy per task: `zeroshot/<task>/top{k}`.

    The split is read once, on the first `run`, keeping only the images the tasks use (each
    task's filter applied once); later runs (periodic evaluation) only re-embed them.
    """

    def __init__(
        self,
        builder: Any,
        *,
        split: str = "test",
        tasks: Sequence[str] | Mapping[str, Any] = ("shape", "color"),
        batch_size: int = 256,
        max_examples: int | None = None,
        templates: Sequence[str] | None = None,
    ):
        """Resolves the tasks now, so a bad task or label key fails at start-up.

        Args:
          builder: a prepared tfds builder (`as_data_source`, `info.features`, `name`).
          split: split to evaluate on.
          tasks: task names from the dataset's ZEROSHOT_TASKS, or {name: task definition}.
          batch_size: images / prompts per embedding call.
          max_examples: read only the first N examples of the split (before task filters).
          templates: overrides every task's prompt templates (each contains '{}').
        """
        self.builder = builder
        self.split = split
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.tasks = resolve_tasks(builder, tasks, templates)
        self._images: np.ndarray | None = None
        self._task_data: dict[str, _TaskData] = {}

    def _load(self) -> np.ndarray:
        """Reads the split once; caches the union of the tasks' images and each task's labels."""
        if self._images is not None:
            return self._images
        keys = {"image"} | {t.label_key for t in self.tasks}
        if any(t.single_object for t in self.tasks):
            keys.add(NUM_OBJECTS_KEY)
        data = common.read_split(
            self.builder,
            self.split,
            sorted(keys),
            max_examples=self.max_examples,
            desc=f"zeroshot {self.split}: reading",
        )
        selected = {}
        for task in self.tasks:
            where = (
                f"zero-shot task {task.name!r} ({self.builder.name}/{self.split}, "
                f"{task.label_key!r})"
            )
            positives = label_positives(data[task.label_key], len(task.class_names), where)
            keep = positives.any(axis=1)  # examples without any label are not scored
            if task.single_object:
                keep &= data[NUM_OBJECTS_KEY].reshape(-1) == 1
            if not keep.any():
                raise ValueError(f"{where}: no labelled example passes the task's filter")
            selected[task.name] = (np.flatnonzero(keep), positives[keep])
        union = np.unique(np.concatenate([idx for idx, _ in selected.values()]))
        self._task_data = {
            name: _TaskData(rows=np.searchsorted(union, idx), positives=pos)
            for name, (idx, pos) in selected.items()
        }
        self._images = common.as_rgb(
            data["image"][union], where=f"zero-shot {self.builder.name}/{self.split}"
        )
        return self._images

    def run(self, encoder: Any) -> dict[str, float]:
        """Embeds the cached images once and every task's prompts; returns the accuracies.

        encoder: see `common` (embed_images with key 'embedding', embed_texts).
        """
        images = self._load()
        zimg = common.embed_images(
            encoder, images, ("embedding",), self.batch_size, f"zeroshot {self.split}: images"
        )["embedding"]
        metrics = {}
        for task in self.tasks:
            w = class_embeddings(encoder, task.class_names, task.templates, self.batch_size)
            data = self._task_data[task.name]
            ranks = common.best_positive_rank(zimg[data.rows] @ w.T, data.positives)
            ks = (1, 5) if len(task.class_names) > 5 else (1,)
            for k, acc in common.recall_at_k(ranks, ks).items():
                metrics[f"zeroshot/{task.name}/top{k}"] = acc
        return metrics
