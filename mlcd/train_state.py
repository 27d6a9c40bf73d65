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

import filecmp
import json
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from configs import common as config_lib
from input_pipeline.tokenizers import Tokenizer
from mlcd import models, runs, sharding, tree_utils
from mlcd.models import layers, text, vit
from mlcd.objectives import Objective, head_key

HEADS = "heads"
# The trainer's logger (mlcd/train.py), whose INFO lines the CLI shows.
log = logging.getLogger("mlcd.train")


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


def _subtree(tree: dict[Any, Any], paths: set[str], prefix: str = "") -> dict[Any, Any]:
    """The nested dict `tree` with only its leaves at `paths` (tree_utils.path_str spelling)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            if sub := _subtree(value, paths, path + "/"):
                out[key] = sub
        elif path in paths:
            out[key] = value
    return out


def _differing_model_keys(
    source: ml_collections.ConfigDict, here: ml_collections.ConfigDict, towers: set[str]
) -> list[tuple[str, Any, Any]]:
    """(key, source's value, this run's) of each config.model key whose values differ, such as
    'model.image.width', leaving out the towers ('image', 'text') that are not in `towers`."""
    changed = config_lib.changed_keys(
        {"model": json.loads(source.to_json())}, ml_collections.ConfigDict({"model": here})
    )
    part = lambda key: key.split(".")[1]
    return [c for c in changed if part(c[0]) in towers or part(c[0]) not in ("image", "text")]


def load_init_from(config: ml_collections.ConfigDict, params: dict[str, Any]) -> dict[str, Any]:
    """`params`, the model's freshly initialised parameters, with those of config.init_from (an
    mlcd export, or a training run's latest checkpoint: runs.open_pretrained) in their place,
    read directly onto the same shardings. Parameters whose path config.init_from_skip (a regex,
    e.g. 'text/.*|t') fully matches keep their fresh values. `config` is resolved as the
    trainer resolves it (config.tokenizer names the run's tokenizer file).

    The architecture is this run's config.model, not the source's. Each parameter loaded must
    be in the source with the same shape, and each of the source's parameters must be loaded,
    except skipped ones and the parts (towers, logit scale) this model does not have at all:
    an image-only model started from a two-tower export loads the image tower and ignores the
    rest. Otherwise a ValueError lists the first differing parameters with both shapes and the
    config.model keys that differ. A text tower is loaded only with the tokenizer it was
    trained with (config.tokenizer a file of the same contents). Model settings that change no
    shape (an activation, causal masking) but differ in a loaded tower are logged as a warning.
    """
    what = f"config.init_from={config.init_from!r}"
    skip = config.init_from_skip
    try:
        pattern = re.compile(skip) if skip else None
    except re.error as e:
        raise ValueError(f"config.init_from_skip={skip!r} is not a regex: {e}") from None
    skipped = lambda path: pattern is not None and pattern.fullmatch(path) is not None
    part = lambda path: path.split("/")[0]
    source = runs.open_pretrained(config.init_from, what)

    here = tree_utils.shapes(params)
    to_load = {path for path in here if not skipped(path)}
    # A source parameter in a part (tower, logit scale) this model has is never dropped
    # unnoticed: a source tower deeper than this model's is a mismatch, not a partial load.
    parts = {part(path) for path in here}
    compared = to_load | {p for p in source.shapes if part(p) in parts and not skipped(p)}
    differ = [
        f"{path}: {source.shapes.get(path, 'absent')} there, {here.get(path, 'absent')} here"
        for path in sorted(compared)
        if source.shapes.get(path) != here.get(path)
    ]
    loaded_parts = {part(path) for path in to_load}
    keys = _differing_model_keys(source.model, config.model, loaded_parts)
    describe = lambda items: "; ".join(
        f"config.{key} ({there!r} there, {now!r} here)" for key, there, now in items
    )
    if differ:
        raise ValueError(
            f"{what}: {len(differ)} parameters differ from this run's model (whose architecture "
            f"is this run's config.model): {'; '.join(differ[:3])}"
            + (f". Keys that differ: {describe(keys[:5])}" if keys else "")
            + ". Make this run's model the source's, or keep those parameters freshly "
            "initialised with config.init_from_skip (a regex of parameter paths)"
        )
    if (
        "text" in loaded_parts
        and source.tokenizer
        and not filecmp.cmp(source.tokenizer, config.tokenizer, shallow=False)
    ):
        raise ValueError(
            f"{what}: its text tower was trained with the tokenizer {source.tokenizer}, not "
            f"with config.tokenizer={config.tokenizer!r} (another file); train with "
            f"--config.tokenizer={source.tokenizer}"
        )
    unlike = [k for k in keys if k[0].split(".")[1] in loaded_parts]
    if unlike:
        log.warning(
            "%s: the towers loaded were trained with other settings: %s",
            what,
            describe(unlike),
        )

    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        _subtree(params, to_load),
    )
    restored = runs.restore_pretrained(source, target)
    loaded = tree_utils.flatten(restored)
    log.info(
        "initialised towers from %s (step %d): %s loaded; %d parameters kept fresh "
        "(config.init_from_skip); not in this model, ignored: %s",
        source.path,
        source.step,
        ", ".join(sorted(loaded_parts)),
        len(here) - len(loaded),
        ", ".join(sorted({part(path) for path in source.shapes} - parts)) or "nothing",
    )
    return tree_utils.map_with_path(lambda path, x: loaded.get(path, x), params)


def init_params(
    config: ml_collections.ConfigDict, objective: Objective, shardings: dict[str, Any]
) -> dict[str, Any]:
    """Step-0 params, created directly with `shardings`: the model from nnx.Rngs(config.seed)
    (models.init_params), or, with config.init_from, loaded from there (load_init_from); each
    head by its Head.init from its own stream head_key(seed, name), so heads start the same
    with or without init_from."""
    params = models.init_params(config.model, config.seed, model_params(shardings))
    if config.init_from:
        params = load_init_from(config, params)
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
    (state_shardings): the params of init_params (so config.init_from applies), a fresh
    optimizer state, step 0. Call under jax.set_mesh(mesh)."""
    params = init_params(config, objective, shardings["params"])
    return {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "rng": jax.device_put(
            jax.random.key_data(jax.random.key(config.seed + 1)), shardings["rng"]
        ),
    }
