"""Models: output contracts, masking/pooling semantics against direct references, CLIP parameter
counts (abstractly, via nnx.eval_shape), bf16 compute, logit-scale clipping, config errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mlcd.losses import softmax_contrastive_loss
from mlcd.models import build_model, layers
from mlcd.models.text import build_text, first_eos_index
from mlcd.models.two_tower import l2_normalize
from mlcd.models.vit import ConvStem, PatchEmbed, build_vit

EOS, PAD = 3, 0
# Small shapes; 'tiny' variants with overrides keep every test fast on 2 shared cores.
IMAGE = dict(variant="tiny", image_size=16, patch_size=4, width=32, depth=2, num_heads=2)
TEXT = dict(
    variant="tiny",
    context_length=8,
    vocab_size=50,
    width=32,
    depth=2,
    num_heads=2,
    eos_id=EOS,
    pad_id=PAD,
)
B = 3


def _images(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, 16, 16, 3)), jnp.float32)


def _tokens():
    """Rows BOS(1) + words + EOS + PAD, EOS at positions 4, 7 (last) and 2."""
    rng = np.random.default_rng(1)
    tok = rng.integers(4, 50, (B, 8)).astype(np.int32)
    tok[:, 0] = 1
    for row, pos in enumerate((4, 7, 2)):
        tok[row, pos] = EOS
        tok[row, pos + 1 :] = PAD
    return tok


def _model_cfg(**kw):
    cfg = dict(
        image=IMAGE,
        text=TEXT,
        embed_dim=16,
        logit_scale_init=float(np.log(10.0)),
        logit_bias_init=None,
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


@functools.cache
def _text(**overrides):
    return build_text(dict(TEXT, **overrides), embed_dim=16, dtype=jnp.float32, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# Output contracts.


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_vit_outputs(pool):
    vit = build_vit(dict(IMAGE, pool=pool), embed_dim=16, dtype=jnp.float32, rngs=nnx.Rngs(0))
    out = vit(_images())
    assert set(out) == {"embedding", "pre_logits", "patch_tokens", "patch_embeddings"}
    assert out["embedding"].shape == (B, 16)
    assert out["pre_logits"].shape == (B, 32)
    assert out["patch_tokens"].shape == (B, 16, 32)  # (16 / 4)^2 patches, no cls token
    assert all(v.dtype == jnp.float32 for v in out.values())
    np.testing.assert_allclose(out["embedding"], out["pre_logits"] @ vit.proj.kernel[...], 1e-5)
    # patch_proj='shared' (the default): the patches go through the pooled embedding's `proj`.
    np.testing.assert_allclose(
        out["patch_embeddings"], out["patch_tokens"] @ vit.proj.kernel[...], atol=1e-5
    )
    if pool == "gap":
        np.testing.assert_allclose(out["pre_logits"], out["patch_tokens"].mean(1), atol=1e-5)
    # Patch tokens come after the final LayerNorm (with its init scale 1, bias 0).
    np.testing.assert_allclose(out["patch_tokens"].mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out["patch_tokens"].std(-1), 1.0, atol=1e-3)


def test_separate_patch_projection():
    """patch_proj='separate': the patches get a projection of their own, the pooled embedding
    keeps `proj`; 'shared' has no such parameter."""
    vit = build_vit(
        dict(IMAGE, patch_proj="separate"), embed_dim=16, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    out = vit(_images())
    kernel = vit.patch_proj.kernel[...]
    assert kernel.shape == (32, 16)
    np.testing.assert_allclose(out["patch_embeddings"], out["patch_tokens"] @ kernel, atol=1e-5)
    np.testing.assert_allclose(out["embedding"], out["pre_logits"] @ vit.proj.kernel[...], 1e-5)
    assert np.abs(kernel - vit.proj.kernel[...]).max() > 0.01  # its own initialisation
    shared = build_vit(IMAGE, embed_dim=16, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert not hasattr(shared, "patch_proj")


def test_short_token_sequences_use_the_first_positions():
    """tokens [B, L'] with L' < context_length: the first L' position embeddings; under the
    causal mask a row's features equal those of the same row padded to context_length."""
    text, tok = _text(), _tokens()
    short = jnp.asarray(tok[:, :5])
    np.testing.assert_allclose(
        text.token_features(short), text.token_features(jnp.asarray(tok))[:, :5], atol=1e-6
    )
    # Row 2's EOS is at position 2 < 5: its pooled embedding is the same either way.
    np.testing.assert_allclose(
        text(short)["embedding"][2], text(jnp.asarray(tok))["embedding"][2], atol=1e-6
    )


def test_patch_embed_is_the_strided_convolution():
    embed = PatchEmbed(4, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
    embed.bias[...] = jnp.arange(8.0)
    images = _images()
    want = jax.lax.conv_general_dilated(
        images, embed.kernel[...], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    want = (want + embed.bias[...]).reshape(B, 16, 8)  # row-major (y, x) patch order
    np.testing.assert_allclose(embed(images), want, atol=1e-5)


def test_conv_stem_is_a_stack_of_strided_convolutions():
    """im2col + matmul equals lax.conv (3x3, stride 2, SAME) -> LN -> ReLU, then the 1x1 proj."""
    stem = ConvStem(4, 16, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert [k.shape for k in stem.kernels] == [(3, 3, 3, 8), (3, 3, 8, 16)]
    images = _images()
    x = images
    for kernel in stem.kernels:
        x = jax.lax.conv_general_dilated(
            x, kernel[...], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        x = jax.nn.relu((x - mean) / jnp.sqrt(var + 1e-6))
    want = x.reshape(B, 16, 16) @ stem.proj.kernel[...] + stem.proj.bias[...]
    np.testing.assert_allclose(stem(images), want, atol=1e-4)
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ConvStem(6, 16, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_two_tower_outputs():
    model = build_model(_model_cfg(logit_bias_init=-10.0), rngs=nnx.Rngs(0))
    out = model(_images(), jnp.asarray(_tokens()))
    assert set(out) == {"zimg", "ztxt", "logit_scale", "logit_bias", "image", "text"}
    for key in ("zimg", "ztxt"):
        assert out[key].shape == (B, 16)
        np.testing.assert_allclose(jnp.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-6)
    assert float(out["logit_bias"]) == -10.0
    assert set(out["text"]) == {"embedding", "pre_logits"}
    np.testing.assert_allclose(
        out["zimg"],
        out["image"]["embedding"]
        / jnp.linalg.norm(out["image"]["embedding"], axis=-1, keepdims=True),
        1e-6,
    )
    # encode_* are the towers.
    np.testing.assert_array_equal(
        model.encode_text(jnp.asarray(_tokens()))["embedding"], out["text"]["embedding"]
    )


def test_image_only_model():
    model = build_model(_model_cfg(text=None), rngs=nnx.Rngs(0))
    out = model(_images())
    assert "ztxt" not in out and "text" not in out and "logit_bias" not in out
    with pytest.raises(ValueError, match="no text tower"):
        model.encode_text(jnp.asarray(_tokens()))


def test_logit_scale_is_clipped():
    model = build_model(
        _model_cfg(logit_scale_init=float(np.log(500.0)), max_logit_scale=50.0), rngs=nnx.Rngs(0)
    )
    assert float(model(_images())["logit_scale"]) == 50.0
    # Past the cap the scale is constant: no gradient pushes t further.
    grad = jax.grad(lambda t: jnp.minimum(jnp.exp(t), 50.0))(model.t[...])
    assert float(grad) == 0.0


# ----------------------------------------------------------------------------------------------
# Text masking and pooling.


def test_first_eos_index():
    tok = np.array([[1, 5, 3, 3, 0], [1, 5, 6, 7, 8], [3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(first_eos_index(jnp.asarray(tok), 3), [2, 4, 0])


def test_causal_mask_and_eos_pooling():
    text, tok = _text(), _tokens()
    feats = text.token_features(jnp.asarray(tok))
    # EOS pooling = the features at the first EOS (manual gather).
    out = text(jnp.asarray(tok))
    np.testing.assert_allclose(
        out["pre_logits"], np.asarray(feats)[np.arange(B), [4, 7, 2]], atol=1e-6
    )
    # Changing token 5 changes positions >= 5 only; row 0's EOS (position 4) keeps its value.
    changed = tok.copy()
    changed[:, 5] = 9
    feats2 = text.token_features(jnp.asarray(changed))
    np.testing.assert_array_equal(feats2[:, :5], feats[:, :5])
    assert np.abs(feats2[:, 5:] - feats[:, 5:]).min(axis=-1).max() > 0
    np.testing.assert_array_equal(text(jnp.asarray(changed))["pre_logits"][0], out["pre_logits"][0])


def test_bidirectional_sees_later_tokens_and_ignores_pads():
    text, tok = _text(causal=False), _tokens()
    feats = text.token_features(jnp.asarray(tok))
    changed = tok.copy()
    changed[1, 6] = 9  # row 1 has no padding before its EOS at 7
    feats2 = text.token_features(jnp.asarray(changed))
    assert np.abs(feats2[1, :6] - feats[1, :6]).min() > 0  # earlier positions see it
    # Pads are not attended to: corrupting the pad embedding leaves real tokens unchanged.
    corrupt = nnx.clone(text)
    emb = corrupt.token_embed.embedding
    emb[...] = emb[...].at[PAD].set(100.0)
    feats3 = corrupt.token_features(jnp.asarray(tok))
    real = tok != PAD
    np.testing.assert_allclose(np.asarray(feats3)[real], np.asarray(feats)[real], atol=1e-5)


def test_mean_pooling_ignores_pads():
    text, tok = _text(causal=False, pool="mean"), _tokens()
    feats = np.asarray(text.token_features(jnp.asarray(tok)))
    want = np.stack([feats[i][tok[i] != PAD].mean(0) for i in range(B)])
    np.testing.assert_allclose(text(jnp.asarray(tok))["pre_logits"], want, atol=1e-5)


def test_first_pooling():
    text, tok = _text(pool="first"), _tokens()
    feats = text.token_features(jnp.asarray(tok))
    np.testing.assert_allclose(text(jnp.asarray(tok))["pre_logits"], feats[:, 0], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Attention against a direct NumPy loop (values and gradients).


def _np_attention(q, k, v, mask):
    b, _, h, d = q.shape
    out = np.zeros_like(q)
    for i in range(b):
        for j in range(h):
            s = q[i, :, j] @ k[i, :, j].T / np.sqrt(d)
            s = np.where(mask[i, 0], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, :, j] = (p / p.sum(-1, keepdims=True)) @ v[i, :, j]
    return out


def test_dot_product_attention_matches_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 4)) for _ in range(3))
    mask = np.broadcast_to(np.tril(np.ones((5, 5), bool)), (2, 1, 5, 5))
    got = layers.dot_product_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask)
    )
    np.testing.assert_allclose(got, _np_attention(q, k, v, mask), atol=1e-5)
    # Gradient w.r.t. q against central differences of the reference.
    w = rng.normal(size=q.shape)
    g = jax.grad(
        lambda qq: (
            layers.dot_product_attention(
                qq, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(mask)
            )
            * w
        ).sum()
    )
    got_g = g(jnp.asarray(q, jnp.float32))
    eps, want_g = 1e-6, np.zeros_like(q)
    for idx in np.ndindex(q.shape):
        dq = np.zeros_like(q)
        dq[idx] = eps
        want_g[idx] = (
            (_np_attention(q + dq, k, v, mask) - _np_attention(q - dq, k, v, mask)) * w
        ).sum() / (2 * eps)
    np.testing.assert_allclose(got_g, want_g, atol=1e-4)


def test_bias_gelu_matches_autodiff_of_jax_gelu():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(6, 5)) * 3, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    ref = lambda z, b: (jax.nn.gelu(z + b, approximate=True) * w).sum()
    got = lambda z, b: (layers.bias_gelu(z, b) * w).sum()
    np.testing.assert_allclose(got(z, bias), ref(z, bias), rtol=1e-6)
    for g, r in zip(jax.grad(got, (0, 1))(z, bias), jax.grad(ref, (0, 1))(z, bias), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_layer_norm_matches_formula():
    ln = layers.LayerNorm(8, dtype=jnp.float32)
    ln.scale[...] = jnp.arange(1.0, 9.0)
    ln.bias[...] = jnp.full((8,), 0.5)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)) * 4 + 2
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(
        ln(jnp.asarray(x, jnp.float32)), want * np.arange(1, 9) + 0.5, rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Training signal, dtypes, sizes, errors.


def _loss(model, images, tokens):
    out = model(images, tokens)
    return softmax_contrastive_loss(out["zimg"], out["ztxt"], out["logit_scale"])


def test_gradients_finite_and_reach_every_block():
    model = build_model(_model_cfg(), rngs=nnx.Rngs(0))
    grads = nnx.grad(_loss)(model, _images(), jnp.asarray(_tokens()))
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        name = jax.tree_util.keystr(path)
        assert np.isfinite(g).all(), name
        if "blocks" in name or name.endswith("['t']"):
            assert np.abs(g).max() > 0, name


def test_data_parallel_on_8_devices_matches_one_device():
    """Batch sharded over 8 fake devices (params replicated): same loss and gradients."""
    model = build_model(_model_cfg(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
    tokens = jnp.asarray(np.concatenate([_tokens(), _tokens(), _tokens()])[:8])
    graphdef, params = nnx.split(model)
    step = jax.jit(jax.value_and_grad(lambda p, i, t: _loss(nnx.merge(graphdef, p), i, t)))
    want = step(params, images, tokens)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    with jax.set_mesh(mesh):
        got = step(params, jax.device_put(images, batch), jax.device_put(tokens, batch))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5)  # summation order


def test_bfloat16_compute_close_to_float32():
    f32 = build_model(_model_cfg(), rngs=nnx.Rngs(0))
    bf16 = build_model(_model_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)  # params stay float32
    images, tokens = _images(), jnp.asarray(_tokens())
    out32, out16 = f32(images, tokens), bf16(images, tokens)
    for key in ("zimg", "ztxt"):
        assert out16[key].dtype == jnp.float32
        cos = (out32[key] * out16[key]).sum(-1)
        assert float(cos.min()) > 0.99, key
    loss32, loss16 = _loss(f32, images, tokens), _loss(bf16, images, tokens)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


# Known CLIP image-tower sizes (Radford et al. 2021 / open_clip), in millions, with the
# projection to the joint embedding (S/16: 384, B: 512, L/14: 768).
CLIP_VISUAL_PARAMS = {
    "S/16": (21.8, 384),
    "B/32": (87.85, 512),
    "B/16": (86.19, 512),
    "L/14": (303.97, 768),
}


@pytest.mark.parametrize("variant", CLIP_VISUAL_PARAMS)
def test_clip_image_tower_param_counts(variant):
    want, embed = CLIP_VISUAL_PARAMS[variant]
    vit = nnx.eval_shape(
        lambda: build_vit(
            {"variant": variant}, embed_dim=embed, dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
    )
    got = sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(vit, nnx.Param))) / 1e6
    assert abs(got - want) / want < 0.02, (variant, got, want)


def test_overrides_apply():
    vit = nnx.eval_shape(
        lambda: build_vit(
            {"variant": "B/16", "depth": 3, "image_size": 112},
            embed_dim=8,
            dtype=jnp.float32,
            rngs=nnx.Rngs(0),
        )
    )
    assert len(vit.blocks) == 3
    assert vit.pos_embed.shape == (1, 7 * 7 + 1, 768)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(image=dict(IMAGE, variant="H/14")), "Unknown image variant 'H/14'"),
        (dict(image=dict(IMAGE, widht=8)), r"Unknown image config key\(s\) \['widht'\]"),
        (dict(text=dict(TEXT, variant="XL")), "Unknown text variant 'XL'"),
        (dict(text=dict(TEXT, casual=False)), r"Unknown text config key\(s\) \['casual'\]"),
        (dict(image=dict(IMAGE, pool="max")), "Unknown image pool 'max'"),
        (dict(image=dict(IMAGE, patch_proj="own")), "Unknown image patch_proj 'own'"),
        (dict(text=dict(TEXT, pool="last")), "Unknown text pool 'last'"),
        (dict(text=dict(TEXT, act="relu")), r"Unknown config\.model\.text\.act='relu'"),
        (dict(image=dict(IMAGE, ln_eps=0.0)), r"config\.model\.image\.ln_eps=0\.0 must be > 0"),
        (dict(text=dict(TEXT, pad_id=None)), "pad_id"),
        (dict(dtype="float16"), "Unknown model dtype 'float16'"),
        (dict(embed_dims=3), r"Unknown model config key\(s\) \['embed_dims'\]"),
        (dict(image=dict(IMAGE, width=30, num_heads=4)), "not divisible by num_heads"),
    ],
)
def test_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_model(_model_cfg(**cfg), rngs=nnx.Rngs(0))


def test_input_shape_errors():
    model = build_model(_model_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"images must be \[B, 16, 16, 3\]"):
        model.encode_image(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"tokens must be \[B, L\] with L <= 8"):
        model.encode_text(jnp.zeros((1, 9), jnp.int32))


def test_l2_normalize_values_and_finite_gradient_at_zero():
    x = jax.random.normal(jax.random.key(0), (64, 16)) * jnp.logspace(-3, 3, 64)[:, None]
    # The values of x / max(||x||, eps), bit for bit, compiled as the model compiles them.
    want = jax.jit(lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12))
    np.testing.assert_array_equal(np.asarray(jax.jit(l2_normalize)(x)), np.asarray(want(x)))
    # ... and of their gradients (the trainer's results depend on them, to the last bit).
    old = lambda v: want(v)[0] @ jnp.arange(16.0)
    new = lambda v: jax.jit(l2_normalize)(v)[0] @ jnp.arange(16.0)
    np.testing.assert_array_equal(np.asarray(jax.grad(new)(x)), np.asarray(jax.grad(old)(x)))
    for tiny in (0.0, 1e-30):  # the zero vector, and one whose squares underflow
        v = jnp.full((2, 8), tiny)
        np.testing.assert_array_less(np.abs(np.asarray(l2_normalize(v))), 1e-12)
        grad = jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.arange(8.0)))(v)
        assert np.all(np.isfinite(np.asarray(grad))), tiny
    # Away from zero the gradient is the projection (I - u u^T) / ||x||.
    v = jnp.arange(1.0, 9.0)
    u = v / jnp.linalg.norm(v)
    g = jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.arange(8.0)))(v)
    want = (jnp.arange(8.0) - u * jnp.dot(u, jnp.arange(8.0))) / jnp.linalg.norm(v)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"config\.model\.name='vit': unknown model 'vit'; known: \['two_tower'\]"
    ):
        build_model(_model_cfg(name="vit"), rngs=nnx.Rngs(0))
