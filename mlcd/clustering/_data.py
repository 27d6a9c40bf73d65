"""Input checks, row padding and device placement shared by k-means and top-k assignment.

The data `x` [N, D] may be a NumPy array, a NumPy memmap (read chunk by chunk from the host, so
N is bounded by disk, not device memory) or a jax.Array. Work is done on chunks of rows; every
chunk is padded to one static row count, so a whole pass compiles once, and the padded rows are
masked out by a `num_valid` scalar, not by a transferred mask.

Layout under `jax.set_mesh(mesh)` with more than one device (the Partial-FC layout, see
mlcd.partial_fc): a chunk's rows and the centers' rows are both split over ALL mesh axes, dim 0
on `batch_spec(mesh)`. The sharded kernels all-gather the chunk, so every device scores all its
rows against its own K / n centers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mlcd import partial_fc
from mlcd.sharding import batch_spec

# Tiling of the score matrix x @ centers.T in the kernels: BLOCK_ROWS rows by CENTER_TILE
# centers per matmul. Each [1024, 1024] float32 score tile (4 MiB) is reduced (max / top-k) right
# after its matmul while still in cache; a running best (or top-k) carries across the center
# tiles, so a huge K (1M centers / n devices) never materialises a [block, K] score block.
# Measured on the 2-core CPU (docs/benchmarks.md, "k-means"): 256-1024 rows best, 4096 worse
# (the tile leaves the caches); center tiles of 512-16384 all within noise.
BLOCK_ROWS = 1024
CENTER_TILE = 1024


def check_data(x: Any, name: str = "x") -> tuple[int, int]:
    """Returns (N, D) of a 2-D array-like; ValueError naming `name` otherwise."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {shape}.")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column; got {tuple(shape)}.")
    return int(shape[0]), int(shape[1])


def num_shards() -> int:
    """Devices the centers are split over: the size of the `jax.set_mesh` mesh, else 1."""
    mesh = partial_fc.batch_mesh()
    return 1 if mesh is None else mesh.size


def check_centers_divisible(num_centers: int, what: str) -> None:
    """ValueError unless `num_centers` splits evenly over the devices of the current mesh."""
    n = num_shards()
    if num_centers % n:
        raise ValueError(
            f"{what}={num_centers} must be divisible by the {n} devices of the mesh: the centers "
            f"are sharded along K over all devices (K / {n} rows each)."
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the kernels tile a chunk of `rows` rows: a static (hashable) jit argument.

    The chunk is zero-padded to `padded = num_blocks * block` rows, scored `block` rows by
    `center_tile` centers at a time. `block` is a multiple of the shard count, so the padded
    rows split evenly over the devices and the gathered chunk splits evenly into blocks.
    """

    rows: int
    num_blocks: int
    block: int
    center_tile: int

    @property
    def padded(self) -> int:
        return self.num_blocks * self.block


def plan_rows(rows: int, shards: int) -> Plan:
    """Fewest blocks of ~BLOCK_ROWS rows covering `rows`; padding < num_blocks * shards rows."""
    num_blocks = max(1, math.ceil(rows / BLOCK_ROWS))
    block = shards * math.ceil(math.ceil(rows / num_blocks) / shards)
    return Plan(rows, num_blocks, block, CENTER_TILE)


def row_sharding() -> NamedSharding | None:
    """Sharding of a chunk's (or the centers') dim 0 under the current mesh; None unsharded."""
    if partial_fc.batch_mesh() is None:
        return None
    mesh = jax.sharding.get_mesh()
    return NamedSharding(mesh, batch_spec(mesh))


def to_device(rows: Any, padded: int, sharding: NamedSharding | None) -> jax.Array:
    """float32 [padded, D] on the devices: `rows` zero-padded at the end, dim 0 on `sharding`."""
    pad = ((0, padded - rows.shape[0]), (0, 0))
    if isinstance(rows, jax.Array):
        rows = jnp.pad(rows.astype(jnp.float32), pad)
    else:
        # Host data (NumPy or memmap): pad on the host so the transfer is the only copy.
        rows = np.asarray(rows, np.float32)
        rows = rows if rows.shape[0] == padded else np.pad(rows, pad)
    return jax.device_put(rows, sharding)


def host_rows(x: Any, index: np.ndarray) -> np.ndarray:
    """float32 rows x[index] on the host; `index` sorted, which keeps memmap reads sequential."""
    return np.asarray(x[index], np.float32)


def iter_chunks(x: Any, chunk_rows: int) -> Iterator[tuple[int, Any]]:
    """(start, x[start:start + chunk_rows]) over the rows of x, the last chunk possibly short."""
    for start in range(0, x.shape[0], chunk_rows):
        yield start, x[start : start + chunk_rows]
