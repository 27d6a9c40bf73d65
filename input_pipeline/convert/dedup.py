"""Repeated ids across a split, found after every shard is written.

Each shard's .npz holds the 64-bit hashes of its examples' ids (and their source rows); equal
hashes are confirmed on the ids themselves, read back from the shards, so a hash collision
never drops an example. The first occurrence is the one earliest in shard order, then in order
within the shard: the same whatever the number of workers.

With config.on_duplicate='keep_first' the later occurrences are removed by rewriting their
shards. The rewrite is safe to interrupt: a shard still holds either all of its examples
(rewritten again) or exactly the kept ones (left alone), which its record count tells apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from input_pipeline.convert import examples, fields, shards

_READ_CHUNK = 256  # records read at a time when a shard is rewritten


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """Example `position` of shard `shard` repeats the id of an earlier example."""

    id: str
    shard: int
    position: int
    where: str  # the repeat's source
    first_where: str  # the first occurrence's source
    image: str  # what was done to the repeat's image (examples.IMAGE_KINDS)
    empty_texts: tuple[str, ...]  # its extra texts that were empty


def find(
    layout: shards.Layout, markers: list[dict], spec: tfds.features.FeaturesDict
) -> list[Duplicate]:
    """Every repeat of an id in the split, in shard order, then position."""
    loaded = [np.load(layout.ids_path(i)) for i in range(layout.num_shards)]
    hashes = np.concatenate([z["hashes"] for z in loaded])
    shard_of = np.concatenate([np.full(len(z["hashes"]), i) for i, z in enumerate(loaded)])
    pos_of = np.concatenate([np.arange(len(z["hashes"])) for z in loaded])
    rows = [z["rows"] for z in loaded]
    kinds = [z["image_kinds"] for z in loaded]
    texts = [k for k in spec.keys() if k not in fields.RESERVED]
    if len(hashes) < 2:
        return []
    order = np.argsort(hashes, kind="stable")  # stable: equal hashes stay in shard order
    sorted_hashes = hashes[order]
    repeated = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]) + 1
    if not len(repeated):
        return []
    readers: dict[int, array_record_module.ArrayRecordReader] = {}
    out = []
    try:
        # Runs of equal hashes: confirm on the ids, the first of each id is kept.
        starts = np.unique(np.searchsorted(sorted_hashes, sorted_hashes[repeated], side="left"))
        for start in starts:
            stop = np.searchsorted(sorted_hashes, sorted_hashes[start], side="right")
            first_seen: dict[str, int] = {}
            for k in order[start:stop]:
                i, p = int(shard_of[k]), int(pos_of[k])
                example = _read(readers, layout, i, p, spec)
                example_id = example["id"].decode()
                if example_id not in first_seen:
                    first_seen[example_id] = k
                    continue
                f = first_seen[example_id]
                fi, fp = int(shard_of[f]), int(pos_of[f])
                out.append(
                    Duplicate(
                        example_id,
                        i,
                        p,
                        _where(markers[i], rows[i][p]),
                        _where(markers[fi], rows[fi][fp]),
                        examples.IMAGE_KINDS[kinds[i][p]],
                        tuple(t for t in texts if not example[t]),
                    )
                )
    finally:
        for r in readers.values():
            r.close()
    return sorted(out, key=lambda d: (d.shard, d.position))


def _where(marker: dict, row: int) -> str:
    return f"{marker['source']} {marker['row_name']} {row}"


def _read(readers, layout: shards.Layout, shard: int, position: int, spec) -> dict:
    if shard not in readers:
        readers[shard] = array_record_module.ArrayRecordReader(layout.shard_path(shard))
    (record,) = readers[shard].read([position])
    return spec.deserialize_example_np(record, decoders={"image": tfds.decode.SkipDecoding()})


def drop(layout: shards.Layout, markers: list[dict], duplicates: list[Duplicate]) -> list[int]:
    """Removes the repeats from their shards; returns every shard's final length."""
    by_shard: dict[int, set[int]] = {}
    for d in duplicates:
        by_shard.setdefault(d.shard, set()).add(d.position)
    lengths = [m["num_examples"] for m in markers]
    for i, positions in sorted(by_shard.items()):
        lengths[i] -= len(positions)
        path = layout.shard_path(i)
        reader = array_record_module.ArrayRecordReader(path)
        try:
            have = reader.num_records()
            if have == lengths[i]:
                continue  # rewritten by an earlier run
            if have != markers[i]["num_examples"]:
                raise ValueError(
                    f"{path} holds {have} examples; its marker {layout.marker_path(i)} says "
                    f"{markers[i]['num_examples']}: the shard was changed after it was written. "
                    "Delete the marker to convert it again"
                )
            tmp = shards.temporary_path(layout, path)
            writer = array_record_module.ArrayRecordWriter(tmp, shards.WRITER_OPTIONS)
            # In chunks: a shard of large images need not fit in memory.
            for start in range(0, have, _READ_CHUNK):
                chunk = range(start, min(start + _READ_CHUNK, have))
                for p, record in zip(chunk, reader.read(list(chunk))):
                    if p not in positions:
                        writer.write(record)
            writer.close()
        finally:
            reader.close()
        shards.commit(tmp, path)
    return lengths
