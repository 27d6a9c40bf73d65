"""Softmax and sigmoid contrastive losses: NumPy references, sharded vs unsharded, sharding proof.

The reference path is checked against a float64 NumPy implementation (values) and central finite
differences of it (gradients). The sharded path is checked against the reference path on the 8
fake CPU devices for several mesh shapes, values and gradients w.r.t. every input.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shard_map_shapes
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import finite_difference_grads

from mlcd.losses import sigmoid_contrastive_loss, softmax_contrastive_loss

B, D = 32, 8  # 8 devices -> b = 4 rows each; D != b != N - 1 so shapes are unambiguous below.
SCALE, BIAS = 7.0, -3.0


def _unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


_RNG = np.random.default_rng(0)
ZIMG64, ZTXT64 = _unit_rows(_RNG, (B, D)), _unit_rows(_RNG, (B, D))
# Make the positives more similar than chance so the loss is in a realistic regime.
ZTXT64 = _unit_rows(_RNG, (B, D)) * 0.3 + ZIMG64
ZTXT64 /= np.linalg.norm(ZTXT64, axis=-1, keepdims=True)
ZIMG, ZTXT = ZIMG64.astype(np.float32), ZTXT64.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Direct NumPy references (float64).


def _np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_softmax_loss(zimg, ztxt, scale, bias=None, *, label_smoothing, reduction):
    del bias
    n = zimg.shape[0]
    logits = scale * zimg @ ztxt.T
    target = (1 - label_smoothing) * np.eye(n) + label_smoothing / n
    l_i2t = -(target * _np_log_softmax(logits)).sum() / n
    l_t2i = -(target * _np_log_softmax(logits.T)).sum() / n
    return (l_i2t + l_t2i) / 2 if reduction == "mean" else l_i2t + l_t2i


def np_sigmoid_loss(zimg, ztxt, scale, bias):
    n = zimg.shape[0]
    labels = 2 * np.eye(n) - 1
    z = labels * (scale * zimg @ ztxt.T + bias)
    return np.logaddexp(0.0, -z).sum() / n  # -log_sigmoid(z) = log(1 + exp(-z))


# ----------------------------------------------------------------------------------------------
# Cases: name -> (jax loss of (zimg, ztxt, scale, bias), numpy reference). Jitted value_and_grad
# functions are shared by all tests; jit retraces per context mesh.

CASES = {
    "softmax_mean": (
        lambda zi, zt, s, b: softmax_contrastive_loss(zi, zt, s),
        functools.partial(np_softmax_loss, label_smoothing=0.0, reduction="mean"),
    ),
    "softmax_mean_smooth": (
        lambda zi, zt, s, b: softmax_contrastive_loss(zi, zt, s, label_smoothing=0.2),
        functools.partial(np_softmax_loss, label_smoothing=0.2, reduction="mean"),
    ),
    "softmax_sum_smooth": (
        lambda zi, zt, s, b: softmax_contrastive_loss(
            zi, zt, s, label_smoothing=0.1, reduction="sum"
        ),
        functools.partial(np_softmax_loss, label_smoothing=0.1, reduction="sum"),
    ),
    "sigmoid": (sigmoid_contrastive_loss, np_sigmoid_loss),
}
VALUE_AND_GRAD = {
    name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))) for name, (fn, _) in CASES.items()
}
ARG_NAMES = ("zimg", "ztxt", "logit_scale", "logit_bias")


def _assert_close(got, want, atol, what):
    value_got, grads_got = got
    value_want, grads_want = want
    np.testing.assert_allclose(value_got, value_want, rtol=1e-6, atol=atol, err_msg=f"{what} loss")
    for name, g, w in zip(ARG_NAMES, grads_got, grads_want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol, err_msg=f"{what} d/d{name}")


@functools.cache
def _reference(name):
    """Unsharded (no mesh in context) value and gradients."""
    return jax.device_get(VALUE_AND_GRAD[name](ZIMG, ZTXT, SCALE, BIAS))


@pytest.mark.parametrize("name", CASES)
def test_unsharded_matches_numpy(name):
    _, np_fn = CASES[name]
    want = (
        np_fn(ZIMG64, ZTXT64, SCALE, BIAS),
        finite_difference_grads(np_fn, (ZIMG64, ZTXT64, SCALE, BIAS)),
    )
    if name.startswith("softmax"):  # no bias: its finite-difference gradient is exactly 0
        assert want[1][3] == 0
    _assert_close(_reference(name), want, atol=2e-5, what=name)


def _mesh(shape, reverse=False):
    devices = jax.devices()[: int(np.prod(shape))]
    if reverse:
        devices = devices[::-1]
    return Mesh(np.array(devices).reshape(shape), ("data", "model"))


MESHES = {
    "8x1": _mesh((8, 1)),
    "4x2": _mesh((4, 2)),
    "2x4": _mesh((2, 4)),
    "2x4_reversed_devices": _mesh((2, 4), reverse=True),
    "1x1": _mesh((1, 1)),
}


# Smoothing and reduction act after the sharded part; one case each keeps the compiles few.
@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("name", ["softmax_mean", "softmax_sum_smooth", "sigmoid"])
def test_sharded_matches_unsharded(name, mesh_name):
    mesh = MESHES[mesh_name]
    batch_sharding = NamedSharding(mesh, P(mesh.axis_names))
    zimg, ztxt = (jax.device_put(x, batch_sharding) for x in (ZIMG, ZTXT))
    with jax.set_mesh(mesh):
        got = jax.device_get(VALUE_AND_GRAD[name](zimg, ztxt, SCALE, BIAS))
    _assert_close(got, _reference(name), atol=1e-5, what=f"{name} on {mesh_name}")


@pytest.mark.parametrize("name", ["softmax_sum_smooth", "sigmoid"])
def test_sharded_eager_matches_unsharded(name):
    """No outer jit, unsharded (host) inputs: the loss reshards them itself."""
    fn, _ = CASES[name]
    with jax.set_mesh(MESHES["4x2"]):
        got = jax.device_get(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(ZIMG, ZTXT, SCALE, BIAS))
    _assert_close(got, _reference(name), atol=1e-5, what=f"eager {name}")


@pytest.mark.parametrize("name", ["softmax_sum_smooth", "sigmoid"])
def test_sharded_explicit_axes_matches_unsharded(name):
    """An Explicit-axes mesh and replicated inputs: shard_map needs them resharded first."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        got = jax.device_get(VALUE_AND_GRAD[name](ZIMG, ZTXT, SCALE, BIAS))
    _assert_close(got, _reference(name), atol=1e-5, what=f"explicit-axes {name}")


# ----------------------------------------------------------------------------------------------
# The sharded path really is sharded.


def _lowered(name, mesh):
    with jax.set_mesh(mesh):
        args = (ZIMG, ZTXT, SCALE, BIAS)
        jaxpr = jax.make_jaxpr(VALUE_AND_GRAD[name])(*args)
        hlo = VALUE_AND_GRAD[name].lower(*args).compile().as_text()
    return shard_map_shapes(jaxpr), hlo


def test_softmax_is_sharded():
    mesh = MESHES["8x1"]
    b = B // mesh.size
    shapes, hlo = _lowered("softmax_mean", mesh)
    assert "all-gather" in hlo
    assert shapes, "no shard_map in the jaxpr"
    assert (b, B) in shapes  # local rows against all gathered columns
    assert (B, B) not in shapes


def test_sigmoid_is_ring_without_large_blocks():
    mesh = MESHES["8x1"]
    n, b = mesh.size, B // mesh.size
    shapes, hlo = _lowered("sigmoid", mesh)
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo
    assert (b, b) in shapes
    # No global-batch dimension anywhere, and the backward pass does not keep the N - 1 logits
    # blocks of the ring (it keeps only the [b, D] text blocks and recomputes the logits).
    assert not [s for s in shapes if B in s]
    assert (n - 1, b, b) not in shapes
    assert (n - 1, b, D) in shapes


# ----------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "loss",
    [
        lambda zi, zt: softmax_contrastive_loss(zi, zt, SCALE),
        lambda zi, zt: sigmoid_contrastive_loss(zi, zt, SCALE, BIAS),
    ],
)
def test_indivisible_batch_raises(loss):
    with (
        jax.set_mesh(MESHES["4x2"]),
        pytest.raises(ValueError, match=r"global batch size=12 is not divisible by the 8 dev"),
    ):
        loss(ZIMG[:12], ZTXT[:12])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="reduction='max'"):
        softmax_contrastive_loss(ZIMG, ZTXT, SCALE, reduction="max")
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_contrastive_loss(ZIMG, ZTXT, SCALE, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"zimg \(32, 8\) and ztxt \(16, 8\)"):
        sigmoid_contrastive_loss(ZIMG, ZTXT[:16], SCALE, BIAS)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        sigmoid_contrastive_loss(ZIMG, ZTXT, SCALE, jnp.zeros(2))
