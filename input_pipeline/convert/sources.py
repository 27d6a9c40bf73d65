"""From config.sources / config.tfds to the ordered list of units (readers.py) to convert.

Order is deterministic: patterns in the order given, each pattern's files in brace-expansion
order (a glob's matches sorted), each file's rows in file order. Output shard i is unit i, so
the dataset is the same whatever the number of workers.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from typing import Any

from input_pipeline.convert import fields
from input_pipeline.convert.readers import ParquetUnit, RowsUnit, TarUnit, TfdsUnit, Unit

SOURCE_SEPARATOR = "::"
_KINDS = {
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
}
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion: 'a/{00..02}.tar' -> a/00.tar, a/01.tar, a/02.tar (zero-padded to
    the longer bound when a bound has a leading zero); '{x,y}' -> x, y; several groups expand
    left to right. Nested braces are not supported; a group without ',' or '..' stays as is."""
    pos = 0
    while (m := _BRACES.search(pattern, pos)) is not None:
        body = m.group(1)
        if (r := _RANGE.fullmatch(body)) is not None:
            lo, hi = r.groups()
            padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (lo, hi))
            width = max(len(lo), len(hi)) if padded else 0
            step = 1 if int(hi) >= int(lo) else -1
            items = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
        elif "," in body:
            items = body.split(",")
        else:
            pos = m.end()
            continue
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [out for item in items for out in expand_braces(head + item + tail)]
    return [pattern]


def resolve_files(sources: str) -> list[str]:
    """The files named by config.sources, in order.

    Raises:
      FileNotFoundError: a glob matches nothing (names the pattern) or a named file does not
        exist (names the path and its pattern).
      ValueError: a URL, a directory, or a file named twice.
    """
    patterns = [p.strip() for p in sources.split(SOURCE_SEPARATOR) if p.strip()]
    if not patterns:
        raise ValueError("config.sources is empty: name the input files (or set config.tfds.name)")
    files: list[str] = []
    seen: dict[str, str] = {}
    for pattern in patterns:
        if _URL.match(pattern):
            raise ValueError(
                f"config.sources: {pattern!r} is a URL; nothing is downloaded here: download the "
                "data first (e.g. with img2dataset) and convert the local files"
            )
        for expanded in expand_braces(pattern):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"config.sources: pattern {expanded!r} matches no file")
            elif not os.path.exists(expanded):
                raise FileNotFoundError(
                    f"config.sources: {expanded} does not exist (from pattern {pattern!r})"
                )
            else:
                matches = [expanded]
            for path in matches:
                if os.path.isdir(path):
                    raise ValueError(f"config.sources: {path} is a directory, not a file")
                real = os.path.realpath(path)
                if real in seen:
                    raise ValueError(
                        f"config.sources: {path} is named twice (by {seen[real]!r} and {pattern!r})"
                    )
                seen[real] = pattern
                files.append(path)
    return files


def file_kind(path: str) -> str:
    """'tar' | 'parquet' | 'csv' | 'tsv' | 'jsonl' from the file name."""
    low = path.lower()
    for suffix in sorted(_KINDS, key=len, reverse=True):
        if low.endswith(suffix):
            return _KINDS[suffix]
    raise ValueError(
        f"config.sources: {path}: unknown file type; expected one of {', '.join(_KINDS)}"
    )


def plan(config: Any, mapping: fields.Mapping) -> list[Unit]:
    """Every unit of the conversion, in output-shard order (tables are read here, images not).

    Raises (naming the config key, file or column): see resolve_files, fields.resolve,
    _read_table; for config.tfds, readers.open_tfds_source.
    """
    if config.tfds.name:
        return _plan_tfds(config, mapping)
    units: list[Unit] = []
    for path in resolve_files(config.sources):
        kind = file_kind(path)
        if kind == "tar":
            units.append(TarUnit(path, mapping))
        elif kind == "parquet":
            units.extend(_plan_parquet(path, mapping, config.rows_per_shard))
        else:
            separator = config.csv_separator or {"csv": ",", "tsv": "\t"}.get(kind)
            columns, rows = _read_table(path, kind, separator)
            resolved = fields.resolve(mapping, columns, path)
            units.extend(
                _row_units(path, resolved, _project(rows, resolved), config.rows_per_shard)
            )
    return units


def _row_units(path: str, mapping: fields.Mapping, rows: list[dict], per_shard: int) -> list[Unit]:
    return [
        RowsUnit(path, mapping, start, tuple(rows[start : start + per_shard]))
        for start in range(0, len(rows), per_shard)
    ]


def _needed(mapping: fields.Mapping) -> list[str]:
    """The source columns a resolved mapping reads, each once."""
    names = [mapping.image, mapping.caption, mapping.id, mapping.entities]
    names += [src for src, _ in mapping.texts]
    return list(dict.fromkeys(n for n in names if n))


def _project(rows: list[dict], mapping: fields.Mapping) -> list[dict]:
    needed = _needed(mapping)
    return [{k: row.get(k) for k in needed} for row in rows]


def _read_table(path: str, kind: str, separator: str | None) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a CSV / TSV (header row first) or JSONL (one object a line) file.
    A JSONL file's columns are the keys of its objects, in order of first appearance."""
    if kind == "jsonl":
        rows, columns = [], {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path} line {lineno}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path} line {lineno}: a JSON object is expected, got {row!r:.80}"
                    )
                columns.update(dict.fromkeys(row))
                rows.append(row)
        return list(columns), rows
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=separator)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty, or no header row")
        return list(reader.fieldnames), list(reader)


def _plan_parquet(path: str, mapping: fields.Mapping, per_shard: int) -> list[Unit]:
    """Parquet with image bytes: units of whole row groups (workers read the images); with
    image paths: the mapped columns are read here and cut like a CSV's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        schema = parquet.schema_arrow
        resolved = fields.resolve(mapping, schema.names, path)
        image_type = schema.field(resolved.image).type
        holds_bytes = (
            pa.types.is_binary(image_type)
            or pa.types.is_large_binary(image_type)
            or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)
        )
        if not holds_bytes:
            rows = parquet.read(columns=_needed(resolved)).to_pylist()
            return _row_units(path, resolved, rows, per_shard)
        units, groups, start, count = [], [], 0, 0
        for g in range(parquet.num_row_groups):
            groups.append(g)
            count += parquet.metadata.row_group(g).num_rows
            if count >= per_shard or g == parquet.num_row_groups - 1:
                units.append(
                    ParquetUnit(
                        path, resolved, start, count, tuple(groups), tuple(_needed(resolved))
                    )
                )
                start, groups, count = start + count, [], 0
        return units


def _plan_tfds(config: Any, mapping: fields.Mapping) -> list[Unit]:
    from input_pipeline.convert.readers import open_tfds_source

    if config.sources:
        raise ValueError("config.sources and config.tfds.name are both set: convert one of them")
    t = config.tfds
    source = open_tfds_source(t.name, t.data_dir, t.split)
    where = f"tfds dataset {t.name} (config.tfds.name)"
    resolved = fields.resolve(mapping, list(source.dataset_info.features), where)
    n, step = len(source), config.rows_per_shard
    return [
        TfdsUnit(t.name, t.data_dir, t.split, resolved, a, min(a + step, n))
        for a in range(0, n, step)
    ]
