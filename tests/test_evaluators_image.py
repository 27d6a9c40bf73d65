"""Image-to-image retrieval mAP and the grounding pointing game: maths vs scikit-learn and direct
loops, known answers (oracle encoders score 1, random ones chance), the real synthetic_scenes
layout, the heatmap plot, and the errors. No jax: encoders are numpy functions.
"""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from evaluator_fakes import FakeBuilder, FakeEncoder, random_embed, unit
from sklearn.metrics import average_precision_score

from input_pipeline.datasets.synthetic_scenes import split_sentences
from mlcd import evaluators
from mlcd.evaluators import common, grounding, image_retrieval


@pytest.fixture(autouse=True)
def _fresh_split_cache():
    """Fake builders are rebuilt per test; their cached splits must not outlive them."""
    yield
    common.clear_split_cache()


# ---------------------------------------------------------------------------- mAP maths


def test_average_precisions_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(25, 30)), 1)  # rounding makes many ties
    relevant = rng.random((25, 30)) < 0.2
    relevant[3] = False
    aps = image_retrieval.average_precisions(scores, relevant)
    for q in range(25):
        if q == 3:
            assert np.isnan(aps[q])
        else:
            assert aps[q] == pytest.approx(average_precision_score(relevant[q], scores[q]))


def test_average_precision_textbook_formula_without_ties():
    rng = np.random.default_rng(1)
    scores, relevant = rng.normal(size=(5, 12)), rng.random((5, 12)) < 0.4
    relevant[:, 0] = True
    for q, ap in enumerate(image_retrieval.average_precisions(scores, relevant)):
        ranked = relevant[q][np.argsort(-scores[q])]
        precisions = [ranked[: k + 1].mean() for k in range(12) if ranked[k]]
        assert ap == pytest.approx(np.mean(precisions))


def test_label_groups_are_multisets():
    labels = np.array([[1, 2, -1], [2, 1, -1], [1, -1, -1], [1, 1, 2], [-1, -1, -1], [2, -1, 1]])
    groups = image_retrieval.label_groups(labels)
    assert groups[0] == groups[1] == groups[5]
    assert len({groups[0], groups[2], groups[3]}) == 3 and groups[4] == -1
    scalar = image_retrieval.label_groups(np.array([3, 1, 3, -1]))
    assert scalar[0] == scalar[2] != scalar[1] and scalar[3] == -1 and scalar[1] >= 0


def test_mean_average_precision_matches_direct_loop():
    rng = np.random.default_rng(2)
    features = unit(rng.normal(size=(60, 6)))
    groups = rng.integers(-1, 12, size=60)  # some singletons (no relevant other) and unlabelled
    aps = []
    for q in np.flatnonzero(groups >= 0):
        others = [i for i in np.flatnonzero(groups >= 0) if i != q]
        relevant = groups[others] == groups[q]
        if relevant.any():
            aps.append(average_precision_score(relevant, features[others] @ features[q]))
    got = image_retrieval.mean_average_precision(features, groups)
    assert got == pytest.approx(np.mean(aps))
    with pytest.raises(ValueError, match="here: no image shares its label with any other image"):
        image_retrieval.mean_average_precision(features[:3], np.array([0, 1, 2]), "here")


# ---------------------------------------------------------------------------- mAP evaluator


def entity_builder(n=200, seed=0):
    """entity_ids: 1-2 entities of 5 (padded to 4 with -1, in random order); pixel [0,0,:2] and
    [0,1,:2] hold the sorted entity pair (255 = none)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        ids = rng.choice(5, size=rng.integers(1, 3), replace=False)
        image = np.full((4, 4, 3), 255, np.uint8)
        image[0, 0, : len(ids)] = np.sort(ids)
        entity_ids = np.full(4, -1, np.int32)
        entity_ids[: len(ids)] = rng.permutation(ids)
        examples.append({"image": image, "entity_ids": entity_ids})
    features = {"entity_ids": tfds.features.Tensor(shape=(4,), dtype=np.int32)}
    return FakeBuilder("fake_entities", {"test": examples}, features)


def set_onehot(images):
    """One-hot of the (sorted) entity set read from the pixels: 6 x 6 pair codes."""
    first, second = (np.minimum(images[:, 0, 0, c].astype(int), 5) for c in (0, 1))  # 255 -> 5
    code = first * 6 + second
    return np.eye(36, dtype=np.float32)[code]


def expected_random_ap(num_relevant, num_others):
    """E[AP] of a uniformly random ranking: an item at rank r has on average
    (r-1)(R-1)/(M-1) relevant items above it, so E[precision] = (H_M + (R-1)/(M-1) (M - H_M)) / M
    (H_M the harmonic number), the same for every relevant item."""
    r, m = np.asarray(num_relevant, float), float(num_others)
    h = np.sum(1.0 / np.arange(1, num_others + 1))
    return (h + (r - 1) / (m - 1) * (m - h)) / m


def test_image_retrieval_oracle_perfect_random_at_chance():
    builder = entity_builder()
    ev = evaluators.EVALUATORS.get("image_retrieval")(builder=builder, batch_size=64)
    encoder = FakeEncoder(set_onehot)
    assert ev.run(encoder) == {"image_retrieval/test/map": 1.0}
    assert {keys for keys, _ in encoder.image_calls} == {("embedding",)}
    groups = image_retrieval.label_groups(
        np.stack([ex["entity_ids"] for ex in builder.as_data_source("test")])
    )
    sizes = np.bincount(groups)[groups] - 1  # relevant others per query
    chance = np.mean(expected_random_ap(sizes[sizes > 0], len(groups) - 1))
    got = [ev.run(FakeEncoder(random_embed(s)))["image_retrieval/test/map"] for s in range(3)]
    assert abs(np.mean(got) - chance) < 0.2 * chance, (got, chance)


def test_image_retrieval_first_label_relevance():
    """relevance='first': two images are relevant when their label vectors start with the same
    id (synthetic_scenes: the same largest entity), whatever the rest of the vectors hold."""
    examples = list(entity_builder().as_data_source("test"))
    for ex in examples:
        ex["image"] = ex["image"].copy()
        ex["image"][1, 0, 0] = ex["entity_ids"][0]  # the embedding reads the first id here
    features = {"entity_ids": tfds.features.Tensor(shape=(4,), dtype=np.int32)}
    builder = FakeBuilder("fake_entities", {"test": examples}, features)
    onehot = lambda x: np.eye(5, dtype=np.float32)[x[:, 1, 0, 0]]
    ev = evaluators.EVALUATORS.get("image_retrieval")(builder=builder, relevance="first")
    assert ev.run(FakeEncoder(onehot)) == {"image_retrieval/test/map": 1.0}
    # Under the default multiset rule the same embedding is far from perfect.
    multiset = evaluators.EVALUATORS.get("image_retrieval")(builder=builder)
    assert multiset.run(FakeEncoder(onehot))["image_retrieval/test/map"] < 0.7
    with pytest.raises(
        ValueError, match=r"relevance='largest'; expected one of \('set', 'first'\)"
    ):
        image_retrieval.ImageRetrievalEvaluator(builder, relevance="largest")


def test_image_retrieval_on_digits_and_errors():
    ev = evaluators.EVALUATORS.get("image_retrieval")(
        builder=None, dataset="digits", representation="pre_logits"
    )
    pixels = lambda x: x[..., 0].reshape(len(x), -1).astype(np.float32)
    metrics = ev.run(FakeEncoder({"pre_logits": pixels}, image_size=8))
    assert list(metrics) == ["image_retrieval/digits/map"]
    assert 0.5 < metrics["image_retrieval/digits/map"] < 1.0  # raw pixels: good, not perfect
    with pytest.raises(ValueError, match="unknown representation 'patch_embeddings'"):
        image_retrieval.ImageRetrievalEvaluator(None, representation="patch_embeddings")
    ev = image_retrieval.ImageRetrievalEvaluator(entity_builder(), label_key="entities")
    with pytest.raises(KeyError, match="split 'test' has no feature 'entities'"):
        ev.run(FakeEncoder(set_onehot))


# ---------------------------------------------------------------------------- grounding maths


def cells_loop(box, grid):
    """Reference of the on-object rule: centre inside the box, or the cell holds the box centre."""
    ymin, xmin, ymax, xmax = box
    cy, cx = (ymin + ymax) / 2, (xmin + xmax) / 2
    out = []
    for r in range(grid):
        for c in range(grid):
            centre_in = ymin <= (r + 0.5) / grid <= ymax and xmin <= (c + 0.5) / grid <= xmax
            holds_centre = min(int(cy * grid), grid - 1) == r and min(int(cx * grid), grid - 1) == c
            out.append(centre_in or holds_centre)
    return out


@pytest.mark.parametrize("grid", [4, 5])
def test_on_object_cells_match_loop(grid):
    rng = np.random.default_rng(grid)
    corner = rng.random((50, 2)) * 0.9
    extent = rng.random((50, 2)) * rng.choice([0.05, 0.5], size=(50, 1))  # tiny and large boxes
    boxes = np.concatenate([corner, np.minimum(corner + extent, 1.0)], axis=1)
    boxes[0] = [0.0, 0.0, 1.0, 1.0]
    got = grounding.on_object_cells(boxes, grid)
    np.testing.assert_array_equal(got, [cells_loop(b, grid) for b in boxes])
    assert got.any(axis=1).all() and got[0].all()


def test_pointing_hits_count_ties_against_the_model():
    sims = np.array([[0.1, 0.9, 0.2], [0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0.3, 0.3, 0.3]])
    on = np.array([[0, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]], bool)
    np.testing.assert_array_equal(grounding.pointing_hits(sims, on), [True, True, False, False])


# ---------------------------------------------------------------------------- grounding evaluator

QUADRANTS = ((0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5))


def scenes_like_builder(n=40, seed=0, size=32):
    """synthetic_scenes layout: 1-3 objects in distinct quadrants (so their cells never overlap),
    one sentence each plus a background sentence, shuffled. Pixel [0,0,0] = example index."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        boxes = np.zeros((4, 4), np.float32)
        for j, q in enumerate(rng.choice(4, size=k, replace=False)):
            y0, x0 = np.array(QUADRANTS[q]) + rng.random(2) * 0.2
            h, w = rng.uniform(0.03, 0.28, size=2)
            boxes[j] = y0, x0, y0 + h, x0 + w
        sentences = [f"object {j} of image {i}." for j in range(k)] + ["a gray background."]
        order = rng.permutation(k + 1)
        image = np.zeros((size, size, 3), np.uint8)
        image[0, 0, 0] = i
        box_sentence = np.full(4, -1, np.int32)
        box_sentence[:k] = np.argsort(order)[:k]
        examples.append(
            {
                "image": image,
                "long_caption": " ".join(sentences[s] for s in order).encode(),
                "boxes": boxes,
                "box_sentence": box_sentence,
                "num_objects": np.int32(k),
            }
        )
    return FakeBuilder("fake_scenes", {"test": examples}, {})


def oracle_encoder(examples, grid, size):
    """Text: one-hot over every distinct sentence (+ 1 background dim). Patches of image i: the
    one-hot of object j's sentence on j's cells (`cells_loop`), the background dim elsewhere."""
    vocab: dict[str, int] = {}
    patch_maps = []
    for ex in examples:
        sentences = split_sentences(ex["long_caption"].decode())
        cells = np.zeros((grid * grid,), np.int64)  # 0 = background
        for j in range(int(ex["num_objects"])):
            text = sentences[ex["box_sentence"][j]]
            cells[np.asarray(cells_loop(ex["boxes"][j], grid))] = vocab.setdefault(
                text, len(vocab) + 1
            )
        patch_maps.append(cells)
    dim = len(vocab) + 1
    embed_texts = lambda texts: np.eye(dim, dtype=np.float32)[[vocab[t] for t in texts]]
    patches = lambda images: np.eye(dim, dtype=np.float32)[
        np.stack([patch_maps[i] for i in images[:, 0, 0, 0]])
    ]
    return FakeEncoder({"patch_embeddings": patches}, embed_texts, image_size=size)


def test_grounding_oracle_perfect_random_at_box_fraction_and_plot(tmp_path):
    builder = scenes_like_builder()
    examples = builder.as_data_source("test")
    plot = tmp_path / "plots" / "grounding.png"
    ev = evaluators.EVALUATORS.get("grounding")(builder=builder, plot_path=str(plot), num_plot=3)
    encoder = oracle_encoder(examples, grid=4, size=32)
    assert ev.run(encoder) == {"grounding/test/pointing_acc": 1.0}
    assert {keys for keys, _ in encoder.image_calls} == {("patch_embeddings",)}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(plot.parent) == [plot.name]

    boxes = [ex["boxes"][j] for ex in examples for j in range(int(ex["num_objects"]))]
    fraction = np.mean([np.mean(cells_loop(b, 4)) for b in boxes])  # chance: share of on cells
    rng = np.random.default_rng(0)
    random_patches = lambda x: unit(rng.normal(size=(len(x), 16, 8)))
    ev = grounding.GroundingEvaluator(builder, out_dir=str(tmp_path / "out"))
    encoder = FakeEncoder({"patch_embeddings": random_patches}, random_embed(1, 8), image_size=32)
    got = ev.run(encoder)["grounding/test/pointing_acc"]
    assert abs(got - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / len(boxes)), (
        got,
        fraction,
    )
    assert os.listdir(tmp_path / "out") == ["grounding_test.png"]


def test_grounding_on_real_synthetic_scenes(scenes_builder):
    """The real dataset's captions, box_sentence and boxes, with an oracle encoder: every pair is
    a hit except where two objects of one image have the very same sentence (their cells tie)."""
    examples = [scenes_builder.as_data_source("test")[i] for i in range(96)]
    indexed = []
    for i, ex in enumerate(examples):  # pixel [0,0,0] := index, for the oracle's look-up
        image = ex["image"].copy()
        image[0, 0, 0] = i
        indexed.append(dict(ex, image=image))
    scenes = FakeBuilder("synthetic_scenes", {"test": indexed}, {})
    ev = grounding.GroundingEvaluator(scenes, split="test", batch_size=32)
    metrics = ev.run(oracle_encoder(indexed, grid=4, size=32))
    duplicated, pairs = 0, 0
    for ex in examples:
        sentences = split_sentences(ex["long_caption"].decode())
        mine = [sentences[ex["box_sentence"][j]] for j in range(int(ex["num_objects"]))]
        pairs += len(mine)
        duplicated += sum(mine.count(s) > 1 for s in mine)
    assert len(ev._load()[1]["image"]) == pairs
    assert metrics["grounding/test/pointing_acc"] == pytest.approx(1 - duplicated / pairs)


def test_grounding_errors():
    builder = scenes_like_builder(n=4)
    builder._splits["test"][2]["box_sentence"][0] = 7
    ev = grounding.GroundingEvaluator(builder)
    encoder = oracle_encoder(scenes_like_builder(n=4).as_data_source("test"), 4, 32)
    with pytest.raises(
        ValueError, match="fake_scenes/test: example 2 object 0 points to sentence 7"
    ):
        ev.run(encoder)
    ev = grounding.GroundingEvaluator(scenes_like_builder(n=4))
    not_square = FakeEncoder(
        {"patch_embeddings": lambda x: unit(np.ones((len(x), 12, 3)))}, encoder.text_fn, 32
    )
    with pytest.raises(ValueError, match="patch_embeddings has 12 patches, not a square grid"):
        ev.run(not_square)
    builder = FakeBuilder("b", {"test": [{"image": np.zeros((4, 6, 3), np.uint8)}]}, {})
    builder._splits["test"][0].update(
        long_caption=b"x.", boxes=np.zeros((4, 4)), box_sentence=np.zeros(4), num_objects=1
    )
    with pytest.raises(
        ValueError, match=r"grounding on b/test: images must be square, got \(4, 6\)"
    ):
        grounding.GroundingEvaluator(builder).run(encoder)
