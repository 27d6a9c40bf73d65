"""Flax NNX models, built by name from config.model (MODELS; 'two_tower' when no name is
given): ViT image tower (vit.py), text transformer (text.py), the two-tower wrapper
(two_tower.py). A model keeps all its state in nnx.Param and is exported whole."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from mlcd.registry import Registry

MODELS = Registry("model", autoload=("mlcd.models",))


def build_model(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
    """The model named by model_cfg['name'] (default 'two_tower'), built from model_cfg."""
    name = model_cfg.get("name") or "two_tower"
    return MODELS.get(name, key="config.model.name")(model_cfg, rngs=rngs)


def abstract_model(model_cfg: Mapping[str, Any]) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, abstract params as a pure dict of ShapeDtypeStructs), allocating nothing."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("models must keep all their state in nnx.Param (found other variables)")
    return graphdef, nnx.to_pure_dict(params)


def init_params(model_cfg: Mapping[str, Any], seed: int, shardings: Any) -> Any:
    """The model's parameters for `seed` (nnx.Rngs(seed)), each created directly with its
    sharding from `shardings` (no host ever holds them whole). The values do not depend on
    the shardings: the trainer's step-0 parameters and a --random-init export are equal."""

    def init():
        return nnx.to_pure_dict(nnx.state(build_model(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))

    return jax.jit(init, out_shardings=shardings)()
