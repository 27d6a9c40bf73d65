"""Which source field feeds which output feature (config.fields), and the defaults.

Output features: 'id', 'image', 'caption', the extra texts of `fields.texts` and 'entities'
(when `fields.entities` is set). A source field is a table column, a tfds feature, or, in a
WebDataset tar, a member extension ('jpg', 'txt', ...), '__key__' (the member name up to the
first dot) or a field of the example's .json member.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from typing import Any

# Defaults, first present wins: WebDataset members first (a tar's .json may repeat them under
# other names), then HuggingFace's and tfds's (image / caption / id), open_clip's CSV columns
# (filepath / title) and img2dataset's parquet columns (jpg / caption / key).
CANDIDATES = {
    "image": ("jpg", "jpeg", "png", "webp", "image", "filepath"),
    "caption": ("txt", "caption", "title", "text"),
    "id": ("key", "__key__", "id"),
}
RESERVED = ("id", "image", "caption", "entities")
_FEATURE_NAME = re.compile(r"[a-z_][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Source field names. image / caption / id None: the first of CANDIDATES present in each
    example (a tar's members vary from example to example); an id with none present is derived
    from the example's position (readers.Record.fallback_id)."""

    image: str | None
    caption: str | None
    id: str | None
    texts: tuple[tuple[str, str], ...]  # (source field, output feature)
    entities: str | None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The extra text features, in config order."""
        return tuple(out for _, out in self.texts)

    def configured(self) -> dict[str, str]:
        """{config key: source field} of every field set explicitly (for messages)."""
        keys = {"fields.image": self.image, "fields.caption": self.caption, "fields.id": self.id}
        keys.update({f"fields.texts[{out!r}]": src for src, out in self.texts})
        keys["fields.entities"] = self.entities
        return {k: v for k, v in keys.items() if v}


def from_config(fields: Any) -> Mapping:
    """config.fields -> Mapping; ValueError naming the key of a malformed entry."""
    texts = []
    for entry in fields.texts:
        if (
            not isinstance(entry, tuple | list)
            or len(entry) != 2
            or not all(isinstance(s, str) and s for s in entry)
        ):
            raise ValueError(
                f"config.fields.texts: {entry!r} is not a (source field, output feature) pair"
            )
        src, out = entry
        if not _FEATURE_NAME.fullmatch(out) or out in RESERVED:
            raise ValueError(
                f"config.fields.texts: output feature {out!r} must be lower-case letters, digits "
                f"and '_', and not one of {RESERVED}"
            )
        if out in (o for _, o in texts):
            raise ValueError(f"config.fields.texts: output feature {out!r} appears twice")
        texts.append((src, out))
    return Mapping(
        image=fields.image or None,
        caption=fields.caption or None,
        id=fields.id or None,
        texts=tuple(texts),
        entities=fields.entities or None,
    )


def resolve(mapping: Mapping, columns: Collection[str], where: str) -> Mapping:
    """The mapping with every name fixed for a source whose fields are known up front (a
    table's columns, a tfds dataset's features).

    Raises:
      ValueError: a configured field is not a column, or no default is (image, caption);
        the message names the config key and lists the columns.
    """
    listed = ", ".join(columns)
    for key, name in mapping.configured().items():
        if name not in columns:
            raise ValueError(
                f"config.{key}={name!r}: {where} has no such column (columns: {listed})"
            )
    picked = {}
    for feature in ("image", "caption", "id"):
        name = getattr(mapping, feature) or pick(feature, columns)
        if name is None and feature != "id":
            raise ValueError(
                f"config.fields.{feature}: none of the default columns "
                f"{', '.join(CANDIDATES[feature])} is in {where} (columns: {listed}); set it"
            )
        picked[feature] = name
    return dataclasses.replace(mapping, **picked)


def pick(feature: str, present: Collection[str]) -> str | None:
    """The first default source field of `feature` that is `present`, or None."""
    return next((name for name in CANDIDATES[feature] if name in present), None)


def field_name(mapping: Mapping, feature: str, present: Collection[str]) -> str | None:
    """The source field of 'image' / 'caption' / 'id' for one example with fields `present`."""
    return getattr(mapping, feature) or pick(feature, present)
