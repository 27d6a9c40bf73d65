"""synthetic_scenes: determinism, features, geometry, segmentation maps, caption links, side
files, CLI, registry, and reading builds of older versions."""

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from input_pipeline import tokenizers
from input_pipeline.datasets import get_builder
from input_pipeline.datasets import synthetic_scenes as ss
from input_pipeline.datasets.synthetic_scenes import __main__ as cli
from input_pipeline.datasets.synthetic_scenes import builder as builder_lib
from input_pipeline.datasets.synthetic_scenes import captions, scenes
from mlcd.evaluators import common

TINY = dict(train_size=40, validation_size=10, test_size=20, image_size=32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = str(builder_lib.VERSION)


def _examples(builder, split):
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def built(data_root):
    return ss.build(data_root, seed=0, **TINY)


@pytest.fixture(scope="module")
def data(built):
    return {split: _examples(built, split) for split in ss.SPLITS}


def _all(data):
    return [ex for split in ss.SPLITS for ex in data[split]]


def test_split_sizes_ids_and_layout(built, data):
    assert {s: len(v) for s, v in data.items()} == {"train": 40, "validation": 10, "test": 20}
    root = os.fspath(built.data_dir)
    assert root.endswith(
        os.path.join("synthetic_scenes", "train40_val10_test20_res32_seed0_vocab1024", VERSION)
    )
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(root))
    for split in ss.SPLITS:
        assert [ex["id"] for ex in data[split]] == [
            f"{split}_{i:08d}".encode() for i in range(len(data[split]))
        ]


def test_feature_shapes_dtypes_and_padding(data):
    k = ss.MAX_OBJECTS
    for ex in _all(data):
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
        assert ex["segmentation"].dtype == np.uint8 and ex["segmentation"].shape == (32, 32)
        assert isinstance(ex["long_caption"], bytes) and isinstance(ex["short_caption"], bytes)
        n = int(ex["num_objects"])
        assert 1 <= n <= k
        for key in ("entity_ids", "colors", "shapes", "sizes", "box_sentence"):
            assert ex[key].dtype == np.int32 and ex[key].shape == (k,), key
            assert (ex[key][:n] >= 0).all() and (ex[key][n:] == -1).all(), key
        assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (k, 4)
        assert (ex["boxes"][n:] == 0).all()
        b = ex["boxes"][:n]
        assert (b >= 0).all() and (b <= 1).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (ex["colors"][:n] < len(ss.COLORS)).all() and (
            ex["shapes"][:n] < len(ss.SHAPES)
        ).all()
        assert (ex["sizes"][:n] < len(ss.SIZES)).all()


def test_object_counts_cover_one_to_four(data):
    counts = {int(ex["num_objects"]) for ex in data["train"]}
    assert counts == {1, 2, 3, 4}


def test_boxes_contain_their_object_and_nothing_outside(data):
    """Inside box j the saturated pixels are (mostly) object j's colour; outside every box no
    pixel is saturated (backgrounds are grey-level, object colours fully saturated)."""
    palette = scenes.COLOR_RGB
    for ex in _all(data):
        img = ex["image"].astype(np.float32)
        r = img.shape[0]
        saturation = img.max(-1) - img.min(-1)
        covered = np.zeros((r, r), bool)
        for j in range(int(ex["num_objects"])):
            y0, x0, y1, x1 = ex["boxes"][j] * r
            covered[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            inner = img[int(np.ceil(y0)) : int(y1), int(np.ceil(x0)) : int(x1)].reshape(-1, 3)
            strong = inner[inner.max(-1) - inner.min(-1) > 100]
            assert len(strong) >= 0.25 * len(inner), (ex["id"], j)
            nearest = np.argmin(((strong[:, None] - palette[None]) ** 2).sum(-1), axis=1)
            # Anti-aliased edge pixels may sit nearer a neighbouring hue; the interior decides.
            assert np.mean(nearest == ex["colors"][j]) >= 0.75, (ex["id"], j)
        assert saturation[~covered].max(initial=0) < 40, ex["id"]


def test_box_sentence_names_the_object(data):
    for ex in _all(data):
        sentences = ss.split_sentences(ex["long_caption"].decode())
        n = int(ex["num_objects"])
        assert len(sentences) == n + 1
        assert len(set(ex["box_sentence"][:n].tolist())) == n
        for j in range(n):
            words = re.findall(r"[a-z]+", sentences[ex["box_sentence"][j]])
            assert ss.COLORS[ex["colors"][j]] in words and ss.SHAPES[ex["shapes"][j]] in words
        (bg_index,) = set(range(n + 1)) - set(ex["box_sentence"][:n].tolist())
        assert ss.BACKGROUNDS[ex["background"]] in sentences[bg_index]


def test_split_sentences_is_exact():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = scenes.sample_scene(rng)
        sentences = [captions.object_sentence(o, rng) for o in scene.objects]
        assert ss.split_sentences(" ".join(sentences)) == sentences
    assert ss.split_sentences("a red circle. the background is dark.") == [
        "a red circle.",
        "the background is dark.",
    ]


def test_probe_labels_match_objects(data):
    for ex in _all(data):
        n = int(ex["num_objects"])
        sizes = ex["sizes"][:n]
        # Slot 0 is the largest object, strictly larger (by size class) than all others.
        assert (sizes[0] > sizes[1:]).all()
        assert ex["largest_shape"] == ex["shapes"][0]
        assert ex["largest_color"] == ex["colors"][0]
        assert ex["count"] == n - 1
        extent = ex["boxes"][:n, 2] - ex["boxes"][:n, 0]
        assert np.argmax(extent) == 0


def test_entities_table_and_ids(built, data):
    with open(os.path.join(built.data_dir, ss.ENTITIES_FILE)) as f:
        table = json.load(f)
    assert table == ss.entities()
    assert [e["id"] for e in table] == list(range(len(ss.COLORS) * len(ss.SHAPES)))
    for e in table:
        assert e["name"] == f"{e['color']} {e['shape']}" and e["description"]
        assert e["id"] == ss.COLORS.index(e["color"]) * len(ss.SHAPES) + ss.SHAPES.index(e["shape"])
    for ex in _all(data):
        n = int(ex["num_objects"])
        np.testing.assert_array_equal(
            ex["entity_ids"][:n], ex["colors"][:n] * len(ss.SHAPES) + ex["shapes"][:n]
        )


def test_classlabel_names(built):
    for key, names in ss.PROBE_NAMES.items():
        assert tuple(built.info.features[key].names) == names


def test_examples_regenerate_independently(data):
    for split, i in (("train", 7), ("test", 19)):
        stored = data[split][i]
        fresh = ss.generate_example(0, split, i, 32)
        np.testing.assert_array_equal(stored["image"], fresh["image"])
        assert stored["long_caption"].decode() == fresh["long_caption"]
        assert stored["short_caption"].decode() == fresh["short_caption"]
        np.testing.assert_array_equal(stored["boxes"], fresh["boxes"])
        np.testing.assert_array_equal(stored["segmentation"], fresh["segmentation"])


def test_build_is_deterministic_across_dirs_and_generation_paths(tmp_path, monkeypatch, data):
    # Force the process-pool path for the second build: the same seed must give the same bytes.
    monkeypatch.setattr(builder_lib, "_PARALLEL_MIN_EXAMPLES", 1)
    again = ss.build(str(tmp_path / "again"), seed=0, **TINY)
    for split in ss.SPLITS:
        for a, b in zip(data[split], _examples(again, split), strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    monkeypatch.setattr(builder_lib, "_PARALLEL_MIN_EXAMPLES", 10**9)
    other = ss.build(str(tmp_path / "other"), seed=1, **TINY)
    other_train = _examples(other, "train")
    assert not np.array_equal(data["train"][0]["image"], other_train[0]["image"])
    assert [e["long_caption"] for e in data["train"]] != [e["long_caption"] for e in other_train]


def test_config_names_are_distinct_and_validated():
    a = ss.SyntheticScenesConfig.create(**TINY)
    assert a.name != ss.SyntheticScenesConfig.create(**{**TINY, "train_size": 41}).name
    assert a.name != ss.SyntheticScenesConfig.create(**{**TINY, "image_size": 64}).name
    assert a.name != ss.SyntheticScenesConfig.create(**TINY, seed=1).name
    with pytest.raises(TypeError, match="colour_count"):
        ss.SyntheticScenesConfig.create(colour_count=3)
    with pytest.raises(ValueError, match="test_size"):
        ss.SyntheticScenesConfig.create(test_size=0)
    with pytest.raises(ValueError, match="image_size"):
        ss.SyntheticScenesConfig.create(image_size=8)
    with pytest.raises(ValueError, match="vocab_size"):  # caught before generating anything
        ss.SyntheticScenesConfig.create(vocab_size=100)


def test_side_files_regenerated_from_stored_data(built, data_root):
    root = os.fspath(built.data_dir)
    paths = [os.path.join(root, f) for f in (ss.TOKENIZER_FILE, ss.ENTITIES_FILE)]
    before = [open(p, "rb").read() for p in paths]
    for p in paths:
        os.remove(p)
    rebuilt = ss.build(data_root, seed=0, **TINY)
    assert rebuilt.generated_train_captions is None  # data reused, captions read back
    assert [open(p, "rb").read() for p in paths] == before
    assert not [f for f in os.listdir(root) if ".tmp" in f]


def test_interrupted_generation_never_looks_prepared(tmp_path, monkeypatch):
    real = builder_lib.generate_example

    def failing(seed, split, index, image_size):
        if split == "validation" and index == 3:
            raise RuntimeError("simulated crash")
        return real(seed, split, index, image_size)

    monkeypatch.setattr(builder_lib, "generate_example", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ss.build(str(tmp_path), **TINY)
    config = ss.SyntheticScenesConfig.create(**TINY)
    probe = ss.SyntheticScenes(config=config, data_dir=str(tmp_path))
    assert not probe.is_prepared()
    assert not os.path.exists(probe.data_dir)
    monkeypatch.setattr(builder_lib, "generate_example", real)
    done = ss.build(str(tmp_path), **TINY)
    assert done.is_prepared() and len(done.as_data_source("validation")) == 10


def test_zeroshot_prompts_are_in_vocabulary_and_in_distribution(built):
    tok = tokenizers.load_tokenizer(os.path.join(built.data_dir, ss.TOKENIZER_FILE))
    unk = tok.token_to_id("[UNK]")
    assert unk is not None
    prompts = list(captions.prompt_texts())
    assert len(prompts) == sum(
        len(t.templates) * len(ss.PROBE_NAMES[t.label_key]) for t in ss.ZEROSHOT_TASKS.values()
    )
    assert unk not in set(np.concatenate(tok.tokenize(prompts)).tolist())
    for name in ss.COLORS + ss.SHAPES:  # every class name is a learned whole-word token
        assert len(tok.tokenize([name])[0]) == 1, name
    # Every template, with some class name in its slot, occurs verbatim in generated captions.
    texts = []
    for i in range(4000):
        rng = np.random.default_rng([0, 0, i])
        scene = scenes.sample_scene(rng)
        texts += [captions.long_caption(scene, rng)[0], captions.short_caption(scene, rng)]
    corpus = "\n".join(texts)
    for task in ss.ZEROSHOT_TASKS.values():
        names = "|".join(ss.PROBE_NAMES[task.label_key])
        assert task.single_object
        for template in task.templates:
            body = re.escape(template.rstrip(".")).replace(r"\{\}", f"({names})")
            assert re.search(rf"(^|[ ,]){body}($|[ ,.])", corpus, flags=re.M), template


def test_get_builder(built, data_root, tmp_path):
    same = get_builder("synthetic_scenes", data_root, **TINY)
    assert os.fspath(same.data_dir) == os.fspath(built.data_dir)
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        get_builder("mnist", missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        get_builder("mnist", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not_a_dataset_xyz"):
        get_builder("not_a_dataset_xyz", str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        get_builder("mnist", None)
    with pytest.raises(ValueError, match="train_size"):
        get_builder("mnist", str(tmp_path), train_size=3)
    # build=False (evaluation) opens a prepared dataset and never generates a missing one.
    assert get_builder("synthetic_scenes", data_root, build=False, **TINY).is_prepared()
    typo = tmp_path / "dat"
    with pytest.raises(FileNotFoundError, match=r"not prepared in .*/dat; evaluation never"):
        get_builder("synthetic_scenes", str(typo), build=False, **TINY)
    assert not typo.exists()


def test_cli_builds(tmp_path, capsys):
    cmd = [
        sys.executable,
        "-m",
        "input_pipeline.datasets.synthetic_scenes",
        "--data_dir",
        str(tmp_path),
    ]
    cmd += ["--train_size", "6", "--validation_size", "2", "--test_size", "3", "--image_size", "16"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    root = tmp_path / "synthetic_scenes" / "train6_val2_test3_res16_seed0_vocab1024" / VERSION
    assert f"ready in {root}" in out.stdout
    assert (root / ss.TOKENIZER_FILE).is_file() and (root / ss.ENTITIES_FILE).is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data_dir", str(tmp_path), "--test_size", "0"])
    assert exit_info.value.code == 2 and "test_size" in capsys.readouterr().err


# ---------------------------------------------------------------------------- segmentation (1.2.0)


def test_segmentation_labels_each_object_inside_its_box(data):
    """Every object slot j < num_objects labels some pixels (j + 1), all inside its box's pixel
    range; no other label occurs; the labelled pixels are the object's colour and the
    background pixels are not saturated."""
    palette = scenes.COLOR_RGB
    for ex in _all(data):
        seg, n, r = ex["segmentation"], int(ex["num_objects"]), 32
        assert set(np.unique(seg).tolist()) <= set(range(n + 1)), ex["id"]
        img = ex["image"].astype(np.float32)
        for j in range(n):
            ys, xs = np.nonzero(seg == j + 1)
            assert len(ys) > 0, (ex["id"], j)
            y0, x0, y1, x1 = ex["boxes"][j] * r
            assert ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1), (ex["id"], j)
            assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1), (ex["id"], j)
            pixels = img[ys, xs]
            nearest = np.argmin(((pixels[:, None] - palette[None]) ** 2).sum(-1), axis=1)
            # Edge pixels (alpha 0.5..1) blend with the background; the majority decides.
            assert np.mean(nearest == ex["colors"][j]) >= 0.5, (ex["id"], j)
        # A background pixel has alpha < 0.5: at most half an object's saturation (<= 255)
        # plus its colour jitter (+-12 a channel) and the background's tint (+-6 a channel).
        saturation = img.max(-1) - img.min(-1)
        assert saturation[seg == 0].max(initial=0) <= 0.5 * (255 + 24) + 12, ex["id"]


@pytest.mark.parametrize("image_size", [16, 33, 64])
def test_segmentation_is_the_alpha_that_render_composites(image_size):
    """The label is the object covering at least half of a pixel's sub-pixels, counted directly
    here; objects never share a sub-pixel; and seg > 0 agrees with the alpha `render`
    composites (all objects drawn on one mask, box-filtered the same way) wherever one object
    alone covers the pixel: seg = 0 under an alpha >= 0.5 only in a pixel that two objects
    share (each under half of it; the gap between objects is 0.03 of the image side)."""
    s = scenes.SUPERSAMPLE
    big = image_size * s
    for i in range(60):
        scene = scenes.sample_scene(np.random.default_rng([5, i]))
        seg = scenes.segmentation(scene, image_size)
        assert seg.dtype == np.uint8 and seg.shape == (image_size, image_size)
        union = Image.new("L", (big, big))
        labels = Image.new("L", (big, big))
        for j, obj in enumerate(scene.objects):
            scenes._draw_object(ImageDraw.Draw(union), obj, big, 255)
            single = Image.new("L", (big, big))
            scenes._draw_object(ImageDraw.Draw(single), obj, big, 255)
            covered = np.asarray(labels) > 0
            assert not (covered & (np.asarray(single) > 0)).any(), (i, j)  # no shared sub-pixel
            scenes._draw_object(ImageDraw.Draw(labels), obj, big, j + 1)
        blocks = np.asarray(labels).reshape(image_size, s, image_size, s)
        counts = np.stack(
            [(blocks == j + 1).sum(axis=(1, 3)) for j in range(len(scene.objects))]
        )  # [K, R, R]
        expected = np.where(2 * counts.max(0) >= s * s, counts.argmax(0) + 1, 0)
        np.testing.assert_array_equal(seg, expected)
        alpha = np.asarray(union.reduce(s), np.float32) / 255.0
        shared = (counts > 0).sum(0) >= 2
        assert (alpha[seg > 0] >= 0.5).all()
        np.testing.assert_array_equal((seg > 0)[~shared], (alpha >= 0.5)[~shared])


# What generate_example gave with the 1.1.0 code (commit cc6cd3c, before the segmentation
# feature existed): a digest of every 1.1.0 feature, per (seed, split, index, image_size).
FEATURES_1_1_0 = (
    "id",
    "image",
    "long_caption",
    "short_caption",
    "alt_text",
    "num_objects",
    "entity_ids",
    "colors",
    "shapes",
    "sizes",
    "boxes",
    "box_sentence",
    "largest_shape",
    "largest_color",
    "count",
    "background",
)
DIGESTS_1_1_0 = {
    (0, "train", 0, 64): "e89c175feaf3f1d5",
    (0, "train", 5, 64): "41e5d842da8bb78f",
    (0, "validation", 3, 64): "2612cdb8139adc1c",
    (0, "test", 11, 64): "e04b1b7ed4f6ff4c",
    (3, "test", 1999, 64): "b1b7449e07a1809e",
    (0, "train", 7, 32): "1e8a73619f39159a",
}


def _digest(example: dict, keys) -> str:
    """sha256 of the values of `keys` (name, dtype, shape and bytes of each), 16 hex digits."""
    h = hashlib.sha256()
    for key in sorted(keys):
        value = example[key]
        if isinstance(value, str):
            value = value.encode()
        if isinstance(value, bytes):
            h.update(key.encode() + b"=" + value + b";")
        else:
            a = np.asarray(value)
            h.update(f"{key}:{a.dtype.str}:{a.shape}=".encode() + a.tobytes() + b";")
    return h.hexdigest()[:16]


def test_every_1_1_0_feature_is_unchanged(tmp_path):
    """Adding segmentation consumed no rng: images, captions and labels are what 1.1.0
    generated, at the default 64 px (digests) and in a real 1.1.0 build (the fixture)."""
    for args, want in DIGESTS_1_1_0.items():
        example = ss.generate_example(*args)
        assert set(example) == {*FEATURES_1_1_0, "segmentation"}
        assert _digest(example, FEATURES_1_1_0) == want, args
    old = ss.build(_fixture(tmp_path), prepare=False, **FIXTURE_BUILD)
    assert sorted(old.info.features.keys()) == sorted(FEATURES_1_1_0)
    for split in ss.SPLITS:
        source = old.as_data_source(split)
        assert len(source) == FIXTURE_BUILD[f"{split}_size"]
        for i in range(len(source)):
            stored, fresh = source[i], ss.generate_example(0, split, i, 16)
            for key in FEATURES_1_1_0:
                value = fresh[key].encode() if isinstance(fresh[key], str) else fresh[key]
                np.testing.assert_array_equal(stored[key], value, err_msg=f"{split} {i} {key}")


# ---------------------------------------------------------------------------- older builds

# tests/fixtures/synthetic_scenes_1.1.0/build.tar.gz: a data_dir holding the build of this config
# made by the 1.1.0 code (see the README beside it).
FIXTURE_BUILD = dict(train_size=6, validation_size=2, test_size=3, image_size=16)
FIXTURE_TAR = os.path.join(REPO, "tests", "fixtures", "synthetic_scenes_1.1.0", "build.tar.gz")


def _fixture(where) -> str:
    """Unpacks a fresh copy of the 1.1.0 fixture's data_dir into `where`; returns it."""
    with tarfile.open(FIXTURE_TAR) as tar:
        # filter="data" (no absolute paths, links out, devices) where tarfile has it (3.11.4+).
        tar.extractall(where, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return str(where)


def test_prepare_false_opens_an_older_build_then_prepare_builds_the_new_version(tmp_path, caplog):
    data_dir = _fixture(tmp_path / "data")
    config = ss.SyntheticScenesConfig.create(**FIXTURE_BUILD)
    config_dir = tmp_path / "data" / "synthetic_scenes" / config.name
    assert sorted(os.listdir(config_dir)) == ["1.1.0"]
    before = {p.name: p.read_bytes() for p in (config_dir / "1.1.0").iterdir()}

    with caplog.at_level(logging.WARNING):
        old = get_builder("synthetic_scenes", data_dir, build=False, **FIXTURE_BUILD)
    assert str(old.version) == "1.1.0" and old.name == "synthetic_scenes"
    assert os.fspath(old.data_dir) == str(config_dir / "1.1.0")
    assert "opened the older build" in caplog.text and "['segmentation']" in caplog.text
    assert os.path.isfile(os.path.join(old.data_dir, ss.TOKENIZER_FILE))  # side files beside
    example = old.as_data_source("test")[2]
    assert example["image"].shape == (16, 16, 3) and example["id"] == b"test_00000002"
    # An evaluator asking for the new feature gets a clear error naming it.
    with pytest.raises(KeyError, match="has no feature 'segmentation'"):
        common.read_split(old, "test", ["image", "segmentation"])
    common.clear_split_cache()
    assert sorted(os.listdir(config_dir)) == ["1.1.0"]  # nothing written

    new = ss.build(data_dir, **FIXTURE_BUILD)  # prepare=True: the new version beside the old
    assert str(new.version) == VERSION and os.fspath(new.data_dir) == str(config_dir / VERSION)
    assert new.as_data_source("test")[2]["segmentation"].shape == (16, 16)
    assert {p.name: p.read_bytes() for p in (config_dir / "1.1.0").iterdir()} == before
    again = ss.build(data_dir, prepare=False, **FIXTURE_BUILD)
    assert isinstance(again, ss.SyntheticScenes) and str(again.version) == VERSION


def test_prepare_false_skips_unfinished_versions(tmp_path):
    """A version directory without dataset_info.json (a partial copy, a foreign directory) is
    not a build: with nothing else there, evaluation gets the usual FileNotFoundError."""
    data_dir = _fixture(tmp_path / "data")
    config = ss.SyntheticScenesConfig.create(**FIXTURE_BUILD)
    version_dir = tmp_path / "data" / "synthetic_scenes" / config.name / "1.1.0"
    os.remove(version_dir / "dataset_info.json")
    with pytest.raises(FileNotFoundError, match=r"not prepared in .*; evaluation never .*1\.1\.0"):
        ss.build(data_dir, prepare=False, **FIXTURE_BUILD)


# A build whose train split is generated by the process pool (>= _PARALLEL_MIN_EXAMPLES) in
# about a second: long enough to be killed midway, short enough for a test.
POOL_BUILD = dict(train_size=4000, validation_size=4, test_size=4, image_size=16)
POOL_TEST = pytest.mark.skipif(
    not os.path.isdir("/proc/self") or len(os.sched_getaffinity(0)) < 2,
    reason="needs /proc (to find processes) and 2 CPUs (a pool)",
)


def _start_build(data_dir: str) -> subprocess.Popen:
    """Starts a build of POOL_BUILD in a new process; its output goes to `data_dir`.log (not a
    pipe: orphaned workers would hold a pipe open, and reading it would hang)."""
    code = (
        "from input_pipeline.datasets.synthetic_scenes import builder; "
        f"builder.build({data_dir!r}, **{POOL_BUILD!r})"
    )
    with open(data_dir + ".log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A test run started in the background (`cmd &` in a script) ignores SIGINT, and
            # children inherit that: Python then installs no KeyboardInterrupt handler. A user
            # pressing Ctrl-C on a build is what the test is about, so restore the default.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    proc.log = data_dir + ".log"
    return proc


@pytest.fixture
def start_build():
    """_start_build, killing at teardown what is still running (a failed test's builds)."""
    started = []
    yield lambda data_dir: started.append(_start_build(data_dir)) or started[-1]
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _log(proc: subprocess.Popen) -> str:
    with open(proc.log) as f:
        return f.read()[-3000:]


def _processes() -> dict[int, tuple[int, str, int]]:
    """{pid: (parent pid, state, start time)} of every process, from /proc."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        # The command name (in parentheses) may hold spaces: split after its closing one.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(name)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def _descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of the processes below `pid` (children, their children, ...)."""
    table, found, todo = _processes(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                todo.append(child)
    return found


def _still_running(procs: dict[int, int]) -> list[int]:
    """The processes of `procs` that still run (not ended, not a zombie, pid not reused)."""
    table = _processes()
    return [
        p
        for p, start in procs.items()
        if p in table and table[p][1] not in "ZX" and table[p][2] == start
    ]


def _incomplete_dirs(config_dir) -> list[str]:
    return sorted(n for n in os.listdir(config_dir) if n.startswith("incomplete."))


def _wait_for_pool(proc: subprocess.Popen, config_dir, not_named=()) -> dict[int, int]:
    """Waits until `proc` generates with its pool: its incomplete.* directory (other than
    `not_named`) exists and it has >= 3 descendants (2 workers + the resource tracker);
    returns them."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the build ended first: {_log(proc)}"
        procs = _descendants(proc.pid)
        mine = os.path.isdir(config_dir) and set(_incomplete_dirs(config_dir)) - set(not_named)
        if mine and len(procs) >= 3:
            return procs
        time.sleep(0.02)
    raise AssertionError("the build never started its process pool")


def _no_orphans_within(procs: dict[int, int], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while _still_running(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _still_running(procs)
    for pid in left:  # do not leave them to the rest of the test session
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed build still run after {seconds} s: {left}"


@POOL_TEST
def test_killed_build_leaves_no_process_and_the_next_build_cleans_up(tmp_path, start_build):
    """SIGKILL of a build mid-generation: its pool workers and the resource tracker exit
    within seconds (they used to run on as orphans). Its incomplete.* directory is removed by
    the next build, which waits for a build running concurrently in another process instead of
    breaking it, and the result has the examples and side files of a clean build."""
    data_dir = str(tmp_path / "data")
    config = ss.SyntheticScenesConfig.create(**POOL_BUILD)
    config_dir = tmp_path / "data" / "synthetic_scenes" / config.name

    killed = start_build(data_dir)
    procs = _wait_for_pool(killed, config_dir)
    time.sleep(0.3)  # let the workers start generating
    killed.kill()
    killed.wait(timeout=60)
    (stale,) = _incomplete_dirs(config_dir)  # killed midway: tfds could not clean up
    _no_orphans_within(procs)

    # A second build takes the lock, removes the stale directory and generates; a third one
    # (here, in this process) waits for it, then finds the data prepared.
    running = start_build(data_dir)
    _wait_for_pool(running, config_dir, not_named=[stale])
    assert stale not in _incomplete_dirs(config_dir)
    waited = ss.build(data_dir, **POOL_BUILD)
    assert running.wait(timeout=300) == 0, _log(running)
    assert waited.is_prepared() and waited.generated_train_captions is None  # reused, not rebuilt
    assert _incomplete_dirs(config_dir) == []

    # The same examples as a clean build (compared decoded: the shard bytes differ between
    # processes, tfds's serialisation order is not fixed) and the same side files.
    clean = ss.build(str(tmp_path / "clean"), **POOL_BUILD)
    raw = {"image": tfds.decode.SkipDecoding()}  # the PNG bytes: compared without decoding
    for split in ss.SPLITS:
        got = waited.as_data_source(split, decoders=raw)
        want = clean.as_data_source(split, decoders=raw)
        assert len(got) == len(want) == config.split_size(split)
        for i in range(len(want)):
            a, b = got[i], want[i]
            assert a.keys() == b.keys()
            for key in b:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split} {i} {key}")
    for name in (ss.TOKENIZER_FILE, ss.ENTITIES_FILE):
        with open(os.path.join(waited.data_dir, name), "rb") as f:
            with open(os.path.join(clean.data_dir, name), "rb") as g:
                assert f.read() == g.read(), name


@POOL_TEST
def test_sigterm_or_ctrl_c_of_a_build_leaves_no_process(tmp_path, start_build):
    """SIGTERM (default action: the parent dies at once) and Ctrl-C (KeyboardInterrupt in the
    parent, which shuts the pool down and lets tfds remove its incomplete directory)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        data_dir = str(tmp_path / sig.name)
        config_dir = os.path.join(
            data_dir, "synthetic_scenes", ss.SyntheticScenesConfig.create(**POOL_BUILD).name
        )
        proc = start_build(data_dir)
        procs = _wait_for_pool(proc, config_dir)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == -sig, _log(proc)
        _no_orphans_within(procs)
        if sig == signal.SIGINT:
            assert _incomplete_dirs(config_dir) == []


def test_only_dead_builds_own_incomplete_dirs_are_removed(tmp_path, caplog):
    """What the next build removes: tfds's temporary directories of this version holding only
    files tfds writes. Anything else that looks similar is left alone."""
    version = str(builder_lib.VERSION)
    stale = tmp_path / f"incomplete.AB12CD_{version}"
    stale.mkdir()
    for name in (
        "dataset_info.json",
        "colors.labels.txt",
        f"incomplete.{'0a' * 16}.synthetic_scenes-train.array_record-00000-of-00001",
    ):
        (stale / name).write_text("x")
    foreign = tmp_path / f"incomplete.ZZ99ZZ_{version}"
    foreign.mkdir()
    (foreign / "dataset_info.json").write_text("x")
    (foreign / "my_notes.txt").write_text("mine")
    (tmp_path / f"incomplete.QQ11QQ_{version}" / "sub").mkdir(parents=True)  # a subdirectory
    (tmp_path / "incomplete.AB12CD_0.0.1").mkdir()  # another version
    (tmp_path / f"incomplete.ab12cd_{version}").mkdir()  # not a name tfds makes
    (tmp_path / f"incomplete.LN12KS_{version}").symlink_to(stale)
    builder_lib._remove_stale_incomplete_dirs(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        [
            f"incomplete.ZZ99ZZ_{version}",
            f"incomplete.QQ11QQ_{version}",
            "incomplete.AB12CD_0.0.1",
            f"incomplete.ab12cd_{version}",
            f"incomplete.LN12KS_{version}",
        ]
    )
    assert (foreign / "my_notes.txt").read_text() == "mine"
    assert "my_notes.txt" in caplog.text
