"""Helpers shared by the evaluators: cached split reading, validated embedding, ranking maths.

An evaluator reads its split into host memory once (the evaluation sets are small: the tiny run's
test split is ~2000 images of 64x64x3 = 24 MiB), then on every `run` embeds the cached inputs in
batches with the caller's encoder and scores them with numpy.

Encoder contract (`mlcd.encoder.Encoder`, exported encoders, test fakes):
  encoder.image_size: int, the resolution the image tower runs at;
  encoder.embed_images(uint8 [N, H, W, 3], keys=(...)) -> {key: float32 array} for the requested
    keys among IMAGE_KEYS (shapes below);
  encoder.embed_texts(list of N str) -> {'embedding': float32 [N, E]}.
Outputs are checked (shape, finiteness, unit norm where promised) because a silent violation would
not crash the metrics, it would bias them: NaN similarities compare False against everything and
would rank every query first.
"""

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import threadpoolctl
import tqdm

from input_pipeline import preprocess

# What `embed_images` may return: key -> (number of dims per example, L2-normalised last axis).
IMAGE_KEYS = {
    "embedding": (1, True),  # [N, E] pooled, projected
    "pre_logits": (1, False),  # [N, W] pooled, before the projection
    "patch_tokens": (2, False),  # [N, P, W] after the final LayerNorm
    "patch_embeddings": (2, True),  # [N, P, E] patch tokens through the projection
}
# Representations a probe can be trained on (one vector per image).
REPRESENTATIONS = ("pre_logits", "embedding")

# A progress bar only pays off when a loop takes a while; below this many batches it is noise.
_MIN_BATCHES_FOR_PROGRESS = 8
# Unit-norm tolerance: bfloat16 compute gives |norm - 1| ~ 4e-3 after normalisation.
_NORM_ATOL = 1e-2

# (id(builder), split, max_examples) -> (builder, {feature: [N, ...]}). Every evaluator of a run
# reads the same test split; decoding it (PNG + feature parsing, ~1 ms an example) once instead of
# once per evaluator saves seconds per evaluation. The builder is kept in the value so its id
# cannot be reused by another object while the entry lives. Dataset files are immutable once
# prepared, so the cache never goes stale.
_SPLIT_CACHE: dict[tuple[int, str, int | None], tuple[Any, dict[str, np.ndarray]]] = {}


def clear_split_cache() -> None:
    """Forgets every split read by `read_split` (frees its memory)."""
    _SPLIT_CACHE.clear()


def _stack(values: list[Any]) -> np.ndarray:
    """Stacks per-example values; arrays of different shapes (images of varying size) become a
    1-D object array of the arrays."""
    first = np.shape(values[0])
    if all(np.shape(v) == first for v in values):
        return np.stack(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def read_split(
    builder: Any,
    split: str,
    keys: Sequence[str],
    *,
    max_examples: int | None = None,
    desc: str = "reading",
) -> dict[str, np.ndarray]:
    """Features `keys` of the first `max_examples` examples of `split`, read once per process.

    Args:
      builder: a prepared tfds builder (or any object with `.name` and `.as_data_source(split)`
        returning a random-access sequence of feature dicts of numpy values).
      split: split name, e.g. 'test' (tfds slicing such as 'test[:10%]' works for tfds builders).
      keys: feature names wanted.
      max_examples: read at most this many examples (the first ones, so the subset is fixed).
      desc: progress-bar label.

    Returns:
      {key: array [N, ...]}: per-example values stacked along a new leading axis (bytes features
      become numpy bytes arrays; images of varying shapes a 1-D object array). All features of
      the examples are cached (see _SPLIT_CACHE), so another evaluator asking for other keys of
      the same split does not read it again.

    Raises:
      KeyError: the examples lack one of `keys` (names the dataset, split and their features).
      ValueError: the split (after `max_examples`) is empty.
    """
    cache_key = (id(builder), split, max_examples)
    if cache_key not in _SPLIT_CACHE:
        source = builder.as_data_source(split)
        n = len(source) if max_examples is None else min(len(source), max_examples)
        if n == 0:
            raise ValueError(f"dataset {builder.name!r} split {split!r} has no examples")
        examples = []
        with progress(n, 256, desc) as bar:
            for i in range(n):
                examples.append(source[i])
                bar.update(1)
        columns = {k: _stack([ex[k] for ex in examples]) for k in examples[0]}
        _SPLIT_CACHE[cache_key] = (builder, columns)
    columns = _SPLIT_CACHE[cache_key][1]
    missing = [k for k in keys if k not in columns]
    if missing:
        raise KeyError(
            f"dataset {builder.name!r} split {split!r} has no feature {missing[0]!r}; "
            f"its examples have {sorted(columns)}"
        )
    return {k: columns[k] for k in keys}


def as_rgb(images: np.ndarray, size: int | None = None, where: str = "images") -> np.ndarray:
    """uint8 images -> uint8 [N, H, W, 3]: gray [N, H, W(, 1)] repeated to RGB; images of varying
    shapes (a 1-D object array) or any image when `size` is given resized + centre-cropped to
    size x size (the encoder's own eval preprocessing, so `size` = encoder.image_size changes
    nothing else).

    Raises:
      ValueError: non-uint8 images or a channel count other than 1 or 3 (names `where`).
    """
    if images.dtype == object:
        if size is None:
            raise ValueError(f"{where}: images of different sizes need a target size")
        return np.stack([as_rgb(im[None], size, where)[0] for im in images])
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: images must be [N, H, W] or [N, H, W, 1|3]; got {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if size is not None and images.shape[1:3] != (size, size):
        images = np.stack([preprocess.resize_center_crop(im, size) for im in images])
    return images


class ResizedImages:
    """An evaluator's images at its encoder's resolution, resized once per resolution.

    An evaluator reads its images once, but `as_rgb(images, encoder.image_size)` (resize +
    centre crop of every image) would otherwise run again on every evaluation round. Each named
    set keeps its last resolution's result (one copy of the images), so rounds with the same
    encoder reuse it and an encoder of another resolution gets a fresh resize.
    """

    def __init__(self, where: str = "images"):
        """where: names the images in as_rgb's errors (e.g. 'fewshot evaluator on digits')."""
        self.where = where
        self._cache: dict[str, tuple[int, np.ndarray]] = {}

    def get(self, name: str, images: np.ndarray, encoder: Any) -> np.ndarray:
        """uint8 [N, S, S, 3]: `images` (uint8, see as_rgb) at S = encoder.image_size.

        `images` must be the same array on every call with this `name` (the evaluator's cached
        split): only the resolution is compared, not the content.
        """
        size = int(encoder.image_size)
        if name not in self._cache or self._cache[name][0] != size:
            self._cache[name] = (size, as_rgb(images, size, self.where))
        return self._cache[name][1]


def check_outputs(out: Any, keys: Sequence[str], num_inputs: int, what: str) -> dict:
    """Validates one batch of encoder outputs; returns {key: float32 array} for `keys`.

    Args:
      out: the encoder's dict for `num_inputs` inputs.
      keys: the keys that were requested (each in IMAGE_KEYS, or 'embedding' for texts).
      num_inputs: B, the batch size that was passed in.
      what: 'embed_images' or 'embed_texts', for the error message.

    Raises:
      ValueError: a missing key, wrong shape, non-finite values, or rows that should be
        unit-norm and are not (to `_NORM_ATOL`).
    """
    if not hasattr(out, "keys"):
        raise ValueError(f"{what} must return a dict of arrays; got {type(out).__name__}")
    checked = {}
    for key in keys:
        if key not in out:
            raise ValueError(f"{what} returned no {key!r} (it returned {sorted(out.keys())})")
        ndim, unit = IMAGE_KEYS[key]
        z = np.asarray(out[key], dtype=np.float32)
        if z.ndim != ndim + 1 or z.shape[0] != num_inputs:
            dims = "N, D" if ndim == 1 else "N, P, D"
            raise ValueError(
                f"{what} {key!r} must be [{dims}] with N = {num_inputs} inputs; got {z.shape}"
            )
        if not np.isfinite(z).all():
            raise ValueError(f"{what} {key!r} has non-finite values")
        if unit:
            norms = np.linalg.norm(z, axis=-1)
            if not np.allclose(norms, 1.0, atol=_NORM_ATOL):
                worst = norms.flat[np.argmax(np.abs(norms - 1.0))]
                raise ValueError(
                    f"{what} {key!r} must be L2-normalised; found a vector of norm {worst:.4g}"
                )
        checked[key] = z
    return checked


def embed_images(
    encoder: Any, images: np.ndarray, keys: Sequence[str], batch_size: int, desc: str
) -> dict[str, np.ndarray]:
    """Embeds uint8 images [N, H, W, 3] in batches; returns the validated `keys` (float32).

    Only `keys` are requested from the encoder: every key is computed on device and transferred
    back, and patch outputs are P times bigger than pooled ones.
    """
    keys = tuple(keys)
    unknown = [k for k in keys if k not in IMAGE_KEYS]
    if unknown:
        raise ValueError(f"unknown image output(s) {unknown}; known: {list(IMAGE_KEYS)}")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with progress(len(images), batch_size, desc) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            out = check_outputs(
                encoder.embed_images(batch, keys=keys), keys, len(batch), "embed_images"
            )
            for k in keys:
                parts[k].append(out[k])
            bar.update(len(batch))
    return {k: np.concatenate(v) for k, v in parts.items()}


def embed_patch_grid(
    encoder: Any, images: np.ndarray, batch_size: int, desc: str, where: str
) -> tuple[np.ndarray, int]:
    """Embeds images to their 'patch_embeddings'; returns (float32 [N, P, E], grid).

    Args:
      images: uint8 [N, S, S, 3] at the encoder's resolution (an evaluator's `ResizedImages`).
      where: the evaluator, for the error message (e.g. 'segmentation').

    Returns:
      The validated patch embeddings (rows L2-normalised) and grid = sqrt(P), the side of the
      square patch grid in row-major order.

    Raises:
      ValueError: P is not a perfect square (the patch maps could not be laid out as a grid).
    """
    patches = embed_images(encoder, images, ("patch_embeddings",), batch_size, desc)[
        "patch_embeddings"
    ]
    grid = math.isqrt(patches.shape[1])
    if grid * grid != patches.shape[1]:
        raise ValueError(
            f"{where}: patch_embeddings has {patches.shape[1]} patches, not a square grid"
        )
    return patches, grid


def embed_texts(encoder: Any, texts: Sequence[str], batch_size: int, desc: str) -> np.ndarray:
    """Embeds strings in batches; returns float32 [N, E], rows L2-normalised (validated)."""
    texts = list(texts)
    parts = []
    with progress(len(texts), batch_size, desc) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            out = check_outputs(
                encoder.embed_texts(batch), ("embedding",), len(batch), "embed_texts"
            )
            parts.append(out["embedding"])
            bar.update(len(batch))
    return np.concatenate(parts)


def check_representation(representation: str, evaluator: str) -> str:
    """Returns `representation` if a probe can use it, else raises a ValueError naming it."""
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"{evaluator}: unknown representation {representation!r}; known: {list(REPRESENTATIONS)}"
        )
    return representation


def blas_threads(num_threads: int | None) -> contextlib.AbstractContextManager:
    """Caps the BLAS / OpenMP threads of numpy, scipy and scikit-learn inside the block.

    The probes' linear algebra is small (thousands x hundreds): threads barely help, and on a
    shared or oversubscribed host spinning BLAS threads made an lbfgs fit 40x slower (8.5 s vs
    0.2 s for 4000 x 128 x 8 classes on 2 busy cores). None leaves the libraries' defaults.
    """
    if num_threads is None:
        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(limits=num_threads)


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


def atomic_savefig(fig: Any, path: str) -> None:
    """Writes the matplotlib figure to `path` as a PNG so that readers see either the old file
    or the whole new one (temporary file in the same directory + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
