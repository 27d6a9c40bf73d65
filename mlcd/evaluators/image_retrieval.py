"""Image-to-image retrieval mAP (the GPR1200 protocol, as MOFI reports it).

Every image queries all the others, ranked by cosine similarity of the chosen representation
(L2-normalised). A database image is relevant to a query when their labels are equal: a scalar
label (a class), or a label SET given as an int vector padded with -1 (synthetic_scenes
'entity_ids': relevant = the same multiset of entities, i.e. identical sorted vectors); with
relevance='first', only the vector's first entry is compared (synthetic_scenes lists the
largest object first, so: the same largest entity, a looser rule). Images without any label
(all -1) take no part.

Average precision of a query with R relevant images among the ranked others, ties handled as
scikit-learn's `average_precision_score` does (every tie group is one threshold, so the result
does not depend on the dataset's order):
  AP = (1/R) sum over relevant images i of precision@end(i),
  precision@end(i) = (#relevant ranked at or above i's tie group) / (#images at or above it).
A query without any relevant image has no AP and is left out (with synthetic_scenes, a
multi-object scene whose entity set occurs once). mAP = mean AP over the remaining queries.
Metric `image_retrieval/<set>/map`.
"""

from typing import Any

import numpy as np

from mlcd.evaluators import EVALUATORS, common, labelled

# Queries scored per block: bounds the [block, N] temporaries (GPR1200's 12k images: 12k x 1k
# float32 = 48 MiB per array instead of 576 MiB for the whole matrix).
_QUERY_BLOCK = 1024
RELEVANCE = ("set", "first")


def label_groups(labels: np.ndarray) -> np.ndarray:
    """Relevance groups: int64 [N], equal for two examples iff their labels are equal, -1 for an
    example without a label.

    Args:
      labels: int [N] (one class each, -1 = none) or [N, K] (a multiset padded with -1).
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    canonical = np.sort(labels, axis=1)  # set equality = equality of sorted rows (pads sort first)
    _, groups = np.unique(canonical, axis=0, return_inverse=True)
    return np.where((labels >= 0).any(axis=1), groups.reshape(-1), -1)


def average_precisions(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Tie-aware average precision of each query (module docstring).

    Args:
      scores: float [Q, C] query-candidate similarities (finite; exclude a candidate with -inf).
      relevant: bool [Q, C].

    Returns:
      float64 [Q]; NaN for a query without any relevant candidate.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    r = np.take_along_axis(relevant, order, axis=1)
    hits = np.cumsum(r, axis=1)
    c = s.shape[1]
    # end[q, i]: last position of i's tie group = the first group end at or after i.
    is_end = np.ones(s.shape, dtype=bool)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    end = np.minimum.accumulate(np.where(is_end, np.arange(c), c)[:, ::-1], axis=1)[:, ::-1]
    precision = np.take_along_axis(hits, end, axis=1) / (end + 1.0)
    num_relevant = r.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_relevant > 0, (precision * r).sum(axis=1) / num_relevant, np.nan)


def mean_average_precision(
    features: np.ndarray, groups: np.ndarray, where: str = "image retrieval"
) -> float:
    """mAP of every labelled image querying all other labelled images.

    Args:
      features: float [N, D], rows L2-normalised (cosine similarity = dot product).
      groups: int [N] from `label_groups` (-1: unlabelled, not used).

    Raises:
      ValueError: no query has a relevant image.
    """
    keep = groups >= 0
    features, groups = features[keep], groups[keep]
    aps = []
    for start in range(0, len(features), _QUERY_BLOCK):
        q = np.arange(start, min(start + _QUERY_BLOCK, len(features)))
        scores = features[q] @ features.T
        relevant = groups[q, None] == groups[None, :]
        scores[np.arange(len(q)), q] = -np.inf  # the query itself: last, and not relevant
        relevant[np.arange(len(q)), q] = False
        aps.append(average_precisions(scores, relevant))
    aps = np.concatenate(aps)
    if np.isnan(aps).all():
        raise ValueError(f"{where}: no image shares its label with any other image")
    return float(np.nanmean(aps))


@EVALUATORS.register("image_retrieval")
class ImageRetrievalEvaluator:
    """Image-to-image mAP: `image_retrieval/<name>/map`.

    The split is read once, on the first `run`; later runs re-embed it.
    """

    def __init__(
        self,
        builder: Any,
        *,
        dataset: str | None = None,
        data_dir: str | None = None,
        split: str = "test",
        label_key: str | None = None,
        representation: str = "embedding",
        relevance: str = "set",
        max_examples: int | None = None,
        batch_size: int = 256,
        name: str | None = None,
    ):
        """Resolves the dataset now, so a bad name fails at start-up.

        Args:
          builder: the training dataset's tfds builder (used when dataset is None).
          dataset: None (the training dataset), 'digits', or a tfds name prepared in data_dir.
          data_dir: where a tfds `dataset` is prepared.
          split: split to evaluate ('digits' has train / validation / test).
          label_key: the relevance label (default: 'entity_ids' when the dataset has it, as
            synthetic_scenes does, else 'label').
          representation: 'embedding' or 'pre_logits'.
          relevance: 'set' (equal label vectors, as multisets) or 'first' (equal first
            entries of the label vectors).
          max_examples: use only the first N images of the split.
          batch_size: images per embedding call.
          name: metric namespace (default: `split` for the training dataset, the dataset's name
            otherwise).
        """
        who = "image_retrieval evaluator"
        self.representation = common.check_representation(representation, who)
        self.source = labelled.LabelledSource(builder, dataset=dataset, data_dir=data_dir, who=who)
        self.split = split
        if relevance not in RELEVANCE:
            raise ValueError(f"{who}: relevance={relevance!r}; expected one of {RELEVANCE}")
        self.relevance = relevance
        self.label_key = label_key or (
            "entity_ids" if "entity_ids" in self.source.features else "label"
        )
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.name = name or (self.source.name if self.source.external else split)
        self._data: tuple[np.ndarray, np.ndarray] | None = None
        self._images = common.ResizedImages(
            f"image_retrieval evaluator on {self.source.name}/{self.split}"
        )

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, relevance groups int64 [N]), read once."""
        if self._data is None:
            data = self.source.read(self.split, [self.label_key], self.max_examples)
            labels = np.asarray(data[self.label_key]).reshape(len(data["image"]), -1)
            if self.relevance == "first":
                labels = labels[:, :1]
            self._data = (data["image"], label_groups(labels))
        return self._data

    def run(self, encoder: Any) -> dict[str, float]:
        """Embeds the cached images and returns the mAP.

        encoder: see `common` (embed_images with key `representation`, image_size).
        """
        images, groups = self._load()
        z = common.embed_images(
            encoder,
            self._images.get("images", images, encoder),
            (self.representation,),
            self.batch_size,
            f"image_retrieval {self.name}: images",
        )[self.representation]
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        where = f"image_retrieval on {self.source.name}/{self.split} ({self.label_key!r})"
        return {f"image_retrieval/{self.name}/map": mean_average_precision(z, groups, where)}
