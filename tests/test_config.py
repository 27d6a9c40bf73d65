"""Config loading, presets and `--config.key=value` overrides."""

import glob
import json
import os

import ml_collections
import pytest

from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Training configs (cluster.py and annotate.py configure python -m mlcd.cluster / mlcd.annotate;
# test_cluster.py and test_annotate.py build them).
TOOL_CONFIGS = ("common.py", "__init__.py", "cluster.py", "annotate.py", "convert.py")
METHOD_CONFIGS = [p for p in CONFIG_FILES if os.path.basename(p) not in TOOL_CONFIGS]


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=os.path.basename)
def test_every_preset_builds(path):
    presets = common.load_module(path).PRESETS
    assert "tiny" in presets, f"{path} has no tiny preset"
    for preset in presets:
        c = common.load_config(f"{path}:{preset}")
        assert isinstance(c, ml_collections.ConfigDict)
        assert c.batch_size > 0 and c.total_steps > 0
        assert c.objective.name


def test_default_preset_is_first():
    c = common.load_config(os.path.join(ROOT, "configs", "clip.py"))
    assert c.model.image.variant == "tiny"


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match=r"unknown preset.*known: tiny, b16"):
        common.load_config(os.path.join(ROOT, "configs", "clip.py") + ":huge")


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match=r"nope\.py"):
        common.load_config("configs/nope.py:tiny")


def test_overrides_are_typed():
    c = common.load_config(os.path.join(ROOT, "configs", "clip.py") + ":tiny")
    common.parse_overrides(
        c,
        [
            "--config.total_steps=7",
            "--config.optim.lr",
            "3",
            "--config.distributed.enabled=true",
            "--config.mesh=(('data', 2), ('model', 4))",
            "--config.model.dtype=bfloat16",
            "--config.tokenizer=/x/tok.json",
        ],
    )
    assert c.total_steps == 7
    assert c.optim.lr == 3.0 and isinstance(c.optim.lr, float)
    assert c.distributed.enabled is True
    assert c.mesh == (("data", 2), ("model", 4))
    assert c.model.dtype == "bfloat16"
    assert c.tokenizer == "/x/tok.json"


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        (
            "--config.totl_steps=3",
            r"--config.totl_steps: unknown config key. Did you mean: total_steps",
        ),
        ("--config.optim.lrr=3", r"--config.optim.lrr: unknown config key"),
        ("--config.nothere.x=3", r"--config.nothere: unknown config key"),
        ("--config.total_steps=abc", r"--config.total_steps: cannot parse 'abc' as int"),
        ("--config.total_steps=1.5", r"--config.total_steps: expected int"),
        ("--config.distributed.enabled=maybe", r"--config.distributed.enabled: expected a bool"),
        ("--steps=3", r"unrecognised argument '--steps=3'"),
    ],
)
def test_bad_overrides_name_the_key(arg, message):
    c = common.load_config(os.path.join(ROOT, "configs", "clip.py") + ":tiny")
    with pytest.raises((KeyError, ValueError), match=message):
        common.parse_overrides(c, [arg])


def test_a_config_stored_before_a_key_was_added_is_not_a_change():
    """config.json of a run written before model.image.patch_proj existed lacks the key: the
    value that reproduces the old code ('shared') is no change, any other value is."""
    c = common.load_config(os.path.join(ROOT, "configs", "clip.py") + ":tiny")
    stored = json.loads(c.to_json())
    del stored["model"]["image"]["patch_proj"]
    assert common.changed_keys(stored, c) == []
    c.model.image.patch_proj = "separate"
    assert common.changed_keys(stored, c) == [("model.image.patch_proj", "shared", "separate")]
