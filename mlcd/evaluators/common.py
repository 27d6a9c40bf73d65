"""Helpers shared by the embedding evaluators (zero-shot, retrieval).

An evaluator reads its split into host memory once (the evaluation sets are small: the tiny run's
test split is ~2000 images of 64x64x3 = 24 MiB), then on every `run` embeds the cached inputs in
batches with the caller's embedding functions and scores them with the numpy metrics below.

Embedding functions follow one contract: `embed_images(uint8 [B, R, R, 3]) -> float [B, E]` and
`embed_texts(list[str]) -> float [B, E]`, each row L2-normalised. Outputs are checked (shape,
finiteness, unit norm) because a silent violation would not crash the metrics, it would bias them:
NaN similarities compare False against everything and would rank every query first.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm

# A progress bar only pays off when embedding takes a while; below this many batches it is noise.
_MIN_BATCHES_FOR_PROGRESS = 8
# Unit-norm tolerance: bfloat16 compute gives |norm - 1| ~ 4e-3 after normalisation.
_NORM_ATOL = 1e-2


def read_split(
    builder: Any,
    split: str,
    keys: Sequence[str],
    *,
    max_examples: int | None = None,
    batch_size: int = 256,
    desc: str = "reading",
) -> dict[str, np.ndarray]:
    """Reads features `keys` of the first `max_examples` examples of `split` into memory.

    Args:
      builder: a prepared tfds builder (or any object with `.name` and `.as_data_source(split)`
        returning a random-access sequence of feature dicts of numpy values).
      split: split name, e.g. 'test' (tfds slicing such as 'test[:10%]' works for tfds builders).
      keys: feature names to keep; the rest of each decoded example is dropped.
      max_examples: read at most this many examples (the first ones, so the subset is fixed).
      batch_size: examples fetched per data-source call (tfds sources read batches faster).
      desc: progress-bar label.

    Returns:
      {key: array [N, ...]}: the per-example values stacked along a new leading axis (bytes
      features become numpy bytes arrays).

    Raises:
      KeyError: an example lacks one of `keys` (names the dataset, split and available features).
      ValueError: the split (after `max_examples`) is empty.
    """
    source = builder.as_data_source(split)
    n = len(source) if max_examples is None else min(len(source), max_examples)
    if n == 0:
        raise ValueError(f"dataset {builder.name!r} split {split!r} has no examples to evaluate")
    # tfds ArrayRecord sources read a batch of records in one call through __getitems__.
    get_batch = getattr(source, "__getitems__", None) or (lambda idx: [source[i] for i in idx])
    columns: dict[str, list] = {k: [] for k in keys}
    with progress(n, batch_size, desc) as bar:
        for start in range(0, n, batch_size):
            examples = get_batch(list(range(start, min(start + batch_size, n))))
            for example in examples:
                for k in keys:
                    if k not in example:
                        raise KeyError(
                            f"dataset {builder.name!r} split {split!r} has no feature {k!r}; "
                            f"its examples have {sorted(example)}"
                        )
                    columns[k].append(example[k])
            bar.update(len(examples))
    return {k: np.stack(v) for k, v in columns.items()}


def check_embeddings(z: Any, num_inputs: int, what: str) -> np.ndarray:
    """Validates one batch of embeddings and returns it as float32 [B, E].

    Args:
      z: the embedding function's output for `num_inputs` inputs.
      num_inputs: B, the batch size that was passed in.
      what: 'embed_images' or 'embed_texts', for the error message.

    Raises:
      ValueError: wrong shape, non-finite values, or rows that are not unit-norm (to `_NORM_ATOL`).
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[0] != num_inputs:
        raise ValueError(
            f"{what} must return [{num_inputs}, E] for {num_inputs} inputs; got {z.shape}"
        )
    if not np.isfinite(z).all():
        raise ValueError(f"{what} returned non-finite values")
    norms = np.linalg.norm(z, axis=1)
    if not np.allclose(norms, 1.0, atol=_NORM_ATOL):
        worst = norms[np.argmax(np.abs(norms - 1.0))]
        raise ValueError(f"{what} must return L2-normalised rows; found a row of norm {worst:.4g}")
    return z


def embed_in_batches(
    embed_fn: Callable[[Any], Any],
    inputs: np.ndarray | Sequence[str],
    batch_size: int,
    *,
    what: str,
    desc: str,
) -> np.ndarray:
    """Embeds `inputs` (uint8 images [N, R, R, 3] or N strings) in batches.

    The last batch is smaller than `batch_size`; callers that jit on a static batch shape pad
    inside their embedding function.

    Returns:
      float32 [N, E], rows L2-normalised (validated by `check_embeddings`).
    """
    n = len(inputs)
    out = []
    with progress(n, batch_size, desc) as bar:
        for start in range(0, n, batch_size):
            batch = inputs[start : start + batch_size]
            if not isinstance(batch, np.ndarray):
                batch = list(batch)
            out.append(check_embeddings(embed_fn(batch), len(batch), what))
            bar.update(len(batch))
    return np.concatenate(out)


def progress(total: int, batch_size: int, desc: str) -> tqdm.tqdm:
    """A tqdm bar over `total` items, shown only for long loops on a terminal.

    `disable=None` is tqdm's "disable when not a tty" (log files stay clean); short loops are
    always silent.
    """
    small = -(-total // batch_size) < _MIN_BATCHES_FOR_PROGRESS
    return tqdm.tqdm(
        total=total, desc=desc, unit="ex", leave=False, disable=True if small else None
    )


def best_positive_rank(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rank of each query's best-scoring positive candidate, ties counted against it.

    For query q with positives P_q (scores[q, P_q]) and s*_q = max over P_q:
      rank_q = #{c not in P_q : scores[q, c] >= s*_q}   (0 = ranked first).
    Positives do not compete with each other, so "is any positive in the top k" is exactly
    `rank_q < k`. Ties between a positive and a negative go to the negative (pessimistic and
    order-independent): a collapsed model whose scores are all equal ranks every positive last
    instead of being rewarded for the dataset's ordering.

    Args:
      scores: float [Q, C] query-candidate similarities (finite).
      positive: bool [Q, C], True where candidate c is a correct answer for query q; every query
        needs at least one.

    Returns:
      int64 [Q] ranks in [0, C - |P_q|].

    Raises:
      ValueError: non-finite scores, mismatched shapes, or a query without any positive.
    """
    scores = np.asarray(scores)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must both be [Q, C]")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not positive.any(axis=1).all():
        raise ValueError(f"query {int(np.argmin(positive.any(axis=1)))} has no positive candidate")
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    return np.sum(~positive & (scores >= best), axis=1)


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose best positive rank (from `best_positive_rank`) is below k."""
    ranks = np.asarray(ranks)
    return {k: float(np.mean(ranks < k)) for k in ks}
