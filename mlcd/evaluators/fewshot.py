"""Few-shot linear probe: closed-form ridge regression on frozen features (big_vision protocol).

For a task with C classes, k shots and seed s:
  1. Shots. The train examples read (the first `max_train_examples` of the train split) lose a
     fixed held-out part (`selection_fraction` of them, `labelled.holdout`), used only to choose
     the regulariser. From the rest (the pool), k examples of every class present there are drawn
     with np.random.default_rng([s, crc32(task)]); a seed's k-shot set is the first k of its
     per-class permutation, so the sets are nested across k.
  2. Design. Features x [N = kC, D] (the chosen representation) are standardised per dimension
     with the shots' mean and std (+1e-5: a constant feature becomes 0, not NaN), and a constant
     column BIAS_FEATURE is appended: its weight is the bias, and the large constant makes its
     ridge penalty negligible. Targets Y = 2 onehot(y) - 1, in {-1, +1}, [N, C].
  3. Ridge for every lambda at once. With X the design [N, D+1],
       W(lambda) = argmin ||X W - Y||^2 + lambda ||W||^2 = (X^T X + lambda I)^-1 X^T Y
                 = X^T (X X^T + lambda I)^-1 Y.
     One symmetric eigendecomposition of the smaller Gram matrix serves all lambdas:
       N >= D+1: X^T X = Q diag(e) Q^T  ->  W = Q diag(1/(e + lambda)) (Q^T X^T Y),
       N <  D+1: X X^T = Q diag(e) Q^T  ->  W = (X^T Q) diag(1/(e + lambda)) (Q^T Y),
     i.e. W = lhs diag(1/(e + lambda)) rhs, a diagonal rescaling per lambda.
  4. Selection. lambda* maximises the accuracy (argmax_c of x W) on the held-out examples; ties
     go to the largest lambda (the simplest model). The test accuracy of W(lambda*) is the result.
Metric `fewshot/<task>/<k>shot`: the mean test accuracy over the seeds.
"""

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlcd.evaluators import EVALUATORS, common, labelled

BIAS_FEATURE = 100.0
DEFAULT_L2_REGS = tuple(float(2.0**i) for i in range(-10, 20))
_STD_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class RidgeFit:
    """The lambda-independent part of a ridge fit: W(lambda) = lhs diag(1/(eigs+lambda)) rhs."""

    mean: np.ndarray  # float64 [D], feature means of the training set
    std: np.ndarray  # float64 [D], feature stds (+ _STD_EPS)
    lhs: np.ndarray  # float64 [D+1, K], K = min(N, D+1)
    eigs: np.ndarray  # float64 [K], eigenvalues of the smaller Gram matrix
    rhs: np.ndarray  # float64 [K, C]


def design(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """[(x - mean) / std, BIAS_FEATURE]: float64 [N, D+1]."""
    z = (np.asarray(x, np.float64) - mean) / std
    return np.concatenate([z, np.full((len(z), 1), BIAS_FEATURE)], axis=1)


def fit_ridge(x: np.ndarray, y: np.ndarray, num_classes: int) -> RidgeFit:
    """Standardises x [N, D], builds +-1 targets from int labels y [N] in [0, num_classes), and
    eigendecomposes the smaller Gram matrix (module docstring, steps 2-3)."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + _STD_EPS
    xd = design(x, mean, std)
    targets = 2.0 * (np.asarray(y)[:, None] == np.arange(num_classes)) - 1.0
    n, d = xd.shape
    if n >= d:
        eigs, q = np.linalg.eigh(xd.T @ xd)
        lhs, rhs = q, q.T @ (xd.T @ targets)
    else:
        eigs, q = np.linalg.eigh(xd @ xd.T)
        lhs, rhs = xd.T @ q, q.T @ targets
    return RidgeFit(mean=mean, std=std, lhs=lhs, eigs=eigs, rhs=rhs)


def ridge_weights(fit: RidgeFit, l2_regs: Sequence[float]) -> np.ndarray:
    """W(lambda) for every lambda: float64 [L, D+1, C] (the bias weight last along D+1)."""
    inv = 1.0 / (fit.eigs[None, :] + np.asarray(l2_regs, np.float64)[:, None])  # [L, K]
    return (fit.lhs[None] * inv[:, None, :]) @ fit.rhs  # batched matmul (BLAS), not einsum


def accuracies(fit: RidgeFit, weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Accuracy of each W(lambda) [L, D+1, C] on features x [M, D] with labels y [M]: [L]."""
    scores = design(x, fit.mean, fit.std)[None] @ weights  # [L, M, C]
    return np.mean(scores.argmax(axis=-1) == np.asarray(y), axis=-1)


def sample_shots(
    labels: np.ndarray, pool: np.ndarray, max_shots: int, seed: int, task: labelled.Task, where: str
) -> np.ndarray:
    """max_shots examples of every class present in labels[pool], for one seed.

    Returns:
      int64 [C', max_shots]: indices (into labels) of the shots, one row per present class in
      increasing class order; row[:k] is the seed's k-shot set of that class.

    Raises:
      ValueError: a class with fewer than max_shots examples in the pool (names it).
    """
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
    rows = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        if len(members) < max_shots:
            raise ValueError(
                f"{where}: class {task.class_names[c]!r} has {len(members)} examples in the shot "
                f"pool, fewer "
                f"than {max_shots} shots; lower `shots` or raise `max_train_examples`"
            )
        rows.append(rng.permutation(members)[:max_shots])
    return np.stack(rows)


@EVALUATORS.register("fewshot")
class FewShotEvaluator:
    """Few-shot ridge probe accuracy per task and shot count: `fewshot/<task>/<k>shot`.

    The train split (its first `max_train_examples`) and the test split are read once, on the
    first `run`; only the held-out examples and the drawn shots of the train split are embedded.
    """

    def __init__(
        self,
        builder: Any,
        *,
        dataset: str | None = None,
        data_dir: str | None = None,
        tasks: Sequence[str] | str | None = None,
        representation: str = "pre_logits",
        shots: Sequence[int] = (1, 5, 10, 25),
        seeds: int = 3,
        l2_regs: Sequence[float] = DEFAULT_L2_REGS,
        selection_fraction: float = 0.2,
        train_split: str = "train",
        test_split: str = "test",
        max_train_examples: int | None = 2000,
        max_test_examples: int | None = None,
        batch_size: int = 256,
        blas_threads: int | None = 1,
    ):
        """Resolves the dataset and tasks now, so bad names fail at start-up.

        Args:
          builder: the training dataset's tfds builder (used when dataset is None).
          dataset: None (the training dataset), 'digits', or a tfds name prepared in data_dir.
          data_dir: where a tfds `dataset` is prepared.
          tasks: ClassLabel keys to probe (default: see `labelled.probe_tasks`).
          representation: 'pre_logits' (big_vision's choice) or 'embedding'.
          shots: the k of the k-shot probes.
          seeds: number of shot draws averaged (seeds 0 .. seeds-1).
          l2_regs: the ridge regularisers swept.
          selection_fraction: fraction of the train examples held out to choose lambda.
          train_split / test_split: split names ('digits' has train / validation / test).
          max_train_examples / max_test_examples: read only the first N examples (train default
            2000, like linear_probe's, so both probes read and embed the same examples; None:
            all).
          batch_size: images per embedding call.
          blas_threads: BLAS threads for the solves (see `common.blas_threads`).
        """
        who = "fewshot evaluator"
        self.representation = common.check_representation(representation, who)
        self.source = labelled.LabelledSource(builder, dataset=dataset, data_dir=data_dir, who=who)
        self.tasks = labelled.probe_tasks(self.source, tasks)
        self.shots = tuple(sorted({int(k) for k in shots}))
        if not self.shots or self.shots[0] < 1 or seeds < 1 or not l2_regs:
            raise ValueError(
                f"{who}: needs shots >= 1, seeds >= 1 and l2_regs; got "
                f"shots={shots}, seeds={seeds}, l2_regs={l2_regs}"
            )
        self.seeds = int(seeds)
        self.l2_regs = np.sort(np.asarray(l2_regs, np.float64))  # ascending: ties -> largest
        self.selection_fraction = selection_fraction
        self.train_split, self.test_split = train_split, test_split
        self.max_train_examples, self.max_test_examples = max_train_examples, max_test_examples
        self.batch_size = batch_size
        self.blas_threads = blas_threads
        self._data: dict[str, Any] | None = None
        self._images = common.ResizedImages(f"fewshot evaluator on {self.source.name}")

    def _load(self) -> dict[str, Any]:
        """Reads both splits once; draws the shots of every (task, seed); keeps only the train
        images that are ever embedded (the held-out part and the shots)."""
        if self._data is not None:
            return self._data
        keys = [t.label_key for t in self.tasks]
        train = self.source.read(self.train_split, keys, self.max_train_examples)
        test = self.source.read(self.test_split, keys, self.max_test_examples)
        pool, held = labelled.holdout(len(train["image"]), self.selection_fraction)
        shots, used = {}, [held]
        for task in self.tasks:
            y = np.asarray(train[task.label_key], np.int64)
            y_test = np.asarray(test[task.label_key], np.int64)
            parts = {"train": y[pool], f"{self.train_split} (held out)": y[held]}
            parts[self.test_split] = y_test
            labelled.check_labels(task, parts, "fewshot evaluator", self.source.name)
            where = f"fewshot evaluator: task {task.name!r} ({self.source.name}/{self.train_split})"
            shots[task.name] = [
                sample_shots(y, pool, self.shots[-1], s, task, where) for s in range(self.seeds)
            ]
            used += [s.ravel() for s in shots[task.name]]
        rows = np.unique(np.concatenate(used))  # train rows to embed; np.searchsorted maps into it
        self._data = {
            "rows": rows,
            "train_images": train["image"][rows],
            "train_labels": {t.name: np.asarray(train[t.label_key], np.int64) for t in self.tasks},
            "held": held,
            "shots": shots,
            "test_images": test["image"],
            "test_labels": {t.name: np.asarray(test[t.label_key], np.int64) for t in self.tasks},
        }
        return self._data

    def _features(self, encoder: Any, data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(train-row features [len(rows), D], test features [M, D]) of the representation."""
        train, test = (
            common.embed_images(
                encoder,
                self._images.get(part, data[f"{part}_images"], encoder),
                (self.representation,),
                self.batch_size,
                f"fewshot {self.source.name}: {part}",
            )[self.representation]
            for part in ("train", "test")
        )
        return train, test

    def run(self, encoder: Any) -> dict[str, float]:
        """Embeds the held-out, shot and test images, fits every probe, returns the accuracies.

        encoder: see `common` (embed_images with key `representation`, image_size).
        """
        data = self._load()
        train_features, test_features = self._features(encoder, data)
        at = lambda idx: train_features[np.searchsorted(data["rows"], idx)]
        metrics = {}
        with common.blas_threads(self.blas_threads):
            for task in self.tasks:
                y = data["train_labels"][task.name]
                y_test = data["test_labels"][task.name]
                num_classes = len(task.class_names)
                for k in self.shots:
                    accs = []
                    for seed_shots in data["shots"][task.name]:
                        idx = seed_shots[:, :k].ravel()
                        fit = fit_ridge(at(idx), y[idx], num_classes)
                        weights = ridge_weights(fit, self.l2_regs)
                        held = accuracies(fit, weights, at(data["held"]), y[data["held"]])
                        best = len(held) - 1 - np.argmax(held[::-1])  # ties -> largest lambda
                        accs.append(
                            accuracies(fit, weights[best : best + 1], test_features, y_test)[0]
                        )
                    metrics[f"fewshot/{task.name}/{k}shot"] = float(np.mean(accs))
        return metrics
