"""Full-data linear probe: multinomial logistic regression on frozen features (CLIP protocol, as
CLIP_benchmark runs it: regularisation chosen on a validation split, then a refit on train +
validation, accuracy on test).

Per task:
  1. Features (the chosen representation) are PCA-whitened with the mean and covariance of the
     examples being fitted (directions with variance below _WHITEN_RTOL x the largest, i.e.
     rounding noise such as the near-null direction of unit-norm embeddings, are dropped rather
     than amplified). The L2 penalty then acts on the whitened weights: for logits w.x,
     ||w_white||^2 = w^T Cov(x) w = Var(w.x), the variance of the logits over the data. This is
     the one deviation from CLIP's L2 on raw features, made for two reasons: the probe no longer
     depends on any invertible linear map applied to the features (so representations are
     compared on equal terms), and lbfgs converges in ~40 iterations instead of hitting 1000
     (measured on the tiny model's 5000 x 128 embeddings: 0.2 s instead of 4 s per fit). The
     unregularised end of the sweep (large C) is the same model either way.
  2. Sweep of C, the inverse L2 strength of scikit-learn's LogisticRegression (multinomial,
     lbfgs, `max_iter`): fit on train, top-1 on validation. CLIP's parametric binary search: the
     coarse grid `c_grid` (1e-6 .. 1e6, every 2 decades), then `refinements` rounds that halve the
     log10 step and try both neighbours of the best C so far, inside the grid's range (4 rounds:
     8 steps per decade, 15 fits). Ties go to the smaller C (stronger regularisation).
  3. Refit with the best C on train + validation; the metric is its top-1 on test.
The validation set is `val_split` when given, else the dataset's 'validation' split when it has
one, else a fixed held-out `val_fraction` of the train examples read (`labelled.holdout`).
Metric `linear_probe/<task>/top1`.
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from mlcd.evaluators import EVALUATORS, common, labelled

DEFAULT_C_GRID = tuple(float(10.0**e) for e in range(-6, 7, 2))
_WHITEN_RTOL = 1e-8


def sweep_log_c(
    score: Callable[[float], float], c_grid: Sequence[float], refinements: int
) -> tuple[float, dict[float, float]]:
    """Parametric binary search of the C maximising `score(C)` (the validation accuracy).

    Args:
      score: C -> score (higher is better).
      c_grid: initial values, evenly spaced in log10 (the first round's step is their spacing).
      refinements: rounds of "halve the step, try best - step and best + step".

    Returns:
      (best C, {log10 C: score} of every C tried). Ties go to the smallest C.
    """
    logs = np.sort(np.log10(np.asarray(c_grid, np.float64)))
    step = float(np.min(np.diff(logs))) if len(logs) > 1 else 1.0
    tried = {round(float(lc), 6): score(10.0**lc) for lc in logs}
    best = lambda: min(tried, key=lambda lc: (-tried[lc], lc))
    for _ in range(refinements):
        step /= 2
        centre = best()
        for lc in (round(centre - step, 6), round(centre + step, 6)):
            if logs[0] <= lc <= logs[-1] and lc not in tried:
                tried[lc] = score(10.0**lc)
    return 10.0 ** best(), tried


def _whiten(fit_x: np.ndarray, *xs: np.ndarray) -> list[np.ndarray]:
    """Each of xs in the PCA-whitened coordinates of fit_x [N, D]: [n, K] with K <= D.

    With Cov(fit_x) = Q diag(e) Q^T (unbiased, as scikit-learn's PCA), x -> (x - mean) Q_K
    diag(e_K)^-1/2 over the K eigenvalues above _WHITEN_RTOL * max(e).

    Raises:
      ValueError: fit_x is constant (no direction of nonzero variance).
    """
    mean = fit_x.mean(axis=0)
    e, q = np.linalg.eigh(np.atleast_2d(np.cov(fit_x, rowvar=False)))
    keep = e > _WHITEN_RTOL * max(e.max(), 0.0)
    if not keep.any():
        raise ValueError("the probe's features are constant over the examples it is fitted on")
    proj = q[:, keep] / np.sqrt(e[keep])
    return [(x - mean) @ proj for x in xs]


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    """Multinomial L2 logistic regression (lbfgs) on x [N, D] (already whitened), labels y.

    lbfgs may stop at max_iter at large C on (nearly) separable data: the fit is then slightly
    under-optimised, which the validation sweep judges like any other C, so the
    ConvergenceWarning is silenced.
    """
    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def probe_accuracy(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    refinements: int = 4,
    max_iter: int = 1000,
) -> tuple[float, float]:
    """The protocol of the module docstring on (features [n, D], int labels [n]) triples.

    Returns:
      (test top-1 of the refit model, the chosen C).
    """
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = train, val, test
    s_tr, s_val = _whiten(x_tr, x_tr, x_val)
    score = lambda c: float(np.mean(fit_logistic(s_tr, y_tr, c, max_iter).predict(s_val) == y_val))
    c, _ = sweep_log_c(score, c_grid, refinements)
    x_all, y_all = np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val])
    s_all, s_te = _whiten(x_all, x_all, x_te)
    model = fit_logistic(s_all, y_all, c, max_iter)
    return float(np.mean(model.predict(s_te) == y_te)), c


@EVALUATORS.register("linear_probe")
class LinearProbeEvaluator:
    """Logistic-regression probe top-1 per task: `linear_probe/<task>/top1`.

    The three splits are read once, on the first `run`; later runs re-embed and refit.
    """

    def __init__(
        self,
        builder: Any,
        *,
        dataset: str | None = None,
        data_dir: str | None = None,
        tasks: Sequence[str] | str | None = None,
        representation: str = "embedding",
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str = "test",
        val_fraction: float = 0.2,
        max_train_examples: int | None = 2000,
        max_eval_examples: int | None = None,
        c_grid: Sequence[float] = DEFAULT_C_GRID,
        refinements: int = 4,
        max_iter: int = 1000,
        batch_size: int = 256,
        blas_threads: int | None = 1,
    ):
        """Resolves the dataset and tasks now, so bad names fail at start-up.

        Args:
          builder: the training dataset's tfds builder (used when dataset is None).
          dataset: None (the training dataset), 'digits', or a tfds name prepared in data_dir.
          data_dir: where a tfds `dataset` is prepared.
          tasks: ClassLabel keys to probe (default: see `labelled.probe_tasks`).
          representation: 'embedding' (CLIP_benchmark: the L2-normalised image embedding) or
            'pre_logits'.
          train_split / val_split / test_split: split names; val_split None: see module doc.
          val_fraction: held-out fraction of train when there is no validation split.
          max_train_examples: read only the first N train examples (before any hold-out;
            None: all). The default 2000 keeps the tiny run's whole evaluation suite well under
            two minutes on 2 CPU cores; CLIP_benchmark uses the full train split.
          max_eval_examples: read only the first N validation / test examples.
          c_grid / refinements / max_iter: the C sweep and lbfgs budget (module docstring).
          batch_size: images per embedding call.
          blas_threads: BLAS threads for the fits (see `common.blas_threads`).
        """
        who = "linear_probe evaluator"
        self.representation = common.check_representation(representation, who)
        self.source = labelled.LabelledSource(builder, dataset=dataset, data_dir=data_dir, who=who)
        self.tasks = labelled.probe_tasks(self.source, tasks)
        if val_split is None and self.source.has_split("validation"):
            val_split = "validation"
        self.splits = (train_split, val_split, test_split)
        self.val_fraction = val_fraction
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.c_grid, self.refinements, self.max_iter = tuple(c_grid), refinements, max_iter
        self.batch_size = batch_size
        self.blas_threads = blas_threads
        self._data: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] | None = None
        self._images = common.ResizedImages(f"linear_probe evaluator on {self.source.name}")

    def _load(self) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
        """{'train' | 'validation' | 'test': (images, {task: int64 labels})}, read once."""
        if self._data is not None:
            return self._data
        train_split, val_split, test_split = self.splits
        keys = [t.label_key for t in self.tasks]
        train = self.source.read(train_split, keys, self.max_train_examples)
        if val_split is None:
            keep, held = labelled.holdout(len(train["image"]), self.val_fraction)
            val = {k: v[held] for k, v in train.items()}
            train = {k: v[keep] for k, v in train.items()}
            val_name = f"{train_split} (held out)"
        else:
            val, val_name = self.source.read(val_split, keys, self.max_eval_examples), val_split
        test = self.source.read(test_split, keys, self.max_eval_examples)
        parts = {"train": train, "validation": val, "test": test}
        labels = {
            p: {t.name: np.asarray(d[t.label_key], np.int64) for t in self.tasks}
            for p, d in parts.items()
        }
        for task in self.tasks:
            named = {"train": labels["train"][task.name], val_name: labels["validation"][task.name]}
            named[test_split] = labels["test"][task.name]
            labelled.check_labels(task, named, "linear_probe evaluator", self.source.name)
        self._data = {p: (d["image"], labels[p]) for p, d in parts.items()}
        return self._data

    def run(self, encoder: Any) -> dict[str, float]:
        """Embeds the three splits, runs the sweep + refit per task, returns the accuracies.

        encoder: see `common` (embed_images with key `representation`, image_size).
        """
        data = self._load()
        features = {
            part: common.embed_images(
                encoder,
                self._images.get(part, images, encoder),
                (self.representation,),
                self.batch_size,
                f"linear_probe {self.source.name}: {part}",
            )[self.representation].astype(np.float64)
            for part, (images, _) in data.items()
        }
        metrics = {}
        # The sweeps are the slow part (16 lbfgs fits per task): a bar on a terminal.
        bar = tqdm.tqdm(
            self.tasks, desc=f"linear_probe {self.source.name}: fits", leave=False, disable=None
        )
        with common.blas_threads(self.blas_threads):
            for task in bar:
                triple = [
                    (features[p], data[p][1][task.name]) for p in ("train", "validation", "test")
                ]
                top1, _ = probe_accuracy(
                    *triple,
                    c_grid=self.c_grid,
                    refinements=self.refinements,
                    max_iter=self.max_iter,
                )
                metrics[f"linear_probe/{task.name}/top1"] = top1
        return metrics
