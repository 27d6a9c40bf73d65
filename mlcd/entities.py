"""Entity tables (MOFI): entity id -> name, aliases, description.

A table is a file of entries, either a JSON list of objects or JSON Lines (one object per line;
chosen by the first non-blank character: '[' is a list). Each entry has

    id           int >= 0, unique in the table (the class id of the entity)
    name         str with at least one letter or digit, e.g. "Eiffel Tower"
    aliases      list of str (may be empty): other names found in text, e.g. ["tour eiffel"]
    description  str (may be empty): one line, e.g. "wrought-iron tower in Paris"

and may carry any other keys (kept as they are; synthetic_scenes' table has color and shape).
Names and aliases need not be unique: several entities may share one ("Paris" the city and
"Paris" the person); entity annotation then proposes all of them and its teacher filter picks.

An annotation store (python -m mlcd.annotate) keeps the table it was made with, renumbered
0..C-1 (each entry then records its id in the source table as "source_id"), and its digest:
`EntityTable.digest()` is a hash of the entries' content, independent of the file's layout
(JSON or JSONL, key order, spacing), so a trainer can check that a table matches a store.

    table = load_table("entities.json")
    table.ids            int64 [C], sorted ascending
    table.names[k], table.aliases[k] (a tuple), table.descriptions[k]   of entity table.ids[k]
    table.text(entity_id, with_description)   "name" or "name: description"
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np

from mlcd import label_store

FIELDS = ("id", "name", "aliases", "description")
_MAX_ID = 2**31 - 1  # labels are int32


class EntityTable:
    """A validated entity table, its entries sorted by id (see the module docstring)."""

    def __init__(self, entries: Iterable[dict[str, Any]], source: str = "<entities>"):
        """entries: dicts with the FIELDS (and any other keys), any order; read once, so a
        generator streams a large table without holding its dicts. source: the file they came
        from, named in errors. ValueError naming the source and the entry (index in the file,
        id) for a missing or mistyped field, a duplicate id or a name without words."""
        ids, names, aliases, descriptions, extras = [], [], [], [], []
        for index, entry in enumerate(entries):
            _check_entry(entry, index, source)
            ids.append(entry["id"])
            names.append(entry["name"])
            # Tuples: the empty one is a shared singleton (most entities of a large table have
            # no alias), where an empty list costs 56 bytes each.
            aliases.append(tuple(entry["aliases"]))
            descriptions.append(entry["description"])
            extras.append({k: v for k, v in entry.items() if k not in FIELDS} or None)
        ids = np.array(ids, np.int64)
        order = np.argsort(ids, kind="stable")
        same = np.nonzero(ids[order][1:] == ids[order][:-1])[0]
        if len(same):
            first, dup = sorted(order[same[0] : same[0] + 2].tolist())
            raise ValueError(
                f"{source}: entry {dup} (id {ids[dup]}): duplicate id, also entry {first}"
            )
        self.source = source
        self.ids = ids[order]
        self.names = [names[k] for k in order.tolist()]
        self.aliases = [aliases[k] for k in order.tolist()]
        self.descriptions = [descriptions[k] for k in order.tolist()]
        # Other keys, per entry (None when there are none: most tables at scale have none).
        self.extras = [extras[k] for k in order.tolist()]
        self._contiguous = len(self.ids) == 0 or (
            self.ids[0] == 0 and self.ids[-1] == len(self.ids) - 1
        )
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, entity_id: int) -> int:
        """The position of `entity_id` in ids (and names, ...); KeyError if it is not there."""
        entity_id = int(entity_id)
        if self._contiguous:
            if 0 <= entity_id < len(self.ids):
                return entity_id
        else:
            k = int(np.searchsorted(self.ids, entity_id))
            if k < len(self.ids) and self.ids[k] == entity_id:
                return k
        raise KeyError(f"{self.source}: no entity with id {entity_id}")

    def rows(self, entity_ids: np.ndarray) -> np.ndarray:
        """int64 positions of many ids at once (all must be in the table)."""
        entity_ids = np.asarray(entity_ids, np.int64)
        if self._contiguous:
            return entity_ids
        return np.searchsorted(self.ids, entity_ids)

    def text(self, entity_id: int, with_description: bool = False) -> str:
        """The entity as text: its name, or "name: description" (just the name when the
        description is empty)."""
        k = self.row(entity_id)
        if with_description and self.descriptions[k]:
            return f"{self.names[k]}: {self.descriptions[k]}"
        return self.names[k]

    def entry(self, row: int) -> dict[str, Any]:
        """The entry at position `row` as a dict (FIELDS first, then its other keys)."""
        entry = {
            "id": int(self.ids[row]),
            "name": self.names[row],
            "aliases": list(self.aliases[row]),
            "description": self.descriptions[row],
        }
        return {**entry, **(self.extras[row] or {})}

    def entries(self) -> list[dict[str, Any]]:
        return [self.entry(k) for k in range(len(self))]

    def digest(self) -> str:
        """sha256 (hex) of the entries' content in id order, every key included: any edit of an
        entry changes it; the file's format, key order and spacing do not."""
        if self._digest is None:
            h = hashlib.sha256()
            for k in range(len(self)):
                line = json.dumps(self.entry(k), sort_keys=True, ensure_ascii=False)
                h.update(line.encode("utf-8") + b"\n")
            self._digest = h.hexdigest()
        return self._digest

    def subset(self, entity_ids: Sequence[int]) -> EntityTable:
        """The entities `entity_ids` (in that order) renumbered 0..k-1; each new entry records
        its id in this table as "source_id" (replacing any "source_id" it had)."""
        entries = []
        for new_id, entity_id in enumerate(entity_ids):
            entry = self.entry(self.row(entity_id))
            entries.append({**entry, "id": new_id, "source_id": int(entity_id)})
        return EntityTable(entries, source=f"{self.source} (subset)")

    def save(self, path: str) -> None:
        """Writes the table as a JSON list (one entry per line), atomically."""
        lines = [json.dumps(e, ensure_ascii=False) for e in self.entries()]
        with label_store.atomic_file(path) as f:
            f.write(("[\n" + ",\n".join(lines) + "\n]\n").encode("utf-8"))


def _check_entry(entry: Any, index: int, source: str) -> None:
    where = f"{source}: entry {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with {list(FIELDS)}, got {entry!r:.80}")
    if "id" in entry:
        where += f" (id {entry['id']!r})"
    for key in FIELDS:
        if key not in entry:
            raise ValueError(f"{where}: missing {key!r} (entries need {list(FIELDS)})")
    entity_id = entry["id"]
    # bool is an int subclass: true/false in a file is a typo, not an id.
    if not isinstance(entity_id, int) or isinstance(entity_id, bool):
        raise ValueError(f"{where}: 'id' must be an integer, got {type(entity_id).__name__}")
    if not 0 <= entity_id <= _MAX_ID:
        raise ValueError(f"{where}: 'id' must be in [0, {_MAX_ID}] (int32 labels)")
    for key in ("name", "description"):
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(entry[key]).__name__}")
    if not any(c.isalnum() for c in entry["name"]):
        raise ValueError(f"{where}: 'name' {entry['name']!r} has no letter or digit")
    aliases = entry["aliases"]
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"{where}: 'aliases' must be a list of strings, got {aliases!r:.80}")
    for alias in aliases:
        if not any(c.isalnum() for c in alias):
            raise ValueError(f"{where}: alias {alias!r} has no letter or digit")


def _entries(f: TextIO, path: str) -> Iterator[Any]:
    """The entries of an open table file: a JSON list, or JSON Lines read line by line (a
    table of millions of entities is never held as dicts)."""
    head = f.read(4096)
    if head.lstrip().startswith("["):
        try:
            yield from json.loads(head + f.read())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        return
    f.seek(0)
    for number, line in enumerate(f, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number}: invalid JSON Lines entry: {e}") from None


def load_table(path: str | os.PathLike) -> EntityTable:
    """The entity table in the JSON or JSONL file `path` (module docstring); FileNotFoundError
    or ValueError naming the file (and the entry: its index and id) when it is invalid."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"entity table {path} does not exist")
    with open(path, encoding="utf-8") as f:
        table = EntityTable(_entries(f, path), source=path)
    if not len(table):
        raise ValueError(f"{path}: the entity table is empty")
    return table
