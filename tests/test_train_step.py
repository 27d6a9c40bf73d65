"""The train state and step: heads in the state (Partial-FC layout of MLCD's centers, their
own rng stream, initialiser and lr multiplier), the compiled step holding no [B, C] array, and
gradient accumulation. (Training end to end: tests/test_train.py.)"""

import os
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import image_only, tiny_overrides

from configs import common
from mlcd import objectives, partial_fc, sharding, train_state
from mlcd.train_step import build_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, E, L = 152, 128, 8  # 152 = 8 x 19: a C no other dimension of the tiny step has


def _config(**extra):
    config = common.load_config(os.path.join(ROOT, "configs/mlcd.py:tiny"))
    overrides = tiny_overrides("unused", **{"objective.num_centers": C, **extra})
    common.parse_overrides(config, image_only(overrides))
    with config.unlocked():
        config.objective.centers_init = None  # random centers; test_centers_start_from_centroids
        config.model.image.depth = 1  # compile time: the layout under test is the head's
    return train_state.resolve_model_config(config, None)


@pytest.fixture(scope="module")
def setup():
    """The trainer's pieces for a 1-layer tiny MLCD model with C = 152 on the 8-device mesh."""
    config = _config(**{"objective.sample_ratio": 0.5})
    mesh = sharding.make_mesh(config.mesh)
    built = build_train_step(config, mesh)

    def make_step(microbatches, objective=None):
        return build_train_step(config, mesh, microbatches=microbatches, objective=objective).step

    def init_state():
        with jax.set_mesh(mesh):
            return train_state.init_state(config, built.objective, built.tx, built.shardings)

    return types.SimpleNamespace(
        config=config, mesh=mesh, built=built, make_step=make_step, init_state=init_state
    )


def test_centers_are_split_over_devices_and_the_step_has_no_batch_by_class_array(setup):
    state = setup.init_state()
    assert sorted(state["params"]) == ["heads", "image"]  # the model is image-only
    # Centers and both AdamW moments: C / 8 rows per device, each device different rows.
    center_leaves = [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if "'heads'" in jax.tree_util.keystr(path)
    ]
    assert len(center_leaves) == 3, [p for p, _ in center_leaves]  # params, mu, nu
    for path, x in center_leaves:
        assert x.shape == (C, E), path
        shards = x.addressable_shards
        assert len(shards) == 8 and all(s.data.shape == (C // 8, E) for s in shards), path
        assert sorted(s.index[0].start for s in shards) == list(range(0, C, C // 8)), path

    # The compiled per-device program never holds a [B, C] block nor all C centers: no
    # shape in it has a dimension of C (the local block [B, k] of sampled classes is there).
    b = setup.config.batch_size
    batch = setup.built.objective.abstract_batch(b)
    assert sorted(batch) == sorted(setup.built.objective.inputs)
    assert batch["cluster_labels"].shape == (b, L)
    with jax.set_mesh(setup.mesh):
        hlo = setup.make_step(1).lower(state, batch).compile().as_text()
    shapes = set(re.findall(r"\[([\d,]+)\]", hlo))
    assert f"{b},{partial_fc.num_sampled(C // 8, 0.5)}" in shapes
    assert not [s for s in shapes if str(C) in s.split(",")]


def test_microbatches_give_the_full_batch_step(setup):
    rng = np.random.default_rng(0)
    b = setup.config.batch_size
    batch = {
        "image": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
        "cluster_labels": rng.integers(-1, C, (b, L), dtype=np.int32),
    }
    results = []
    for k in (1, 2):  # r = 0.5: the slices must share the step's sampled negatives
        step = setup.make_step(k)
        with jax.set_mesh(setup.mesh):
            global_batch = sharding.host_to_global(batch, setup.mesh)
            results.append(jax.device_get(step(setup.init_state(), global_batch)))
    (state1, metrics1), (state2, metrics2) = results
    for key in ("train/loss", "train/grad_norm", "train/pos_loss", "train/neg_loss"):
        np.testing.assert_allclose(metrics2[key], metrics1[key], rtol=2e-5, err_msg=key)
    # AdamW's first moments are 0.1 x the gradients: same gradients, leaf by leaf.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state2, state1
    )

    clip_config = ml_collections.ConfigDict(
        {"objective": {"name": "softmax_contrastive"}, "model": {"logit_scale_init": 1.0}}
    )
    with clip_config.unlocked():
        clip_config.model.text = {"variant": "tiny"}
    clip = objectives.build(clip_config)
    with pytest.raises(ValueError, match=r"config\.microbatches=2: objective SoftmaxContrastive"):
        setup.make_step(2, objective=clip)


def _init_params(config):
    mesh = sharding.make_mesh(config.mesh)
    objective = objectives.build(config)
    _, abstract = train_state.abstract_params(config, objective)
    shardings = train_state.param_shardings(config, objective, abstract, mesh)
    with jax.set_mesh(mesh):
        return train_state.init_params(config, objective, shardings), shardings


def test_centers_start_from_centroids(tmp_path):
    config = _config()
    centroids = np.random.default_rng(0).normal(size=(C, E)).astype(np.float32)
    path = str(tmp_path / "centroids.npy")
    np.save(path, centroids)
    with config.unlocked():
        config.objective.centers_init = path
    params, shardings = _init_params(config)
    np.testing.assert_array_equal(np.asarray(params["heads"]["centers"]), centroids)
    assert params["heads"]["centers"].sharding == shardings["heads"]["centers"]

    np.save(path, centroids[:, :64])
    message = r"centers_init='.*centroids\.npy' holds an array of shape \(152, 64\).* head is \(152, 128\)"
    with pytest.raises(ValueError, match=message):
        _init_params(config)


def test_heads_have_their_own_rng_stream_and_leave_the_model_unchanged():
    """The model's step-0 parameters do not depend on the heads (an export with
    --random-init needs no head), and a head's values come from its own stream."""
    config = _config()
    params, _ = _init_params(config)
    with config.unlocked():
        config.objective.num_centers = 2 * C
    bigger, _ = _init_params(config)
    jax.tree.map(
        np.testing.assert_array_equal,
        train_state.model_params(params),
        train_state.model_params(bigger),
    )
    centers = np.asarray(params["heads"]["centers"])
    want = E**-0.5 * jax.random.normal(objectives.head_key(config.seed, "centers"), (C, E))
    np.testing.assert_allclose(centers, np.asarray(want), rtol=1e-6)
    # Rows of norm ~1, the scale of spherical k-means centroids.
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1).mean(), 1.0, atol=0.05)


def test_head_lr_multiplier_applies_to_the_head_only(setup):
    config = _config(**{"objective.centers_lr_mult": 0.0})
    step = build_train_step(config, setup.mesh)
    rng = np.random.default_rng(1)
    b = config.batch_size
    batch = {
        "image": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
        "cluster_labels": rng.integers(0, C, (b, L), dtype=np.int32),
    }
    with jax.set_mesh(setup.mesh):
        state = train_state.init_state(config, step.objective, step.tx, step.shardings)
        before = jax.device_get(state["params"])
        # Two steps: the warm-up gives step 0 a learning rate of 0.
        for _ in range(2):
            state, _ = step.step(state, sharding.host_to_global(batch, setup.mesh))
        after = jax.device_get(state["params"])
    np.testing.assert_array_equal(after["heads"]["centers"], before["heads"]["centers"])
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(after["image"]), jax.tree.leaves(before["image"]), strict=True
        )
    ]
    assert any(changed)


def test_partial_fc_rule_splits_rows_over_every_axis():
    mesh = sharding.make_mesh((("data", 4), ("model", 2)))
    params = {"heads": {"w": jax.ShapeDtypeStruct((16, 3), jnp.float32)}}
    spec = sharding.param_shardings(params, (("heads/w", "partial_fc"),), mesh)
    assert spec["heads"]["w"].spec == jax.sharding.PartitionSpec(("data", "model"), None)
    params = {"heads": {"w": jax.ShapeDtypeStruct((12, 3), jnp.float32)}}
    with pytest.raises(ValueError, match=r"heads/w of shape \(12, 3\): 12 rows do not split"):
        sharding.param_shardings(params, (("heads/w", "partial_fc"),), mesh)
