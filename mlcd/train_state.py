"""The train state: model config resolution, the parameters (model + the objective's heads),
their shardings, and the abstract and initial state.

    state = {"params":    {**model params, "heads": {name: array}},   # heads only if any
             "opt_state": optax state over all params,
             "step":      int32 scalar,
             "rng":       key data of the step rng}

Every leaf is a global jax.Array placed by its sharding: model parameters by
config.sharding_rules, each head by its own Head.sharding, optimizer moments like their
parameter (so a center row's AdamW moments live on the device that owns the row), step and
rng replicated. Heads sit under params['heads'] so that parameter paths say what is exported
(everything else) and what is training-only ('heads/...').
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from input_pipeline.tokenizers import Tokenizer
from mlcd import models, sharding
from mlcd.models import layers, text, vit
from mlcd.objectives import Objective, head_key

HEADS = "heads"


def resolve_model_config(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer | None
) -> ml_collections.ConfigDict:
    """Fills the model fields that follow from data and tokenizer (resolution, vocabulary), then
    expands each tower's named variant into all of its settings.

    Why the expansion: config.json (and every export made from the run) then records the exact
    architecture, so a later change to a variant's defaults in mlcd/models can never rebuild an
    old checkpoint with a different shape.
    """
    config = ml_collections.ConfigDict(config)  # copy: never edit the caller's config
    with config.unlocked():
        config.model.image.image_size = config.pp.image_size
        config.model.image = {
            "variant": config.model.image.variant,
            **layers.resolve_variant("image", vit.VARIANTS, config.model.image.to_dict()),
        }
        if config.model.get("text") is not None and tokenizer is not None:
            config.model.text.vocab_size = tokenizer.vocab_size
            config.model.text.eos_id = tokenizer.eos_id
            config.model.text.pad_id = tokenizer.pad_id
            config.model.text.context_length = config.pp.context_length
            config.model.text = {
                "variant": config.model.text.variant,
                **layers.resolve_variant("text", text.VARIANTS, config.model.text.to_dict()),
            }
    return config


def model_params(params: dict[str, Any]) -> dict[str, Any]:
    """The model's own parameters (what an export holds): `params` without the heads."""
    return {k: v for k, v in params.items() if k != HEADS}


def abstract_params(
    config: ml_collections.ConfigDict, objective: Objective
) -> tuple[Any, dict[str, Any]]:
    """(graphdef of the model, ShapeDtypeStructs of all params: model and heads)."""
    graphdef, params = models.abstract_model(config.model)
    if HEADS in params:
        raise ValueError(f"a model parameter is named {HEADS!r}, which the objectives' heads use")
    heads = {n: jax.ShapeDtypeStruct(h.shape, jnp.float32) for n, h in objective.heads().items()}
    if heads:
        params[HEADS] = heads
    return graphdef, params


def _head_rules(objective: Objective, field: str) -> tuple[tuple[str, Any], ...]:
    """(regex of 'heads/<name>', Head.<field>) rules, ahead of the config's own rules."""
    return tuple(
        (re.escape(f"{HEADS}/{n}"), getattr(h, field)) for n, h in objective.heads().items()
    )


def param_shardings(
    config: ml_collections.ConfigDict, objective: Objective, params: Any, mesh
) -> Any:
    """NamedShardings of `params`: heads by their own Head.sharding, the model by
    config.sharding_rules."""
    rules = (*_head_rules(objective, "sharding"), *config.sharding_rules)
    return sharding.param_shardings(params, rules, mesh)


def lr_mult_rules(objective: Objective) -> tuple[tuple[str, float], ...]:
    """The heads' learning-rate multipliers as (regex, multiplier) rules for optim."""
    return _head_rules(objective, "lr_mult")


def abstract_state(tx: optax.GradientTransformation, params: Any) -> dict[str, Any]:
    """The train state as ShapeDtypeStructs, allocating nothing."""
    return {
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    }


def state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh
) -> dict[str, Any]:
    """NamedShardings of the train state: optimizer moments take their parameter's sharding;
    everything else (step, rng, optimizer counts) is replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {
        "params": param_shardings,
        "opt_state": optax.tree_map_params(
            tx,
            lambda _, s: s,
            jax.eval_shape(tx.init, params),
            param_shardings,
            transform_non_params=lambda _: replicated,
        ),
        "step": replicated,
        "rng": replicated,
    }


def init_params(
    config: ml_collections.ConfigDict, objective: Objective, shardings: dict[str, Any]
) -> dict[str, Any]:
    """Step-0 params, created directly with `shardings`: the model from nnx.Rngs(config.seed)
    (models.init_params), each head by its Head.init from its own stream head_key(seed, name)."""
    params = models.init_params(config.model, config.seed, model_params(shardings))
    heads = objective.heads()
    if heads:
        params[HEADS] = {
            n: h.init(head_key(config.seed, n), h.shape, shardings[HEADS][n])
            for n, h in heads.items()
        }
    return params


def init_state(
    config: ml_collections.ConfigDict,
    objective: Objective,
    tx: optax.GradientTransformation,
    shardings: dict[str, Any],
) -> dict[str, Any]:
    """The initial train state, every array created directly with `shardings`
    (state_shardings). Call under jax.set_mesh(mesh)."""
    params = init_params(config, objective, shardings["params"])
    return {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "rng": jax.device_put(
            jax.random.key_data(jax.random.key(config.seed + 1)), shardings["rng"]
        ),
    }
