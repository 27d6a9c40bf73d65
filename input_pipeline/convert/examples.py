"""One source record -> one output example, or the reason it is left out.

Every image is decoded once here (PIL, pixels loaded, not only the header checked), so the
training pipeline never meets an image it cannot decode. Images keep their original bytes
unless they are resized (config.image.max_shorter_side), re-encoded (config.image.reencode) or
neither RGB nor grayscale (converted to RGB, as the pipeline's decode_image would: alpha is
dropped), so a stored image always decodes to [H, W, 3] (or [H, W] gray) with tfds's own
decoding too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from input_pipeline.convert import fields
from input_pipeline.convert.readers import Record, Skipped

# Reasons an example is skipped (summary.json counts them; readers.py adds its own two).
NO_ID = "no_id"
NO_IMAGE = "no_image"
NO_CAPTION = "no_caption"
IMAGE_FILE_NOT_FOUND = "image_file_not_found"
UNDECODABLE_IMAGE = "undecodable_image"
UNDECODABLE_TEXT = "undecodable_text"
IMAGE_TOO_SMALL = "image_too_small"
ASPECT_RATIO = "aspect_ratio_too_large"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"

# What happened to a kept example's image (summary.json 'images').
ORIGINAL = "original_bytes"
RESIZED = "resized"
REENCODED = "reencoded"
CONVERTED = "converted_to_rgb"
IMAGE_KINDS = (ORIGINAL, RESIZED, REENCODED, CONVERTED)  # stored per example as an index

_KEEP_MODES = ("RGB", "L")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclasses.dataclass(frozen=True)
class Options:
    """Filters (0 = off) and image storage settings: config.filters and config.image."""

    min_shorter_side: int = 0
    max_aspect_ratio: float = 0.0
    caption_min_words: int = 0
    caption_max_words: int = 0
    max_shorter_side: int = 0
    reencode: bool = False
    jpeg_quality: int = 95

    @classmethod
    def from_config(cls, config: Any) -> Options:
        return cls(**config.filters.to_dict(), **config.image.to_dict())


@dataclasses.dataclass(frozen=True)
class Kept:
    """An output example ({feature: value}) and what was done to its image bytes."""

    example: dict[str, Any]
    image: str  # ORIGINAL | RESIZED | REENCODED | CONVERTED
    empty_texts: tuple[str, ...]  # extra text features the source lacked (stored as '')


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def make_example(record: Record, mapping: fields.Mapping, options: Options) -> Kept | Skipped:
    """The output example of `record`, or why it is skipped.

    Raises:
      ValueError: bad input that no skip can fix, naming the example and the config key: an
        image given as a URL, a field of a type that cannot be text, entities that are not
        a list of strings.
    """
    present = record.fields
    id_field = fields.field_name(mapping, "id", present)
    example_id = record.fallback_id
    try:
        if id_field is not None:
            example_id = (_text(present.get(id_field), record, "fields.id") or "").strip()
            if not example_id:
                raise _Skip(NO_ID, _absent("id", id_field))
        image_field = fields.field_name(mapping, "image", present)
        value = present.get(image_field) if image_field else None
        if _is_empty(value):
            raise _Skip(NO_IMAGE, _absent("image", image_field))
        caption_field = fields.field_name(mapping, "caption", present)
        caption = (
            _text(present.get(caption_field), record, "fields.caption") if caption_field else None
        )
        caption = (caption or "").strip()
        if not caption:
            raise _Skip(NO_CAPTION, _absent("caption", caption_field))
        _check_caption(caption, options)
        texts = {
            out: (_text(present.get(src), record, f"fields.texts[{out!r}]") or "").strip()
            for src, out in mapping.texts
        }
        example = {"id": example_id, "caption": caption, **texts}
        if mapping.entities:
            example["entities"] = _entities(present.get(mapping.entities), record)
        data = _image_bytes(value, record, image_field)
        example["image"], how = _check_image(data, options)
    except _Skip as s:
        return Skipped(s.reason, example_id, record.where, s.detail)
    return Kept(example, how, tuple(out for out, text in texts.items() if not text))


def _absent(feature: str, field: str | None) -> str:
    if field is None:
        return f"none of the fields {', '.join(fields.CANDIDATES[feature])}"
    return f"field {field!r} is missing or empty"


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | bytes) and not value)


def _text(value: Any, record: Record, key: str) -> str | None:
    """A text value as str (bytes are UTF-8; numbers are written out); None if absent."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Skip(UNDECODABLE_TEXT, f"config.{key}: not UTF-8 ({e})") from None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        return str(value)
    raise ValueError(
        f"{record.where}: config.{key} gives a {type(value).__name__} ({value!r:.80}), not a text"
    )


def _entities(value: Any, record: Record) -> list[str]:
    """A list of strings: a list / array value, or a string holding a JSON list."""
    if _is_empty(value):
        return []
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if isinstance(value, list | tuple | np.ndarray):
        items = [_text(v, record, "fields.entities") for v in value]
        if all(isinstance(v, str) for v in items):
            return [v for v in items if v.strip()]
    raise ValueError(
        f"{record.where}: config.fields.entities must give a list of strings (or a JSON list "
        f"of them), got {value!r:.80}"
    )


def _check_caption(caption: str, options: Options) -> None:
    words = len(caption.split())
    if options.caption_min_words and words < options.caption_min_words:
        raise _Skip(CAPTION_TOO_SHORT, f"{words} words")
    if options.caption_max_words and words > options.caption_max_words:
        raise _Skip(CAPTION_TOO_LONG, f"{words} words")


def _image_bytes(value: Any, record: Record, field: str) -> bytes:
    """Encoded image bytes from the field's value: bytes, a path (relative to the source
    file's directory), a {'bytes', 'path'} struct (HuggingFace datasets' parquet) or a uint8
    array (a tfds Tensor feature: PNG-encoded here)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        out = io.BytesIO()
        Image.fromarray(
            value.squeeze(-1) if value.ndim == 3 and value.shape[-1] == 1 else value
        ).save(out, "PNG")
        return out.getvalue()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        if _URL.match(value):
            raise ValueError(
                f"{record.where}: the image (field {field!r}) is a URL, {value[:100]}; URLs are not "
                "fetched: download the images first (e.g. with img2dataset) and convert its output"
            )
        path = os.path.join(record.base_dir, value)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _Skip(IMAGE_FILE_NOT_FOUND, path) from None
    raise ValueError(
        f"{record.where}: the image (field {field!r}) is a {type(value).__name__}, neither "
        "encoded bytes nor a path"
    )


def _check_image(data: bytes, options: Options) -> tuple[bytes, str]:
    """(bytes to store, what was done) after the filters and a full decode."""
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _Skip(UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}") from None
    shorter, longer = min(width, height), max(width, height)
    if options.min_shorter_side and shorter < options.min_shorter_side:
        raise _Skip(IMAGE_TOO_SMALL, f"{width}x{height}")
    if options.max_aspect_ratio and longer > options.max_aspect_ratio * shorter:
        raise _Skip(ASPECT_RATIO, f"{width}x{height}")
    target = None
    if options.max_shorter_side and shorter > options.max_shorter_side:
        scale = options.max_shorter_side / shorter
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
    try:
        if target is not None:
            # JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers the target (the
            # whole stream is still decoded, so damage is still found).
            im.draft(None, target)
        im.load()
        keep = target is None and not options.reencode and im.mode in _KEEP_MODES
        if keep:
            return data, ORIGINAL
        source_format = im.format
        rgb = im if im.mode in _KEEP_MODES else im.convert("RGB")
        if target is not None:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    except Exception as e:
        raise _Skip(UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}") from None
    out = io.BytesIO()
    if target is not None or options.reencode or source_format == "JPEG":
        rgb.save(out, "JPEG", quality=options.jpeg_quality)
    else:
        rgb.save(out, "PNG")  # a lossless source (palette, alpha) stays lossless
    how = RESIZED if target is not None else REENCODED if options.reencode else CONVERTED
    return out.getvalue(), how
