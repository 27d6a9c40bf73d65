"""Objectives: one module per training method, picked by name from `config.objective.name`.

A method subclasses `Objective` (mlcd/objectives/base.py: its inputs, training-only heads,
forward pass and loss) and registers it with `@OBJECTIVES.register("name")`. Every module of
this package is imported on the first lookup, so adding a method means adding a module here,
never a branch (or an import line) in the trainer.
"""

from __future__ import annotations

import ml_collections

from mlcd.objectives.base import (
    Head,
    Objective,
    head_key,
    loss_weights,
    normal_init,
    npy_init,
)
from mlcd.registry import Registry

OBJECTIVES = Registry("objective", autoload=("mlcd.objectives",))


def build(config: ml_collections.ConfigDict) -> Objective:
    """The objective of a run: OBJECTIVES[config.objective.name](config)."""
    return OBJECTIVES.get(config.objective.name, key="config.objective.name")(config)


__all__ = [
    "OBJECTIVES",
    "Head",
    "Objective",
    "build",
    "head_key",
    "loss_weights",
    "normal_init",
    "npy_init",
]
