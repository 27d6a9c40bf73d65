"""Training input pipeline: tfds data source -> grain -> host batches of uint8 images + tokens
(+ cluster labels).

    source.map_with_index(...)                each example gets its index in the split
      .slice(process_index::process_count)    per-host shard (disjoint examples per host)
      .shuffle(seed).repeat()                 a fresh permutation every epoch
      .random_map(decode, crop, flip)         randomness seeded by (seed, element index)
      -> iter: filter bad examples, batch(host_batch), tokenize, join labels by index

Every random choice is a function of (seed, position in the stream), so the only state needed
to resume exactly is the iterator position, which `get_state()` returns (grain accounts for
elements prefetched but not yet consumed). It goes into each checkpoint.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import preprocess
from input_pipeline.labels import ClusterLabels
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
        self,
        pp: ml_collections.ConfigDict,
        text_keys: tuple[str, ...],
        skipped: _SkipCounter,
        keep_index: bool,
    ):
        self._size = int(pp.image_size)
        self._scale = tuple(pp.crop_scale)
        self._flip = bool(pp.flip)
        self._text_keys = text_keys
        self._skipped = skipped
        self._keep_index = keep_index

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
        out = {"image": np.ascontiguousarray(image)}
        if self._text_keys:
            key = self._text_keys[int(rng.integers(len(self._text_keys)))]
            out["text"] = _to_str(example[key])
        if self._keep_index:  # the cluster-label join: row `index`, checked against `id`
            out["index"] = example["index"]
            out["id"] = _to_str(example["id"])
        return out


def _with_index(num_examples: int, index: int, example: dict[str, Any]) -> dict[str, Any]:
    """The example with its index in the split (its row in the cluster labels). grain passes
    the element's position in the stream, epoch * num_examples + i after .repeat(), and the
    source reads source[index % num_examples]: so does this."""
    return {**example, "index": index % num_examples}


def _to_str(text: bytes | str | np.ndarray) -> str:
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class TrainIterator:
    """Infinite iterator over host batches {'image': uint8 [b,S,S,3], 'tokens': int32 [b,L]
    (unless config.data.text_keys is empty: image-only models), 'cluster_labels': int32
    [b, l] (when config.data.labels names a cluster output; -1 pads)}.

    `get_state()` / `set_state()` checkpoint the position; `skipped` counts dropped examples.
    """

    def __init__(
        self,
        builder: tfds.core.DatasetBuilder,
        config: ml_collections.ConfigDict,
        tokenizer: Tokenizer | None,
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
        if text_keys and tokenizer is None:
            raise ValueError(
                f"config.data.text_keys={text_keys}: the model has no text tower to read them; "
                "set config.data.text_keys=()"
            )
        labels = None
        if data.get("labels"):
            if "id" not in builder.info.features:
                raise ValueError(
                    f"config.data.labels: dataset {builder.name} has no 'id' feature to join "
                    "cluster labels on"
                )
            if not config.model.get("num_centers"):
                raise ValueError("config.data.labels is set but config.model.num_centers is not")
            labels = ClusterLabels(data.labels, config.model.num_centers, data.get("top_l"))
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
            grain.MapDataset.source(source)
            # Before the per-host slice: the index in the split, not in this host's shard.
            .map_with_index(functools.partial(_with_index, len(source)))
            .slice(slice(process_index, None, process_count))
            .shuffle(seed=config.seed)
            .repeat(None)
            .random_map(
                _TrainExample(config.pp, text_keys, self.skipped_counter, labels is not None),
                seed=config.seed,
            )
        )
        options = grain.ReadOptions(
            num_threads=data.num_threads, prefetch_buffer_size=data.prefetch
        )

        def finish(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = {"image": b["image"]}
            if text_keys:
                out["tokens"] = tokenizer.encode([str(t) for t in b["text"]], context_length)
            if labels is not None:
                out["cluster_labels"] = labels.labels_for(b["index"], b["id"])
            return out

        batches = ds.to_iter_dataset(options).batch(host_batch_size, drop_remainder=True)
        self._it = iter(batches.map(finish))

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
