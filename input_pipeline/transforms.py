"""Per-example input transforms ("ops"), composed by name from `config.pp.ops`.

Each op reads and writes named fields of an example dict, big_vision's `pp` registry style:

    config.pp.ops = ("random_resized_crop", "choose_text", "tokenize")
    config.pp.ops = ("random_resized_crop(scale=(0.9, 1.0))", "join_cluster_labels")

An entry is a registered name, optionally called with literal keyword arguments that override
the op's defaults (which come from the config keys each op documents, so one override such as
--config.pp.image_size=128 reaches every op that uses it). The pipeline starts each example
from the dataset's features (raw), with 'image' decoded to uint8 [H, W, 3], 'index' (int, the
example's position in the split) and 'epoch' (int, how many times this host's stream has passed
over its shard before this example: 0 in the first pass) added; the ops run in the listed order;
the batch keeps only the fields the objective declares as its `inputs`. An op that wants draws
tied to the example rather than to the stream (the same whatever the host count) can seed its
own generator from (config.seed, 'index', 'epoch'), e.g. with
input_pipeline.sentences.subcaption_rng.

Randomness: op number j of the list draws from its own stream, a Philox generator keyed by
config.seed with counter (0, 0, j, p), where p is the example's position in this host's
stream (epoch * examples per host + position in the epoch's permutation). So an op's draws
do not depend on what the other ops draw, every epoch draws afresh, and a resumed run (which
restores the position) draws exactly what an uninterrupted one would. Stream 0 is the one
grain's own `random_map` uses.

Methods register their own ops in their objective module (e.g. MLCD's `join_cluster_labels`
in mlcd/objectives/mlcd.py): the registry imports mlcd.objectives on its first lookup.
"""

from __future__ import annotations

import ast
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from input_pipeline import preprocess
from input_pipeline.tokenizers import Tokenizer
from mlcd.registry import Registry

TRANSFORMS = Registry("transform", autoload=("mlcd.objectives",))

# Fields every example has before the first op, besides the dataset's own features.
SOURCE_FIELDS = ("image", "index", "epoch")


@dataclasses.dataclass(frozen=True)
class Context:
    """What an op may consult when it is built (never while it runs)."""

    config: ml_collections.ConfigDict  # the run's resolved config
    dataset: str  # the dataset's name, for messages
    features: tuple[str, ...]  # the dataset's feature names
    tokenizer: Tokenizer | None  # None for image-only models
    # peek(n) -> the first n examples of the training split as the data source gives them
    # (features only, images not decoded), for checks of the data against the config (e.g. a
    # number of sub-captions no example can fill); None where there is no data source.
    peek: Callable[[int], list[dict[str, Any]]] | None = None


class Transform:
    """One op. Subclasses set `reads` / `writes` (or set them in __init__) and implement
    __call__(example, rng) -> {field: value} for exactly the fields in `writes`; `rng` is the
    op's own numpy Generator for this example (see the module docstring)."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    # True: as the first op, it takes 'image' encoded (bytes) and decodes it itself, raising
    # preprocess.UndecodableImageError for bad data (the pipeline then drops the example).
    decodes: bool = False

    def __init__(self, ctx: Context):
        del ctx

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError


def to_str(value: bytes | str | np.ndarray) -> str:
    """A text feature as a Python str (tfds gives bytes, or a 0-d array of them)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """'name' or 'name(key=literal, ...)' -> (name, kwargs)."""
    try:
        node = ast.parse(spec.strip(), mode="eval").body
        if isinstance(node, ast.Name):
            return node.id, {}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            return node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError):
        pass
    raise ValueError(
        f"config.pp.ops: cannot parse {spec!r}; write name or name(key=value, ...) with "
        "literal values"
    )


def build(specs: Sequence[str], ctx: Context, outputs: Sequence[str]) -> list[Transform]:
    """The ops of `specs`, checked as a chain: each op's reads are source fields or written by
    an earlier op, and together they deliver every field of `outputs` (the objective's
    inputs). Errors name config.pp.ops, the op and the field."""
    available = set(SOURCE_FIELDS) | set(ctx.features)
    ops = []
    for position, spec in enumerate(specs):
        name, kwargs = parse(spec)
        cls = TRANSFORMS.get(name, key=f"config.pp.ops[{position}]")
        try:
            op = cls(ctx, **kwargs)
        except TypeError as e:
            raise ValueError(f"config.pp.ops[{position}]={spec!r}: {e}") from None
        missing = [f for f in op.reads if f not in available]
        if missing:
            raise ValueError(
                f"config.pp.ops[{position}]={spec!r} reads {missing}, which neither dataset "
                f"{ctx.dataset} nor an earlier op provides (available: {sorted(available)})"
            )
        available |= set(op.writes)
        ops.append(op)
    missing = [f for f in outputs if f not in available]
    if missing:
        raise ValueError(
            f"the objective needs batch field(s) {missing}, which config.pp.ops={tuple(specs)} "
            f"do not write (available: {sorted(available)})"
        )
    return ops


class _Streams(threading.local):
    """Per-thread Philox generators, reset to (seed, stream, position) for each use: building
    a generator costs far more than resetting its counter (the same trick as grain's)."""

    def __init__(self, seed: int):
        self.generator = np.random.Generator(np.random.Philox(seed))

    def get(self, stream: int, position: int) -> np.random.Generator:
        state = self.generator.bit_generator.state
        state["state"]["counter"] = np.array([0, 0, stream, position], dtype=np.uint64)
        state["buffer"] = np.zeros(4, dtype=np.uint64)
        state["buffer_pos"] = 4
        state["has_uint32"] = 0
        state["uinteger"] = 0
        self.generator.bit_generator.state = state
        return self.generator


class Chain:
    """Applies ops in order, op j with stream j of `seed` at the example's stream position."""

    def __init__(self, ops: Sequence[Transform], seed: int):
        self._ops = list(ops)
        self._streams = _Streams(seed)

    @property
    def decodes(self) -> bool:
        """Whether the first op takes the encoded image (Transform.decodes)."""
        return bool(self._ops) and self._ops[0].decodes

    def __call__(self, example: dict[str, Any], position: int) -> dict[str, Any]:
        for stream, op in enumerate(self._ops):
            example.update(op(example, self._streams.get(stream, position)))
        return example


# ---------------------------------------------------------------------------------------------
# Generic ops: image augmentation, caption choice, tokenization.


@TRANSFORMS.register("random_resized_crop")
class RandomResizedCrop(Transform):
    """Inception-style crop to a square: area fraction ~ U(scale), log aspect ~ U(log 3/4,
    log 4/3) (preprocess.random_resized_crop). Defaults: size config.pp.image_size, scale
    config.pp.crop_scale. As the first op it decodes the image: a JPEG at the DCT scale its
    crop needs."""

    reads = writes = ("image",)
    decodes = True

    def __init__(self, ctx: Context, size: int | None = None, scale: Sequence[float] = ()):
        self.size = int(size or ctx.config.pp.image_size)
        self.scale = tuple(scale or ctx.config.pp.crop_scale)

    def __call__(self, example, rng):
        image = preprocess.random_resized_crop(example["image"], self.size, rng, scale=self.scale)
        return {"image": np.ascontiguousarray(image)}


@TRANSFORMS.register("flip_lr")
class FlipLeftRight(Transform):
    """Horizontal flip with probability 1/2. Leave it out where captions name positions."""

    reads = writes = ("image",)

    def __call__(self, example, rng):
        return {"image": np.ascontiguousarray(preprocess.random_flip(example["image"], rng))}


@TRANSFORMS.register("choose_text")
class ChooseText(Transform):
    """'text' (str): one of the caption fields `keys` (default config.data.text_keys), drawn
    uniformly per example and epoch."""

    writes = ("text",)

    def __init__(self, ctx: Context, keys: Sequence[str] = ()):
        self.keys = tuple(keys or ctx.config.data.text_keys)
        if not self.keys:
            raise ValueError("choose_text: no caption field; set config.data.text_keys")
        for key in self.keys:
            if key not in ctx.features:
                raise ValueError(
                    f"config.data.text_keys: {key!r} is not a feature of {ctx.dataset} "
                    f"(features: {sorted(ctx.features)})"
                )
        self.reads = self.keys

    def __call__(self, example, rng):
        return {"text": to_str(example[self.keys[int(rng.integers(len(self.keys)))]])}


@TRANSFORMS.register("tokenize")
class Tokenize(Transform):
    """int32 [length] field `outkey` (default 'tokens'): BOS + tokens of the str field `inkey`
    (default 'text') + EOS, padded (Tokenizer.encode). Default length:
    config.pp.context_length. Needs the run's tokenizer (a text tower)."""

    def __init__(
        self,
        ctx: Context,
        length: int | None = None,
        inkey: str = "text",
        outkey: str = "tokens",
    ):
        if ctx.tokenizer is None:
            raise ValueError(
                "tokenize: the model has no text tower (config.model.text) and so no tokenizer"
            )
        self.tokenizer = ctx.tokenizer
        self.length = int(length or ctx.config.pp.context_length)
        self.reads, self.writes = (inkey,), (outkey,)

    def __call__(self, example, rng):
        (inkey,), (outkey,) = self.reads, self.writes
        return {outkey: self.tokenizer.encode([example[inkey]], self.length)[0]}
