"""Evaluators of image(-text) encoders, picked by name (EVALUATORS) from config.evals.

Usage (the trainer and `mlcd.evaluate` alike):
  evaluator, every = evaluators.build(name, config.evals[name], builder=builder, ...)
  metrics = evaluator.run(encoder)                 # {'zeroshot/shape/top1': 0.93, ...}
Several evaluators in one round: pass them `SharedEmbeddings(encoder)` (a new one per round)
so that images they share are embedded once.
`builder` is the training dataset's tfds builder; an evaluator on another dataset takes it from
its kwargs (dataset='digits', or a tfds name + data_dir) and ignores `builder`. The encoder
contract (embed_images / embed_texts / image_size) is in `common`. Each evaluator module
registers its class with `@EVALUATORS.register(type)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from mlcd.evaluators.shared import SharedEmbeddings
from mlcd.registry import Registry

EVALUATORS = Registry("evaluator", autoload=("mlcd.evaluators",))

__all__ = ["EVALUATORS", "SharedEmbeddings", "build"]


def build(
    name: str, entry: Mapping[str, Any], *, builder: Any, out_dir: str | None, default_every: int
) -> tuple[Any, int]:
    """(evaluator, every) of a config.evals entry {type (default: name), every, **kwargs}.

    every: evaluate each `every` steps (default `default_every`, i.e. config.eval_every); 0 =
    only after the last step; < 0 = never (the trainer skips the entry). Evaluators that write
    files (an `out_dir` argument) write them under `out_dir` (None: nothing written).
    """
    kwargs = dict(entry)
    cls = EVALUATORS.get(kwargs.pop("type", name), key=f"config.evals.{name}.type")
    every = int(kwargs.pop("every", default_every))
    if "out_dir" in inspect.signature(cls).parameters:
        kwargs["out_dir"] = out_dir
    return cls(builder=builder, **kwargs), every
