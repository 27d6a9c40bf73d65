"""DreamLIP as a method (mlcd/objectives/dreamlip.py, configs/dreamlip.py): the ablation
presets' inputs and heads, the loss as the weighted sum of the public losses, the sub-caption op
(pool, fallback, the (seed, index, epoch) draw, tokens and mask) and its errors, and a run on the
8-device mesh that resumes exactly and exports a plain two-tower encoder."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import check_exact_resume, tiny_overrides

import mlcd
from configs import common
from input_pipeline import sentences, transforms
from input_pipeline.tokenizers import load_tokenizer
from mlcd import export, losses, objectives, train
from mlcd.metrics_writer import read_metrics
from mlcd.models.two_tower import l2_normalize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E = 128  # the tiny embedding dimension
PRESETS = ("tiny_long", "tiny_sub", "tiny_short", "tiny")


def _config(preset, scenes_dir="unused", **extra):
    config = common.load_config(os.path.join(ROOT, f"configs/dreamlip.py:{preset}"))
    common.parse_overrides(config, tiny_overrides(scenes_dir, **extra))
    return config


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_declare_inputs_and_heads(preset):
    config = _config(preset)
    objective = objectives.build(config)
    batch = objective.abstract_batch(4)
    assert sorted(batch) == sorted(objective.inputs)
    assert not objective.per_example  # in-batch softmaxes
    if preset == "tiny_long":
        # The ablation's first row: CLIP on the whole long caption.
        assert objective.inputs == ("image", "tokens")
        assert config.data.text_keys == ("long_caption",)
    else:
        assert objective.inputs == ("image", "sub_tokens", "sub_mask", "sub_fallback")
        assert batch["sub_tokens"].shape == (4, 4, 24)
        assert batch["sub_mask"].shape == (4, 4) and batch["sub_mask"].dtype == jnp.bool_
        assert config.objective.include_short == (preset in ("tiny_short", "tiny"))
    heads = objective.heads()
    if preset == "tiny":
        assert list(heads) == ["local_scale"] and heads["local_scale"].shape == ()
    else:
        assert heads == {}


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"objective.w_mp": 0.0, "objective.w_sub": 0.0}, r"w_clip, w_mp and w_sub are all 0"),
        ({"objective.w_sub": -1.0}, r"config\.objective\.w_sub must be >= 0"),
        ({"objective.threshold": 1.0}, r"config\.objective\.threshold must be in \[0, 1\)"),
        ({"objective.scope": "global"}, r"config\.objective\.scope='global'"),
        ({"objective.num_sub_captions": 0}, r"config\.objective\.num_sub_captions must be >= 1"),
        ({"objective.sub_caption_length": 64}, r"sub_caption_length=64: must be in \[2, "),
    ],
)
def test_bad_settings_name_their_key(extra, match):
    with pytest.raises(ValueError, match=match):
        objective = objectives.build(_config("tiny", **extra))
        objective.abstract_batch(4)


def test_no_text_tower_is_refused():
    config = _config("tiny")
    with config.unlocked():
        config.model.text = None
    with pytest.raises(ValueError, match=r"dreamlip needs a text tower"):
        objectives.build(config)


def test_loss_is_the_weighted_sum_of_the_public_losses():
    """w_clip * CLIP + w_mp * multi-positive + w_sub * grouping (local scale exp(head), capped),
    each term reported as a metric, with the sub-caption statistics."""
    weights = {"objective.w_clip": 0.25, "objective.w_mp": 2.0, "objective.w_sub": 0.5}
    config = _config("tiny", **weights, **{"objective.scope": "batch"})
    objective = objectives.build(config)
    assert "tokens" in objective.inputs
    b, k, p = 8, 4, 16
    keys = jax.random.split(jax.random.key(0), 5)
    out = {
        "zimg": l2_normalize(jax.random.normal(keys[0], (b, E))),
        "ztxt": l2_normalize(jax.random.normal(keys[1], (b, E))),
        "zsub": l2_normalize(jax.random.normal(keys[2], (b, k, E))),
        "image": {"patch_embeddings": jax.random.normal(keys[3], (b, p, E))},
        "logit_scale": jnp.float32(10.0),
    }
    mask = jnp.asarray(np.random.default_rng(0).random((b, k)) < 0.7).at[:, 0].set(True)
    fallback = jnp.zeros((b,), jnp.int32).at[3].set(1)
    batch = {"sub_mask": mask, "sub_fallback": fallback}
    heads = {"local_scale": jnp.float32(np.log(20.0))}
    loss, metrics = objective.loss(out, heads, batch, keys[4])
    clip = losses.softmax_contrastive_loss(out["zimg"], out["ztxt"], out["logit_scale"])
    mp = losses.multi_positive_contrastive_loss(out["zimg"], out["zsub"], mask, out["logit_scale"])
    sub = losses.grouping_loss(
        out["zsub"], out["image"]["patch_embeddings"], mask, 20.0, scope="batch"
    )
    np.testing.assert_allclose(loss, 0.25 * clip + 2.0 * mp + 0.5 * sub, rtol=1e-5)
    np.testing.assert_allclose(
        [metrics["clip_loss"], metrics["mp_loss"], metrics["sub_loss"]], [clip, mp, sub], 1e-6
    )
    np.testing.assert_allclose(metrics["local_scale"], 20.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["sub_captions_per_image"], float(mask.sum()) / b)
    np.testing.assert_allclose(metrics["frac_empty_long_caption"], 1 / b)
    # The local scale is capped like the model's.
    _, metrics = objective.loss(out, {"local_scale": jnp.float32(9.0)}, batch, keys[4])
    assert float(metrics["local_scale"]) == 100.0


def _op(config, scenes_builder, peek=None):
    tokenizer = load_tokenizer(os.path.join(scenes_builder.data_dir, "tokenizer.json"))
    features = tuple(scenes_builder.info.features.keys())
    ctx = transforms.Context(config, "synthetic_scenes", features, tokenizer, peek=peek)
    (op,) = transforms.build(("sample_sub_captions",), ctx, ())
    return op, tokenizer


def _raw(source, i, epoch=0):
    return {**source[i], "index": i, "epoch": epoch}


def test_sub_captions_are_drawn_per_index_and_epoch_from_the_pool(scenes_builder):
    """Pool = short caption (include_short) + the long caption's sentences; K = 4 drawn without
    replacement when the pool has 4, else the whole pool padded and masked; the draw depends on
    (seed, index, epoch) only; tokens are the drawn texts tokenized to sub_caption_length."""
    config = _config("tiny", scenes_builder.data_dir)
    op, tokenizer = _op(config, scenes_builder)
    source = scenes_builder.as_data_source("train")
    assert op.reads == ("long_caption", "short_caption", "index", "epoch")
    for i in range(12):
        example = _raw(source, i)
        long_sentences = sentences.split_sentences(example["long_caption"].decode())
        pool = [example["short_caption"].decode(), *long_sentences]
        out = op(example, np.random.default_rng(123))
        assert out["sub_tokens"].shape == (4, 24) and out["sub_tokens"].dtype == np.int32
        assert out["sub_mask"].sum() == min(len(pool), 4) and out["sub_fallback"] == 0
        # The draw itself, reproduced from the public pieces.
        texts, mask = sentences.draw_subcaptions(pool, 4, sentences.subcaption_rng(0, i, 0))
        np.testing.assert_array_equal(out["sub_mask"], mask)
        np.testing.assert_array_equal(out["sub_tokens"], tokenizer.encode(texts, 24))
        assert len(set(t for t in texts if t)) == out["sub_mask"].sum()  # no repeats
        # The op's position-keyed stream plays no part; the epoch does.
        again = op(example, np.random.default_rng(7))
        np.testing.assert_array_equal(again["sub_tokens"], out["sub_tokens"])
    draws = {op(_raw(source, 5, epoch), None)["sub_tokens"].tobytes() for epoch in range(8)}
    assert len(draws) > 1

    # Without the short caption (tiny_sub), and with 2 sentences merged into one sub-caption.
    config = _config(
        "tiny_sub", scenes_builder.data_dir, **{"objective.sentences_per_sub_caption": 2}
    )
    op, _ = _op(config, scenes_builder)
    example = _raw(source, 3)
    long_sentences = sentences.split_sentences(example["long_caption"].decode())
    pool, fallback = op.pool(example)
    assert pool == sentences.merge_sentences(long_sentences, 2) and not fallback


def test_an_empty_long_caption_falls_back_to_the_short_caption(scenes_builder):
    config = _config("tiny_sub", scenes_builder.data_dir)
    op, tokenizer = _op(config, scenes_builder)
    example = {**_raw(scenes_builder.as_data_source("train"), 0), "long_caption": b"  \n . "}
    out = op(example, None)
    assert out["sub_fallback"] == 1
    np.testing.assert_array_equal(out["sub_mask"], [True, False, False, False])
    want = tokenizer.encode([example["short_caption"].decode()], 24)[0]
    np.testing.assert_array_equal(out["sub_tokens"][0], want)
    # Nothing at all: every slot is padding, still no crash (the losses skip the example).
    example["short_caption"] = b""
    out = op(example, None)
    assert out["sub_fallback"] == 1 and not out["sub_mask"].any()


def test_sub_caption_op_errors_name_the_config_key(scenes_builder):
    source = scenes_builder.as_data_source("train")
    peek = lambda n: [source[i] for i in range(min(n, len(source)))]
    config = _config("tiny", scenes_builder.data_dir, **{"objective.num_sub_captions": 7})
    with pytest.raises(
        ValueError, match=r"config\.objective\.num_sub_captions=7 is larger than every"
    ):
        _op(config, scenes_builder, peek=peek)
    _op(
        _config("tiny", scenes_builder.data_dir, **{"objective.num_sub_captions": 6}),
        scenes_builder,
        peek,
    )
    config = _config(
        "tiny", scenes_builder.data_dir, **{"objective.long_caption_keys": "('recap',)"}
    )
    with pytest.raises(
        ValueError, match=r"config\.objective\.long_caption_keys: 'recap' is not a feature"
    ):
        _op(config, scenes_builder)
    config = _config("tiny", scenes_builder.data_dir, **{"objective.short_caption_keys": "()"})
    with pytest.raises(ValueError, match=r"config\.objective\.short_caption_keys is empty"):
        _op(config, scenes_builder)


def test_full_method_trains_resumes_exactly_and_exports_two_towers(scenes_dir, tmp_path):
    """4 steps of the full method (separate patch projection, batch-wide grouping) on the
    8-device mesh; a copy cut back to its step-2 checkpoint resumes to the same params,
    optimizer state (local scale included) and metrics.jsonl, which needs the same sub-caption
    draws. The export holds the towers (with the patch projection) and no local scale."""
    extra = {
        "total_steps": 4,
        "ckpt_every": 2,
        "keep_ckpts": 3,
        "model.image.patch_proj": "separate",
        "objective.scope": "batch",
        "objective.w_clip": 0.5,
        "pp.ops": "('random_resized_crop', 'choose_text', 'tokenize', 'sample_sub_captions')",
    }
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config("tiny", scenes_dir, **extra), workdir)
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 4
    last = records[-1]
    for key in ("clip_loss", "mp_loss", "sub_loss", "local_scale", "sub_captions_per_image"):
        assert np.isfinite(last[f"train/{key}"]), key
    assert 2.0 <= last["train/sub_captions_per_image"] <= 4.0
    assert last["train/frac_empty_long_caption"] == 0.0
    np.testing.assert_allclose(
        last["train/loss"],
        0.5 * last["train/clip_loss"] + last["train/mp_loss"] + last["train/sub_loss"],
        rtol=1e-5,
    )

    state = check_exact_resume(
        workdir,
        str(tmp_path / "resumed"),
        4,
        lambda resumed: train.train_and_evaluate(_config("tiny", scenes_dir, **extra), resumed),
    )
    assert state["params"]["heads"]["local_scale"].shape == ()

    out = export.export(workdir, str(tmp_path / "export"))
    saved = ocp.StandardCheckpointer().metadata(os.path.join(out, "params")).item_metadata
    assert sorted(saved) == ["image", "t", "text"]
    assert "patch_proj" in saved["image"]
    encoder = mlcd.load_encoder(out)
    patches = encoder.embed_images(np.zeros((2, 32, 32, 3), np.uint8), ("patch_embeddings",))
    assert patches["patch_embeddings"].shape == (2, 16, E)
