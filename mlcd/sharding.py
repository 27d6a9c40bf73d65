"""Mesh from config, parameter partition rules, and host <-> global batch conversion.

Conventions (docs/architecture.md, "Sharding"):
- the mesh has Auto axis types, built from `config.mesh = (("data", -1), ("model", 1))`;
- the global batch is sharded along dim 0 over *all* devices, PartitionSpec(mesh.axis_names);
- parameters follow `config.sharding_rules`, (regex, spec) pairs with first match winning, as
  in big_vision: 'replicate', 'fsdp', 'partial_fc' or an explicit per-dimension tuple of axis
  names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlcd import tree_utils


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh over `devices` (default: all) with the given (name, size) axes; one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    if not all(isinstance(a, tuple | list) and len(a) == 2 for a in axes):
        raise ValueError(
            f"config.mesh={tuple(axes)}: each entry must be a (name, size) pair, e.g. "
            "(('data', -1), ('model', 1))"
        )
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh={tuple(axes)}: at most one axis size may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0 or len(devices) % known:
        raise ValueError(
            f"config.mesh={tuple(axes)}: axis sizes {sizes} do not divide the "
            f"{len(devices)} available devices"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"config.mesh={tuple(axes)}: the mesh has {int(np.prod(sizes))} devices but "
            f"{len(devices)} are available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_spec(mesh: Mesh | AbstractMesh) -> P:
    """PartitionSpec of a global batch: dim 0 over all mesh axes, the rest replicated."""
    return P(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """NamedSharding of a global batch (see batch_spec)."""
    return NamedSharding(mesh, batch_spec(mesh))


def check_batch_divisible(batch_size: int, mesh: Mesh | AbstractMesh, what: str) -> int:
    """Per-device share of a global batch; ValueError naming `what` if it does not split evenly.

    Works with concrete meshes and with the abstract mesh visible inside jit.
    """
    if batch_size % mesh.size:
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {mesh.size} devices of the mesh "
            f"{dict(mesh.shape)}"
        )
    return batch_size // mesh.size


def _spec_for(path: str, shape: tuple[int, ...], spec: Any, mesh: Mesh) -> P:
    if spec in ("replicate", None):
        return P()
    if spec == "fsdp":
        # Shard the largest dimension that the 'data' axis divides; small or indivisible
        # parameters stay replicated (sharding a bias buys nothing and costs a gather).
        n = mesh.shape.get("data", 1)
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if n > 1 and shape[d] % n == 0 and shape[d] >= n:
                return P(*([None] * d + ["data"] + [None] * (len(shape) - d - 1)))
        return P()
    if spec == "partial_fc":
        # A class matrix [C, D] in the Partial-FC layout: C split over every device, which is
        # what the sharded losses (mlcd.partial_fc) expect, so the step never reshards it.
        if shape[0] % mesh.size:
            raise ValueError(
                f"{path} of shape {shape}: {shape[0]} rows do not split over the {mesh.size} "
                "devices of the mesh (sharding 'partial_fc')"
            )
        return P(tuple(mesh.axis_names), *[None] * (len(shape) - 1))
    spec = tuple(spec)
    if len(spec) != len(shape):
        raise ValueError(f"sharding rule spec {spec} has {len(spec)} dims; {path} has {shape}")
    for dim, axis in zip(shape, spec, strict=True):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        if dim % size:
            raise ValueError(f"sharding rule spec {spec} does not divide {path} of shape {shape}")
    return P(*spec)


def param_shardings(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Any:
    """Tree of NamedSharding for `params` (arrays or ShapeDtypeStructs) from (regex, spec) rules."""

    def one(path: str, x: Any) -> NamedSharding:
        spec = tree_utils.first_match(path, rules, "config.sharding_rules")
        return NamedSharding(mesh, _spec_for(path, tuple(x.shape), spec, mesh))

    return tree_utils.map_with_path(one, params)


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded over all devices.

    Every host passes its own `global_batch / process_count` examples; on one host this is a
    plain device_put with the batch sharding.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
