"""Training input pipeline: tfds data source -> grain -> host batches of the objective's inputs.

    source.map_with_index(...)                each example gets 'index', its position in the split
      .slice(process_index::process_count)    per-host shard (disjoint examples per host)
      .shuffle(seed).repeat()                 a fresh permutation every epoch
      .map_with_index(decode, ops)            decode 'image' (unless the first op decodes it:
                                              random_resized_crop, a JPEG at its crop's scale),
                                              add 'epoch' (passes over this host's shard before
                                              this example); config.pp.ops (transforms.py), each
                                              op seeded by (seed, op, position in the stream)
      -> iter: drop unreadable records and undecodable images (counted as they are consumed,
         at most config.data.max_skipped), keep the objective's input fields, batch(host_batch)

Every random choice is a function of (seed, op, position in the stream), so the state needed to
resume exactly is the iterator position (grain accounts for elements prefetched but not yet
consumed) and the count of examples dropped so far, which `get_state()` returns. It goes into
each checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import preprocess, transforms
from input_pipeline.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class _Dropped:
    """Stands in the stream for an example that could not be read or decoded (`what` says
    which), so it is counted when it is consumed, in stream order, not when a prefetch thread
    meets it: the count is then a function of the checkpointed position."""

    what: str


class _SkipCounter:
    """Count of dropped examples among those consumed (a filter on the consuming thread); past
    `limit` the run stops (config.data.max_skipped)."""

    def __init__(self, limit: int):
        self.count = 0
        self.limit = limit

    def keep(self, element: dict[str, Any] | _Dropped) -> bool:
        """False (and counted) for a dropped example; ValueError naming it past the limit."""
        if not isinstance(element, _Dropped):
            return True
        self.count += 1
        if self.count > self.limit:
            raise ValueError(
                f"{self.count} examples could not be read or decoded, more than "
                f"config.data.max_skipped={self.limit}; the last: {element.what}"
            )
        return False


class _SkippingSource:
    """The split's data source, where a record that cannot be read (a corrupted shard: e.g.
    a Riegeli chunk hash mismatch) reads as _Dropped, dropped and counted like an undecodable
    image. Corruption is static, so a resumed run drops exactly the same records."""

    def __init__(self, source, where: str):
        self._source = source
        self._where = where

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any] | _Dropped:
        try:
            return self._source[index]
        except Exception as e:
            what = f"record {index} of {self._where}: {str(e).splitlines()[0] if str(e) else e!r}"
            logging.warning("skipping unreadable %s", what)
            return _Dropped(what)


class _Example:
    """Decodes one example's image, adds its 'epoch' and runs the ops; _Dropped (counted and
    dropped downstream) if the image cannot be decoded. Returns only the `fields` the batch
    keeps."""

    def __init__(self, chain: transforms.Chain, fields: Sequence[str], shard_size: int):
        """shard_size: examples in this host's shard, the length of one pass of the stream."""
        self._chain = chain
        self._fields = tuple(fields)
        self._shard_size = shard_size

    def __call__(self, position: int, example: dict[str, Any] | _Dropped) -> Any:
        if isinstance(example, _Dropped):  # an unreadable record (_SkippingSource)
            return example
        # The stream is the shard repeated: position = epoch * shard_size + i (grain's repeat).
        epoch = position // self._shard_size
        try:
            image = example["image"]
            if not self._chain.decodes:  # else the first op decodes (a JPEG at its crop's scale)
                image = preprocess.decode_image(image)
            example = self._chain({**example, "image": image, "epoch": epoch}, position)
        except preprocess.UndecodableImageError as e:
            logging.warning("skipping example %r: unreadable image (%s)", example.get("id"), e)
            return _Dropped(f"example {example.get('id')!r}: unreadable image ({e})")
        return {k: example[k] for k in self._fields}


def _with_index(num_examples: int, index: int, example: dict[str, Any]) -> dict[str, Any]:
    """The example with its index in the split (e.g. its row in a label store). grain passes
    the element's position in the stream, epoch * num_examples + i after .repeat(), and the
    source reads source[index % num_examples]: so does this."""
    return example if isinstance(example, _Dropped) else {**example, "index": index % num_examples}


class TrainIterator:
    """Infinite iterator over host batches {field: array [b, ...]} of the objective's input
    fields (e.g. 'image' uint8 [b, S, S, 3] and 'tokens' int32 [b, L]), built by config.pp.ops.

    `get_state()` / `set_state()` checkpoint the position and `skipped`, the number of dropped
    examples consumed so far.
    """

    def __init__(
        self,
        builder: tfds.core.DatasetBuilder,
        config: ml_collections.ConfigDict,
        tokenizer: Tokenizer | None,
        *,
        fields: Sequence[str],
        host_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        """fields: the batch fields to deliver (the objective's `inputs`)."""
        data = config.data
        if data.split not in builder.info.splits:
            raise ValueError(
                f"config.data.split={data.split!r}: dataset {builder.name} has splits "
                f"{sorted(builder.info.splits)}"
            )
        # Raw bytes: we decode ourselves so that a corrupt image drops one example, not the run.
        source = _SkippingSource(
            builder.as_data_source(
                split=data.split, decoders={"image": tfds.decode.SkipDecoding()}
            ),
            f"split {data.split!r} in {builder.data_dir}",
        )

        def peek(n: int) -> list[dict[str, Any]]:
            # Through _SkippingSource: an unreadable record among the first n is left out here
            # as it is dropped in training, not a start-up crash.
            rows = (source[i] for i in range(min(n, len(source))))
            return [r for r in rows if not isinstance(r, _Dropped)]

        ctx = transforms.Context(
            config=config,
            dataset=f"{builder.name} split {data.split!r}",
            features=tuple(builder.info.features),
            tokenizer=tokenizer,
            peek=peek,
        )
        ops = transforms.build(config.pp.ops, ctx, fields)
        if len(source) < process_count * host_batch_size:
            raise ValueError(
                f"split {data.split!r} of {builder.name} has {len(source)} examples, fewer than "
                f"one global batch ({process_count * host_batch_size})"
            )
        self.skipped_counter = _SkipCounter(int(data.max_skipped))
        shard = (
            grain.MapDataset.source(source)
            # Before the per-host slice: the index in the split, not in this host's shard.
            .map_with_index(functools.partial(_with_index, len(source)))
            .slice(slice(process_index, None, process_count))
        )
        example = _Example(transforms.Chain(ops, config.seed), fields, len(shard))
        ds = shard.shuffle(seed=config.seed).repeat(None).map_with_index(example)
        options = grain.ReadOptions(
            num_threads=data.num_threads, prefetch_buffer_size=data.prefetch
        )
        batches = (
            ds.to_iter_dataset(options)
            # Runs on the consuming thread, in stream order (the map above runs ahead on
            # prefetch threads).
            .filter(self.skipped_counter.keep)
            .batch(host_batch_size, drop_remainder=True)
        )
        self._it = iter(batches)

    @property
    def skipped(self) -> int:
        return self.skipped_counter.count

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"position": self._it.get_state(), "skipped": self.skipped_counter.count}

    def set_state(self, state: dict[str, Any]) -> None:
        """A state of `get_state`, or a bare grain position (checkpoints written before the
        count was part of the state: it restarts at 0)."""
        self._it.set_state(state["position"] if "position" in state else state)
        self.skipped_counter.count = int(state.get("skipped", 0))
