"""Training input pipeline and its transforms: determinism, exact resumption, per-host
sharding, bad examples, op composition and per-op random streams, and the image ops."""

import hashlib
import os

import numpy as np
import pytest
from conftest import SMALL_SCENES, tiny_overrides

from configs import common
from input_pipeline import preprocess, transforms
from input_pipeline.pipeline import TrainIterator
from input_pipeline.tokenizers import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(scenes_dir, **extra):
    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    common.parse_overrides(config, tiny_overrides(scenes_dir, **extra))
    return config


@pytest.fixture(scope="module")
def tokenizer(scenes_builder):
    return load_tokenizer(os.path.join(scenes_builder.data_dir, "tokenizer.json"))


CLIP_FIELDS = ("image", "tokens")


def _iterator(builder, config, tokenizer, fields=CLIP_FIELDS, **kwargs):
    return TrainIterator(builder, config, tokenizer, fields=fields, **kwargs)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_batches_have_the_configured_layout(scenes_builder, scenes_dir, tokenizer):
    config = _config(scenes_dir)
    batch = next(_iterator(scenes_builder, config, tokenizer, host_batch_size=8))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (8, 48) and batch["tokens"].dtype == np.int32
    assert np.all((batch["tokens"] == tokenizer.eos_id).sum(1) == 1)


def test_same_seed_same_stream_and_exact_resume(scenes_builder, scenes_dir, tokenizer):
    config = _config(scenes_dir)
    it = _iterator(scenes_builder, config, tokenizer, host_batch_size=8)
    # 40 batches of 8 > 256 examples: the stream crosses an epoch boundary.
    first = _take(it, 37)
    state = it.get_state()
    rest = _take(it, 3)
    fresh = _iterator(scenes_builder, config, tokenizer, host_batch_size=8)
    _same(first + rest, _take(fresh, 40))
    resumed = _iterator(scenes_builder, config, tokenizer, host_batch_size=8)
    resumed.set_state(state)
    _same(rest, _take(resumed, 3))
    other = _iterator(scenes_builder, _config(scenes_dir, seed=1), tokenizer, host_batch_size=8)
    assert not np.array_equal(next(other)["image"], first[0]["image"])


def test_epochs_are_reshuffled_and_cover_the_split(scenes_builder, scenes_dir, tokenizer):
    config = _config(scenes_dir)
    with config.unlocked():
        config.pp.crop_scale = (1.0, 1.0)  # images pass unchanged (no flip_lr op)
    it = _iterator(scenes_builder, config, tokenizer, host_batch_size=16)
    digest = lambda im: hashlib.sha1(im.tobytes()).hexdigest()
    epoch1 = [digest(im) for b in _take(it, 16) for im in b["image"]]
    epoch2 = [digest(im) for b in _take(it, 16) for im in b["image"]]
    assert len(set(epoch1)) == 256 and set(epoch1) == set(epoch2)
    assert epoch1 != epoch2


def test_hosts_read_disjoint_examples(scenes_builder, scenes_dir, tokenizer):
    config = _config(scenes_dir)
    with config.unlocked():
        config.pp.crop_scale = (1.0, 1.0)
    seen = []
    for host in range(2):
        it = _iterator(
            scenes_builder,
            config,
            tokenizer,
            host_batch_size=16,
            process_index=host,
            process_count=2,
        )
        seen.append({im.tobytes() for b in _take(it, 8) for im in b["image"]})
    assert len(seen[0]) == len(seen[1]) == 128
    assert not seen[0] & seen[1]


class _CorruptSource:
    """A data source whose example 5 carries bytes that are not an image."""

    def __init__(self, source):
        self._source = source

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        example = dict(self._source[i])
        if i == 5:
            example["image"] = b"definitely not a png"
        return example


class _CorruptBuilder:
    def __init__(self, builder):
        self._builder = builder
        self.info, self.name, self.data_dir = builder.info, builder.name, builder.data_dir

    def as_data_source(self, **kw):
        return _CorruptSource(self._builder.as_data_source(**kw))


def test_unreadable_image_is_skipped_and_counted(scenes_builder, scenes_dir, tokenizer, caplog):
    config = _config(scenes_dir)
    it = _iterator(_CorruptBuilder(scenes_builder), config, tokenizer, host_batch_size=16)
    batches = _take(it, 16)  # one full epoch, minus the bad example, fits in 16 batches
    assert it.skipped == 1
    assert all(b["image"].shape == (16, 32, 32, 3) for b in batches)
    assert "unreadable image" in caplog.text and "train_" in caplog.text


def test_corrupted_shard_records_are_skipped_and_counted(scenes_builder, tmp_path):
    """Bytes flipped inside the train shard: the records of the damaged chunk are dropped and
    counted like undecodable images (this used to kill the run with a Riegeli hash-mismatch
    traceback), the stream is the same when resumed, and past config.data.max_skipped the run
    stops naming the record and the split."""
    import shutil

    from input_pipeline.datasets import synthetic_scenes

    root = str(tmp_path / "data")
    shutil.copytree(
        os.path.dirname(os.path.dirname(os.path.dirname(scenes_builder.data_dir))), root
    )
    builder = synthetic_scenes.build(root, prepare=False, **SMALL_SCENES)
    (shard,) = [f for f in os.listdir(builder.data_dir) if "train.array_record" in f]
    path = os.path.join(builder.data_dir, shard)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    config = _with_ops(root, ["random_resized_crop"])
    it = _iterator(builder, config, None, fields=("image",), host_batch_size=16)
    first = _take(it, 20)  # more than an epoch (256 examples): past the damaged records
    state, skipped_at_state = it.get_state(), it.skipped
    rest = _take(it, 20)
    assert it.skipped > skipped_at_state > 0
    assert all(b["image"].shape == (16, 32, 32, 3) for b in first + rest)
    # The count is of consumed examples (not of those prefetch threads ran into): it is part
    # of the state, so a resumed run counts exactly what the uninterrupted one does.
    assert state["skipped"] == skipped_at_state
    resumed = _iterator(builder, config, None, fields=("image",), host_batch_size=16)
    resumed.set_state(state)
    assert resumed.skipped == skipped_at_state
    for a, b in zip(rest, _take(resumed, 20), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert resumed.skipped == it.skipped
    strict = _with_ops(root, ["random_resized_crop"], **{"data.max_skipped": 0})
    with pytest.raises(
        ValueError,
        match=r"more than config\.data\.max_skipped=0; the last: record \d+ of split 'train' in .*Riegeli",
    ):
        _take(_iterator(builder, strict, None, fields=("image",), host_batch_size=16), 20)


def test_bad_split_or_text_key_names_the_key(scenes_builder, scenes_dir, tokenizer):
    with pytest.raises(ValueError, match=r"config\.data\.split='nope'"):
        _iterator(
            scenes_builder,
            _config(scenes_dir, **{"data.split": "nope"}),
            tokenizer,
            host_batch_size=8,
        )
    with pytest.raises(ValueError, match=r"config\.data\.text_keys: 'caption' is not a feature"):
        _iterator(
            scenes_builder,
            _config(scenes_dir, **{"data.text_keys": "('long_caption', 'caption')"}),
            tokenizer,
            host_batch_size=8,
        )


def _with_ops(scenes_dir, ops, **extra):
    config = _config(scenes_dir, **extra)
    with config.unlocked():
        config.pp.ops = tuple(ops)
    return config


def test_ops_are_checked_as_a_chain(scenes_builder, scenes_dir, tokenizer):
    def build(ops, fields=CLIP_FIELDS, tok=tokenizer):
        return _iterator(
            scenes_builder, _with_ops(scenes_dir, ops), tok, fields=fields, host_batch_size=8
        )

    with pytest.raises(ValueError, match=r"config\.pp\.ops\[1\]='crop': unknown transform"):
        build(["choose_text", "crop"])
    with pytest.raises(ValueError, match=r"'tokenize' reads \['text'\], which neither dataset"):
        build(["tokenize"])
    with pytest.raises(ValueError, match=r"objective needs batch field\(s\) \['tokens'\]"):
        build(["random_resized_crop", "choose_text"])
    with pytest.raises(ValueError, match=r"tokenize: the model has no text tower"):
        build(["choose_text", "tokenize"], tok=None)
    with pytest.raises(ValueError, match=r"cannot parse 'tokenize\(48\)'"):
        build(["choose_text", "tokenize(48)"])
    with pytest.raises(ValueError, match=r"unexpected keyword argument 'lenght'"):
        build(["choose_text", "tokenize(lenght=8)"])
    # Keyword arguments override the config's defaults; only the objective's fields remain.
    batch = next(build(["random_resized_crop(size=16)", "choose_text", "tokenize(length=8)"]))
    assert sorted(batch) == ["image", "tokens"]
    assert batch["image"].shape == (8, 16, 16, 3) and batch["tokens"].shape == (8, 8)


def test_each_op_draws_from_its_own_stream(scenes_builder, scenes_dir, tokenizer):
    """An op's draws do not depend on what other ops draw: with the caption choice before the
    crop, choosing among two captions instead of one leaves every crop unchanged."""
    ops = ["choose_text", "random_resized_crop", "tokenize"]
    images, tokens = [], []
    for keys in ("('long_caption',)", "('long_caption', 'short_caption')"):
        config = _with_ops(scenes_dir, ops, **{"data.text_keys": keys})
        batches = _take(_iterator(scenes_builder, config, tokenizer, host_batch_size=8), 4)
        images.append(np.concatenate([b["image"] for b in batches]))
        tokens.append(np.concatenate([b["tokens"] for b in batches]))
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(tokens[0], tokens[1])  # the captions were drawn differently


@transforms.TRANSFORMS.register("test_stamp_index_epoch")
class _StampIndexEpoch(transforms.Transform):
    """'stamp': int64 [2] = (the source fields 'index', 'epoch') of the example."""

    reads = ("index", "epoch")
    writes = ("stamp",)

    def __call__(self, example, rng):
        return {"stamp": np.array([example["index"], example["epoch"]], np.int64)}


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_examples_carry_their_epoch(scenes_builder, scenes_dir, process_count):
    """'epoch' counts the passes of each host's stream over its shard (256 examples, so with 3
    hosts shards of 86, 85 and 85: a pass is the host's shard, not the split / hosts)."""
    config = _with_ops(scenes_dir, ["test_stamp_index_epoch"])
    n = SMALL_SCENES["train_size"]
    for host in range(process_count):
        it = _iterator(
            scenes_builder,
            config,
            None,
            fields=("stamp",),
            host_batch_size=16,
            process_index=host,
            process_count=process_count,
        )
        shard = list(range(host, n, process_count))
        batches = _take(it, -(-5 * len(shard) // 32))  # ~2.5 passes
        index, epoch = np.concatenate([b["stamp"] for b in batches]).T
        position = np.arange(len(index))
        np.testing.assert_array_equal(epoch, position // len(shard))
        for e in range(2):  # each full pass holds every example of the shard once
            assert sorted(index[epoch == e]) == shard
        assert len(set(index[epoch == 2])) == (epoch == 2).sum()
        assert not np.array_equal(index[epoch == 0], index[epoch == 1])  # reshuffled


def test_first_op_stream_is_grains_random_map_stream():
    """Op 0 draws what grain's random_map draws for the same seed and position: runs made when
    the crop was a grain random_map reproduce exactly."""
    import grain

    seed = 7
    ds = grain.MapDataset.range(20).random_map(lambda x, rng: rng.random(3), seed=seed)
    chain = transforms.Chain([_Draw(None)], seed)
    for position in range(20):
        np.testing.assert_array_equal(chain({}, position)["draw"], ds[position])


class _Draw(transforms.Transform):
    writes = ("draw",)

    def __call__(self, example, rng):
        return {"draw": rng.random(3)}


def test_random_resized_crop_and_center_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    for _ in range(20):
        out = preprocess.random_resized_crop(image, 24, rng, scale=(0.3, 1.0))
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    whole = preprocess.random_resized_crop(image[:, :40], 40, rng, scale=(1.0, 1.0), ratio=(1, 1))
    np.testing.assert_array_equal(whole, image[:, :40])
    center = preprocess.resize_center_crop(image, 40)  # shorter side is already 40
    np.testing.assert_array_equal(center, image[:, 10:50])
    assert preprocess.resize_center_crop(image, 20).shape == (20, 20, 3)


def test_normalize_matches_clip_statistics():
    x = np.full((1, 2, 2, 3), 255, np.uint8)
    out = preprocess.normalize_images(x)
    expected = (1.0 - np.asarray(preprocess.MEAN_RGB)) / np.asarray(preprocess.STD_RGB)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
