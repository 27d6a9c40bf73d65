"""Image-text retrieval: Recall@k in both directions from one image-caption similarity matrix.

With N images, T >= N captions and t2i[t] the image of caption t, S = zimg @ ztxt.T is [N, T].
  image -> text (i2t): query image i hits at k if ANY of its captions is among the k best columns
    of row i;
  text -> image (t2i): query caption t hits at k if image t2i[t] is among the k best rows of
    column t.
R@k is the fraction of queries that hit (CLIP / COCO-Karpathy protocol). Ties between a correct
and a wrong candidate count against the query (`common.best_positive_rank`), so the result never
depends on the dataset's order and a collapsed encoder (all scores equal) gets R@k ~ 0, not a
lucky 1/N.

Sentence-level retrieval (`sentences=True`, DreamLIP's fine-grained protocol): the captions are
split into sentences (`input_pipeline.sentences.split_sentences`) and the queries are the T
DISTINCT sentence texts. A sentence that occurs in several images' captions ("the background is
dark.") is one query whose correct answers are all of those images: [N, T] bool positive[i, t]
= sentence t occurs in a caption of image i. Then
  i2t: image i hits at k if ANY of its sentences is among the k best sentences;
  t2i: sentence t hits at k if ANY of its images is among the k best images.
Counting only one of the images as correct would cap t2i R@1 far below 1 for a perfect model.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from input_pipeline.sentences import split_sentences
from mlcd.evaluators import EVALUATORS, common


def retrieval_ranks(sim: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the best correct answer for every image query and every text query.

    Args:
      sim: float [N, T] similarities, image i against caption t (any monotone score works).
      text_to_image: int [T] in [0, N), the image each caption describes; every image needs at
        least one caption.

    Returns:
      (i2t [N], t2i [T]) int64 ranks, 0 = a correct answer scored strictly above every wrong
      one. Memory: a few [N, T] temporaries (COCO 5k x 25k: ~0.6 GB).

    Raises:
      ValueError: shapes disagree, an index is out of range, or an image has no caption.
    """
    sim = np.asarray(sim)
    text_to_image = np.asarray(text_to_image)
    n, t = sim.shape
    if text_to_image.shape != (t,):
        raise ValueError(
            f"text_to_image must be [{t}] for sim {sim.shape}; got {text_to_image.shape}"
        )
    if t and (text_to_image.min() < 0 or text_to_image.max() >= n):
        raise ValueError(f"text_to_image values must lie in [0, {n})")
    positive = (
        text_to_image[None, :] == np.arange(n)[:, None]
    )  # [N, T]: caption t describes image i
    return positive_ranks(sim, positive)


def positive_ranks(sim: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`retrieval_ranks` where a text may describe several images.

    Args:
      sim: float [N, T] similarities, image i against text t.
      positive: bool [N, T], True where text t describes image i (a correct answer both ways);
        every image needs at least one text and every text at least one image.

    Returns:
      (i2t [N], t2i [T]) int64 ranks of the best correct answer (`common.best_positive_rank`).

    Raises:
      ValueError: shapes disagree, an image has no text or a text no image.
    """
    sim = np.asarray(sim)
    positive = np.asarray(positive, dtype=bool)
    if positive.shape != sim.shape:
        raise ValueError(f"positive must be {sim.shape} like sim; got {positive.shape}")
    if not positive.any(axis=1).all():
        raise ValueError(f"image {int(np.argmin(positive.any(axis=1)))} has no caption")
    if not positive.any(axis=0).all():
        raise ValueError(f"text {int(np.argmin(positive.any(axis=0)))} describes no image")
    i2t = common.best_positive_rank(sim, positive)
    t2i = common.best_positive_rank(sim.T, positive.T)
    return i2t, t2i


def recalls_from_ranks(
    i2t: np.ndarray, t2i: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways from the ranks of `retrieval_ranks` / `positive_ranks`:
    {'i2t_r{k}': ..., 't2i_r{k}': ...}."""
    out = {f"i2t_r{k}": r for k, r in common.recall_at_k(i2t, ks).items()}
    out.update({f"t2i_r{k}": r for k, r in common.recall_at_k(t2i, ks).items()})
    return out


def retrieval_recalls(
    sim: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways: {'i2t_r{k}': ..., 't2i_r{k}': ...} (see `retrieval_ranks`)."""
    return recalls_from_ranks(*retrieval_ranks(sim, text_to_image), ks)


def flatten_captions(
    columns: Mapping[str, np.ndarray], keys: Sequence[str], where: str
) -> tuple[list[str], np.ndarray]:
    """All captions of every image, in image order, with the image each belongs to.

    Args:
      columns: {key: [N] bytes/str (one caption per image) or [N, K] (K captions per image)}.
      keys: caption features to use, in this order within each image.
      where: names the dataset/split in error messages.

    Returns:
      (captions: list[str] of length T, text_to_image: int64 [T]). Empty strings (padding of
      variable-length caption lists) are dropped.

    Raises:
      ValueError: an image ends up without any caption.
    """
    n = len(columns[keys[0]])
    per_key = [np.asarray(columns[k]).reshape(n, -1) for k in keys]
    captions, owners = [], []
    for i in range(n):
        texts = [
            c.decode("utf-8") if isinstance(c, bytes) else str(c) for col in per_key for c in col[i]
        ]
        texts = [c for c in texts if c]
        if not texts:
            raise ValueError(f"{where}: example {i} has no caption under {list(keys)}")
        captions.extend(texts)
        owners.extend([i] * len(texts))
    return captions, np.asarray(owners, dtype=np.int64)


def sentence_queries(
    captions: Sequence[str], text_to_image: np.ndarray, num_images: int, where: str
) -> tuple[list[str], np.ndarray]:
    """The distinct sentences of the captions and the images each occurs in.

    Args:
      captions: T captions (str), e.g. from `flatten_captions`.
      text_to_image: int [T] in [0, num_images), the image of each caption.
      num_images: N.
      where: names the dataset/split in error messages.

    Returns:
      (sentences: list[str] of S distinct sentences in order of first occurrence,
       positive: bool [N, S], True where sentence s occurs in a caption of image i).

    Raises:
      ValueError: an image's captions hold no sentence (e.g. only whitespace).
    """
    column: dict[str, int] = {}  # sentence -> its query index
    pairs = []  # (image, query) for every occurrence
    for caption, image in zip(captions, np.asarray(text_to_image).tolist(), strict=True):
        for sentence in split_sentences(caption):
            pairs.append((image, column.setdefault(sentence, len(column))))
    positive = np.zeros((num_images, len(column)), dtype=bool)
    if pairs:
        positive[tuple(np.asarray(pairs).T)] = True
    empty = ~positive.any(axis=1)
    if empty.any():
        raise ValueError(f"{where}: example {int(np.argmax(empty))} has no sentence")
    return list(column), positive


@EVALUATORS.register("retrieval")
class RetrievalEvaluator:
    """Image-text Recall@k both ways: `retrieval/<name>/{i2t,t2i}_r{k}`, name defaulting to split.

    The queries are the captions, or with `sentences=True` their distinct sentences (see the
    module docstring). The split's images and captions are read once, on the first `run`; later
    runs re-embed them.
    """

    def __init__(
        self,
        builder: Any,
        *,
        split: str = "test",
        caption_key: str | Sequence[str] = "long_caption",
        batch_size: int = 256,
        max_examples: int | None = None,
        ks: Sequence[int] = (1, 5, 10),
        name: str | None = None,
        sentences: bool = False,
    ):
        """Stores the settings; the split is read on the first `run`.

        Args:
          builder: a prepared tfds builder (`as_data_source`, `name`).
          split: split to evaluate on.
          caption_key: caption feature, or several (e.g. ('long_caption', 'short_caption')); a
            feature may also hold several captions per image ([K] bytes, '' = padding). Every
            caption is a separate text query and a correct answer for its image.
          batch_size: images / captions per embedding call.
          max_examples: use only the first N images of the split.
          ks: the k of Recall@k.
          name: metric namespace (default: `split`), to tell apart two retrieval evaluations.
          sentences: split the captions into sentences and retrieve with the distinct
            sentences as the texts; a sentence is correct for every image whose captions hold
            it (module docstring).
        """
        self.builder = builder
        self.split = split
        self.caption_keys = [caption_key] if isinstance(caption_key, str) else list(caption_key)
        if not self.caption_keys:
            raise ValueError("retrieval evaluator needs at least one caption_key")
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.ks = tuple(ks)
        self.name = name or split
        self.sentences = bool(sentences)
        self._cache: tuple[np.ndarray, list[str], np.ndarray] | None = None
        # Images of a converted web dataset vary in size: resized once per encoder resolution.
        self._images = common.ResizedImages(f"retrieval on {builder.name}/{split}")
        self._sentence_cache: tuple[list[str], np.ndarray] | None = None

    def _load(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(images uint8 [N, R, R, 3], or an object array [N] of images of varying sizes,
        captions list[str] [T], text_to_image int [T]), read once."""
        if self._cache is None:
            data = common.read_split(
                self.builder,
                self.split,
                ["image", *self.caption_keys],
                max_examples=self.max_examples,
                desc=f"retrieval {self.split}: reading",
            )
            where = f"retrieval on {self.builder.name}/{self.split}"
            captions, text_to_image = flatten_captions(data, self.caption_keys, where)
            images = data["image"]
            if images.dtype != object:  # one size: RGB now; varying sizes: per encoder (run)
                images = common.as_rgb(images, where=where)
            self._cache = (images, captions, text_to_image)
        return self._cache

    def _load_sentences(self) -> tuple[list[str], np.ndarray]:
        """(sentences list[str] [S], positive bool [N, S]) of the cached captions, built once
        (`sentence_queries`)."""
        if self._sentence_cache is None:
            images, captions, text_to_image = self._load()
            where = f"retrieval on {self.builder.name}/{self.split} (sentences)"
            self._sentence_cache = sentence_queries(captions, text_to_image, len(images), where)
        return self._sentence_cache

    def run(self, encoder: Any) -> dict[str, float]:
        """Embeds the cached images and texts (captions or sentences) and returns the recalls.

        encoder: see `common` (embed_images with key 'embedding', embed_texts).
        """
        images, texts, text_to_image = self._load()
        if images.dtype == object:
            images = self._images.get("images", images, encoder)
        if self.sentences:
            texts, positive = self._load_sentences()
        zimg = common.embed_images(
            encoder, images, ("embedding",), self.batch_size, f"retrieval {self.name}: images"
        )["embedding"]
        ztxt = common.embed_texts(encoder, texts, self.batch_size, f"retrieval {self.name}: texts")
        sim = zimg @ ztxt.T
        if self.sentences:
            recalls = recalls_from_ranks(*positive_ranks(sim, positive), self.ks)
        else:
            recalls = retrieval_recalls(sim, text_to_image, self.ks)
        return {f"retrieval/{self.name}/{k}": v for k, v in recalls.items()}
