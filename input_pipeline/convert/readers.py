"""Units of conversion and how their records are read.

A unit is a piece of the input that becomes one output shard: a WebDataset tar, a range of
table rows, a group of parquet row groups, or a range of a tfds split. Units are planned by
sources.py in the main process and converted by workers: they are picklable and their
`records()` yields the source's examples in order, each a `Record` (raw fields, nothing
decoded), or a `Skipped` for a piece that could not be read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

from input_pipeline.convert.fields import Mapping

UNREADABLE_SOURCE = "unreadable_source"
UNREADABLE_JSON = "unreadable_json"
# Parquet rows read at a time: bounds memory when a row group holds many images.
_PARQUET_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Record:
    """One source example, undecoded."""

    fields: dict[str, Any]
    row: int  # position in its source file or split (tar: example ordinal; table: data row)
    where: str  # for messages, e.g. 'shards/00001.tar example 3' or 'meta.csv row 17'
    fallback_id: str  # the id when the source has no id field
    base_dir: str  # relative image paths are relative to this directory (the table's)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An example (or the unreadable rest of a source) left out, and why."""

    reason: str
    id: str
    where: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class TarUnit:
    """A WebDataset tar: consecutive members sharing a key (the member path up to the first
    dot of its basename) form one example, keyed by extension ('jpg', 'txt', 'json', ...)."""

    path: str
    mapping: Mapping
    row_name = "example"  # what Record.row counts, for messages

    @property
    def description(self) -> str:
        return self.path

    @property
    def source(self) -> str:
        """The file (or dataset) read, as messages about its records name it."""
        return self.path

    def records(self) -> Iterator[Record | Skipped]:
        """The tar's examples in member order. A tar that cannot be read to its end (truncated,
        damaged, not a tar) yields its examples up to the damage, then one Skipped for the
        rest; a tar file that cannot be opened at all (gone, no permission) raises OSError."""
        key, members, ordinal = None, {}, 0
        with open(self.path, "rb") as f:
            try:
                # Streaming mode: members in file order, no seeks (.tar.gz works as well).
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        name_key, ext = (
                            _split_member_name(member.name) if member.isfile() else (None, None)
                        )
                        if ext is None:
                            continue  # directories, links, files without an extension
                        data = tar.extractfile(member).read()
                        if name_key != key and members:
                            yield self._record(key, members, ordinal)
                            ordinal += 1
                            members = {}
                        key = name_key
                        members[ext] = data
            except (tarfile.TarError, OSError, EOFError) as e:
                # An example in progress may be missing members: left out with the rest.
                where = f"{self.path} after example {ordinal}"
                yield Skipped(UNREADABLE_SOURCE, key or "", where, f"{type(e).__name__}: {e}")
                return
        if members:
            yield self._record(key, members, ordinal)

    def _record(self, key: str, members: dict[str, bytes], ordinal: int) -> Record | Skipped:
        where = f"{self.path} example {ordinal} (key {key!r})"
        fields: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except ValueError as e:
                return Skipped(UNREADABLE_JSON, key, where, str(e))
            if isinstance(meta, dict):
                fields.update(meta)
        fields.update(members)  # a member wins over a .json field of the same name
        fields["__key__"] = key
        return Record(fields, ordinal, where, key, os.path.dirname(self.path))


def _split_member_name(name: str) -> tuple[str | None, str | None]:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); (None, None) without an extension or
    for hidden files ('.DS_Store', macOS's '._000123.jpg')."""
    directory, base = os.path.split(name)
    dot = base.find(".")
    if dot <= 0 or dot == len(base) - 1:
        return None, None
    return os.path.join(directory, base[:dot]), base[dot + 1 :].lower()


@dataclasses.dataclass(frozen=True)
class RowsUnit:
    """Rows of a table read by the planner (CSV, TSV, JSONL, parquet without image bytes),
    reduced to the mapped columns."""

    path: str
    mapping: Mapping
    start: int  # row number of rows[0] in the file (0 = the first data row)
    rows: tuple[dict[str, Any], ...]
    row_name = "row"

    @property
    def description(self) -> str:
        return f"{self.path} rows {self.start}-{self.start + len(self.rows) - 1}"

    @property
    def source(self) -> str:
        return self.path

    def records(self) -> Iterator[Record]:
        base = os.path.basename(self.path)
        for i, row in enumerate(self.rows, self.start):
            yield Record(row, i, f"{self.path} row {i}", f"{base}#{i}", os.path.dirname(self.path))


@dataclasses.dataclass(frozen=True)
class ParquetUnit:
    """Consecutive row groups of a parquet file holding the image bytes (read by the worker:
    the planner never holds the images)."""

    path: str
    mapping: Mapping
    start: int  # row number of the first row of row_groups[0]
    num_rows: int
    row_groups: tuple[int, ...]
    columns: tuple[str, ...]
    row_name = "row"

    @property
    def description(self) -> str:
        groups = f"{self.row_groups[0]}-{self.row_groups[-1]}"
        return (
            f"{self.path} row groups {groups} (rows {self.start}-{self.start + self.num_rows - 1})"
        )

    @property
    def source(self) -> str:
        return self.path

    def records(self) -> Iterator[Record]:
        import pyarrow.parquet as pq  # only workers converting parquet pay for the import

        base = os.path.basename(self.path)
        i = self.start
        with pq.ParquetFile(self.path) as parquet:
            for batch in parquet.iter_batches(
                batch_size=_PARQUET_BATCH,
                row_groups=list(self.row_groups),
                columns=list(self.columns),
            ):
                for row in batch.to_pylist():
                    yield Record(
                        row, i, f"{self.path} row {i}", f"{base}#{i}", os.path.dirname(self.path)
                    )
                    i += 1


@dataclasses.dataclass(frozen=True)
class TfdsUnit:
    """Examples [start, stop) of a split of a prepared tfds dataset, images as stored bytes."""

    name: str
    data_dir: str
    split: str
    mapping: Mapping
    start: int
    stop: int
    row_name = "index"

    @property
    def description(self) -> str:
        return (
            f"tfds {self.name} in {self.data_dir} split {self.split!r} [{self.start}:{self.stop}]"
        )

    @property
    def source(self) -> str:
        return f"tfds {self.name}"

    def records(self) -> Iterator[Record]:
        source = open_tfds_source(self.name, self.data_dir, self.split)
        for i in range(self.start, self.stop):
            yield Record(
                dict(source[i]),
                i,
                f"tfds {self.name} {self.split}[{i}]",
                f"{self.name}/{self.split}#{i}",
                self.data_dir,
            )


def open_tfds_source(name: str, data_dir: str, split: str) -> Any:
    """Random-access source of a prepared tfds split; Image features come as their stored
    bytes (no decode + re-encode). Raises FileNotFoundError / ValueError naming config.tfds."""
    import tensorflow_datasets as tfds

    from input_pipeline.datasets import get_builder

    try:
        builder = get_builder(name, data_dir, build=False)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.tfds.name={name!r}: {e}") from e
    features = builder.info.features
    skip = {
        k: tfds.decode.SkipDecoding()
        for k, f in features.items()
        if isinstance(f, tfds.features.Image)
    }
    try:
        return builder.as_data_source(split=split, decoders=skip)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"config.tfds.split={split!r}: not a split of {name} (splits: "
            f"{', '.join(builder.info.splits)}): {e}"
        ) from e


Unit = TarUnit | RowsUnit | ParquetUnit | TfdsUnit
