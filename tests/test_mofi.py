"""MOFI as a method (mlcd/objectives/mofi.py, configs/mofi.py): the three variants' inputs and
heads, the loss as the weighted sum of the public losses, the entity ops of the input pipeline
(join, seeded draw, rendering) and their errors, and a multi-task run on the 8-device mesh that
resumes exactly and exports a plain two-tower encoder."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SMALL_SCENES, check_exact_resume, image_only, tiny_overrides

import mlcd
from configs import common
from input_pipeline import transforms
from input_pipeline.pipeline import TrainIterator
from input_pipeline.tokenizers import load_tokenizer
from mlcd import annotate, export, losses, objectives, train
from mlcd.annotation import store
from mlcd.metrics_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, E = 48, 128  # synthetic_scenes' 48 entities (divisible by the 8 devices), tiny embed dim
VARIANTS = ("tiny_sup", "tiny_con", "tiny")


@pytest.fixture(scope="module")
def annotations(scenes_dir, tmp_path_factory):
    """An annotation store of the small train split: alt-text candidates, no teacher filter,
    the whole 48-entity table kept (min_images_per_entity=0)."""
    config = common.load_config(os.path.join(ROOT, "configs/annotate.py:tiny"))
    out_dir = str(tmp_path_factory.mktemp("annotations"))
    common.parse_overrides(
        config,
        [
            f"--config.data.data_dir={scenes_dir}",
            *(f"--config.data.build.{k}={v}" for k, v in SMALL_SCENES.items()),
            f"--config.out_dir={out_dir}",
            "--config.filter.enabled=False",
            "--config.labels.min_images_per_entity=0",
            "--config.report.thresholds=()",
            "--config.verbose=False",
        ],
    )
    meta = annotate.run(config)
    assert meta["num_entities"] == C
    return out_dir


def _config(variant, scenes_dir, annotations_dir="unused", **extra):
    config = common.load_config(os.path.join(ROOT, f"configs/mofi.py:{variant}"))
    overrides = tiny_overrides(scenes_dir, **{"objective.annotations": annotations_dir, **extra})
    common.parse_overrides(config, image_only(overrides) if variant == "tiny_sup" else overrides)
    return config


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_declare_inputs_heads_and_towers(variant):
    config = _config(variant, "unused")
    objective = objectives.build(config)
    batch = objective.abstract_batch(4)
    assert sorted(batch) == sorted(objective.inputs)
    heads = objective.heads()
    if variant == "tiny_sup":
        # The paper's classifier variant: image-only, a mean of per-example terms.
        assert objective.inputs == ("image", "entity_ids") and objective.per_example
        assert config.model.text is None and config.model.logit_scale_init is None
    else:
        assert {"entity_ids", "entity_tokens", "text_entity"} <= set(objective.inputs)
        assert not objective.per_example and config.model.text is not None
        assert batch["entity_tokens"].shape == (4, config.pp.context_length)
        assert batch["text_entity"].shape == (4,)
    if variant == "tiny_con":
        assert heads == {}
    else:
        assert list(heads) == ["entities"] and heads["entities"].shape == (C, E)
        assert heads["entities"].sharding == "partial_fc"


def test_bad_settings_name_their_key():
    config = _config("tiny", "unused", **{"objective.w_sup": 0.0, "objective.w_con": 0.0})
    with pytest.raises(ValueError, match=r"w_sup, w_con and w_clip are all 0"):
        objectives.build(config)
    config = _config("tiny", "unused", **{"objective.w_con": -1.0})
    with pytest.raises(ValueError, match=r"config\.objective\.w_con must be >= 0"):
        objectives.build(config)
    config = _config("tiny_con", "unused")
    with config.unlocked():
        config.model.text = None
    with pytest.raises(ValueError, match=r"w_con / w_clip > 0 need a text tower"):
        objectives.build(config)


def test_loss_is_the_weighted_sum_of_the_public_losses():
    """w_sup * entity_classification + w_con * entity_contrastive + w_clip * CLIP, each term
    reported as a metric."""
    weights = {"objective.w_sup": 0.5, "objective.w_con": 2.0, "objective.w_clip": 0.25}
    config = _config("tiny", "unused", **weights, **{"objective.sample_ratio": 0.5})
    objective = objectives.build(config)
    assert "tokens" in objective.inputs
    keys = jax.random.split(jax.random.key(0), 6)
    b = 8
    unit = lambda k: jax.random.normal(k, (b, E)) / jnp.sqrt(E)
    out = {
        "image": {"embedding": unit(keys[0])},
        "zimg": mlcd.models.two_tower.l2_normalize(unit(keys[0])),
        "ztxt": mlcd.models.two_tower.l2_normalize(unit(keys[1])),
        "zent": mlcd.models.two_tower.l2_normalize(unit(keys[2])),
        "logit_scale": jnp.float32(10.0),
    }
    entity_ids = jnp.asarray(np.random.default_rng(0).integers(-1, C, (b, 4)), jnp.int32)
    batch = {"entity_ids": entity_ids, "text_entity": jnp.max(entity_ids, axis=1)}
    heads = {"entities": jax.random.normal(keys[3], (C, E))}
    loss, metrics = objective.loss(out, heads, batch, keys[4])
    sup = losses.entity_classification_loss(
        out["image"]["embedding"], heads["entities"], entity_ids, sample_ratio=0.5, rng=keys[4]
    )
    con = losses.entity_contrastive_loss(
        out["zimg"], out["zent"], entity_ids, batch["text_entity"], out["logit_scale"]
    )
    clip = losses.softmax_contrastive_loss(out["zimg"], out["ztxt"], out["logit_scale"])
    np.testing.assert_allclose(loss, 0.5 * sup + 2.0 * con + 0.25 * clip, rtol=1e-6)
    np.testing.assert_allclose(
        [metrics["sup_loss"], metrics["con_loss"], metrics["clip_loss"]], [sup, con, clip]
    )


def _ops(config, scenes_builder):
    tokenizer = load_tokenizer(os.path.join(scenes_builder.data_dir, "tokenizer.json"))
    features = tuple(scenes_builder.info.features.keys())
    ctx = transforms.Context(config, "synthetic_scenes", features, tokenizer)
    return transforms.build(config.pp.ops, ctx, objectives.build(config).inputs), tokenizer


def test_entity_ops_join_draw_and_render(scenes_builder, annotations):
    """join_entities gives the store's row of each example; choose_entity_text draws one of its
    entities, seeded per (op, position): the same position draws the same, over many positions
    every entity of the row is drawn; the text is the entity's name (or name: description)."""
    config = _config("tiny_con", scenes_builder.data_dir, annotations)
    ops, tokenizer = _ops(config, scenes_builder)
    ann = store.load_annotations(annotations)
    table = json.load(open(ann.entities_path))
    names = {e["id"]: e["name"] for e in table}
    chain = transforms.Chain(ops, seed=0)
    source = scenes_builder.as_data_source("train")
    with_entities = [i for i in range(len(source)) if (ann.labels[i] >= 0).sum() >= 2][:3]
    for i in with_entities:
        example = lambda i=i: {**source[i], "index": i}
        drawn = {int(chain(example(), p)["text_entity"]) for p in range(40)}
        row = {int(x) for x in ann.labels[i] if x >= 0}
        assert drawn == row  # every entity of the row, nothing else
        first, again = chain(example(), 7), chain(example(), 7)
        assert first["text_entity"] == again["text_entity"]
        np.testing.assert_array_equal(first["entity_ids"], ann.labels[i])
        assert first["entity_text"] == names[int(first["text_entity"])]
        expected = tokenizer.encode([first["entity_text"]], config.pp.context_length)[0]
        np.testing.assert_array_equal(first["entity_tokens"], expected)
    empty = [i for i in range(len(source)) if (ann.labels[i] < 0).all()]
    if empty:
        out = chain({**source[empty[0]], "index": empty[0]}, 0)
        assert out["text_entity"] == -1 and out["entity_text"] == ""

    config = _config(
        "tiny_con",
        scenes_builder.data_dir,
        annotations,
        **{"objective.entity_text": "name_description"},
    )
    ops, _ = _ops(config, scenes_builder)
    out = transforms.Chain(ops, seed=0)({**source[with_entities[0]], "index": with_entities[0]}, 0)
    entry = next(e for e in table if e["id"] == out["text_entity"])
    assert out["entity_text"] == f"{entry['name']}: {entry['description']}"


def test_entity_ops_refuse_a_store_that_does_not_match(scenes_builder, annotations, tmp_path):
    config = _config(
        "tiny_con", scenes_builder.data_dir, annotations, **{"objective.num_entities": 56}
    )
    with pytest.raises(ValueError, match=r"has 48 entities but config\.objective\.num_entities=56"):
        _ops(config, scenes_builder)
    # An entity table edited after annotation.
    edited = str(tmp_path / "edited")
    shutil.copytree(annotations, edited)
    path = os.path.join(edited, "entities.json")
    table = json.load(open(path))
    table[0]["name"] = "scarlet circle"
    json.dump(table, open(path, "w"))
    config = _config("tiny_con", scenes_builder.data_dir, edited)
    with pytest.raises(ValueError, match=r"entities\.json: the entity table does not match"):
        _ops(config, scenes_builder)
    # A store of another split: the id check fails on the first example, naming it.
    config = _config("tiny_sup", scenes_builder.data_dir, annotations, **{"data.split": "test"})
    iterator = TrainIterator(
        scenes_builder, config, None, fields=("image", "entity_ids"), host_batch_size=4
    )
    with pytest.raises(ValueError, match=r"example id 'test_\d+'"):
        next(iter(iterator))
    # No store configured.
    config = _config("tiny_sup", scenes_builder.data_dir, "")
    with pytest.raises(ValueError, match=r"set config\.objective\.annotations"):
        _ops(config, scenes_builder)


def test_multitask_trains_resumes_exactly_and_exports_two_towers(scenes_dir, annotations, tmp_path):
    """4 steps on the 8-device mesh; a copy cut back to its step-2 checkpoint resumes to the
    same params, optimizer state (entity classifier included) and metrics.jsonl. The export
    holds the towers and no classifier."""
    extra = {"total_steps": 4, "ckpt_every": 2, "keep_ckpts": 3, "objective.sample_ratio": 0.5}
    config = _config("tiny", scenes_dir, annotations, **extra)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 4
    for key in ("sup_loss", "con_loss", "accuracy", "frac_with_entity", "logit_scale"):
        assert np.isfinite(records[-1][f"train/{key}"]), key
    np.testing.assert_allclose(
        records[-1]["train/loss"], records[-1]["train/sup_loss"] + records[-1]["train/con_loss"]
    )

    state = check_exact_resume(
        workdir,
        str(tmp_path / "resumed"),
        4,
        lambda resumed: train.train_and_evaluate(
            _config("tiny", scenes_dir, annotations, **extra), resumed
        ),
    )
    assert state["params"]["heads"]["entities"].shape == (C, E)

    out = export.export(workdir, str(tmp_path / "export"))
    saved = ocp.StandardCheckpointer().metadata(os.path.join(out, "params")).item_metadata
    assert sorted(saved) == ["image", "t", "text"]
    encoder = mlcd.load_encoder(out)
    assert encoder.embed_texts(["red circle"])["embedding"].shape == (1, E)
