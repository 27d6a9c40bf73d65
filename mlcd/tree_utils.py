"""Pytree helpers keyed by '/'-joined parameter paths (e.g. 'image/blocks/0/mlp/fc1/kernel').

Sharding rules, weight-decay masks and learning-rate multipliers are all written as regexes over
these paths, so every one of them goes through the same path spelling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined readable form of a jax key path (DictKey, SequenceKey, GetAttrKey...)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Like jax.tree.map, but `fn(path_string, leaf)`."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def first_match(path: str, rules: Sequence[tuple[str, Any]], what: str) -> Any:
    """Value of the first (regex, value) rule whose regex fully matches `path`."""
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    raise ValueError(f"{what}: no rule matches parameter {path!r}; add a catch-all ('.*', ...)")


def flatten(tree: Any) -> dict[str, Any]:
    """{path string: leaf} of every leaf of `tree`."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path string: shape} of every leaf (arrays, ShapeDtypeStructs or array metadata)."""
    return {path: tuple(x.shape) for path, x in flatten(tree).items()}
