"""Evaluators of image(-text) encoders, looked up by their config name.

Usage (trainer, `mlcd.evaluate`):
  cls = evaluators.get(name)                       # 'zeroshot', 'retrieval', 'fewshot', ...
  evaluator = cls(builder=builder, **eval_kwargs)  # reads nothing until the first run
  metrics = evaluator.run(encoder)                 # {'zeroshot/shape/top1': 0.93, ...}
Several evaluators in one round: pass them `SharedEmbeddings(encoder)` (a new one per round)
so that images they share are embedded once.
`builder` is the training dataset's tfds builder; an evaluator on another dataset takes it from
its kwargs (dataset='digits', or a tfds name + data_dir) and ignores `builder`. The encoder
contract (embed_images / embed_texts / image_size) is in `common`.
"""

from mlcd.evaluators.fewshot import FewShotEvaluator
from mlcd.evaluators.grounding import GroundingEvaluator
from mlcd.evaluators.image_retrieval import ImageRetrievalEvaluator
from mlcd.evaluators.linear_probe import LinearProbeEvaluator
from mlcd.evaluators.retrieval import RetrievalEvaluator
from mlcd.evaluators.shared import SharedEmbeddings
from mlcd.evaluators.zero_shot import ZeroShotEvaluator

__all__ = ["SharedEmbeddings", "get"]

_EVALUATORS: dict[str, type] = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "fewshot": FewShotEvaluator,
    "linear_probe": LinearProbeEvaluator,
    "image_retrieval": ImageRetrievalEvaluator,
    "grounding": GroundingEvaluator,
}


def get(name: str) -> type:
    """The evaluator class registered as `name`.

    Raises:
      ValueError: unknown name (the message lists the registered ones).
    """
    try:
        return _EVALUATORS[name]
    except KeyError:
        raise ValueError(f"unknown evaluator {name!r}; known: {sorted(_EVALUATORS)}") from None
