"""Encoder: chunked, sharded embeddings equal a direct (unchunked, unsharded, eager) model call
on the same preprocessed inputs, whatever N (padding trimmed, one compiled function per tower
and key set); L2 normalisation; patch embeddings; the same numbers on 1 and 8 devices; input
errors. A tiny two-tower model (32 px, one block per tower); each tower compiles once per
module-scoped encoder."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from input_pipeline import preprocess
from input_pipeline.tokenizers import train_bpe_tokenizer
from mlcd import sharding
from mlcd.encoder import IMAGE_KEYS, Encoder
from mlcd.models import build_model, layers, text, vit

IMAGE_SIZE, CONTEXT_LENGTH, EMBED_DIM, WIDTH = 32, 16, 16, 32
N = 11  # not a multiple of either encoder's chunk
# batch_size -> chunk: 12 is rounded up to 16 (a multiple of the 8 devices). Both encoders put
# 2 rows on each device, so their programs compute the same per-device shapes.
BATCH_SIZE = {"8": 12, "1": 2}
CHUNK = {"8": 16, "1": 2}
NUM_PATCHES = (IMAGE_SIZE // 8) ** 2
TEXTS = [
    "a red circle.",
    "the blue star is small.",
    "a large green square in the top left.",
    "photo of a yellow triangle",
    "",
    "circle",
    "a small red star and a large blue circle next to a green square at the bottom.",
    "the triangle.",
    "blue",
    "a medium yellow square.",
    "there is a red object.",
]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS * 10, vocab_size=300)


@pytest.fixture(scope="module")
def model_parts(tokenizer):
    """(graphdef, params as a pure dict, eager model): variants resolved as the trainer does."""
    image = dict(
        variant="tiny", image_size=IMAGE_SIZE, patch_size=8, width=WIDTH, depth=1, num_heads=2
    )
    txt = dict(
        variant="tiny",
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        context_length=CONTEXT_LENGTH,
        width=WIDTH,
        depth=1,
        num_heads=2,
    )
    cfg = ml_collections.ConfigDict(
        {
            "image": {"variant": "tiny", **layers.resolve_variant("image", vit.VARIANTS, image)},
            "text": {"variant": "tiny", **layers.resolve_variant("text", text.VARIANTS, txt)},
            "embed_dim": EMBED_DIM,
            "logit_scale_init": float(np.log(10.0)),
        }
    )
    model = build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    return graphdef, nnx.to_pure_dict(params), model


def _encoder(model_parts, tokenizer, devices, batch_size):
    graphdef, params, _ = model_parts
    mesh = sharding.make_mesh((("data", -1),), devices=devices)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    return Encoder(
        graphdef,
        params,
        image_size=IMAGE_SIZE,
        tokenizer=tokenizer,
        context_length=CONTEXT_LENGTH,
        mesh=mesh,
        batch_size=batch_size,
    )


@pytest.fixture(scope="module")
def enc8(model_parts, tokenizer):
    assert jax.device_count() == 8  # conftest's fake CPU devices
    return _encoder(model_parts, tokenizer, jax.devices(), BATCH_SIZE["8"])


@pytest.fixture(scope="module")
def enc1(model_parts, tokenizer):
    return _encoder(model_parts, tokenizer, jax.devices()[:1], BATCH_SIZE["1"])


@pytest.fixture(scope="module")
def images():
    """uint8 images of another resolution and aspect than the model's (resized + cropped)."""
    return np.random.default_rng(0).integers(0, 256, (2 * N, 48, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(model_parts, tokenizer, images):
    """The model called directly, eagerly, on all 2N preprocessed images and the N texts."""
    _, _, model = model_parts
    resized = np.stack([preprocess.resize_center_crop(im, IMAGE_SIZE) for im in images])
    out = model.encode_image(preprocess.normalize_images(resized))
    ref = {k: np.asarray(out[k]) for k in ("embedding", "pre_logits", "patch_tokens")}
    ref["embedding"] = _unit(ref["embedding"])
    ref["patch_embeddings"] = _unit(np.asarray(model.image.proj(out["patch_tokens"])))
    tokens = tokenizer.encode(TEXTS, CONTEXT_LENGTH)
    ref["text"] = _unit(np.asarray(model.encode_text(tokens)["embedding"]))
    return ref


@pytest.fixture(scope="module")
def embedded(enc8, enc1, images):
    """N images (all keys) and the N texts through both encoders: compiles each tower once."""
    return {
        name: (enc.embed_images(images[:N], keys=IMAGE_KEYS), enc.embed_texts(TEXTS))
        for name, enc in (("8", enc8), ("1", enc1))
    }


def _check_images(got, ref, rows):
    assert set(got) == set(IMAGE_KEYS)
    shapes = {
        "embedding": (EMBED_DIM,),
        "pre_logits": (WIDTH,),
        "patch_tokens": (NUM_PATCHES, WIDTH),
        "patch_embeddings": (NUM_PATCHES, EMBED_DIM),
    }
    for k, v in got.items():
        assert v.dtype == np.float32 and v.shape == (len(rows), *shapes[k]), (k, v.shape)
        np.testing.assert_allclose(v, ref[k][rows], rtol=1e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("devices", ["8", "1"])
def test_embeddings_equal_a_direct_model_call(embedded, reference, devices):
    image_out, text_out = embedded[devices]
    _check_images(image_out, reference, np.arange(N))
    assert set(text_out) == {"embedding"}
    assert text_out["embedding"].dtype == np.float32
    assert text_out["embedding"].shape == (N, EMBED_DIM)
    np.testing.assert_allclose(text_out["embedding"], reference["text"], rtol=1e-5, atol=2e-6)
    # The texts differ, so do their embeddings (padding rows did not leak into the output).
    assert len({row.tobytes() for row in text_out["embedding"]}) == N


@pytest.mark.parametrize("devices", ["8", "1"])
def test_outputs_are_l2_normalised(embedded, devices):
    image_out, text_out = embedded[devices]
    for v in (image_out["embedding"], image_out["patch_embeddings"], text_out["embedding"]):
        np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    # pre_logits and patch tokens are not normalised (patch tokens: the final LN's output).
    assert not np.allclose(np.linalg.norm(image_out["pre_logits"], axis=-1), 1.0, rtol=1e-2)


def test_patch_embeddings_are_projected_patch_tokens(embedded, model_parts):
    image_out, _ = embedded["8"]
    kernel = np.asarray(model_parts[2].image.proj.kernel[...])
    projected = image_out["patch_tokens"] @ kernel
    if model_parts[2].image.proj.bias is not None:
        projected = projected + np.asarray(model_parts[2].image.proj.bias[...])
    np.testing.assert_allclose(image_out["patch_embeddings"], _unit(projected), atol=1e-5)
    # The image embedding is the projected pooled token, not a mean of the patch embeddings.
    assert not np.allclose(image_out["embedding"], _unit(image_out["patch_embeddings"].mean(1)))


def test_same_results_on_one_and_eight_devices(embedded):
    """Bit-identical: with the same rows per device (2), the sharded program computes each row
    exactly as the 1-device one, whatever the padding rows around it (16-row chunks padded
    with 5 copies of the last image vs 2-row chunks padded with 1)."""
    (img8, txt8), (img1, txt1) = embedded["8"], embedded["1"]
    for k in IMAGE_KEYS:
        np.testing.assert_array_equal(img8[k], img1[k], err_msg=k)
    np.testing.assert_array_equal(txt8["embedding"], txt1["embedding"])


@pytest.mark.parametrize("devices", ["8", "1"])
def test_any_number_of_inputs_reuses_one_compiled_function(
    embedded, enc8, enc1, images, reference, devices
):
    """N = 1, a whole number of chunks (no padding), and 2N: each tower's jitted function keeps
    the single cache entry the first call made; every output row matches the reference."""
    enc = {"8": enc8, "1": enc1}[devices]
    assert enc._image_fn._cache_size() == 1 and enc._text_fn._cache_size() == 1
    for n in (1, CHUNK[devices], 2 * N):
        _check_images(enc.embed_images(images[:n], keys=IMAGE_KEYS), reference, np.arange(n))
    texts = TEXTS[::-1] * 2  # 22 texts
    got = enc.embed_texts(texts)["embedding"]
    np.testing.assert_allclose(got, np.concatenate([reference["text"][::-1]] * 2), atol=2e-6)
    np.testing.assert_allclose(
        enc.embed_texts(TEXTS[3:4])["embedding"], reference["text"][3:4], atol=2e-6
    )
    assert enc._image_fn._cache_size() == 1 and enc._text_fn._cache_size() == 1


def test_only_the_requested_keys_are_returned(embedded, enc8, images):
    got = enc8.embed_images(images[:3], keys=("pre_logits",))
    assert list(got) == ["pre_logits"]
    np.testing.assert_allclose(got["pre_logits"], embedded["8"][0]["pre_logits"][:3], atol=1e-6)


def test_input_errors(enc8, model_parts, images):
    with pytest.raises(ValueError, match=r"unknown keys \['logits', 'zimg'\]"):
        enc8.embed_images(images[:2], keys=("embedding", "zimg", "logits"))
    bad = {
        "float32": images[:2].astype(np.float32),
        "int32": images[:2].astype(np.int32),
        "no batch dim": images[0],
        "grayscale": images[:2, :, :, 0],
        "RGBA": np.concatenate([images[:2], images[:2, :, :, :1]], axis=-1),
    }
    for x in bad.values():
        with pytest.raises(ValueError, match=r"expects uint8 \[N, H, W, 3\], got"):
            enc8.embed_images(x)
    with pytest.raises(ValueError, match=r"got float32 \(2, 48, 40, 3\)"):
        enc8.embed_images(bad["float32"])
    # A str is a sequence of 12 one-character texts to Python: refused, not embedded.
    with pytest.raises(TypeError, match="expects a list of strings, got a str"):
        enc8.embed_texts("a red circle")
    with pytest.raises(TypeError, match=r"expects a list of strings; texts\[1\] is int"):
        enc8.embed_texts(["a red circle", 3])
    # Any iterable of strings is read once: a generator's texts are all embedded.
    np.testing.assert_array_equal(
        enc8.embed_texts(t for t in TEXTS[:3])["embedding"],
        enc8.embed_texts(TEXTS[:3])["embedding"],
    )

    graphdef, params, _ = model_parts
    no_text = Encoder(
        graphdef,
        params,
        image_size=IMAGE_SIZE,
        tokenizer=None,
        context_length=CONTEXT_LENGTH,
        mesh=sharding.make_mesh((("data", -1),)),
    )
    with pytest.raises(ValueError, match="no text tower / tokenizer"):
        no_text.embed_texts(["a red circle."])


def test_zero_inputs_give_empty_arrays(enc8):
    got = enc8.embed_texts([])
    assert got["embedding"].shape == (0, EMBED_DIM) and got["embedding"].dtype == np.float32
    got = enc8.embed_images(np.zeros((0, 48, 40, 3), np.uint8), keys=("embedding",))
    assert got["embedding"].shape == (0, EMBED_DIM)
