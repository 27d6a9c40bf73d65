"""Long captions as sentence pools: splitting, merging and drawing sub-captions (DreamLIP).

DreamLIP trains on K "sub-captions" per example and epoch, drawn from a pool such as
{short caption / alt-text} + the sentences of the long caption(s):

    pool = [short] + merge_sentences(split_sentences(long_caption), m)
    texts, mask = draw_subcaptions(pool, k, subcaption_rng(seed, index, epoch))

These are pure functions of their arguments; `subcaption_rng` makes the draw a function of
(seed, example index in the split, epoch) only, so it is the same whatever the host count,
the thread that runs it or the other ops of the pipeline.
"""

from __future__ import annotations

import re

import numpy as np

# A sentence ends at ".", "!" or "?" followed by whitespace (the mark stays with its sentence;
# the lookbehind keeps it out of the separator), and at every line break. A "." not followed
# by whitespace ("3.5", "e.g.x", a URL) does not end a sentence.
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|[\r\n]+")
_END_MARKS = ".!?"

# Last entry of the SeedSequence entropy of `subcaption_rng`. Non-zero, because SeedSequence
# ignores trailing zeros ([a, b, 0] seeds what [a, b] seeds), and distinct from the other
# per-example streams of the repo (synthetic_scenes uses [seed, split, index(, 1)]).
_SUBCAPTION_STREAM = 0x5EB7


def split_sentences(text: str) -> list[str]:
    """The sentences of a (long) caption, in order, each stripped and keeping its end mark.

    A sentence ends at ".", "!" or "?" followed by whitespace or the end of the text, and at
    every line break. Pieces that are empty or only end marks (from "..  ", ". .", "\\n\\n",
    trailing spaces) are dropped, so a text of only whitespace gives []. Numbers such as "3.5"
    are not split (no whitespace after the "."). Abbreviations are not recognised: "Dr. Smith
    smiles." gives ["Dr.", "Smith smiles."]; nor are closing quotes after the mark ('"Hi." he
    said.' stays one sentence).

    On synthetic_scenes long captions (sentences ending in "." joined by " ") this is exactly
    `input_pipeline.datasets.synthetic_scenes.split_sentences`.

    Args:
      text: the caption (str; decode tfds bytes first, e.g. with `transforms.to_str`).

    Returns:
      list[str] of non-empty sentences.
    """
    pieces = (p.strip() for p in _BOUNDARY.split(text))
    return [p for p in pieces if p.strip(_END_MARKS)]


def merge_sentences(sentences: list[str], m: int) -> list[str]:
    """Sub-captions of m consecutive sentences each: " ".join of sentences[i * m : (i + 1) * m].

    Args:
      sentences: list[str], e.g. from `split_sentences`.
      m: sentences per sub-caption, >= 1 (1 returns a copy of `sentences`).

    Returns:
      list[str] of ceil(len(sentences) / m) sub-captions; the last may join fewer than m.

    Raises:
      ValueError: m < 1.
    """
    if m < 1:
        raise ValueError(f"merge_sentences: m must be >= 1 sentences per sub-caption; got m={m}")
    return [" ".join(sentences[i : i + m]) for i in range(0, len(sentences), m)]


def draw_subcaptions(
    pool: list[str], k: int, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """K sub-captions of `pool`, drawn without replacement.

    If len(pool) >= k: a uniformly random k-subset of the pool's items, in a random order.
    Otherwise: every item, in a random order, then "" padding up to k. Items are drawn by
    position, so a text that appears twice in the pool can be drawn twice.

    Args:
      pool: list[str] of candidate sub-captions (callers give at least one; an empty pool
        gives k padding entries).
      k: number of sub-captions, >= 1.
      rng: the draw's generator, e.g. `subcaption_rng(seed, index, epoch)`.

    Returns:
      (texts, mask): texts a list[str] of length k; mask bool [k], True where texts[i] is a
      drawn item and False on padding (padding is always last).

    Raises:
      ValueError: k < 1.
    """
    if k < 1:
        raise ValueError(f"draw_subcaptions: k must be >= 1 sub-captions; got k={k}")
    n = len(pool)
    if n >= k:
        # choice(replace=False) is a random ordered k-permutation: uniform over k-subsets and,
        # given the subset, over its orders.
        picks = rng.choice(n, size=k, replace=False)
    else:
        picks = rng.permutation(n)
    texts = [pool[int(i)] for i in picks] + [""] * (k - len(picks))
    mask = np.arange(k) < len(picks)
    return texts, mask


def subcaption_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    """The generator of example `index`'s sub-caption draw in `epoch`.

    np.random.default_rng([seed, index, epoch, tag]) with a fixed non-zero tag: a function of
    its arguments only (not of the host count, the host's position in its stream, the thread
    or the other ops), and a fresh independent stream for every (seed, index, epoch).
    `index` is the example's position in the split and `epoch` the pass over the data, the
    pipeline's 'index' and 'epoch' source fields (input_pipeline/transforms.py). Costs ~10 us.

    Args:
      seed: the run's seed (config.seed), >= 0.
      index: the example's index in the split, >= 0.
      epoch: the epoch (0 for the first pass), >= 0.

    Returns:
      a new np.random.Generator (PCG64).

    Raises:
      ValueError: a negative argument (SeedSequence takes non-negative integers only).
    """
    values = {"seed": seed, "index": index, "epoch": epoch}
    for name, value in values.items():
        if int(value) < 0:
            raise ValueError(f"subcaption_rng: {name} must be >= 0; got {name}={value}")
    return np.random.default_rng([*(int(v) for v in values.values()), _SUBCAPTION_STREAM])
