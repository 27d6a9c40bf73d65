"""config.init_from: a fresh run starts from an export's or a run's model parameters (heads and
optimizer fresh, step 0), an image-only model takes the image tower of a two-tower export,
mismatches are named, and a resumed run continues from its checkpoint without reading it.

Training runs cost the most here, so there are three: the CLIP source run (exported once for
the module) and the interrupted / resumed pair; everything else checks the state the trainer
starts from, built as mlcd.train builds it (train_state.init_state)."""

import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import check_exact_resume, tiny_overrides
from mlcd_fakes import dataset_ids, mlcd_overrides, random_cluster_output

import mlcd
from configs import common
from input_pipeline.tokenizers import load_tokenizer
from mlcd import export, sharding, train, train_state, tree_utils
from mlcd.train_step import build_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = "configs/clip.py:tiny"
# The tiny presets' evaluators that tiny_overrides leaves on (after the last step).
NO_EVALS = ("zeroshot", "retrieval")


def _config(spec, overrides):
    """The preset with one-block towers (compile time: what is loaded, skipped or refused does
    not depend on the depth) and without its end-of-run evaluators (nothing here reads them)."""
    config = common.load_config(os.path.join(ROOT, spec))
    with config.unlocked():
        for tower in ("image", "text"):
            if config.model[tower] is not None:
                config.model[tower].depth = 1
    for name in NO_EVALS:
        if name in config.evals:
            config.evals[name].every = -1
    common.parse_overrides(config, overrides)
    return config


@pytest.fixture(scope="module")
def clip_run(scenes_dir, tmp_path_factory):
    """(workdir, export dir) of a CLIP tiny run trained 2 steps and exported at step 2."""
    tmp = tmp_path_factory.mktemp("clip_source")
    workdir = str(tmp / "run")
    train.train_and_evaluate(_config(CLIP, tiny_overrides(scenes_dir)), workdir)
    return workdir, export.export(workdir, str(tmp / "export"))


def _initial_state(spec, overrides, builder, tokenizer_file=None):
    """The train state a fresh run of `spec` starts from, built as mlcd.train builds it (the
    tokenizer resolved, then the model config; train_state.init_state on the config's mesh)."""
    config = _config(spec, overrides)
    tokenizer = None
    if config.model.text is not None:
        config.tokenizer = tokenizer_file or os.path.join(builder.data_dir, "tokenizer.json")
        tokenizer = load_tokenizer(config.tokenizer)
    config = train_state.resolve_model_config(config, tokenizer)
    mesh = sharding.make_mesh(config.mesh)
    built = build_train_step(config, mesh)
    with jax.set_mesh(mesh):
        return train_state.init_state(config, built.objective, built.tx, built.shardings), built


def _assert_equal(got, want):
    """The same leaves at the same paths, bit for bit."""
    flat = lambda tree: {
        tree_utils.path_str(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


@pytest.mark.parametrize("source", ["export", "run"])
def test_a_fresh_run_starts_from_the_model_parameters_with_a_fresh_optimizer(
    source, clip_run, scenes_builder, scenes_dir, caplog
):
    """init_from an export, or the run it was exported from (its latest checkpoint): the model
    parameters are the export's exactly, placed with the run's own (FSDP) shardings; the
    optimizer state, step and rng are those of a run without init_from."""
    workdir, export_dir = clip_run
    path = export_dir if source == "export" else workdir
    overrides = tiny_overrides(scenes_dir, sharding_rules="(('.*', 'fsdp'),)")
    caplog.set_level(logging.INFO)
    state, built = _initial_state(CLIP, [*overrides, f"--config.init_from={path}"], scenes_builder)
    fresh, _ = _initial_state(CLIP, overrides, scenes_builder)

    exported = mlcd.load_encoder(export_dir).params
    _assert_equal(state["params"], exported)
    assert any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(exported), strict=True)
    ), "the export equals a fresh initialisation: this test could not fail"
    for x, s in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(built.shardings["params"]), strict=True
    ):
        assert x.sharding == s
    assert not state["params"]["image"]["pos_embed"].sharding.is_fully_replicated
    _assert_equal(state["opt_state"], fresh["opt_state"])
    assert all(not np.any(x) for x in jax.tree.leaves(state["opt_state"]))  # moments, counts
    assert int(state["step"]) == 0
    np.testing.assert_array_equal(state["rng"], fresh["rng"])
    assert f"initialised towers from {os.path.abspath(path)} (step 2)" in caplog.text


def test_an_image_only_run_takes_the_image_tower_of_a_two_tower_export(
    clip_run, scenes_builder, scenes_dir, tmp_path, caplog
):
    """MLCD tiny from the CLIP export: the image tower is the export's, the text tower and
    logit scale are ignored (no error, no warning), the centers head starts as without
    init_from."""
    _, export_dir = clip_run
    labels = random_cluster_output(
        str(tmp_path / "clusters"), dataset_ids(scenes_builder), 256, 8, 128
    )
    overrides = mlcd_overrides(scenes_dir, labels)
    caplog.set_level(logging.INFO)
    state, _ = _initial_state(
        "configs/mlcd.py:tiny", [*overrides, f"--config.init_from={export_dir}"], scenes_builder
    )
    fresh, _ = _initial_state("configs/mlcd.py:tiny", overrides, scenes_builder)

    assert sorted(state["params"]) == ["heads", "image"]
    _assert_equal(state["params"]["image"], mlcd.load_encoder(export_dir).params["image"])
    _assert_equal(state["params"]["heads"], fresh["params"]["heads"])
    _assert_equal(state["opt_state"], fresh["opt_state"])
    assert "not in this model, ignored: t, text" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_init_from_skip_keeps_the_matching_parameters_fresh(clip_run, scenes_builder, scenes_dir):
    _, export_dir = clip_run
    overrides = tiny_overrides(scenes_dir)
    state, _ = _initial_state(
        CLIP,
        [*overrides, f"--config.init_from={export_dir}", "--config.init_from_skip=text/.*|t"],
        scenes_builder,
    )
    fresh, _ = _initial_state(CLIP, overrides, scenes_builder)
    _assert_equal(state["params"]["image"], mlcd.load_encoder(export_dir).params["image"])
    _assert_equal(state["params"]["text"], fresh["params"]["text"])
    np.testing.assert_array_equal(state["params"]["t"], fresh["params"]["t"])


def test_resumed_run_continues_from_its_checkpoint_not_init_from(
    clip_run, scenes_dir, tmp_path, caplog
):
    """A run started from an export, interrupted after step 1 and resumed, equals the
    uninterrupted run bit for bit: the resume does not read init_from (here deleted before
    it), which stays recorded in config.json."""
    source = str(tmp_path / "export")
    shutil.copytree(clip_run[1], source)
    overrides = tiny_overrides(scenes_dir, ckpt_every=1, init_from=source)
    run = lambda workdir: train.train_and_evaluate(_config(CLIP, overrides), workdir)
    workdir = str(tmp_path / "run")
    caplog.set_level(logging.INFO)
    run(workdir)
    assert f"initialised towers from {source} (step 2)" in caplog.text
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["init_from"] == source

    caplog.clear()
    shutil.rmtree(source)
    check_exact_resume(workdir, str(tmp_path / "resumed"), 2, run)
    assert "resumed from step 1" in caplog.text and "initialised towers" not in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model.embed_dim": 64},
            r"2 parameters differ from this run's model .*: image/proj/kernel: \(128, 128\) there, "
            r"\(128, 64\) here; text/proj/kernel: \(128, 128\) there, \(128, 64\) here\. "
            r"Keys that differ: config.model.embed_dim \(128 there, 64 here\)\. ",
        ),
        # The export has a parameter this model lacks in a tower it has: never dropped silently.
        (
            {"model.image.pool": "gap"},
            r"2 parameters differ .*: image/cls: \(1, 1, 128\) there, absent here; "
            r"image/pos_embed: \(1, 17, 128\) there, \(1, 16, 128\) here\. Keys that "
            r"differ: config.model.image.pool \('cls' there, 'gap' here\)\. ",
        ),
    ],
)
def test_parameters_that_differ_are_named_with_both_shapes(
    change, message, clip_run, scenes_builder, scenes_dir
):
    _, export_dir = clip_run
    overrides = tiny_overrides(scenes_dir, **change, init_from=export_dir)
    prefix = rf"^config.init_from='{re.escape(export_dir)}': "
    with pytest.raises(ValueError, match=prefix + message + ".*config.init_from_skip"):
        _initial_state(CLIP, overrides, scenes_builder)


def test_a_text_tower_needs_the_tokenizer_it_was_trained_with(
    clip_run, scenes_builder, scenes_dir, tmp_path
):
    """Another tokenizer file of the same vocabulary size (here: the same tokenizer written
    out again, so only the file differs) passes every shape check, but is refused."""
    _, export_dir = clip_run
    other = tmp_path / "tokenizer.json"
    with open(os.path.join(scenes_builder.data_dir, "tokenizer.json")) as f:
        other.write_text(json.dumps(json.load(f), indent=1))
    overrides = tiny_overrides(scenes_dir, init_from=export_dir)
    with pytest.raises(ValueError, match=r"its text tower was trained with the tokenizer .*"):
        _initial_state(CLIP, overrides, scenes_builder, tokenizer_file=str(other))


def test_settings_that_change_no_shape_are_a_warning(clip_run, scenes_builder, scenes_dir, caplog):
    _, export_dir = clip_run
    overrides = tiny_overrides(scenes_dir, **{"model.text.causal": False, "init_from": export_dir})
    _initial_state(CLIP, overrides, scenes_builder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("config.model.text.causal (True there, False here)" in m for m in warnings), warnings


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("missing", FileNotFoundError, ": no such directory"),
        ("foreign", ValueError, " is neither an mlcd export .* nor a training run"),
    ],
)
def test_a_directory_that_is_no_export_or_run_is_named(
    name, error, message, scenes_builder, scenes_dir, tmp_path
):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a model")
    path = str(tmp_path / name)
    with pytest.raises(error, match=rf"^config.init_from='{re.escape(path)}'{message}"):
        _initial_state(CLIP, tiny_overrides(scenes_dir, init_from=path), scenes_builder)
