"""The method contract: everything a training method (CLIP, SigLIP, MLCD, ...) supplies.

A method is one `Objective` subclass, registered by name, plus any input transforms it needs
(registered in the same module, listed in its config's `pp.ops`). The trainer, the model and
the input pipeline never name a method; they only call what is declared here:

    objective = objectives.build(config)      # OBJECTIVES.get(config.objective.name)(config)
    objective.inputs                          # batch fields the pipeline must deliver
    objective.abstract_batch(batch_size)      # their shapes (to build the step from shapes)
    objective.heads()                         # {name: Head}: training-only parameters
    out = objective.forward(model, batch)     # runs the towers on the batch
    loss, metrics = objective.loss(out, heads, batch, rng)
    objective.per_example                     # loss = mean of per-example terms?

Heads live in the train state at params['heads'][name], next to the model's own parameters;
they are optimised and checkpointed with them, and an export (which keeps only the model)
never holds them. docs/architecture.md has a worked example of a method.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import preprocess

Sharding = jax.sharding.Sharding
# (rng key, shape, sharding) -> float32 array of `shape` placed with `sharding`.
HeadInit = Callable[[jax.Array, tuple[int, ...], Sharding], jax.Array]


@dataclasses.dataclass(frozen=True)
class Head:
    """A training-only parameter array of a method (MLCD's class centers, MOFI's entity
    classifier, a learnable scale of a loss).

    Attributes:
      shape: the array's shape, e.g. (C, E) for C class centers of the embedding dimension E.
      init: (key, shape, sharding) -> the initial array, created directly with `sharding`
        (no host holds a 1M x 768 matrix whole): `normal_init(stddev)`, `npy_init(path, key)`
        or a function of the same signature. `key` is the head's own rng stream
        (`head_key`), so adding or removing a head changes no other parameter's values.
      sharding: its layout, in the language of config.sharding_rules: 'replicate', 'fsdp',
        'partial_fc' (dim 0 split over every mesh axis: each device holds C / N rows and their
        optimizer moments) or a tuple of mesh-axis names per dimension.
      lr_mult: learning-rate multiplier of this head (Partial FC trains class centers as
        their own group). Rules of config.optim.lr_mults apply to the model only.
    """

    shape: tuple[int, ...]
    init: HeadInit
    sharding: Any = "replicate"
    lr_mult: float = 1.0


def head_key(seed: int, name: str) -> jax.Array:
    """The rng stream of head `name`: key(seed) folded with a CRC-32 of the name."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def normal_init(stddev: float) -> HeadInit:
    """Initialiser drawing N(0, stddev^2) float32 values, created sharded."""

    def init(key: jax.Array, shape: tuple[int, ...], sharding: Sharding) -> jax.Array:
        draw = lambda: stddev * jax.random.normal(key, shape, jnp.float32)
        return jax.jit(draw, out_shardings=sharding)()

    return init


def npy_init(path: str, config_key: str) -> HeadInit:
    """Initialiser reading the float32 array from a .npy file (e.g. the centroids.npy of
    python -m mlcd.cluster). `config_key` names the setting in errors.

    The file is memory-mapped and each process reads only the rows its devices hold: 1M x 768
    float32 centers are 3 GB, which no host needs whole. Values are used as stored.
    """

    def init(key: jax.Array, shape: tuple[int, ...], sharding: Sharding) -> jax.Array:
        del key
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{config_key}={path!r}: no such file")
        data = np.load(path, mmap_mode="r")
        if data.shape != tuple(shape):
            raise ValueError(
                f"{config_key}={path!r} holds an array of shape {data.shape}, but the head is "
                f"{tuple(shape)}"
            )
        return jax.make_array_from_callback(
            tuple(shape), sharding, lambda index: np.asarray(data[index], np.float32)
        )

    return init


def loss_weights(cfg: ml_collections.ConfigDict, terms: tuple[str, ...]) -> dict[str, float]:
    """{term: weight} from config.objective.w_<term> (missing: 0), checked: every weight >= 0
    and not all 0 (ValueError naming the key). For methods whose loss is a weighted sum of
    terms that a zero weight turns off (MOFI, DreamLIP)."""
    weights = {k: float(cfg.get(f"w_{k}", 0.0)) for k in terms}
    bad = {k: w for k, w in weights.items() if not w >= 0.0}
    if bad:
        raise ValueError(f"config.objective.w_{next(iter(bad))} must be >= 0; got {bad}")
    if not any(weights.values()):
        names = ", ".join(f"w_{k}" for k in terms[:-1]) + f" and w_{terms[-1]}"
        raise ValueError(f"config.objective: {names} are all 0: nothing to train")
    return weights


class Objective(abc.ABC):
    """A training method. Subclasses set `inputs` and `per_example`, override `loss`, and
    `heads` / `forward` where the defaults do not fit.

    Constructed once per run as `cls(config)` with the whole resolved run config; a method
    reads its own settings from config.objective (and documents anything else it reads, e.g.
    config.model.embed_dim). Raise ValueError naming the config key for a bad setting here,
    before anything is compiled.
    """

    # Fields of the batch that forward and loss read; the input pipeline delivers exactly
    # these (its config.pp.ops must write them) and the trainer shards them over the devices.
    inputs: tuple[str, ...] = ("image", "tokens")

    # True when the loss is a mean of per-example terms given the step's rng: gradient
    # accumulation over microbatches (config.microbatches) then gives the full batch's
    # gradient. False for in-batch contrastive losses, where a slice would see fewer negatives.
    per_example: bool = False

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def heads(self) -> dict[str, Head]:
        """The training-only parameters, by name (params['heads'][name]); none by default."""
        return {}

    def forward(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """Runs the towers on the batch; by default the model on uint8 images (normalised
        here) and, when the batch has them, tokens [B, L]: see TwoTower.__call__ for the
        output dict."""
        return model(preprocess.normalize_images(batch["image"]), batch.get("tokens"))

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shape and dtype of each input field for a batch of `batch_size`, so the step can
        be built and compiled from shapes alone (bench/dry_run.py). Handles 'image' (uint8
        [B, S, S, 3], S = config.pp.image_size) and 'tokens' (int32 [B, L], L =
        config.pp.context_length); a method with other inputs adds its own."""
        size, length = self.config.pp.image_size, self.config.pp.context_length
        known = {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
            "tokens": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
        }
        return {k: known[k] for k in self.inputs if k in known}

    @abc.abstractmethod
    def loss(
        self,
        out: dict[str, Any],
        heads: dict[str, jax.Array],
        batch: dict[str, jax.Array],
        rng: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, {metric name: scalar}) from forward's output, the heads' current
        values, the batch and the step's rng. Metrics are logged as train/<name>."""
