"""Writing one output shard: the worker's job, the files it leaves, and when they are trusted.

Layout of a converted dataset (OUT_DIR/NAME/VERSION):

    NAME-SPLIT.array_record-00000-of-000NN   shard i = unit i (tfds's file names)
    dataset_info.json, features.json         tfds metadata (metadata.py), written last
    convert/SPLIT/config.json                the config and inputs; a rerun must match them
    convert/SPLIT/shards/00000.json          done marker of shard 0: its counts
    convert/SPLIT/shards/00000.npz           its examples' id hashes, source rows, image kinds
    convert/SPLIT/summary.json               counts per reason, for the whole split
    convert/SPLIT/split.json                 shard lengths + features, once the split is done
    convert/SPLIT/tmp/                       shards being written

A shard is written under tmp/, fsynced and renamed into place, then its .npz, then its marker
(each atomically): a shard is done exactly when its marker exists. A crash at any point leaves
at most a temporary file or a shard without a marker, which a rerun writes again.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import naming

from input_pipeline.convert import examples, metadata
from input_pipeline.convert.readers import Skipped, Unit

# tfds's own writer options: one record per chunk, so each example is read on its own.
WRITER_OPTIONS = "group_size:1"
EXAMPLES_PER_REASON = 5  # example ids listed per skip reason in the markers and summary


@dataclasses.dataclass(frozen=True)
class Layout:
    """Paths of one split's conversion (see the module docstring)."""

    version_dir: str
    name: str
    split: str
    num_shards: int

    def shard_path(self, i: int) -> str:
        template = naming.ShardedFileTemplate(
            data_dir=epath.Path(self.version_dir),
            template=naming.DEFAULT_FILENAME_TEMPLATE,
            dataset_name=self.name,
            split=self.split,
            filetype_suffix="array_record",
        )
        return os.fspath(template.sharded_filepath(shard_index=i, num_shards=self.num_shards))

    @property
    def state_dir(self) -> str:
        return os.path.join(self.version_dir, "convert", self.split)

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.state_dir, "tmp")

    def marker_path(self, i: int) -> str:
        return os.path.join(self.state_dir, "shards", f"{i:05d}.json")

    def ids_path(self, i: int) -> str:
        return os.path.join(self.state_dir, "shards", f"{i:05d}.npz")


@dataclasses.dataclass(frozen=True)
class Job:
    """Unit `index` of the split, to be written as shard `index`."""

    index: int
    unit: Unit
    layout: Layout
    options: examples.Options


class ShardStats:
    """Counts of one shard (or, merged, of a split): examples read and kept, skips per reason
    with the first few of each, what was done to kept images, extra texts found empty."""

    def __init__(self, record: dict[str, Any] | None = None):
        record = record or {}
        self.read = record.get("num_read", 0)
        self.kept = record.get("num_examples", 0)
        self.skipped = collections.Counter(record.get("skipped", {}))
        self.examples = {k: list(v) for k, v in record.get("skipped_examples", {}).items()}
        self.images = collections.Counter(record.get("images", {}))
        self.empty_texts = collections.Counter(record.get("empty_texts", {}))

    def skip(self, s: Skipped) -> None:
        self.skipped[s.reason] += 1
        listed = self.examples.setdefault(s.reason, [])
        if len(listed) < EXAMPLES_PER_REASON:
            listed.append({"id": s.id, "where": s.where, "detail": s.detail})

    def keep(self, kept: examples.Kept) -> None:
        self.kept += 1
        self.images[kept.image] += 1
        self.empty_texts.update(kept.empty_texts)

    def drop(self, image: str, empty_texts: tuple[str, ...]) -> None:
        """Takes back a kept example (a repeated id removed after its shard was written)."""
        self.kept -= 1
        self.images[image] -= 1
        self.empty_texts.subtract(empty_texts)
        for counter in (self.images, self.empty_texts):
            for k in [k for k, v in counter.items() if v == 0]:
                del counter[k]

    def merge(self, other: ShardStats) -> None:
        self.read += other.read
        self.kept += other.kept
        self.images.update(other.images)
        self.empty_texts.update(other.empty_texts)
        for reason, count in other.skipped.items():
            self.skipped[reason] += count
            listed = self.examples.setdefault(reason, [])
            listed.extend(other.examples.get(reason, [])[: EXAMPLES_PER_REASON - len(listed)])

    def to_json(self) -> dict[str, Any]:
        return {
            "num_read": self.read,
            "num_examples": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": dict(sorted(self.examples.items())),
            "images": dict(sorted(self.images.items())),
            "empty_texts": dict(sorted(self.empty_texts.items())),
        }


def id_hash(example_id: str) -> int:
    """Stable 64-bit hash of an id (blake2b), for the duplicate check."""
    return int.from_bytes(hashlib.blake2b(example_id.encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=4)
def _serializer(texts: tuple[str, ...], entities: bool) -> Callable[[dict[str, Any]], bytes]:
    return metadata.serializer(metadata.features(texts, entities))


def convert_shard(job: Job) -> dict[str, Any]:
    """Converts unit `job.index` into its shard and returns its marker record (also written).

    Raises:
      ValueError: bad input (see examples.make_example), or a configured field that no
        example of the unit has (names the key and the fields present).
    """
    unit, layout = job.unit, job.layout
    serialize = _serializer(unit.mapping.outputs, bool(unit.mapping.entities))
    final = layout.shard_path(job.index)
    tmp = temporary_path(layout, final)
    stats, hashes, rows, kinds, seen = ShardStats(), [], [], [], set()
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    try:
        for item in unit.records():
            stats.read += 1
            if isinstance(item, Skipped):
                stats.skip(item)
                continue
            seen.update(item.fields)
            result = examples.make_example(item, unit.mapping, job.options)
            if isinstance(result, Skipped):
                stats.skip(result)
                continue
            writer.write(serialize(result.example))
            stats.keep(result)
            hashes.append(id_hash(result.example["id"]))
            rows.append(item.row)
            kinds.append(examples.IMAGE_KINDS.index(result.image))
        writer.close()
        if seen:
            _check_fields_seen(unit, seen)
        commit(tmp, final)
    except BaseException:
        if writer.is_open():
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    save_npz(
        layout.ids_path(job.index),
        hashes=np.asarray(hashes, np.uint64),
        rows=np.asarray(rows, np.int64),
        image_kinds=np.asarray(kinds, np.uint8),
    )
    record = {
        "index": job.index,
        "source": unit.description,
        "row_name": unit.row_name,
        "num_bytes": os.path.getsize(final),
        **stats.to_json(),
    }
    write_json(layout.marker_path(job.index), record)
    return record


def _check_fields_seen(unit: Unit, seen: set[str]) -> None:
    """A configured field that none of the unit's examples has is a typo, not data."""
    for key, name in unit.mapping.configured().items():
        if name not in seen:
            raise ValueError(
                f"config.{key}={name!r}: no example of {unit.description} has it; its fields: "
                f"{', '.join(sorted(seen))}"
            )


def read_marker(layout: Layout, i: int) -> dict[str, Any] | None:
    """Shard i's marker record, or None when the shard is not done."""
    try:
        with open(layout.marker_path(i)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def temporary_path(layout: Layout, final: str) -> str:
    """A new empty file in tmp/ to write `final` into (unique: a crashed writer's leftovers
    never collide with it)."""
    os.makedirs(layout.tmp_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=layout.tmp_dir, prefix=os.path.basename(final) + ".")
    os.close(fd)
    return tmp


def commit(tmp: str, final: str) -> None:
    """Flushes `tmp` to disk and renames it to `final`: `final` is the old or the whole new."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


def _atomic(path: str, write) -> None:
    """Calls write(file) on a temporary file beside `path`, then renames it to `path`: readers
    see the old file or the whole new one, never a part."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Atomically writes `obj` as indented JSON."""
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Atomically writes an .npz of `arrays`."""
    _atomic(path, lambda f: np.savez(f, **arrays))
