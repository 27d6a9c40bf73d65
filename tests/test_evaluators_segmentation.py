"""Zero-shot segmentation: exact mIoU / pixel accuracy on hand-made label maps, the bilinear
upsampling, the prompts, the real synthetic_scenes layout, older builds without the feature, the
plot and the errors. No jax: encoders are numpy functions."""

import os
import re
import tarfile

import numpy as np
import pytest
from evaluator_fakes import FakeBuilder, FakeEncoder, unit
from PIL import Image

from input_pipeline.datasets import synthetic_scenes as ss
from input_pipeline.datasets.synthetic_scenes import captions
from mlcd import evaluators
from mlcd.evaluators import common, segmentation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_split_cache():
    """Fake builders are rebuilt per test; their cached splits must not outlive them."""
    yield
    common.clear_split_cache()


# ---------------------------------------------------------------------------- a one-hot world

# Text and patch vectors live in one-hot space: dim 0 = background, then one dim per colour,
# then one per shape. A prompt maps to the dim of the class it names; a patch of an object to
# (colour dim + shape dim) / sqrt(2), so each task's argmax is exactly the patch's own class.
COLOR_DIM = {name: 1 + i for i, name in enumerate(ss.COLORS)}
SHAPE_DIM = {name: 1 + len(ss.COLORS) + i for i, name in enumerate(ss.SHAPES)}
DIM = 1 + len(ss.COLORS) + len(ss.SHAPES)


def prompt_vector(text: str) -> np.ndarray:
    words = set(re.findall(r"[a-z]+", text))
    dims = [COLOR_DIM[w] for w in words & COLOR_DIM.keys()]
    dims += [SHAPE_DIM[w] for w in words & SHAPE_DIM.keys()]
    assert len(dims) <= 1, text  # a prompt names one class
    v = np.zeros(DIM, np.float32)
    v[dims[0] if dims else 0] = 1.0
    return v


def text_fn(texts):
    return np.stack([prompt_vector(t) for t in texts])


def patch_vectors(colour_map: np.ndarray, shape_map: np.ndarray) -> np.ndarray:
    """[g, g] colour ids and shape ids (-1 = background) -> unit vectors [g * g, DIM]."""
    out = np.zeros((colour_map.size, DIM), np.float32)
    for p, (c, s) in enumerate(zip(colour_map.reshape(-1), shape_map.reshape(-1), strict=True)):
        if c < 0:
            out[p, 0] = 1.0
        else:
            out[p, 1 + c] = out[p, 1 + len(ss.COLORS) + s] = 1.0
    return unit(out)


def scene(seg, colors, shapes, index, size=None):
    """An example: image (pixel [0,0,0] = `index`, for the encoder's look-up), label map, slots."""
    seg = np.asarray(seg, np.uint8)
    size = size or seg.shape[0]
    image = np.zeros((size, size, 3), np.uint8)
    image[0, 0, 0] = index
    pad = lambda v: np.array(list(v) + [-1] * (ss.MAX_OBJECTS - len(v)), np.int32)
    return {"image": image, "segmentation": seg, "colors": pad(colors), "shapes": pad(shapes)}


def encoder_for(patch_maps, image_size):
    """patch_maps[i] = (colour ids [g, g], shape ids [g, g]) of image i (-1 = background)."""
    vectors = [patch_vectors(c, s) for c, s in patch_maps]
    patches = lambda images: np.stack([vectors[i] for i in images[:, 0, 0, 0]])
    return FakeEncoder({"patch_embeddings": patches}, text_fn, image_size=image_size)


RED, GREEN, BLUE = (ss.COLORS.index(n) for n in ("red", "green", "blue"))
CIRCLE, SQUARE, TRIANGLE, STAR = (
    ss.SHAPES.index(n) for n in ("circle", "square", "triangle", "star")
)

# Two 4 x 4 images with a 4 x 4 patch grid (one patch per pixel, so the upsampling is the
# identity and every count below is by hand). Image 0: a red square (slot 0) top right, a blue
# circle (slot 1) bottom left. Image 1: a red star (slot 0) along the top row.
SEG0 = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]]
SEG1 = [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
HAND_MADE = [
    scene(SEG0, [RED, BLUE], [SQUARE, CIRCLE], 0),
    scene(SEG1, [RED], [STAR], 1),
]


def truth_maps(seg, colors, shapes):
    """The perfect patch maps of a 1-patch-per-pixel image."""
    seg = np.asarray(seg, np.int64)  # seg - 1 below must not wrap around as uint8
    c = np.where(seg > 0, np.asarray([*colors, -1])[seg - 1], -1)
    s = np.where(seg > 0, np.asarray([*shapes, -1])[seg - 1], -1)
    return c, s


def hand_made_builder():
    return FakeBuilder("synthetic_scenes", {"test": [dict(e) for e in HAND_MADE]}, {})


def test_perfect_patch_maps_score_one():
    maps = [truth_maps(SEG0, [RED, BLUE], [SQUARE, CIRCLE]), truth_maps(SEG1, [RED], [STAR])]
    ev = evaluators.EVALUATORS.get("segmentation")(builder=hand_made_builder())
    assert ev.run(encoder_for(maps, 4)) == {
        "segmentation/test/color_miou": 1.0,
        "segmentation/test/color_pixel_acc": 1.0,
        "segmentation/test/shape_miou": 1.0,
        "segmentation/test/shape_pixel_acc": 1.0,
    }


def test_known_errors_give_the_hand_computed_ious():
    """Image 0: the blue circle predicted red (shape right). Image 1: the star's last pixel
    predicted background, and background pixel (3, 3) predicted a green triangle (classes in
    no ground truth: they count, with IoU 0)."""
    c0, s0 = truth_maps(SEG0, [RED, BLUE], [SQUARE, CIRCLE])
    c0[c0 == BLUE] = RED
    c1, s1 = truth_maps(SEG1, [RED], [STAR])
    c1[0, 3] = s1[0, 3] = -1
    c1[3, 3], s1[3, 3] = GREEN, TRIANGLE
    ev = segmentation.SegmentationEvaluator(hand_made_builder(), name="hand")
    got = ev.run(encoder_for([(c0, s0), (c1, s1)], 4))
    # Colour. Truth: background 20 px, red 8, blue 4. Prediction: background 20, red 11,
    # green 1. I: background 19, red 7, blue 0, green 0; U: 21, 12, 4, 1.
    colour = [19 / 21, 7 / 12, 0.0, 0.0]
    # Shape. Truth: background 20, square 4, circle 4, star 4. Prediction: background 20,
    # square 4, circle 4, star 3, triangle 1. I: 19, 4, 4, 3, 0; U: 21, 4, 4, 4, 1.
    shape = [19 / 21, 1.0, 1.0, 3 / 4, 0.0]
    assert got == pytest.approx(
        {
            "segmentation/hand/color_miou": np.mean(colour),
            "segmentation/hand/color_pixel_acc": 26 / 32,
            "segmentation/hand/shape_miou": np.mean(shape),
            "segmentation/hand/shape_pixel_acc": 30 / 32,
        },
        abs=1e-12,
    )
    # The same through the maths helpers, class by class (NaN: neither labelled nor predicted).
    _, truth = ev._load()
    pred = np.stack([truth_maps(SEG0, [RED, RED], [SQUARE, CIRCLE])[0], c1]) + 1
    ious = segmentation.iou_per_class(segmentation.confusion(truth["color"], pred, 9))
    want = np.full(9, np.nan)
    want[[0, 1 + RED, 1 + BLUE, 1 + GREEN]] = colour
    np.testing.assert_allclose(ious, want)


def test_upsampling_a_2x2_grid_to_8x8_gives_4x4_blocks():
    """Four distinct classes on a 2 x 2 patch grid of 8 x 8 images: bilinear scores, then argmax,
    give each patch's class on exactly its 4 x 4 block."""
    seg = np.zeros((8, 8), np.uint8)
    seg[:4, 4:], seg[4:, :4], seg[4:, 4:] = 1, 2, 3  # background top left
    example = scene(seg, [RED, GREEN, BLUE], [CIRCLE, SQUARE, STAR], 0)
    builder = FakeBuilder("synthetic_scenes", {"test": [example]}, {})
    grid_c = np.array([[-1, RED], [GREEN, BLUE]])
    grid_s = np.array([[-1, CIRCLE], [SQUARE, STAR]])
    ev = segmentation.SegmentationEvaluator(builder)
    metrics = ev.run(encoder_for([(grid_c, grid_s)], 8))
    assert metrics["segmentation/test/color_miou"] == 1.0
    assert metrics["segmentation/test/shape_pixel_acc"] == 1.0
    # predict() itself, on one-hot scores [1, 4, 4 classes].
    pred = segmentation.predict(np.eye(4, dtype=np.float32)[None], 8, 8)
    np.testing.assert_array_equal(pred[0], np.kron(np.arange(4).reshape(2, 2), np.ones((4, 4))))


@pytest.mark.parametrize(("out_size", "in_size"), [(8, 2), (16, 4), (64, 8), (7, 3), (5, 5)])
def test_bilinear_matrix_matches_pil(out_size, in_size):
    """The half-pixel-centre convention of the docstring is PIL's (and jax.image.resize's)
    bilinear upsampling, clamped at the edges."""
    rng = np.random.default_rng(out_size)
    grid = rng.normal(size=(in_size, in_size)).astype(np.float32)
    m = segmentation.bilinear_matrix(out_size, in_size)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    pil = Image.fromarray(grid, mode="F").resize((out_size, out_size), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(m @ grid @ m.T, np.asarray(pil), atol=1e-5)


def test_prompts_are_the_caption_grammar_and_the_zero_shot_templates():
    seen = []
    record = lambda texts: seen.extend(texts) or text_fn(texts)
    maps = [truth_maps(SEG0, [RED, BLUE], [SQUARE, CIRCLE]), truth_maps(SEG1, [RED], [STAR])]
    encoder = encoder_for(maps, 4)
    encoder.text_fn = record
    segmentation.SegmentationEvaluator(hand_made_builder(), tasks="shape").run(encoder)
    background = {t.format(bg=b) for t in captions.BACKGROUND_TEMPLATES for b in ss.BACKGROUNDS}
    shape = {t.format(n) for t in ss.ZEROSHOT_TASKS["shape"].templates for n in ss.SHAPES}
    assert set(seen) == background | shape and len(background) == 24
    assert "the background is striped." in background


def test_real_synthetic_scenes_with_a_per_pixel_oracle(scenes_builder, tmp_path):
    """The real dataset's label maps and slot arrays, an oracle with one patch per pixel
    (32 x 32 patches of a 32 px image): every task scores 1, and the plot is written."""
    examples = [scenes_builder.as_data_source("test")[i] for i in range(24)]
    indexed, maps = [], []
    for i, ex in enumerate(examples):
        seg = ex["segmentation"]
        assert seg.shape == (32, 32) and seg.max() == ex["num_objects"]
        image = ex["image"].copy()
        image[0, 0, 0] = i
        indexed.append(dict(ex, image=image))
        n = int(ex["num_objects"])
        maps.append(truth_maps(seg, ex["colors"][:n].tolist(), ex["shapes"][:n].tolist()))
    builder = FakeBuilder("synthetic_scenes", {"test": indexed}, {})
    ev = segmentation.SegmentationEvaluator(builder, out_dir=str(tmp_path), num_plot=3)
    metrics = ev.run(encoder_for(maps, 32))
    assert set(metrics.values()) == {1.0} and len(metrics) == 4
    plot = tmp_path / "segmentation_test.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == [plot.name]  # written atomically: no temporary left


def test_plot_path_and_a_random_encoder_below_perfect(tmp_path):
    rng = np.random.default_rng(0)
    builder = hand_made_builder()
    random_patches = lambda x: unit(rng.normal(size=(len(x), 16, DIM)))
    encoder = FakeEncoder({"patch_embeddings": random_patches}, text_fn, image_size=4)
    plot = tmp_path / "plots" / "seg.png"
    metrics = segmentation.SegmentationEvaluator(builder, plot_path=str(plot)).run(encoder)
    assert all(0.0 <= v < 1.0 for v in metrics.values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {keys for keys, _ in encoder.image_calls} == {("patch_embeddings",)}


def test_older_build_without_segmentation_is_a_key_error(tmp_path):
    """A real synthetic_scenes 1.1.0 build (the test fixture): read as evaluation reads it, it
    has no `segmentation`, and the evaluator says so."""
    fixture = os.path.join(REPO, "tests", "fixtures", "synthetic_scenes_1.1.0", "build.tar.gz")
    with tarfile.open(fixture) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    old = ss.build(
        tmp_path, prepare=False, train_size=6, validation_size=2, test_size=3, image_size=16
    )
    assert str(old.version) == "1.1.0"
    encoder = FakeEncoder({"patch_embeddings": lambda x: unit(np.ones((len(x), 4, DIM)))}, text_fn)
    with pytest.raises(KeyError, match="split 'test' has no feature 'segmentation'"):
        segmentation.SegmentationEvaluator(old).run(encoder)


def test_errors():
    with pytest.raises(
        ValueError, match=r"tasks must be distinct names among \['color', 'shape'\]"
    ):
        segmentation.SegmentationEvaluator(hand_made_builder(), tasks=("colour",))
    with pytest.raises(ValueError, match="tasks must be distinct"):
        segmentation.SegmentationEvaluator(hand_made_builder(), tasks=("shape", "shape"))
    maps = [truth_maps(SEG0, [RED, BLUE], [SQUARE, CIRCLE]), truth_maps(SEG1, [RED], [STAR])]
    # A pixel of slot 1 in an image whose slot 1 is padding.
    bad = hand_made_builder()
    bad._splits["test"][1]["segmentation"] = np.array(SEG0, np.uint8)
    with pytest.raises(
        ValueError, match=r"synthetic_scenes/test \(color task, 'colors'\): example 1 labels"
    ):
        segmentation.SegmentationEvaluator(bad).run(encoder_for(maps, 4))
    not_square = FakeEncoder(
        {"patch_embeddings": lambda x: unit(np.ones((len(x), 12, DIM)))}, text_fn, 4
    )
    with pytest.raises(ValueError, match="patch_embeddings has 12 patches, not a square grid"):
        segmentation.SegmentationEvaluator(hand_made_builder()).run(not_square)
    wrong = hand_made_builder()
    for ex in wrong._splits["test"]:
        ex["segmentation"] = ex["segmentation"][:2]
    with pytest.raises(ValueError, match=r"segmentation maps \(2, 4\) do not match the images"):
        segmentation.SegmentationEvaluator(wrong).run(encoder_for(maps, 4))
