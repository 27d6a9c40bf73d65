"""Stand-ins shared by the evaluator tests: an in-memory tfds builder and a numpy encoder."""

import types
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds


class FakeBuilder:
    """The parts of a prepared tfds builder the evaluators use; counts data-source opens."""

    def __init__(self, name, splits, features):
        self.name = name
        self.info = types.SimpleNamespace(
            features=tfds.features.FeaturesDict(features), splits=dict.fromkeys(splits)
        )
        self._splits = splits
        self.opens = 0

    def as_data_source(self, split):
        self.opens += 1
        return self._splits[split]


class FakeEncoder:
    """The encoder contract of `mlcd.evaluators.common` over numpy functions.

    image_fns: {output key: fn(uint8 [N, H, W, 3]) -> array}, or one fn for 'embedding'; a key
    without a function is simply not returned. Every call's keys and input shape are recorded.
    """

    def __init__(
        self,
        image_fns: Callable | dict[str, Callable] | None = None,
        text_fn: Callable | None = None,
        image_size: int = 4,
    ):
        self.image_fns = image_fns if isinstance(image_fns, dict) else {"embedding": image_fns}
        self.text_fn = text_fn
        self.image_size = image_size
        self.image_calls: list[tuple[tuple[str, ...], tuple[int, ...]]] = []

    def embed_images(self, images, keys=("embedding",)):
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        self.image_calls.append((tuple(keys), images.shape))
        return {k: self.image_fns[k](images) for k in keys if k in self.image_fns}

    def embed_texts(self, texts):
        assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        return {"embedding": self.text_fn(texts)}


def unit(x):
    """Rows (last axis) L2-normalised, float32."""
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_embed(seed, dim=16):
    """fn(inputs) -> fresh random unit vectors, one per input (ignores the inputs)."""
    rng = np.random.default_rng(seed)
    return lambda x: unit(rng.normal(size=(len(x), dim)))
