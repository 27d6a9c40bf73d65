"""Mesh helpers shared by the sharded losses.

Convention (DESIGN.md, "Sharding conventions"): a loss called under `jax.set_mesh(mesh)` with a
mesh of more than one device runs sharded with `jax.shard_map`, the global batch split over ALL
mesh axes, i.e. dim 0 carries `PartitionSpec(mesh.axis_names)`. Otherwise it runs the plain
single-program reference path.

Ordering fact the losses rely on: for a tuple of axes `axes`, the shard that `P(axes)` gives a
device, its `jax.lax.axis_index(axes)`, and its block's position in
`jax.lax.all_gather(x, axes, tiled=True)` are all the same row-major linear index over `axes`
(the first axis is the major one). tests/test_contrastive_losses.py checks it through the losses.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from mlcd.sharding import batch_spec


def batch_mesh() -> AbstractMesh | None:
    """The mesh set by `jax.set_mesh` when it spans more than one device, else None.

    Works eagerly and inside `jax.jit` (where only the abstract mesh is known).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return mesh


def shard_batch(x: jax.Array, mesh: AbstractMesh) -> jax.Array:
    """Puts dim 0 of `x` on `batch_spec(mesh)` where shard_map would not do it itself.

    With Auto axes (the project's convention) shard_map reshards its inputs as needed. With
    Explicit axes the sharding is part of the type and shard_map rejects a mismatch, so reshard.
    """
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, batch_spec(mesh))
    return x


def as_float32(x: jax.Array) -> jax.Array:
    """x promoted to at least float32. Losses are computed in float32 (or wider): bf16 logits
    lose the small differences that log-softmax / log-sigmoid of scaled cosines depend on."""
    return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
