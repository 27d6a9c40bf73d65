"""MLCD training pieces: the objective, the Partial-FC layout of the centers in the train state
and the compiled step, centers initialised from centroids, and the cluster-label join.
(2-step training and export of configs/mlcd.py:tiny: tests/test_train.py.)"""

import os
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_overrides
from mlcd_fakes import dataset_ids, random_cluster_output, write_cluster_output

from configs import common
from input_pipeline.labels import ClusterLabels
from input_pipeline.pipeline import TrainIterator
from mlcd import losses, objectives, sharding, train
from mlcd.clustering import store
from mlcd.losses import sharded_classifier as sc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, E, L = 152, 128, 8  # 152 = 8 x 19: a C no other dimension of the tiny step has


def _config(**extra):
    config = common.load_config(os.path.join(ROOT, "configs/mlcd.py:tiny"))
    overrides = tiny_overrides("unused", **{"model.num_centers": C, **extra})
    common.parse_overrides(config, [o for o in overrides if ".grounding." not in o])
    with config.unlocked():
        config.model.centers_init = None  # random centers; test_centers_start_from_centroids
        config.model.image.depth = 1  # compile time: the layout under test is the head's
    return train.resolve_model_config(config, None)


@pytest.mark.parametrize("sample_ratio", [1.0, 0.5])
def test_objective_is_mlcd_loss(sample_ratio):
    cfg = {"name": "mlcd", "scale": 32.0, "margin": 0.2, "sample_ratio": sample_ratio}
    objective = objectives.get("mlcd")(ml_collections.ConfigDict(cfg))
    k1, k2, k3, rng = jax.random.split(jax.random.key(0), 4)
    emb = jax.random.normal(k1, (16, 24))
    centers = jax.random.normal(k2, (40, 24))
    labels = jax.random.randint(k3, (16, 3), -1, 40)
    out = {"image": {"embedding": emb}, "centers": centers}
    loss, metrics = objective(out, {"cluster_labels": labels}, rng)
    want, want_metrics = losses.mlcd_loss(
        emb,
        centers,
        labels,
        scale=32.0,
        margin=0.2,
        margin_type="arcface",
        sample_ratio=sample_ratio,
        rng=rng,
        return_metrics=True,
    )
    assert float(loss) == float(want)
    assert metrics == want_metrics
    with pytest.raises(ValueError, match=r"config\.data\.labels"):
        objective(out, {}, rng)
    with pytest.raises(ValueError, match=r"config\.model\.num_centers"):
        objective({"image": {"embedding": emb}}, {"cluster_labels": labels}, rng)


@pytest.fixture(scope="module")
def setup():
    """The trainer's pieces for a 1-layer tiny MLCD model with C = 152 on the 8-device mesh."""
    config = _config(**{"objective.sample_ratio": 0.5})
    mesh = sharding.make_mesh(config.mesh)
    built = train.build_train_step(config, mesh)

    def make_step(microbatches, objective=None):
        return train.build_train_step(
            config, mesh, microbatches=microbatches, objective=objective
        ).step

    def init_state():
        with jax.set_mesh(mesh):
            return train.init_state(config.model, config.seed, built.tx, built.shardings)

    return types.SimpleNamespace(
        config=config, mesh=mesh, make_step=make_step, init_state=init_state
    )


def test_centers_are_split_over_devices_and_the_step_has_no_batch_by_class_array(setup):
    state = setup.init_state()
    # Centers and both AdamW moments: C / 8 rows per device, each device different rows.
    center_leaves = [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if "centers" in jax.tree_util.keystr(path)
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
    batch = {
        "image": jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.uint8),
        "cluster_labels": jax.ShapeDtypeStruct((b, L), jnp.int32),
    }
    with jax.set_mesh(setup.mesh):
        hlo = setup.make_step(1).lower(state, batch).compile().as_text()
    shapes = set(re.findall(r"\[([\d,]+)\]", hlo))
    assert f"{b},{sc.num_sampled(C // 8, 0.5)}" in shapes
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

    clip = objectives.get("softmax_contrastive")(ml_collections.ConfigDict())
    with pytest.raises(ValueError, match=r"config\.microbatches=2: objective SoftmaxContrastive"):
        setup.make_step(2, objective=clip)


def test_centers_start_from_centroids(tmp_path):
    config = _config()
    mesh = sharding.make_mesh(config.mesh)
    _, abstract_params = train.abstract_model(config.model)
    shardings = sharding.param_shardings(abstract_params, config.sharding_rules, mesh)
    centroids = np.random.default_rng(0).normal(size=(C, E)).astype(np.float32)
    path = str(tmp_path / "centroids.npy")
    np.save(path, centroids)
    with config.unlocked():
        config.model.centers_init = path
    with jax.set_mesh(mesh):
        params = train.init_params(config.model, config.seed, shardings)
    np.testing.assert_array_equal(np.asarray(params["centers"]), centroids)
    assert params["centers"].sharding == shardings["centers"]

    np.save(path, centroids[:, :64])
    message = r"centroids\.npy' holds an array of shape \(152, 64\).* centers are \(152, 128\)"
    with pytest.raises(ValueError, match=message):
        train.init_params(config.model, config.seed, shardings)


# ----------------------------------------------------------------------------------------------
# The label join.


@pytest.fixture(scope="module")
def ids(scenes_builder):
    return dataset_ids(scenes_builder)


def _iterator(scenes_builder, scenes_dir, labels_dir, host=(0, 1), **extra):
    """The MLCD tiny TrainIterator (host batches of 16) of host (index, count)."""
    config = common.load_config(os.path.join(ROOT, "configs/mlcd.py:tiny"))
    overrides = tiny_overrides(scenes_dir, **{"data.labels": labels_dir, **extra})
    common.parse_overrides(config, [o for o in overrides if ".grounding." not in o])
    return TrainIterator(
        scenes_builder,
        config,
        None,
        host_batch_size=16,
        process_index=host[0],
        process_count=host[1],
    )


def test_labels_are_joined_by_index_and_resume_exactly(scenes_builder, scenes_dir, ids, tmp_path):
    # Example i's first label is i: the labels of a batch tell which examples it holds.
    labels = (np.arange(len(ids))[:, None] + np.arange(L)[None]) % 256
    labels_dir = write_cluster_output(str(tmp_path / "c"), ids, labels, np.ones((256, E)))
    it = _iterator(scenes_builder, scenes_dir, labels_dir)
    batches = [next(it) for _ in range(len(ids) // 16)]  # one epoch
    assert sorted(batches[0]) == ["cluster_labels", "image"]  # image-only: no tokens
    got = np.concatenate([b["cluster_labels"] for b in batches])
    assert got.dtype == np.int32 and got.shape == (len(ids), L)
    np.testing.assert_array_equal(np.sort(got[:, 0]), np.arange(len(ids)))
    np.testing.assert_array_equal(got, labels[got[:, 0]])

    state = it.get_state()
    after = [next(it)["cluster_labels"] for _ in range(2)]
    resumed = _iterator(scenes_builder, scenes_dir, labels_dir)
    resumed.set_state(state)
    for a in after:
        np.testing.assert_array_equal(next(resumed)["cluster_labels"], a)

    top2 = next(_iterator(scenes_builder, scenes_dir, labels_dir, **{"data.top_l": 2}))
    np.testing.assert_array_equal(top2["cluster_labels"], labels[top2["cluster_labels"][:, 0], :2])

    # Host 1 of 2 reads source[1::2]: its examples' rows are their indices in the whole split
    # (the id check would fail otherwise).
    host1 = _iterator(scenes_builder, scenes_dir, labels_dir, host=(1, 2))
    got = np.concatenate([next(host1)["cluster_labels"] for _ in range(len(ids) // 32)])
    np.testing.assert_array_equal(np.sort(got[:, 0]), np.arange(1, len(ids), 2))
    np.testing.assert_array_equal(got, labels[got[:, 0]])


def test_example_without_labels_names_its_id(scenes_builder, scenes_dir, ids, tmp_path):
    # As if the clustering ran on train[:255]: the last example has no row.
    labels_dir = random_cluster_output(str(tmp_path / "c"), ids[:-1], 256, L, E)
    it = _iterator(scenes_builder, scenes_dir, labels_dir)
    with pytest.raises(ValueError, match=r"example id 'train_00000255' .* no labels in .*c/labels"):
        for _ in range(len(ids) // 16):
            next(it)


def test_labels_of_another_order_name_the_example(scenes_builder, scenes_dir, ids, tmp_path):
    # The same examples, rows in another order (e.g. another dataset version): every row of
    # the file is consistent, but not row i = example i.
    order = np.random.default_rng(0).permutation(len(ids))
    labels_dir = random_cluster_output(str(tmp_path / "c"), ids[order], 256, L, E)
    it = _iterator(scenes_builder, scenes_dir, labels_dir)
    message = r"labels file does not match this dataset/split: example id 'train_\d{8}' .*c/id_hashes\.npy"
    with pytest.raises(ValueError, match=message):
        next(it)


def _id_join(ids: np.ndarray, labels: np.ndarray, query: list[str]) -> np.ndarray:
    """The join by id that the index join replaced: the labels of the rows whose ids match."""
    row = {str(i): r for r, i in enumerate(ids)}
    return labels[[row[i] for i in query]]


def test_index_join_equals_the_id_join(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    # Ids of mixed lengths, non-ASCII included, in no sorted order.
    ids = np.array([f"{'é' * (i % 3)}img/{rng.integers(1 << 40):x}-{i}" for i in range(n)])
    labels = rng.integers(-1, 40, (n, 6)).astype(np.int32)
    path = write_cluster_output(str(tmp_path / "c"), ids, labels, np.ones((40, 4)))
    for top_l in (None, 3):
        joined = ClusterLabels(path, 40, top_l)
        for _ in range(5):
            index = rng.choice(n, 64, replace=False)
            got = joined.labels_for(index, ids[index])
            assert got.dtype == np.int32
            np.testing.assert_array_equal(
                got, _id_join(ids, labels, ids[index].tolist())[:, :top_l]
            )
    order = ids[::-1]  # a file of another order: the first example's row is another id's
    bad = ClusterLabels(
        write_cluster_output(str(tmp_path / "r"), order, labels, np.ones((40, 4))), 40
    )
    with pytest.raises(ValueError, match=re.escape(f"example id {str(ids[0])!r} is example 0")):
        bad.labels_for(np.arange(8), ids[:8])


def _anonymous_rss() -> int:
    """Bytes of this process's anonymous resident memory (not counting mapped files)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_labels_of_2m_examples_are_memory_mapped_not_read(tmp_path):
    n = 2_000_000
    ids = np.array([f"ex_{i}" for i in range(n)])
    labels = np.broadcast_to(np.arange(L, dtype=np.int32), (n, L))
    path = write_cluster_output(str(tmp_path / "c"), ids, labels, np.ones((16, 4)))
    index = np.array([0, 123_456, n - 1])
    query = ids[index]
    del ids, labels
    before = _anonymous_rss()
    joined = ClusterLabels(path, 16)
    np.testing.assert_array_equal(joined.labels_for(index, query), np.tile(np.arange(L), (3, 1)))
    # labels.npy is 64 MB and ids.npy 80 MB: neither was read into memory.
    assert isinstance(joined._labels, np.memmap) and isinstance(joined._id_hashes, np.memmap)
    assert _anonymous_rss() - before < 16 << 20


def test_bad_label_files_are_rejected(ids, tmp_path):
    labels = np.zeros((len(ids), L), np.int32)
    labels[5, 3] = 256
    bad = write_cluster_output(str(tmp_path / "range"), ids, labels, np.ones((256, E)))
    message = r"range/labels\.npy: labels must be center ids in \[0, 256\).*'train_00000005'"
    joined = ClusterLabels(bad, 256)  # values are checked per batch: opening reads no rows
    np.testing.assert_array_equal(joined.labels_for(np.arange(5), ids[:5]), labels[:5])
    with pytest.raises(ValueError, match=message):
        joined.labels_for(np.arange(8), ids[:8])
    with pytest.raises(ValueError, match=r"has 256 centers but config\.model\.num_centers=128"):
        ClusterLabels(bad, 128)
    with pytest.raises(ValueError, match=r"config\.data\.top_l=9: .* has 8 labels per example"):
        ClusterLabels(random_cluster_output(str(tmp_path / "ok"), ids, 256, L, E), 256, 9)
    store.save_npy(os.path.join(bad, store.LABELS_FILE), labels.astype(np.int64))
    with pytest.raises(ValueError, match=r"range/labels\.npy: int64 \(256, 8\) does not match"):
        ClusterLabels(bad, 256)

    partial = write_cluster_output(
        str(tmp_path / "partial"), ids, labels % 256, np.ones((256, E)), complete=False
    )
    with pytest.raises(ValueError, match=r"labels=.*partial/clusters\.json: complete"):
        ClusterLabels(partial, 256)
    os.remove(os.path.join(partial, "clusters.json"))
    with pytest.raises(FileNotFoundError, match=r"labels=.*partial is not a complete clustering"):
        ClusterLabels(partial, 256)
