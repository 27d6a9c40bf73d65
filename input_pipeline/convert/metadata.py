"""The converted dataset's features and its tfds metadata (dataset_info.json, features.json).

tfds opens a directory as a prepared dataset from these two files alone (no builder code, no
registration): `tfds.builder(NAME, data_dir=OUT_DIR)` finds OUT_DIR/NAME/VERSION once
features.json exists. So they are written last, from the splits' records
(convert/SPLIT/split.json), each atomically, features.json after dataset_info.json: a reader
never sees a dataset whose metadata lists a shard that is not complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import dataset_info, example_serializer, file_adapters, naming
from tensorflow_datasets.core import splits as splits_lib

SPLIT_RECORD = "split.json"
_DESCRIPTION = (
    "Converted with python -m input_pipeline.convert; per split, convert/SPLIT/summary.json "
    "counts what was skipped and why."
)


def features(texts: tuple[str, ...], entities: bool) -> tfds.features.FeaturesDict:
    """Output features: 'id', 'image' (encoded bytes as stored: tfds.decode.SkipDecoding()
    gives them back unchanged; tfds's own decoding gives uint8 [H, W, 3]), 'caption', one Text
    per extra text feature, and 'entities' (a sequence of texts) when mapped."""
    spec = {
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(None, None, 3)),
        "caption": tfds.features.Text(),
    }
    spec.update({name: tfds.features.Text() for name in texts})
    if entities:
        spec["entities"] = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict(spec)


def serializer(spec: tfds.features.FeaturesDict) -> Callable[[dict[str, Any]], bytes]:
    """spec.serialize_example with the proto's map entries in key order. tfds's own bytes
    follow the process's string hashing (PYTHONHASHSEED), so two workers would write the same
    example as different bytes; these are the same in every process and decode the same."""
    proto = example_serializer.ExampleSerializer(spec.get_serialized_info())

    def serialize(example: dict[str, Any]) -> bytes:
        encoded = spec.encode_example(example)
        return proto.get_tf_example(encoded).SerializeToString(deterministic=True)

    return serialize


def split_records(version_dir: str) -> dict[str, dict[str, Any]]:
    """{split: record} of every split converted into version_dir and complete."""
    root = os.path.join(version_dir, "convert")
    records = {}
    for split in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, split, SPLIT_RECORD)
        if os.path.isfile(path):
            with open(path) as f:
                records[split] = json.load(f)
    return records


def check_compatible(version_dir: str, split: str, spec: tfds.features.FeaturesDict) -> None:
    """Refuses to add `split` to a dataset whose other splits have other features, or to a
    directory holding a dataset that was not converted here (its splits would be lost).

    Raises:
      ValueError: naming the features that differ, or the foreign splits.
    """
    info_path = os.path.join(version_dir, "dataset_info.json")
    records = split_records(version_dir)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            listed = {s["name"] for s in json.load(f).get("splits", [])}
        foreign = sorted(listed - set(records))
        if foreign:
            raise ValueError(
                f"{version_dir} holds a dataset with splits {foreign} that "
                "python -m input_pipeline.convert did not write: choose another config.name, "
                "config.version or config.out_dir"
            )
    want = set(spec.keys())
    for other, record in records.items():
        if other == split:
            continue
        have = set(record["features"])
        if have != want:
            raise ValueError(
                f"config.fields: split {split!r} would have features {sorted(want)}, but split "
                f"{other!r} of {version_dir} has {sorted(have)}: every split of a dataset has the "
                "same features (map the same fields)"
            )


def publish(version_dir: str, name: str, version: str) -> None:
    """Writes dataset_info.json and features.json for every complete split (split.json)."""
    records = split_records(version_dir)
    if not records:
        return
    with _lock(os.path.join(version_dir, "convert", ".publish.lock")):
        records = split_records(version_dir)  # another split may have completed meanwhile
        first = next(iter(records.values()))
        spec = features(tuple(first["texts"]), first["entities"])
        identity = dataset_info.DatasetIdentity(
            name=name, version=tfds.core.Version(version), data_dir=version_dir, module_name=""
        )
        info = dataset_info.DatasetInfo(builder=identity, features=spec, description=_DESCRIPTION)
        info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
        template = naming.ShardedFileTemplate(
            data_dir=epath.Path(version_dir),
            template=naming.DEFAULT_FILENAME_TEMPLATE,
            dataset_name=name,
            filetype_suffix="array_record",
        )
        info.set_splits(
            splits_lib.SplitDict(
                [
                    splits_lib.SplitInfo(
                        name=split,
                        shard_lengths=list(r["shard_lengths"]),
                        num_bytes=int(r["num_bytes"]),
                        filename_template=template.replace(split=split),
                    )
                    for split, r in records.items()
                ]
            )
        )
        tmp = tempfile.mkdtemp(dir=os.path.join(version_dir, "convert"), prefix="metadata.")
        try:
            info.write_to_directory(tmp)
            # features.json last: its presence is what makes tfds find the dataset.
            for f in sorted(os.listdir(tmp), key=lambda f: f == "features.json"):
                os.replace(os.path.join(tmp, f), os.path.join(version_dir, f))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """An exclusive flock on `path` (released when the holder exits, however it exits): two
    splits finishing at once do not lose each other's entry in dataset_info.json."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
