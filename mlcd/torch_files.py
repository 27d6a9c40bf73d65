"""PyTorch weight files read and written with NumPy alone (torch is never imported).

Three formats hold the open_clip / OpenAI CLIP weights users have:

- ``.safetensors``: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
  data_offsets}} and the raw tensors. Read and written here directly, so bfloat16 works (the
  safetensors package's NumPy API has no bfloat16; ml_dtypes, which jax ships, has).
- ``torch.save`` zip archives (``.pt`` / ``.bin``, torch >= 1.6): ``<dir>/data.pkl`` pickles
  the state dict, each tensor a call of ``torch._utils._rebuild_tensor_v2`` on a storage that
  the pickle names by key (a "persistent id") and that lies in ``<dir>/data/<key>``.
- TorchScript archives (OpenAI's released ``ViT-B-32.pt``, ...): the same zip layout, but
  ``data.pkl`` pickles the module tree itself, objects of ``__torch__.*`` classes whose
  attributes are parameters, buffers and submodules.

The unpickler below resolves only the handful of globals these files use and refuses any
other, so loading a checkpoint never runs code from it (torch.load(weights_only=False) would).
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

# safetensors dtype names <-> NumPy.
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

# torch's legacy typed-storage classes, as torch.save still pickles them -> element type.
_TORCH_STORAGES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{parameter name: array} of a ``.safetensors``, ``torch.save`` or TorchScript file.

    Arrays keep their stored dtype (float16 / bfloat16 included). A training checkpoint that
    nests the weights (``{"state_dict": {...}, "optimizer": ...}``, open_clip's) yields the
    nested state dict. Raises ValueError naming the file when it is none of these formats.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: neither .safetensors nor a zip archive written by torch.save / torch.jit."
            "save (torch >= 1.6); re-save a legacy checkpoint with a current torch, or convert "
            "it to .safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        root = _archive_root(archive, path)
        byteorder = "little"
        if f"{root}byteorder" in archive.namelist():
            byteorder = archive.read(f"{root}byteorder").decode().strip()
        obj = _Unpickler(archive, root, byteorder, path).load()
    return _find_state_dict(obj, path)


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive (torch.jit.save: it holds the model's code)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        root = _archive_root(archive, os.fspath(path))
        return any(n.startswith(f"{root}code/") for n in archive.namelist())


def _archive_root(archive: zipfile.ZipFile, path: str) -> str:
    """The '<dir>/' prefix of the archive's top-level data.pkl."""
    tops = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(tops) != 1:
        raise ValueError(f"{path}: expected one <dir>/data.pkl in the zip archive, found {tops}")
    return tops[0][: -len("data.pkl")]


class _ScriptObject:
    """Stands for any TorchScript ``__torch__.*`` object: BUILD fills its __dict__."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, copied out."""
    if not size:  # a 0-d tensor (e.g. logit_scale): an array, not a NumPy scalar
        return storage[offset : offset + 1].reshape(()).copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *_):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data."""
    return data


# The only functions a weights pickle may call.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only what weight pickles use; storages are read from the zip on demand."""

    def __init__(self, archive: zipfile.ZipFile, root: str, byteorder: str, path: str):
        super().__init__(archive.open(f"{root}data.pkl"))
        self._archive, self._root, self._path = archive, root, path
        self._order = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return np.dtype(_TORCH_STORAGES[name])
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        raise pickle.UnpicklingError(
            f"{self._path}: the pickle refers to {module}.{name}, which a weights file does "
            "not need; refusing to load it (only state dicts and TorchScript modules are read)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        # ('storage', element type, key, location, number of elements)
        kind, dtype, key, _, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent id {pid!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._root}data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype.newbyteorder(self._order), numel)
        return self._storages[key]


def _find_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    """The {name: array} inside what data.pkl held (see read_state_dict)."""
    if isinstance(obj, _ScriptObject):
        return dict(_script_arrays(obj, ""))
    if isinstance(obj, Mapping):
        arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
        if arrays:
            return arrays
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                return _find_state_dict(obj[key], path)
    raise ValueError(
        f"{path}: holds no state dict (a mapping of names to tensors, directly or under "
        "'state_dict' / 'model'), nor a TorchScript module"
    )


def _script_arrays(obj: _ScriptObject, prefix: str):
    """(dotted name, array) of a TorchScript module's parameters and buffers, recursively."""
    for name, value in vars(obj).items():
        if isinstance(value, np.ndarray):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject):
            yield from _script_arrays(value, f"{prefix}{name}.")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: array} of a .safetensors file (any dtype of _ST_DTYPES)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {spec['dtype']}")
        start, end = spec["data_offsets"]
        dtype = _ST_DTYPES[spec["dtype"]].newbyteorder("<")
        out[name] = np.frombuffer(data[start:end], dtype).reshape(spec["shape"]).copy()
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `tensors` as a .safetensors file (little-endian, tensors in name order, the
    header padded to 8 bytes as the format asks), atomically: a temporary file renamed."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")  # (ascontiguousarray makes 0-d 1-d)
        blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": _ST_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)
