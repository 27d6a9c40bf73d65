"""Objectives: model outputs + batch -> (loss, metrics), picked by name from `config.objective`.

Each objective is a class registered with `@register("name")`, built as `cls(config.objective)`
and called as `objective(outputs, batch, rng) -> (scalar loss, {metric name: scalar})` inside the
jitted train step. The trainer only ever calls `get(config.objective.name)`; adding a method
means adding a module here, never a branch in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def get(name: str) -> Any:
    """The objective class registered under `name` (config.objective.name)."""
    if name not in _REGISTRY:
        raise KeyError(
            f"config.objective.name={name!r}: unknown objective; known: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name]


from mlcd.objectives import contrastive, mlcd  # noqa: E402,F401  (register their objectives)
