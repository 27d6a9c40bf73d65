"""Accelerator settings of the model (config.model.remat, config.model.attention, bf16 compute):
the same loss and gradients as the plain path, remat that really changes what the backward pass
keeps, the attention masks in both forms, a float32 loss path in bf16, the train step built from
config, and the config keys' defaults for runs stored before them."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from mlcd import sharding, train_state
from mlcd.losses import softmax_contrastive_loss
from mlcd.models import build_model, layers
from mlcd.train_step import build_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = 3, 0
B, R, L = 4, 16, 8
# One block per tower: remat works per block, and each compile costs seconds on 2 cores.
IMAGE = dict(variant="tiny", image_size=R, patch_size=4, width=32, depth=1, num_heads=2)
TEXT = dict(
    variant="tiny",
    context_length=L,
    vocab_size=50,
    width=32,
    depth=1,
    num_heads=2,
    eos_id=EOS,
    pad_id=PAD,
)
# (image pool, text causal, text pool): CLIP's towers, then both bidirectional text towers.
# XLA:CPU compiles at LLVM -O0: the tests compare programs' values and HLO, never their speed,
# and LLVM's optimisations take a third of each compile on 2 cores.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
ARCHS = {
    "cls_causal": ("cls", True, "eos"),
    "gap_padded": ("gap", False, "eos"),
    "map_padded_mean": ("map", False, "mean"),
}


def _model_cfg(arch: str, **model) -> dict:
    pool, causal, text_pool = ARCHS[arch]
    return dict(
        image=dict(IMAGE, pool=pool),
        text=dict(TEXT, causal=causal, pool=text_pool),
        embed_dim=16,
        logit_scale_init=float(np.log(10.0)),
        **model,
    )


def _tokens(batch: int = B) -> np.ndarray:
    """int32 [batch, L]: BOS + words + EOS + trailing pads, EOS at 4, 7 (no pad), 2, 5, 4, ..."""
    tokens = np.random.default_rng(1).integers(4, 50, (batch, L)).astype(np.int32)
    tokens[:, 0] = 1
    for row in range(batch):
        pos = (4, 7, 2, 5)[row % 4]
        tokens[row, pos] = EOS
        tokens[row, pos + 1 :] = PAD
    return tokens


def _inputs() -> tuple[jax.Array, jax.Array]:
    """Normalised images [B, R, R, 3] and _tokens()."""
    images = np.random.default_rng(0).normal(size=(B, R, R, 3)).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(_tokens())


def _model(arch: str, **model) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of the model built from seed 0: every setting of an arch has the same
    parameters."""
    return nnx.split(build_model(_model_cfg(arch, **model), rngs=nnx.Rngs(0)))


def _forward(graphdef: nnx.GraphDef, params: nnx.State) -> dict:
    """The model's output dict on _inputs()."""
    return nnx.merge(graphdef, params)(*_inputs())


def _loss_fn(arch: str, **model):
    """(loss of (params, images, tokens), params): the model's softmax contrastive loss."""
    graphdef, params = _model(arch, **model)

    def loss(params, images, tokens):
        out = nnx.merge(graphdef, params)(images, tokens)
        return softmax_contrastive_loss(out["zimg"], out["ztxt"], out["logit_scale"])

    return loss, params


@functools.cache
def _compiled(arch: str, **model):
    """(compiled jit(value_and_grad(loss)), its (loss, grads) on _inputs()); cached, so the
    remat test reads the programs the equality test ran."""
    loss, params = _loss_fn(arch, **model)
    images, tokens = _inputs()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, images, tokens)
    compiled = lowered.compile(COMPILER_OPTIONS)
    return compiled, jax.device_get(compiled(params, images, tokens))


def _assert_grads_close(got, want, rtol: float) -> None:
    """Every leaf of `got` within rtol x the largest magnitude of the same leaf of `want`, which
    is nonzero: gradients reach every parameter."""
    for (path, w), g in zip(
        jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True
    ):
        scale = float(np.abs(w).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# Same loss and gradients as the plain path (float32).


@pytest.mark.parametrize(
    "arch, model",
    [
        ("cls_causal", {"remat": "full"}),
        ("map_padded_mean", {"remat": "dots_saveable"}),
        ("cls_causal", {"attention": "fused"}),
        ("gap_padded", {"attention": "fused"}),
        ("map_padded_mean", {"attention": "fused"}),
    ],
)
def test_loss_and_gradients_equal_the_plain_path(arch, model):
    _, (loss, grads) = _compiled(arch, **model)
    _, (want_loss, want_grads) = _compiled(arch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    _assert_grads_close(grads, want_grads, rtol=1e-5)


def _residuals(arch: str, remat: str) -> list[jax.ShapeDtypeStruct]:
    """What the backward pass reads from the forward pass: the leaves of the VJP closure."""
    loss, params = _loss_fn(arch, remat=remat)
    vjp = jax.eval_shape(lambda *args: jax.vjp(loss, *args)[1], params, *_inputs())
    return jax.tree.leaves(vjp)


def _num_dots(arch: str, **model) -> int:
    """Matmuls in the optimised program of jit(value_and_grad(loss))."""
    return len(re.findall(r"\bdot\(", _compiled(arch, **model)[0].as_text()))


def test_remat_changes_what_the_backward_pass_keeps():
    """Fewer residuals with each policy, no [B, H, N, N] attention array kept under either; and
    the compiled program recomputes matmuls (XLA did not merge the recomputation away)."""
    arch = "cls_causal"
    kept = {remat: _residuals(arch, remat) for remat in layers.REMATS}
    sizes = {remat: sum(r.size for r in res) for remat, res in kept.items()}
    assert sizes["none"] > sizes["dots_saveable"] > sizes["full"], sizes
    logits = (B, 2, 17, 17)  # image attention: 16 patches + cls
    assert logits in [r.shape for r in kept["none"]]
    assert all(r.ndim < 4 for r in kept["dots_saveable"] + kept["full"])
    assert _num_dots(arch, remat="full") > _num_dots(arch)
    assert _num_dots("map_padded_mean", remat="dots_saveable") > _num_dots("map_padded_mean")


# ----------------------------------------------------------------------------------------------
# Attention: the masks in both forms, the fused path against the written-out one.


def test_attention_mask_forms():
    causal = layers.AttentionMask(causal=True).dense(3, 3)
    np.testing.assert_array_equal(causal, np.tril(np.ones((3, 3), bool))[None, None])
    valid = jnp.asarray([[True, True, False], [True, True, True]])
    np.testing.assert_array_equal(
        layers.AttentionMask(key_valid=valid).dense(3, 3), valid[:, None, None, :]
    )
    assert layers.AttentionMask().dense(3, 3) is None
    # Lengths for the fused kernels: a pad id inside the text (CLIP's '!' = 0) is attended.
    valid = jnp.asarray([[True, False, True, False, False], [True] * 5, [False] * 5])
    np.testing.assert_array_equal(layers.AttentionMask(key_valid=valid).key_lengths(), [3, 5, 0])


@pytest.mark.parametrize("mask", ["none", "causal", "padded"])
def test_fused_attention_matches_dot_product_attention(mask):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32) for _ in range(3))
    am = {
        "none": None,
        "causal": layers.AttentionMask(causal=True),
        "padded": layers.AttentionMask(key_valid=jnp.arange(5)[None] < jnp.asarray([[3], [5]])),
    }[mask]
    for dtype, atol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        args = [x.astype(dtype) for x in (q, k, v)]
        fused = layers.attention(*args, am, "fused")
        assert fused.dtype == dtype
        np.testing.assert_allclose(
            fused.astype(jnp.float32),
            layers.attention(*args, am, "xla").astype(jnp.float32),
            atol=atol,
            err_msg=str(dtype),
        )


@pytest.mark.parametrize(
    "arch, text_call",
    [("cls_causal", (True, False)), ("map_padded_mean", (False, True))],
)
def test_fused_attention_reaches_jax_with_the_masks(arch, text_call, monkeypatch):
    """attention='fused' sends every attention (image blocks, MAP head, text blocks) to
    jax.nn.dot_product_attention; the text's mask as is_causal or as key lengths."""
    calls, real = [], jax.nn.dot_product_attention

    def spy(q, k, v, *, is_causal, key_value_seq_lengths, implementation):
        calls.append((q.shape[1], is_causal, key_value_seq_lengths is not None))
        return real(
            q,
            k,
            v,
            is_causal=is_causal,
            key_value_seq_lengths=key_value_seq_lengths,
            implementation=implementation,
        )

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    for attention in layers.ATTENTIONS:  # 'xla' calls nothing
        graphdef, params = _model(arch, attention=attention)
        jax.eval_shape(functools.partial(_forward, graphdef), params)
    image = [(R * R // 16 + (arch == "cls_causal"), False, False)]  # N patches (+ cls)
    head = [(1, False, False)] if arch == "map_padded_mean" else []  # the MAP probe
    assert calls == image + head + [(L, *text_call)]


def test_fused_implementation_is_cudnn_only_on_gpu_in_half_precision():
    assert layers.fused_implementation(jnp.bfloat16, "gpu") == "cudnn"
    assert layers.fused_implementation(jnp.float16, "gpu") == "cudnn"
    assert layers.fused_implementation(jnp.float32, "gpu") is None  # cuDNN has no float32
    assert layers.fused_implementation(jnp.bfloat16, "cpu") is None
    assert layers.fused_implementation(jnp.bfloat16, "tpu") is None


# ----------------------------------------------------------------------------------------------
# bf16 compute: float32 wherever precision matters.


def _equations(jaxpr):
    """Every equation of a (closed) jaxpr, those of the jaxprs nested in its equations too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("attention", layers.ATTENTIONS)
def test_bfloat16_loss_path_is_float32(attention):
    """In bf16 the matmuls run in bf16, but every exp / log / rsqrt (the attention softmax,
    LayerNorm, the loss) is float32, and so are the embeddings, the loss and the gradients."""
    model = dict(dtype="bfloat16", attention=attention)
    loss, params = _loss_fn("gap_padded", **model)
    images, tokens = _inputs()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params, images, tokens)
    eqns = list(_equations(jaxpr.jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)
    precise = [e for e in eqns if e.primitive.name in ("exp", "log", "rsqrt")]
    assert precise and all(e.outvars[0].aval.dtype == jnp.float32 for e in precise)
    assert all(x.aval.dtype == jnp.float32 for x in jaxpr.jaxpr.outvars)  # loss, gradients
    graphdef, _ = _model("gap_padded", **model)
    out = jax.eval_shape(functools.partial(_forward, graphdef), params)
    assert all(out[k].dtype == jnp.float32 for k in ("zimg", "ztxt", "logit_scale"))


# ----------------------------------------------------------------------------------------------
# The train step built from config.


def _clip_config(**model) -> ml_collections.ConfigDict:
    """configs/clip.py:tiny with one-block towers on 16 px images, FSDP over the 8 devices."""
    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    config.batch_size = 8
    config.pp.image_size, config.pp.context_length = R, L
    config.sharding_rules = ((".*", "fsdp"),)
    with config.unlocked():
        config.model.image.update(depth=1, width=32, num_heads=2, patch_size=4)
        config.model.text.update(
            depth=1, width=32, num_heads=2, vocab_size=50, eos_id=EOS, pad_id=PAD
        )
        config.model.embed_dim = 16
    config.model.update(model)
    return train_state.resolve_model_config(config, None)


def _step(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(metrics, AdamW first moments = 0.1 x gradients) of one train step from init."""
    mesh = sharding.make_mesh(config.mesh)
    built = build_train_step(config, mesh)
    batch = {
        "image": np.random.default_rng(0).integers(0, 256, (8, R, R, 3), dtype=np.uint8),
        "tokens": _tokens(8),
    }
    with jax.set_mesh(mesh):
        state = train_state.init_state(config, built.objective, built.tx, built.shardings)
        batch = sharding.host_to_global(batch, mesh)
        state, metrics = built.step.lower(state, batch).compile(COMPILER_OPTIONS)(state, batch)
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=_is_adam) if _is_adam(s)]
    assert len(adam) == 1
    return jax.device_get(metrics), jax.device_get(adam[0].mu)


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def test_train_step_with_accelerator_settings():
    """Through build_train_step on the 8-device mesh with FSDP parameters: remat + fused
    attention give the plain step's loss and gradients; bf16 compute a loss close to it."""
    plain_metrics, plain_mu = _step(_clip_config())
    metrics, mu = _step(_clip_config(remat="full", attention="fused"))
    np.testing.assert_allclose(metrics["train/loss"], plain_metrics["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(
        metrics["train/grad_norm"], plain_metrics["train/grad_norm"], rtol=1e-5
    )
    _assert_grads_close(mu, plain_mu, rtol=1e-5)
    bf16_metrics, _ = _step(
        _clip_config(dtype="bfloat16", remat="dots_saveable", attention="fused")
    )
    assert bf16_metrics["train/loss"].dtype == np.float32
    np.testing.assert_allclose(bf16_metrics["train/loss"], plain_metrics["train/loss"], rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# Config keys.


def test_config_keys_default_to_the_old_behaviour_for_stored_runs():
    """A config.json written before model.remat / model.attention existed resumes unchanged
    (ADDED_KEYS holds base_config's defaults); another value is a change naming the key."""
    c = common.load_config(os.path.join(ROOT, "configs", "clip.py") + ":tiny")
    for key in ("remat", "attention"):
        assert common.ADDED_KEYS[f"model.{key}"] == c.model[key]
    stored = json.loads(c.to_json())
    del stored["model"]["remat"], stored["model"]["attention"]
    assert common.changed_keys(stored, c) == []
    c.model.remat, c.model.attention = "full", "fused"
    assert common.changed_keys(stored, c) == [
        ("model.attention", "xla", "fused"),
        ("model.remat", "none", "full"),
    ]


@pytest.mark.parametrize(
    "model, match",
    [
        ({"remat": "dots"}, r"Unknown config\.model\.remat='dots'"),
        ({"attention": "flash"}, r"Unknown config\.model\.attention='flash'"),
    ],
)
def test_unknown_values_name_the_key(model, match):
    with pytest.raises(ValueError, match=match):
        build_model(_model_cfg("cls_causal", **model), rngs=nnx.Rngs(0))
