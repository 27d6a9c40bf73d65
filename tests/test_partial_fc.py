"""mlcd.partial_fc: the sharded class-matrix blocks and the one sharded top-k merge against NumPy.

Sharded runs use the 8 fake CPU devices (conftest.py); the MLCD loss built on these blocks is
tested in test_mlcd_loss.py, the clustering built on the merge in test_clustering.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mlcd import partial_fc as pfc

# 8 devices -> C_local = 8 classes each.
B, D, C, L = 16, 12, 64, 3


def _labels():
    """int32 [B, L] class ids with -1 padding: no id, padding after / before valid ids, a
    repeated id, ids on the first, second and last shard (the labels of test_mlcd_loss.py)."""
    rng = np.random.default_rng(0)
    rng.normal(size=(C, D))  # the centers of test_mlcd_loss.py: keeps the same draws
    labels = np.stack([rng.choice(C, size=L, replace=False) for _ in range(B)])
    labels[0] = -1
    labels[1, 1:] = -1
    labels[2, 0] = -1
    labels[3, 2] = labels[3, 0]
    labels[4, :] = np.arange(L)
    labels[5, :] = np.array([C - 1, 8, 9])
    return labels.astype(np.int32)


LABELS = _labels()


def _mesh(shape, names=("data", "model")):
    devices = jax.devices()[: int(np.prod(shape))]
    return Mesh(np.array(devices).reshape(shape), names[: len(shape)])


MESHES = {"8": _mesh((8,)), "4x2": _mesh((4, 2)), "2x4": _mesh((2, 4))}


# ----------------------------------------------------------------------------------------------
# Top-k and full-softmax cross-entropy over sharded columns (the blocks MOFI reuses).


def test_top_k_and_softmax_cross_entropy_sharded():
    mesh, k = MESHES["2x4"], 5
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(B, C)).astype(np.float32)
    scores[:, 7] = scores[:, 8] = 10.0  # a tie across shards 0 and 1: the lower id first
    ids = LABELS

    def per_device(block, ids, axes):
        values, top = pfc.top_k(block, k, axes)
        return values, top, pfc.softmax_cross_entropy(block, ids, axes)

    axes = mesh.axis_names
    sharded = jax.jit(
        jax.shard_map(
            functools.partial(per_device, axes=axes),
            mesh=mesh,
            in_specs=(P(None, axes), P()),
            out_specs=P(),
        )
    )
    want_top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    logp = scores - np.logaddexp.reduce(scores.astype(np.float64), axis=1, keepdims=True)
    want_ce = [
        -np.mean([logp[i, y] for y in row if y >= 0]) if (row >= 0).any() else 0.0
        for i, row in enumerate(ids)
    ]
    for name, fn in (
        ("sharded", sharded),
        ("reference", jax.jit(functools.partial(per_device, axes=None))),
    ):
        values, top, ce = jax.device_get(fn(scores, ids))
        np.testing.assert_array_equal(top, want_top, err_msg=name)
        np.testing.assert_array_equal(values, np.take_along_axis(scores, want_top, 1))
        np.testing.assert_allclose(ce, want_ce, rtol=1e-5, err_msg=name)
    g_sharded = jax.grad(lambda s: jnp.sum(sharded(s, ids)[2]))(scores)
    probs = np.exp(logp)
    target = np.zeros_like(probs)
    for i, row in enumerate(ids):
        valid = row[row >= 0]
        for y in valid:
            target[i, y] += 1 / len(valid)
    want_grad = np.where((ids >= 0).any(1, keepdims=True), probs - target, 0.0)
    np.testing.assert_allclose(g_sharded, want_grad, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The one merge: all rows on every device vs each device's own block of rows.

MERGE_ROWS, MERGE_CLASSES = 16, 32  # C_local = 4 on 8 devices, 8 / 16 on 4 / 2 along C


def _merge_scores():
    """float32 [rows, C] small integers: many ties, within and across shards."""
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, (MERGE_ROWS, MERGE_CLASSES)).astype(np.float32)
    scores[0] = 1.0  # one value everywhere: the top k are ids 0..k-1
    scores[1] = 0.0
    scores[1, [3, MERGE_CLASSES - 1, 17]] = 5.0  # ties on the first and the last shards
    return scores


@pytest.mark.parametrize("k", [3, 6])
@pytest.mark.parametrize("mesh_name", MESHES)
def test_merge_top_k_all_rows_and_row_blocks_match_numpy(mesh_name, k):
    """Both modes give lax.top_k's (values, ids) of the full scores; ties: the lower id.

    k = 6 exceeds C_local = 4 on 8 devices: each shard then passes k' = 4 candidates.
    """
    mesh = MESHES[mesh_name]
    axes = mesh.axis_names
    scores = _merge_scores()
    num_local = MERGE_CLASSES // mesh.size

    def per_device(block, axes):
        kk = min(k, block.shape[1])
        values, idx = jax.lax.top_k(block, kk)
        ids = idx + pfc.shard_index(axes) * block.shape[1]
        return (
            pfc.merge_top_k(values, ids, k, axes),
            pfc.merge_top_k(values, ids, k, axes, split_rows=True),
        )

    sharded = jax.jit(
        jax.shard_map(
            functools.partial(per_device, axes=axes),
            mesh=mesh,
            in_specs=P(None, axes),
            out_specs=((P(), P()), (P(axes), P(axes))),
        )
    )
    want_ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    want_values = np.take_along_axis(scores, want_ids, axis=1)
    (all_values, all_ids), (block_values, block_ids) = jax.device_get(sharded(scores))
    # The row blocks come back gathered along dim 0 (device r's block at rows r * 16 / N).
    for name, values, ids in (
        ("all rows", all_values, all_ids),
        ("row blocks", block_values, block_ids),
    ):
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"{mesh_name} {name}")
        np.testing.assert_array_equal(values, want_values, err_msg=f"{mesh_name} {name}")
    np.testing.assert_array_equal(want_ids[0], np.arange(k))
    np.testing.assert_array_equal(want_ids[1, :3], [3, 17, MERGE_CLASSES - 1])

    # The convenience top_k (local top k + offset + merge) in both modes, where k <= C_local.
    if k <= num_local:
        top = jax.jit(
            jax.shard_map(
                lambda block: (
                    pfc.top_k(block, k, axes),
                    pfc.top_k(block, k, axes, split_rows=True),
                ),
                mesh=mesh,
                in_specs=P(None, axes),
                out_specs=((P(), P()), (P(axes), P(axes))),
            )
        )
        for values, ids in jax.device_get(top(scores)):
            np.testing.assert_array_equal(ids, want_ids, err_msg=mesh_name)
            np.testing.assert_array_equal(values, want_values, err_msg=mesh_name)

    # Without axes: one program holds every candidate.
    values, ids = jax.device_get(jax.jit(functools.partial(per_device, axes=None))(scores)[0])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)


def test_top_k_larger_than_a_shard_raises():
    with pytest.raises(ValueError, match="k=5 exceeds the 4 classes of a shard"):
        pfc.top_k(jnp.zeros((2, 4)), 5, None)
