"""The method contract (mlcd/objectives): the registry, every registered objective's declared
inputs, contrastive and MLCD objectives against their losses, and MLCD's label-join op in the
input pipeline."""

import os

import jax
import numpy as np
import pytest
from conftest import image_only, tiny_overrides
from mlcd_fakes import dataset_ids, random_cluster_output, write_cluster_output

from configs import common
from input_pipeline.pipeline import TrainIterator
from mlcd import losses, objectives
from mlcd.registry import UnknownNameError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, L = 128, 8
METHOD_CONFIGS = ("clip", "align", "siglip", "mlcd")


def _load(name, **extra):
    config = common.load_config(os.path.join(ROOT, f"configs/{name}.py:tiny"))
    overrides = tiny_overrides("unused", **extra)
    common.parse_overrides(config, image_only(overrides))
    return config


def test_unknown_objective_lists_the_known_ones():
    config = _load("clip")
    with config.unlocked():
        config.objective.name = "clap"
    message = r"config\.objective\.name='clap': unknown objective 'clap'; known: \[.*'mlcd'"
    with pytest.raises(UnknownNameError, match=message):
        objectives.build(config)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_every_method_declares_inputs_its_config_ops_deliver(name):
    """The abstract batch (what the step is compiled for) has exactly the declared inputs,
    and every tiny config's ops write them (the pipeline checks the chain; here only names)."""
    config = _load(name)
    objective = objectives.build(config)
    batch = objective.abstract_batch(4)
    assert sorted(batch) == sorted(objective.inputs)
    assert all(x.shape[0] == 4 for x in batch.values())
    assert ("tokenize" in config.pp.ops) == ("tokens" in objective.inputs)


def test_contrastive_objectives_need_their_model_parameters():
    config = _load("siglip")
    with config.unlocked():
        config.model.logit_bias_init = None
    with pytest.raises(ValueError, match=r"sigmoid_contrastive needs config\.model\.logit_bias"):
        objectives.build(config)
    config = _load("clip")
    with config.unlocked():
        config.model.text = None
    with pytest.raises(ValueError, match=r"softmax_contrastive needs a text tower"):
        objectives.build(config)


@pytest.mark.parametrize("sample_ratio", [1.0, 0.5])
def test_mlcd_objective_is_mlcd_loss(sample_ratio):
    config = _load(
        "mlcd",
        **{
            "objective.scale": 32.0,
            "objective.margin": 0.2,
            "objective.sample_ratio": sample_ratio,
            "objective.num_centers": 40,
        },
    )
    objective = objectives.build(config)
    assert objective.per_example and objective.inputs == ("image", "cluster_labels")
    heads = objective.heads()
    assert list(heads) == ["centers"] and heads["centers"].shape == (40, 128)
    assert heads["centers"].sharding == "partial_fc"
    k1, k2, k3, rng = jax.random.split(jax.random.key(0), 4)
    emb = jax.random.normal(k1, (16, 24))
    centers = jax.random.normal(k2, (40, 24))
    labels = jax.random.randint(k3, (16, 3), -1, 40)
    out = {"image": {"embedding": emb}}
    loss, metrics = objective.loss(out, {"centers": centers}, {"cluster_labels": labels}, rng)
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


def test_softmax_objective_is_the_clip_loss():
    config = _load("align")
    objective = objectives.build(config)
    k1, k2 = jax.random.split(jax.random.key(0))
    zimg, ztxt = jax.random.normal(k1, (8, 16)), jax.random.normal(k2, (8, 16))
    out = {"zimg": zimg, "ztxt": ztxt, "logit_scale": 3.0}
    loss, metrics = objective.loss(out, {}, {}, None)
    want = losses.softmax_contrastive_loss(zimg, ztxt, 3.0, label_smoothing=0.1, reduction="sum")
    assert float(loss) == float(want) and float(metrics["logit_scale"]) == 3.0


# ----------------------------------------------------------------------------------------------
# MLCD's join_cluster_labels op, through the input pipeline.


@pytest.fixture(scope="module")
def ids(scenes_builder):
    return dataset_ids(scenes_builder)


def _iterator(scenes_builder, scenes_dir, labels_dir, host=(0, 1), **extra):
    """The MLCD tiny TrainIterator (host batches of 16) of host (index, count)."""
    config = common.load_config(os.path.join(ROOT, "configs/mlcd.py:tiny"))
    overrides = tiny_overrides(scenes_dir, **{"objective.labels": labels_dir, **extra})
    common.parse_overrides(config, image_only(overrides))
    return TrainIterator(
        scenes_builder,
        config,
        None,
        fields=objectives.build(config).inputs,
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

    top2 = next(_iterator(scenes_builder, scenes_dir, labels_dir, **{"objective.top_l": 2}))
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


def test_label_join_settings_are_checked_when_the_pipeline_is_built(
    scenes_builder, scenes_dir, ids, tmp_path
):
    good = random_cluster_output(str(tmp_path / "ok"), ids, 256, L, E)
    with pytest.raises(ValueError, match=r"has 256 centers but config\.objective\.num_centers=128"):
        _iterator(scenes_builder, scenes_dir, good, **{"objective.num_centers": 128})
    with pytest.raises(
        ValueError, match=r"config\.objective\.top_l=9: .* has 8 labels per example"
    ):
        _iterator(scenes_builder, scenes_dir, good, **{"objective.top_l": 9})
    labels = np.zeros((len(ids), L), np.int32)
    partial = write_cluster_output(
        str(tmp_path / "partial"), ids, labels, np.ones((256, E)), complete=False
    )
    with pytest.raises(ValueError, match=r"objective\.labels=.*partial/clusters\.json: complete"):
        _iterator(scenes_builder, scenes_dir, partial)
    os.remove(os.path.join(partial, "clusters.json"))
    with pytest.raises(FileNotFoundError, match=r"labels=.*partial is not a complete clustering"):
        _iterator(scenes_builder, scenes_dir, partial)
    config = _load("mlcd")
    with config.unlocked():
        config.objective.labels = None
    with pytest.raises(ValueError, match=r"join_cluster_labels: set config\.objective\.labels"):
        TrainIterator(scenes_builder, config, None, fields=("image",), host_batch_size=16)
