"""Training input pipeline: tfds data source -> grain -> host batches of uint8 images + tokens.

    source[process_index::process_count]      per-host shard (disjoint examples per host)
      .shuffle(seed).repeat()                 a fresh permutation every epoch
      .random_map(decode, crop, flip)         randomness seeded by (seed, element index)
      -> iter: filter bad examples, batch(host_batch), tokenize

Every random choice is a function of (seed, position in the stream), so the only state needed
to resume exactly is the iterator position, which `get_state()` returns (grain accounts for
elements prefetched but not yet consumed). It goes into each checkpoint.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import preprocess
from input_pipeline.tokenizers import Tokenizer


class _SkipCounter:
    """Thread-safe count of examples dropped because they could not be decoded."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


class _TrainExample(grain.transforms.RandomMap):
    """Decodes and augments one example; returns None (dropped downstream) if undecodable."""

    def __init__(
        self, pp: ml_collections.ConfigDict, text_keys: tuple[str, ...], skipped: _SkipCounter
    ):
        self._size = int(pp.image_size)
        self._scale = tuple(pp.crop_scale)
        self._flip = bool(pp.flip)
        self._text_keys = text_keys
        self._skipped = skipped

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict | None:
        try:
            image = preprocess.decode_image(example["image"])
        except Exception as e:
            logging.warning("skipping example %r: unreadable image (%s)", example.get("id"), e)
            self._skipped.add()
            return None
        image = preprocess.random_resized_crop(image, self._size, rng, scale=self._scale)
        if self._flip:
            image = preprocess.random_flip(image, rng)
        key = self._text_keys[int(rng.integers(len(self._text_keys)))]
        text = example[key]
        return {"image": np.ascontiguousarray(image), "text": _to_str(text)}


def _to_str(text: bytes | str | np.ndarray) -> str:
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class TrainIterator:
    """Infinite iterator over host batches {'image': uint8 [b,S,S,3], 'tokens': int32 [b,L]}.

    `get_state()` / `set_state()` checkpoint the position; `skipped` counts dropped examples.
    """

    def __init__(
        self,
        builder: tfds.core.DatasetBuilder,
        config: ml_collections.ConfigDict,
        tokenizer: Tokenizer,
        *,
        host_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        data = config.data
        if data.split not in builder.info.splits:
            raise ValueError(
                f"config.data.split={data.split!r}: dataset {builder.name} has splits "
                f"{sorted(builder.info.splits)}"
            )
        text_keys = tuple(data.text_keys)
        for key in text_keys:
            if key not in builder.info.features:
                raise ValueError(
                    f"config.data.text_keys: {key!r} is not a feature of {builder.name} "
                    f"(features: {sorted(builder.info.features)})"
                )
        if not text_keys:
            raise ValueError("config.data.text_keys is empty")
        # Raw bytes: we decode ourselves so that a corrupt image drops one example, not the run.
        source = builder.as_data_source(
            split=data.split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        if len(source) < process_count * host_batch_size:
            raise ValueError(
                f"split {data.split!r} of {builder.name} has {len(source)} examples, fewer than "
                f"one global batch ({process_count * host_batch_size})"
            )
        self.skipped_counter = _SkipCounter()
        context_length = int(config.pp.context_length)
        ds = (
            grain.MapDataset.source(source)[process_index::process_count]
            .shuffle(seed=config.seed)
            .repeat(None)
            .random_map(_TrainExample(config.pp, text_keys, self.skipped_counter), seed=config.seed)
        )
        options = grain.ReadOptions(
            num_threads=data.num_threads, prefetch_buffer_size=data.prefetch
        )
        ids = (
            ds.to_iter_dataset(options)
            .batch(host_batch_size, drop_remainder=True)
            .map(
                lambda b: {
                    "image": b["image"],
                    "tokens": tokenizer.encode([str(t) for t in b["text"]], context_length),
                }
            )
        )
        self._it = iter(ids)

    @property
    def skipped(self) -> int:
        return self.skipped_counter.count

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)
