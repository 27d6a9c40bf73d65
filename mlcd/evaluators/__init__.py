"""Evaluators of image(-text) embeddings, looked up by their config name.

Usage (trainer, `mlcd.evaluate`):
  cls = evaluators.get(name)                       # 'zeroshot', 'retrieval'
  evaluator = cls(builder=builder, **eval_kwargs)  # reads nothing until the first run
  metrics = evaluator.run(embed_images, embed_texts)  # {'zeroshot/shape/top1': 0.93, ...}
with embed_images(uint8 [B, R, R, 3]) -> float32 [B, E] and embed_texts(list[str]) ->
float32 [B, E], rows L2-normalised.
"""

from mlcd.evaluators.retrieval import RetrievalEvaluator
from mlcd.evaluators.zero_shot import ZeroShotEvaluator

_EVALUATORS: dict[str, type] = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
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
