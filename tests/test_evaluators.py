"""Zero-shot and retrieval evaluators: metric maths vs brute force, known answers, errors.

Most datasets are tiny in-memory stand-ins for a tfds builder (`as_data_source`, `name`, and a
real tfds FeaturesDict as `info.features`); one test builds a real 24-example ArrayRecord tfds
dataset in tmp_path (~0.1 s). Encoders are numpy functions, so no jax is needed.
"""

import sys
import types

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from evaluator_fakes import FakeBuilder, FakeEncoder, random_embed, unit

from mlcd import evaluators
from mlcd.evaluators import common, retrieval, zero_shot

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "arrow")
COLORS = ("red", "green", "blue", "yellow")
TASKS = {
    "shape": {
        "label_key": "largest_shape",
        "templates": ("a {}.", "a picture of a {}"),
        "single_object": True,
    },
    "color": types.SimpleNamespace(label_key="largest_color", templates=("something {}",)),
    "shapes": {"label_key": "shape_set", "templates": ("a {}",)},
}


@pytest.fixture(autouse=True)
def _fresh_split_cache():
    """Fake builders are rebuilt per test; their cached splits must not outlive them."""
    yield
    common.clear_split_cache()


def scenes_builder(n=60, seed=0, name="fake_scenes", shape_feature=None):
    """Images encode (pixel [0,0,0], pixel [0,0,1]) = (shape id, color id) of one object.

    Multi-object examples carry a `largest_shape` label that disagrees with the pixel, so only an
    evaluator that applies the single_object filter scores the one-hot encoder perfectly.
    `shape_set` holds the pixel's shape plus a random other one, padded with -1.
    """
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        shape, color, num = rng.integers(len(SHAPES)), rng.integers(len(COLORS)), rng.integers(1, 4)
        image = np.zeros((4, 4, 3), np.uint8)
        image[0, 0, :2] = shape, color
        other = rng.integers(len(SHAPES))
        examples.append(
            {
                "image": image,
                "num_objects": np.int32(num),
                "largest_shape": np.int64(shape if num == 1 else (shape + 1) % len(SHAPES)),
                "largest_color": np.int64(color),
                "shape_set": np.array([other, shape, -1, -1], np.int64),
            }
        )
    features = {
        "largest_shape": shape_feature or tfds.features.ClassLabel(names=SHAPES),
        "largest_color": tfds.features.ClassLabel(names=COLORS),
        "shape_set": tfds.features.Sequence(tfds.features.ClassLabel(names=SHAPES), length=4),
    }
    return FakeBuilder(name, {"test": examples}, features)


def onehot_images(images):
    """[shape one-hot | color one-hot] / sqrt(2): cosine 1/sqrt(2) with the right class prompt."""
    z = np.zeros((len(images), len(SHAPES) + len(COLORS)), np.float32)
    z[np.arange(len(images)), images[:, 0, 0, 0]] = 1
    z[np.arange(len(images)), len(SHAPES) + images[:, 0, 0, 1]] = 1
    return unit(z)


def onehot_texts(texts):
    """One-hot of the class named in the text (whole-word match)."""
    vocab = SHAPES + COLORS
    z = np.zeros((len(texts), len(vocab)), np.float32)
    for i, t in enumerate(texts):
        (hit,) = [j for j, w in enumerate(vocab) if w in t.replace(".", " ").split()]
        z[i, hit] = 1
    return z


# ---------------------------------------------------------------------------- metric functions


def brute_force_hits(sim, text_to_image, k):
    """Per-query loops: sort candidates by score, wrong ones first among equals; check the top k."""
    n, t = sim.shape
    i2t = []
    for i in range(n):
        order = sorted(range(t), key=lambda c: (-sim[i, c], text_to_image[c] == i))
        i2t.append(any(text_to_image[c] == i for c in order[:k]))
    t2i = []
    for c in range(t):
        order = sorted(range(n), key=lambda i: (-sim[i, c], i == text_to_image[c]))
        t2i.append(text_to_image[c] in order[:k])
    return np.mean(i2t), np.mean(t2i)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recalls_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 13
    text_to_image = np.repeat(np.arange(n), rng.integers(1, 4, size=n))  # 1-3 captions per image
    rng.shuffle(text_to_image)
    sim = np.round(rng.normal(size=(n, len(text_to_image))), 1)  # rounding makes many ties
    got = retrieval.retrieval_recalls(sim, text_to_image, ks=(1, 2, 5))
    for k in (1, 2, 5):
        i2t, t2i = brute_force_hits(sim, text_to_image, k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t)
        assert got[f"t2i_r{k}"] == pytest.approx(t2i)


def test_best_positive_rank_counts_ties_against_the_positive():
    scores = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [1.0, 0.0, 1.0]])
    positive = np.array([[True, False, False], [True, False, True], [True, False, True]])
    # row 0: one tied negative; row 1: best positive 0.9 ties negative 0.9; row 2: positives tie
    # each other only.
    np.testing.assert_array_equal(common.best_positive_rank(scores, positive), [1, 1, 0])
    with pytest.raises(ValueError, match="query 1 has no positive"):
        common.best_positive_rank(scores, np.array([[True] * 3, [False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="finite"):
        common.best_positive_rank(np.full((1, 2), np.nan), np.array([[True, False]]))


def test_label_positives_multi_label_matches_loop():
    labels = np.array([[2, -1, -1], [0, 3, -1], [-1, -1, -1], [1, 1, 2]])
    mask = zero_shot.label_positives(labels, 4, "t")
    for i, row in enumerate(labels):
        for c in range(4):
            assert mask[i, c] == (c in row)
    with pytest.raises(ValueError, match=r"t: example 1 has label\(s\) \[4\] outside \[-1, 4\)"):
        zero_shot.label_positives(np.array([0, 4]), 4, "t")


def test_retrieval_ranks_rejects_image_without_caption():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval.retrieval_ranks(np.zeros((3, 2)), np.array([0, 2]))


def test_prompt_ensemble_is_renormalised_mean():
    rng = np.random.default_rng(0)
    table = {}

    def embed(texts):
        return np.stack([table.setdefault(t, unit(rng.normal(size=8))) for t in texts])

    encoder = FakeEncoder(text_fn=embed)
    w = zero_shot.class_embeddings(encoder, ["a", "b"], ["x {}", "y {} {}"], batch_size=3)
    for c, name in enumerate(["a", "b"]):
        mean = table[f"x {name}"] + table[f"y {name} {name}"]
        np.testing.assert_allclose(w[c], mean / np.linalg.norm(mean), rtol=1e-6)


# ---------------------------------------------------------------------------- zero-shot


def test_zeroshot_onehot_encoder_is_perfect_and_reads_once():
    builder = scenes_builder()
    ev = evaluators.EVALUATORS.get("zeroshot")(builder=builder, tasks=TASKS, batch_size=16)
    encoder = FakeEncoder(onehot_images, onehot_texts)
    first = ev.run(encoder)
    assert {keys for keys, _ in encoder.image_calls} == {("embedding",)}  # nothing else computed
    assert first == {
        "zeroshot/shape/top1": 1.0,
        "zeroshot/shape/top5": 1.0,
        "zeroshot/color/top1": 1.0,
        "zeroshot/shapes/top1": 1.0,
        "zeroshot/shapes/top5": 1.0,
    }
    assert ev.run(FakeEncoder(onehot_images, onehot_texts)) == first
    assert builder.opens == 1


def test_zeroshot_single_object_filter_matters():
    # Without the filter, multi-object examples (label != pixel) are all wrong.
    tasks = {"shape": dict(TASKS["shape"], single_object=False)}
    builder = scenes_builder()
    ev = zero_shot.ZeroShotEvaluator(builder, tasks=tasks)
    single = np.mean([int(ex["num_objects"]) == 1 for ex in builder.as_data_source("test")])
    assert ev.run(FakeEncoder(onehot_images, onehot_texts))["zeroshot/shape/top1"] == pytest.approx(
        single
    )


def test_zeroshot_random_encoder_is_near_chance():
    n = 600
    ev = zero_shot.ZeroShotEvaluator(scenes_builder(n=n, seed=1), tasks=TASKS, batch_size=128)
    metrics = ev.run(FakeEncoder(random_embed(0), random_embed(1)))
    # Labels are independent of random embeddings: each accuracy ~ Binomial(n', p) / n' with
    # p = k / C (k true-set size x top-k, capped at 1), n' >= n / 4 examples after filtering.
    for key, p in [
        ("zeroshot/shape/top1", 1 / 7),
        ("zeroshot/shape/top5", 5 / 7),
        ("zeroshot/color/top1", 1 / 4),
    ]:
        tol = 5 * np.sqrt(p * (1 - p) / (n / 4))
        assert abs(metrics[key] - p) < tol, (key, metrics[key], p)


def test_zeroshot_tasks_from_the_dataset_module(monkeypatch):
    module = types.ModuleType("input_pipeline.datasets.fake_scenes")
    module.ZEROSHOT_TASKS = TASKS
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ev = zero_shot.ZeroShotEvaluator(scenes_builder(), tasks=("color",), templates=("the {}",))
    assert [(t.name, t.templates, t.class_names) for t in ev.tasks] == [
        ("color", ("the {}",), COLORS)
    ]
    assert ev.run(FakeEncoder(onehot_images, onehot_texts)) == {"zeroshot/color/top1": 1.0}
    with pytest.raises(
        ValueError,
        match=r"unknown zero-shot task\(s\) \['size'\].*known: \['color', 'shape', 'shapes'\]",
    ):
        zero_shot.ZeroShotEvaluator(scenes_builder(), tasks=("shape", "size"))


def test_zeroshot_errors():
    with pytest.raises(
        ValueError, match="dataset 'fake_scenes' feature 'largest_shape' has no class names"
    ):
        zero_shot.ZeroShotEvaluator(
            scenes_builder(shape_feature=tfds.features.ClassLabel(num_classes=7)), tasks=TASKS
        )
    with pytest.raises(ValueError, match="dataset 'fake_scenes' has no feature 'size'"):
        zero_shot.ZeroShotEvaluator(
            scenes_builder(), tasks={"s": {"label_key": "size", "templates": ("{}",)}}
        )
    with pytest.raises(
        ValueError, match=r"no zero-shot task table \(no module input_pipeline\.datasets\.nowhere\)"
    ):
        zero_shot.ZeroShotEvaluator(scenes_builder(name="nowhere"), tasks=("shape",))
    with pytest.raises(ValueError, match="every template needs"):
        zero_shot.ZeroShotEvaluator(scenes_builder(), tasks=TASKS, templates=("no slot",))
    ev = zero_shot.ZeroShotEvaluator(scenes_builder(), tasks=TASKS)
    with pytest.raises(
        ValueError, match="embed_images 'embedding' must be L2-normalised; found a vector of norm 2"
    ):
        ev.run(FakeEncoder(lambda x: 2 * onehot_images(x), onehot_texts))
    with pytest.raises(
        ValueError,
        match=r"embed_texts 'embedding' must be \[N, D\] with N = 14 inputs; got \(1, 11\)",
    ):
        ev.run(FakeEncoder(onehot_images, lambda t: onehot_texts(t)[:1]))
    with pytest.raises(
        ValueError, match=r"embed_images returned no 'embedding' \(it returned \[\]\)"
    ):
        ev.run(FakeEncoder({"x": onehot_images}, onehot_texts))
    nan_images = lambda x: np.full((len(x), 3), np.nan, np.float32)
    with pytest.raises(ValueError, match="embed_images 'embedding' has non-finite values"):
        ev.run(FakeEncoder(nan_images, onehot_texts))


def test_unknown_evaluator_lists_known():
    known = "'fewshot', 'grounding', 'image_retrieval', 'linear_probe', 'retrieval', 'segmentation', 'zeroshot'"
    with pytest.raises(ValueError, match=rf"unknown evaluator 'linear'; known: \[{known}\]"):
        evaluators.EVALUATORS.get("linear")


# ---------------------------------------------------------------------------- retrieval


def captions_builder(n=40):
    """Image i encodes i in pixel [0,0,0]; long caption names i, short captions list i (or '')."""
    examples = []
    for i in range(n):
        image = np.zeros((4, 4, 3), np.uint8)
        image[0, 0, 0] = i
        examples.append(
            {
                "image": image,
                "long_caption": f"image number {i} .".encode(),
                "alt": np.array([f"pic {i}".encode(), b"" if i % 2 else f"photo {i}".encode()]),
            }
        )
    return FakeBuilder("fake_captions", {"test": examples}, {})


def identity_images(images):
    return np.eye(64, dtype=np.float32)[images[:, 0, 0, 0]]


def identity_texts(texts):
    return np.eye(64, dtype=np.float32)[
        [int(t.split()[-2 if t.endswith(".") else -1]) for t in texts]
    ]


def test_retrieval_identity_encoder_is_perfect_and_reads_once():
    builder = captions_builder()
    ev = evaluators.EVALUATORS.get("retrieval")(
        builder=builder, caption_key=["long_caption", "alt"], batch_size=16
    )
    first = ev.run(FakeEncoder(identity_images, identity_texts))
    assert first == {f"retrieval/test/{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    _, captions, text_to_image = ev._load()
    assert len(captions) == 40 * 2 + 20  # empty alt captions dropped
    assert captions[:3] == ["image number 0 .", "pic 0", "photo 0"]
    np.testing.assert_array_equal(text_to_image[:4], [0, 0, 0, 1])
    assert ev.run(FakeEncoder(identity_images, identity_texts)) == first
    assert builder.opens == 1


def test_retrieval_random_and_collapsed_encoders():
    n = 40
    ev = retrieval.RetrievalEvaluator(captions_builder(n), name="val", ks=(1, 10))
    metrics = ev.run(FakeEncoder(random_embed(0, dim=32), random_embed(1, dim=32)))
    for k in (1, 10):  # one caption per image: a query hits at chance with probability k / n
        p = k / n
        assert abs(metrics[f"retrieval/val/t2i_r{k}"] - p) < 5 * np.sqrt(p * (1 - p) / n) + 1 / n
    # Every score equal: ties count against the query, so nothing is retrieved.
    const = lambda x: np.ones((len(x), 1), np.float32)
    assert set(ev.run(FakeEncoder(const, const)).values()) == {0.0}


def test_retrieval_missing_caption_key():
    ev = retrieval.RetrievalEvaluator(captions_builder(), caption_key="short_caption")
    with pytest.raises(
        KeyError, match="dataset 'fake_captions' split 'test' has no feature 'short_caption'"
    ):
        ev.run(FakeEncoder(identity_images, identity_texts))


# ---------------------------------------------------------------------------- sentence retrieval

# Three images; "the background is dark." is in the captions of images 0 and 1, and image 2's
# alt text repeats a sentence of its long caption; image 1's alt is a one-word text ('' = padding).
SENTENCE_CAPTIONS = [
    ("a red circle. the background is dark.", ""),
    ("a blue star.\nthe background is dark.", "blue"),
    ("a green square. the background is light.", "the background is light."),
]
# Text embeddings (64-d like identity_images): sentence -> mix of image one-hots. The shared
# sentence leans to image 1; "a green square." points at image 0 (a wrong answer).
SENTENCE_VECTORS = {
    "a red circle.": {0: 1.0},
    "the background is dark.": {0: 0.6, 1: 0.8},
    "a blue star.": {1: 1.0},
    "blue": {1: 1.0},
    "a green square.": {0: 1.0},
    "the background is light.": {2: 1.0},
}


def sentence_builder():
    examples = []
    for i, (long, alt) in enumerate(SENTENCE_CAPTIONS):
        image = np.zeros((4, 4, 3), np.uint8)
        image[0, 0, 0] = i
        examples.append({"image": image, "long_caption": long.encode(), "alt": alt.encode()})
    return FakeBuilder("fake_sentences", {"test": examples}, {})


def sentence_texts(texts):
    z = np.zeros((len(texts), 64), np.float32)
    for row, text in enumerate(texts):
        for column, value in SENTENCE_VECTORS[text].items():
            z[row, column] = value
    return z


def test_sentence_queries_are_distinct_with_all_their_images():
    captions = ["a. b.", "b.\nc.", "  ", "c. c."]
    texts, positive = retrieval.sentence_queries(captions, np.array([0, 1, 1, 2]), 3, "t")
    assert texts == ["a.", "b.", "c."]
    np.testing.assert_array_equal(positive, [[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="t: example 1 has no sentence"):
        retrieval.sentence_queries(["a.", " \n "], np.array([0, 1]), 2, "t")


def test_sentence_retrieval_known_answer():
    """Ranks by hand: t2i, "a green square." (image 2) scores image 0 first and ties image 1
    (rank 2), every other sentence ranks one of its images first; i2t, image 0's best sentences
    (score 1) tie the wrong "a green square." (rank 1), images 1 and 2 rank a sentence first."""
    ev = retrieval.RetrievalEvaluator(
        sentence_builder(), caption_key=["long_caption", "alt"], ks=(1, 2, 3), sentences=True
    )
    metrics = ev.run(FakeEncoder(identity_images, sentence_texts))
    expected = {"t2i_r1": 5 / 6, "t2i_r2": 5 / 6, "t2i_r3": 1.0}
    expected.update({"i2t_r1": 2 / 3, "i2t_r2": 1.0, "i2t_r3": 1.0})
    assert metrics == pytest.approx({f"retrieval/test/{k}": v for k, v in expected.items()})
    texts, positive = ev._load_sentences()
    assert texts == [
        "a red circle.",
        "the background is dark.",
        "a blue star.",
        "blue",
        "a green square.",
        "the background is light.",
    ]
    assert positive[:, 1].tolist() == [True, True, False]  # one query, both images correct
    assert positive.sum() == 7  # image 2's repeated sentence counts once


def test_shared_sentence_rule_changes_the_result():
    """Single-target scoring (the shared sentence's first image only) misses "the background
    is dark." at R@1, since it scores image 1 higher: t2i R@1 4/6 instead of 5/6."""
    ev = retrieval.RetrievalEvaluator(
        sentence_builder(), caption_key=["long_caption", "alt"], ks=(1,), sentences=True
    )
    images, _, _ = ev._load()
    texts, positive = ev._load_sentences()
    sim = identity_images(images) @ sentence_texts(texts).T
    shared = retrieval.recalls_from_ranks(*retrieval.positive_ranks(sim, positive), ks=(1,))
    single = retrieval.retrieval_recalls(sim, positive.argmax(axis=0), ks=(1,))
    assert shared["t2i_r1"] == pytest.approx(5 / 6) and single["t2i_r1"] == pytest.approx(4 / 6)


def test_sentence_retrieval_perfect_model_on_synthetic_scenes_captions():
    """A model scoring 1 for every (image, sentence of its caption) pair and 0 otherwise gets
    R@1 = 1 both ways; with one target image per sentence the shared ones would miss."""
    from input_pipeline.datasets import synthetic_scenes

    captions = [
        synthetic_scenes.generate_example(0, "test", i, 32)["long_caption"] for i in range(60)
    ]
    _, positive = retrieval.sentence_queries(captions, np.arange(60), 60, "scenes")
    assert positive.sum(axis=0).max() > 1  # e.g. background sentences recur
    sim = positive.astype(np.float32)
    assert set(retrieval.recalls_from_ranks(*retrieval.positive_ranks(sim, positive)).values()) == {
        1.0
    }
    # Single target: each sentence's first image only (t2i; some images would have no text).
    first = np.zeros_like(positive)
    first[positive.argmax(axis=0), np.arange(positive.shape[1])] = True
    assert np.mean(common.best_positive_rank(sim.T, first.T) == 0) < 1.0


def test_sentences_false_is_the_caption_protocol():
    builder = sentence_builder()
    off = retrieval.RetrievalEvaluator(
        builder, caption_key=["long_caption", "alt"], sentences=False
    )
    metrics = off.run(FakeEncoder(identity_images, random_embed(0, dim=64)))
    images, captions, text_to_image = off._load()
    assert len(captions) == 5  # whole captions ('' alt dropped), not split
    np.testing.assert_array_equal(text_to_image, [0, 1, 1, 2, 2])
    ztxt = random_embed(0, dim=64)(captions)  # the vectors the encoder gave
    expected = retrieval.retrieval_recalls(identity_images(images) @ ztxt.T, text_to_image)
    assert metrics == {f"retrieval/test/{k}": v for k, v in expected.items()}
    # positive_ranks on the one-hot caption -> image matrix is retrieval_ranks.
    rng = np.random.default_rng(0)
    sim = np.round(rng.normal(size=(3, 5)), 1)
    onehot = text_to_image[None, :] == np.arange(3)[:, None]
    for a, b in zip(
        retrieval.retrieval_ranks(sim, text_to_image),
        retrieval.positive_ranks(sim, onehot),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="text 1 describes no image"):
        retrieval.positive_ranks(np.zeros((2, 2)), np.array([[True, False], [True, False]]))


# ---------------------------------------------------------------------------- a real tfds builder


class EvaluatorTestScenes(tfds.core.GeneratorBasedBuilder):
    """24 examples: pixel [0,0,0] = i, caption names shape i % 3 and number i."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "long_caption": tfds.features.Text(),
            "num_objects": tfds.features.Scalar(np.int32),
            "largest_shape": tfds.features.ClassLabel(names=SHAPES[:3]),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(24)}

    def _generate_examples(self, n):
        for i in range(n):
            image = np.zeros((8, 8, 3), np.uint8)
            image[0, 0, 0] = i
            caption = f"a {SHAPES[i % 3]} number {i}"
            yield (
                i,
                {
                    "image": PIL.Image.fromarray(image),
                    "long_caption": caption,
                    "num_objects": np.int32(1 + i % 2),
                    "largest_shape": i % 3,
                },
            )


def test_real_tfds_builder(tmp_path):
    builder = EvaluatorTestScenes(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    shape_images = lambda x: np.eye(len(SHAPES), dtype=np.float32)[x[:, 0, 0, 0] % 3]
    task = {"label_key": "largest_shape", "templates": ("a {}",), "single_object": True}
    zs = evaluators.EVALUATORS.get("zeroshot")(builder=builder, tasks={"shape": task}, batch_size=5)
    assert zs.run(FakeEncoder(shape_images, lambda t: onehot_texts(t)[:, : len(SHAPES)])) == {
        "zeroshot/shape/top1": 1.0
    }
    assert len(zs._task_data["shape"].rows) == 12  # the single-object half

    number = lambda texts: np.eye(24, dtype=np.float32)[[int(t.split()[-1]) for t in texts]]
    ret = evaluators.EVALUATORS.get("retrieval")(
        builder=builder, split="test[:10]", batch_size=4, ks=(1,)
    )
    metrics = ret.run(FakeEncoder(lambda x: np.eye(24, dtype=np.float32)[x[:, 0, 0, 0]], number))
    assert metrics == {"retrieval/test[:10]/i2t_r1": 1.0, "retrieval/test[:10]/t2i_r1": 1.0}


# ---------------------------------------------------------------------------- shared embeddings


def test_shared_embeddings_embed_each_image_once():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(12, 4, 4, 3), dtype=np.uint8)
    images[5] = images[2]  # a duplicate image is the same input
    fns = {
        "embedding": lambda x: unit(x.reshape(len(x), -1).astype(np.float32)),
        "pre_logits": lambda x: x[:, 0, 0].astype(np.float32),
        "patch_embeddings": lambda x: unit(x.reshape(len(x), 16, 3).astype(np.float32)),
    }
    encoder = FakeEncoder(fns, image_size=4)
    shared = evaluators.SharedEmbeddings(encoder)
    first = shared.embed_images(images[:8], keys=("embedding",))
    assert shared.computed == 8 and encoder.image_calls[-1][0] == ("embedding", "pre_logits")
    assert shared.embed_images(images[:2], keys=("pre_logits",)).keys() == {"pre_logits"}
    # Other order, subset, the other pooled key: all hits.
    again = shared.embed_images(images[[7, 2, 5, 0]], keys=("pre_logits", "embedding"))
    assert shared.computed == 8
    np.testing.assert_array_equal(again["embedding"], first["embedding"][[7, 2, 5, 0]])
    np.testing.assert_array_equal(again["pre_logits"], fns["pre_logits"](images[[7, 2, 5, 0]]))
    both = shared.embed_images(images, keys=("embedding", "patch_embeddings"))
    # Pooled outputs for the 4 new images; patch outputs (never computed) for all 12, alone.
    assert shared.computed == 8 + 4 + 12
    assert [keys for keys, _ in encoder.image_calls[-2:]] == [
        ("embedding", "pre_logits"),
        ("patch_embeddings",),
    ]
    np.testing.assert_array_equal(both["patch_embeddings"], fns["patch_embeddings"](images))
    np.testing.assert_array_equal(both["embedding"], fns["embedding"](images))
    shared.embed_images(images[8:], keys=("pre_logits", "patch_embeddings"))
    assert shared.computed == 24

    bad = evaluators.SharedEmbeddings(FakeEncoder(lambda x: np.ones((1, 2), np.float32)))
    with pytest.raises(ValueError, match=r"'embedding' must have one row per image: 3 images"):
        bad.embed_images(images[:3])


def test_evaluators_on_shared_embeddings_give_the_same_metrics():
    builder = captions_builder()
    ret = retrieval.RetrievalEvaluator(builder, caption_key=["long_caption", "alt"], batch_size=16)
    ret_val = retrieval.RetrievalEvaluator(builder, split="test[:5]", name="head", ks=(1,))
    builder._splits["test[:5]"] = builder._splits["test"][:5]
    direct = FakeEncoder(identity_images, identity_texts)
    expected = {**ret.run(direct), **ret_val.run(direct)}
    shared = evaluators.SharedEmbeddings(FakeEncoder(identity_images, identity_texts))
    assert {**ret.run(shared), **ret_val.run(shared)} == expected
    assert shared.computed == 40  # the 5 images of test[:5] were already embedded
