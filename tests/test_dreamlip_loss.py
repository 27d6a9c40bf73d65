"""DreamLIP losses: NumPy loop references, dense references for gradients, sharded vs references.

multi_positive_contrastive_loss: np_multi_positive (float64 loops over the valid (n, k) with
their explicit softmax candidates) gives values; dense_multi_positive (one dense [B, B*K] jnp
program, float64, differentiated by JAX) gives gradients and is itself checked against
np_multi_positive (value, and central finite differences). The loss and its gradients w.r.t.
zimg, zsub and logit_scale are compared with them without a mesh and on 8-device meshes (8, 1),
(4, 2), (2, 4).

grouping_loss: the same scheme with np_grouping (a loop building each region patch by patch)
and dense_grouping (dense [B*K, B*K] logits with a same-image mask for scope "image"), for both
scopes and thresholds 0 and 0.5; gradients w.r.t. zsub, patches and logit_scale.

The data has an image without valid sub-caption, images with a single one (grouping "image"
gives 0 for their terms), images with all K, and an image whose first sub-caption is orthogonal
to every patch (a constant similarity map: uniform weights).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shard_map_shapes
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import finite_differences, np_logsumexp

from mlcd.losses import (
    dreamlip,
    grouping_loss,
    multi_positive_contrastive_loss,
    softmax_contrastive_loss,
)

# 8 devices -> b = 2 images each; B, K, P, D all differ. B*B*K = 768 elements is the size of a
# global [B, B*K] logits matrix; everything a device should hold is smaller: [b*K, B] = 96,
# [b, B*K] = 96, [b*K, B*K] = 288, [B*K, D] = 576 (gathered sub-captions or regions). The
# gathered patches [B, P, D] = 960 or a [B*K, B*P] block = 3840 would not be.
B, K, NP, D = 16, 3, 5, 12
MP_SCALE, GROUP_SCALE = 5.0, 10.0
EMPTY, SINGLE, FULL, FLAT = 0, (1, 2), (3, 4), 5  # rows of the data with those masks


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return Mesh(np.array(devices).reshape(shape), ("data", "model")[: len(shape)])


# (8,): one axis; (4, 2) and (2, 4): the batch split over two axes in both orders.
MESHES = {"8": _mesh((8,)), "4x2": _mesh((4, 2)), "2x4": _mesh((2, 4))}


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data():
    rng = np.random.default_rng(0)
    zimg = _unit(rng.normal(size=(B, D)))
    zsub = _unit(zimg[:, None, :] + 0.9 * rng.normal(size=(B, K, D)))
    mask = rng.random((B, K)) < 0.6
    mask[EMPTY] = False  # no valid sub-caption
    mask[SINGLE[0]] = [True, False, False]  # a single one, first slot
    mask[SINGLE[1]] = [False, False, True]  # ... last slot
    mask[list(FULL)] = True
    mask[FLAT] = True
    # Patches: noise plus a pull towards one of the image's sub-captions, so that the maps have
    # structure; any norm (grouping_loss normalises them).
    towards = zsub[np.arange(B)[:, None], rng.integers(K, size=(B, NP))]  # [B, P, D]
    patches = rng.normal(size=(B, NP, D)) + 1.5 * towards
    patches *= rng.uniform(0.5, 2.0, size=(B, NP, 1))
    # Row FLAT: sub-caption 0 is e_0 and every patch has a 0 there, so its map is exactly 0
    # (max == min) in any precision: uniform weights.
    patches[FLAT, :, 0] = 0.0
    zsub[FLAT, 0] = np.eye(D)[0]
    return zimg, zsub, mask, patches


ZIMG64, ZSUB64, MASK, PATCHES64 = _data()
ZIMG, ZSUB, PATCHES = (x.astype(np.float32) for x in (ZIMG64, ZSUB64, PATCHES64))


def _assert_close(got, want, names, what):
    (value, grads), (want_value, want_grads) = got, want
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=f"{what}: loss")
    for name, g, w in zip(names, grads, want_grads, strict=True):
        # Elementwise rtol plus an absolute floor at 1e-5 of the largest entry (entries that
        # are sums of cancelling terms cannot be relatively accurate in float32).
        np.testing.assert_allclose(
            g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=f"{what}: d/d{name}"
        )


def _put(mesh, *arrays):
    spec = NamedSharding(mesh, P(mesh.axis_names))
    return [jax.device_put(x, spec) for x in arrays]


def _run(fn, split, scale, mesh=None):
    """jax.device_get(fn(*split, scale)), the batch arrays sharded on `mesh` if given."""
    if mesh is None:
        return jax.device_get(fn(*split, scale))
    with jax.set_mesh(mesh):
        return jax.device_get(fn(*_put(mesh, *split), scale))


# ==============================================================================================
# Multi-positive contrastive.


def np_multi_positive(zimg, zsub, mask, s):
    """The formula term by term: loops over the valid (n, k), candidates listed explicitly."""
    batch, slots = mask.shape
    valid = [(n, k) for n in range(batch) for k in range(slots) if mask[n, k]]
    if not valid:
        return 0.0
    t2i = i2t = 0.0
    for n, k in valid:  # sub-caption (n, k) picks its image n among all B images
        logits = [s * zimg[i] @ zsub[n, k] for i in range(batch)]
        t2i += np_logsumexp(logits) - logits[n]
    for i, k in valid:  # image i picks its sub-caption (i, k) among all valid ones
        logits = [s * zimg[i] @ zsub[n, kk] for n, kk in valid]
        i2t += np_logsumexp(logits) - s * zimg[i] @ zsub[i, k]
    return (t2i / len(valid) + i2t / len(valid)) / 2


def dense_multi_positive(zimg, zsub, mask, s):
    """(value, (d/dzimg, d/dzsub, d/ds)), float64, from dense [B, B*K] logits."""
    batch, slots = mask.shape
    valid = mask.reshape(-1)
    image_of = np.repeat(np.arange(batch), slots)  # column (n, k) -> n

    def loss(zimg, zsub, s):
        logits = s * zimg @ zsub.reshape(batch * slots, -1).T  # [B, B*K]
        pos = logits[image_of, np.arange(batch * slots)]
        t2i = jax.nn.logsumexp(logits, axis=0) - pos
        # No valid column at all: an empty softmax; a finite dummy, dropped below.
        masked = jnp.where(valid[None, :] if valid.any() else True, logits, -jnp.inf)
        i2t = jax.nn.logsumexp(masked, axis=1)[image_of] - pos
        total = jnp.sum(jnp.where(valid, t2i + i2t, 0.0))
        return total / (2 * max(valid.sum(), 1))

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(zimg, zsub, float(s))
        return float(value), tuple(np.asarray(g) for g in grads)


MP_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(multi_positive_contrastive_loss, argnums=(0, 1, 3)))
MP_NAMES = ("zimg", "zsub", "logit_scale")


@functools.cache
def _mp_reference():
    args = (ZIMG64, ZSUB64, MASK, MP_SCALE)
    return np_multi_positive(*args), dense_multi_positive(*args)[1]


def test_dense_multi_positive_matches_numpy():
    value, grads = dense_multi_positive(ZIMG64, ZSUB64, MASK, MP_SCALE)
    np.testing.assert_allclose(value, np_multi_positive(ZIMG64, ZSUB64, MASK, MP_SCALE), rtol=1e-12)
    coords = [(0, (i, d)) for i in (EMPTY, 1, 3, 9) for d in range(0, D, 3)]
    coords += [(1, (n, k, d)) for n, k in ((0, 1), (1, 0), (2, 2), (4, 1), (11, 0)) for d in (0, 5)]
    coords += [(2, ())]
    want = finite_differences(
        lambda zi, zs, s: np_multi_positive(zi, zs, MASK, s), (ZIMG64, ZSUB64, MP_SCALE), coords
    )
    got = np.array([grads[which][idx] for which, idx in coords])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    # Padded slots are neither anchors nor candidates; an image without sub-caption is still a
    # candidate image (a gradient).
    np.testing.assert_array_equal(grads[1][~MASK], 0.0)
    assert np.abs(grads[0][EMPTY]).max() > 1e-3


def test_multi_positive_unsharded_matches_references():
    got = _run(MP_VALUE_AND_GRAD, (ZIMG, ZSUB, MASK), MP_SCALE)
    _assert_close(got, _mp_reference(), MP_NAMES, "no mesh")


@pytest.mark.parametrize("mesh_name", MESHES)
def test_multi_positive_sharded_matches_references(mesh_name):
    got = _run(MP_VALUE_AND_GRAD, (ZIMG, ZSUB, MASK), MP_SCALE, MESHES[mesh_name])
    _assert_close(got, _mp_reference(), MP_NAMES, mesh_name)


def test_one_subcaption_per_image_is_clip():
    """With exactly one valid sub-caption per image (in any slot) both directions reduce to
    CLIP's softmax loss on (zimg, that sub-caption)."""
    slot = np.arange(B) % K
    one = np.eye(K, dtype=bool)[slot]
    got = _run(MP_VALUE_AND_GRAD, (ZIMG, ZSUB, one), MP_SCALE)[0]
    want = softmax_contrastive_loss(ZIMG, ZSUB[np.arange(B), slot], MP_SCALE)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ==============================================================================================
# Grouping.


def np_region(zsub_ik, patches_i, threshold):
    """r_ik from the formula, patch by patch: (region [D], weights [P])."""
    p = [x / np.linalg.norm(x) for x in patches_i]
    a = [pn @ zsub_ik for pn in p]
    lo, hi = min(a), max(a)
    if hi == lo:  # a constant map: uniform weights
        w = [1.0 / len(p)] * len(p)
    else:
        scaled = [(an - lo) / (hi - lo) for an in a]
        kept = [x if x >= threshold else 0.0 for x in scaled]
        w = [x / sum(kept) for x in kept]
    r = sum(wn * pn for wn, pn in zip(w, p, strict=True))
    return r / np.linalg.norm(r), np.array(w)


def np_grouping(zsub, patches, mask, s, *, threshold, scope, terms=False):
    """The formula term by term; terms=True also returns {(i, k): L_ik}."""
    batch, slots = mask.shape
    valid = [(n, k) for n in range(batch) for k in range(slots) if mask[n, k]]
    regions = {(n, k): np_region(zsub[n, k], patches[n], threshold)[0] for n, k in valid}
    out = {}
    for i, k in valid:
        cands = [(n, kk) for n, kk in valid if scope == "batch" or n == i]
        logits = [s * regions[c] @ zsub[i, k] for c in cands]  # cos: both are unit vectors
        out[i, k] = np_logsumexp(logits) - s * regions[i, k] @ zsub[i, k]
    loss = sum(out.values()) / len(valid) if valid else 0.0
    return (loss, out) if terms else loss


def dense_grouping(zsub, patches, mask, s, *, threshold, scope, detach_weights=False):
    """(value, (d/dzsub, d/dpatches, d/ds)), float64, from dense [B, K, P] maps and [B*K, B*K]
    logits (scope "image": a same-image mask). detach_weights: stop_gradient on the weights w,
    i.e. a gradient through the region's patches only (what the real loss must NOT be)."""
    batch, slots = mask.shape
    valid = mask.reshape(-1)
    image_of = np.repeat(np.arange(batch), slots)
    same_image = image_of[:, None] == image_of[None, :]
    cand = valid[None, :] & (same_image | (scope == "batch"))
    cand |= ~valid[:, None]  # invalid rows: a finite dummy softmax, dropped below

    def loss(zsub, patches, s):
        p = patches / jnp.linalg.norm(patches, axis=-1, keepdims=True)
        a = jnp.einsum("ikd,ind->ikn", zsub, p)
        lo, hi = a.min(-1, keepdims=True), a.max(-1, keepdims=True)
        scaled = jnp.where(hi == lo, 1.0, (a - lo) / jnp.where(hi == lo, 1.0, hi - lo))
        w = jnp.where(scaled >= threshold, scaled, 0.0)
        w = w / w.sum(-1, keepdims=True)
        if detach_weights:
            w = jax.lax.stop_gradient(w)
        r = jnp.einsum("ikn,ind->ikd", w, p)
        r = r / jnp.linalg.norm(r, axis=-1, keepdims=True)
        logits = s * zsub.reshape(batch * slots, -1) @ r.reshape(batch * slots, -1).T
        lse = jax.nn.logsumexp(jnp.where(cand, logits, -jnp.inf), axis=1)
        terms = jnp.where(valid, lse - jnp.diagonal(logits), 0.0)
        return jnp.sum(terms) / max(valid.sum(), 1)

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(zsub, patches, float(s))
        return float(value), tuple(np.asarray(g) for g in grads)


GROUP_CASES = {
    "image": dict(scope="image", threshold=0.0),
    "image_t0.5": dict(scope="image", threshold=0.5),
    "batch": dict(scope="batch", threshold=0.0),
    "batch_t0.5": dict(scope="batch", threshold=0.5),
}
GROUP_VALUE_AND_GRAD = {
    case: jax.jit(jax.value_and_grad(functools.partial(grouping_loss, **kw), argnums=(0, 1, 3)))
    for case, kw in GROUP_CASES.items()
}
GROUP_NAMES = ("zsub", "patches", "logit_scale")


@functools.cache
def _group_reference(case):
    args = (ZSUB64, PATCHES64, MASK, GROUP_SCALE)
    kw = GROUP_CASES[case]
    return np_grouping(*args, **kw), dense_grouping(*args, **kw)[1]


def _group_run(case, mesh=None, mask=MASK, zsub=ZSUB, patches=PATCHES):
    return _run(GROUP_VALUE_AND_GRAD[case], (zsub, patches, mask), GROUP_SCALE, mesh)


def test_data_exercises_the_threshold_and_the_flat_map():
    """At sigma = 0.5 the maps drop patches beyond their minimum (the threshold matters);
    row FLAT's first map is constant: uniform weights, i.e. the normalised mean patch."""
    dropped = [
        np.sum(np_region(ZSUB64[i, k], PATCHES64[i], 0.5)[1] == 0)
        for i in range(B)
        for k in range(K)
    ]
    assert sum(d >= 2 for d in dropped) >= 10
    region, w = np_region(ZSUB64[FLAT, 0], PATCHES64[FLAT], 0.5)
    np.testing.assert_array_equal(w, 1 / NP)
    np.testing.assert_allclose(region, _unit(_unit(PATCHES64[FLAT]).mean(0)), rtol=1e-12)
    loss0 = _group_run("image")[0]
    loss5 = _group_run("image_t0.5")[0]
    assert abs(loss0 - loss5) > 1e-2


@pytest.mark.parametrize("case", GROUP_CASES)
def test_dense_grouping_matches_numpy(case):
    kw = GROUP_CASES[case]
    value, grads = dense_grouping(ZSUB64, PATCHES64, MASK, GROUP_SCALE, **kw)
    np.testing.assert_allclose(
        value, np_grouping(ZSUB64, PATCHES64, MASK, GROUP_SCALE, **kw), rtol=1e-12
    )
    # Row FLAT is left out: moving one coordinate breaks its constant map (a discontinuity).
    coords = [(0, (n, k, d)) for n, k in ((1, 0), (3, 1), (4, 2), (7, 0), (7, 2)) for d in (0, 7)]
    coords += [(1, (n, j, d)) for n in (2, 3, 7, 12) for j in (0, 3) for d in (0, 4, 11)]
    coords += [(2, ())]
    want = finite_differences(
        lambda zs, pa, s: np_grouping(zs, pa, MASK, s, **kw),
        (ZSUB64, PATCHES64, GROUP_SCALE),
        coords,
    )
    got = np.array([grads[which][idx] for which, idx in coords])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(grads[0][~MASK], 0.0)  # padded slots: no gradient
    np.testing.assert_array_equal(grads[1][EMPTY], 0.0)  # no sub-caption: patches unused


@pytest.mark.parametrize("case", GROUP_CASES)
def test_grouping_unsharded_matches_references(case):
    _assert_close(_group_run(case), _group_reference(case), GROUP_NAMES, f"{case} no mesh")


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("case", GROUP_CASES)
def test_grouping_sharded_matches_references(case, mesh_name):
    got = _group_run(case, MESHES[mesh_name])
    _assert_close(got, _group_reference(case), GROUP_NAMES, f"{case} {mesh_name}")


def test_single_valid_subcaption_gives_zero_in_image_scope():
    """Scope "image": an image with one valid sub-caption has its own region as the whole
    denominator, L = 0 (still counted in V); scope "batch" has other images' regions."""
    _, terms = np_grouping(
        ZSUB64, PATCHES64, MASK, GROUP_SCALE, threshold=0.0, scope="image", terms=True
    )
    assert [terms[i, k] for i in SINGLE for k in range(K) if MASK[i, k]] == [0.0, 0.0]
    # The implementation: those images' patches get no gradient and do not move the loss.
    value, (_, g_patches, _) = _group_run("image")
    np.testing.assert_array_equal(g_patches[list(SINGLE)], 0.0)
    patches = PATCHES.copy()
    patches[list(SINGLE)] = np.random.default_rng(3).normal(size=(2, NP, D))
    np.testing.assert_allclose(_group_run("image", patches=patches)[0], value, rtol=1e-6)
    assert np.abs(_group_run("batch")[1][1][list(SINGLE)]).max() > 1e-4
    # One valid sub-caption per image (in different slots): 0 and zero gradients (up to
    # rounding: XLA's exp(0) - 1 need not be exactly 0 in float32).
    one = np.eye(K, dtype=bool)[np.arange(B) % K]
    for mesh in (None, MESHES["4x2"]):
        value, grads = _group_run("image", mesh, mask=one)
        assert abs(value) < 1e-6
        for g in grads:
            assert np.abs(g).max() < 1e-6
    assert _group_run("batch", mask=one)[0] > 0.1


@pytest.mark.parametrize("mesh_name", [None, "2x4"])
def test_no_valid_subcaption_gives_zero(mesh_name):
    mesh = MESHES[mesh_name] if mesh_name else None
    none = np.zeros_like(MASK)
    results = [_run(MP_VALUE_AND_GRAD, (ZIMG, ZSUB, none), MP_SCALE, mesh)]
    results += [_group_run(case, mesh, mask=none) for case in ("image", "batch_t0.5")]
    for value, grads in results:
        assert value == 0.0
        for g in grads:
            assert np.isfinite(g).all() and not g.any()


def test_constant_map_gives_uniform_weights():
    """max == min: every patch weighs 1 / P (no 0 / 0), at any threshold; the region of row
    FLAT's first sub-caption is the normalised mean patch."""
    want = _unit(_unit(PATCHES64[FLAT]).mean(0))
    for threshold in (0.0, 0.5, 0.99):
        regions = dreamlip._regions(ZSUB[FLAT][None], PATCHES[FLAT][None], threshold)
        np.testing.assert_allclose(regions[0, 0], want, rtol=1e-5, atol=1e-6)
    # Identical patches: every region is the same vector, each term log(number of valid).
    patches = np.broadcast_to(PATCHES[:, :1], PATCHES.shape).copy()
    value, grads = _group_run("image_t0.5", patches=patches)
    counts = MASK.sum(1)
    want_loss = np.sum(counts * np.log(np.maximum(counts, 1))) / counts.sum()
    np.testing.assert_allclose(value, want_loss, rtol=1e-5)
    for g in grads:
        assert np.isfinite(g).all()


@pytest.mark.parametrize("case", ["image_t0.5", "batch"])
def test_gradient_flows_through_the_weights(case):
    """The weights w carry gradient (min-max and the kept a'): a loss with detached weights,
    whose gradient reaches the patches only through the region's p_in, differs clearly."""
    kw = GROUP_CASES[case]
    detached = dense_grouping(ZSUB64, PATCHES64, MASK, GROUP_SCALE, detach_weights=True, **kw)[1]
    full = _group_reference(case)[1]
    for g_full, g_detached in zip(full[:2], detached[:2], strict=True):
        assert np.abs(g_full - g_detached).max() > 0.1 * np.abs(g_full).max()
    _assert_close(_group_run(case), _group_reference(case), GROUP_NAMES, case)


# ==============================================================================================
# Both.


def test_no_device_holds_a_global_matrix():
    """Inside shard_map: nothing of B*B*K elements or more (a [B, B*K] or [B*K, B*P] matrix,
    or the gathered patches), and the expected local blocks are there."""
    mesh, b = MESHES["4x2"], B // 8
    limit = B * B * K
    programs = {
        "multi_positive": (
            MP_VALUE_AND_GRAD,
            (ZIMG, ZSUB, MASK, MP_SCALE),
            [(b * K, B), (b, B * K)],  # t2i and i2t logits
        ),
        "image": (
            GROUP_VALUE_AND_GRAD["image_t0.5"],
            (ZSUB, PATCHES, MASK, GROUP_SCALE),
            [(b, K, NP), (b, K, K)],  # local maps, same-image logits
        ),
        "batch": (
            GROUP_VALUE_AND_GRAD["batch"],
            (ZSUB, PATCHES, MASK, GROUP_SCALE),
            [(b, K, NP), (b * K, B * K)],  # local maps, logits against gathered regions
        ),
    }
    for name, (fn, args, expected) in programs.items():
        with jax.set_mesh(mesh):
            shapes = shard_map_shapes(jax.make_jaxpr(fn)(*args))
        assert shapes, f"{name}: no shard_map in the jaxpr"
        big = [s for s in shapes if np.prod(s, dtype=int) >= limit]
        assert not big, f"{name}: per-device values {big} of >= {limit} elements"
        for shape in expected:
            assert shape in shapes, f"{name}: no {shape} block"


def test_int_mask_and_explicit_axes_eager():
    """A 0/1 int mask is a mask; an Explicit-axes mesh with replicated inputs and no outer jit
    reshards by itself."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    mask = MASK.astype(np.int32)
    with jax.set_mesh(mesh):
        got_mp = jax.value_and_grad(multi_positive_contrastive_loss, argnums=(0, 1, 3))(
            ZIMG, ZSUB, mask, MP_SCALE
        )
        got_group = jax.value_and_grad(
            functools.partial(grouping_loss, threshold=0.5, scope="batch"), argnums=(0, 1, 3)
        )(ZSUB, PATCHES, mask, GROUP_SCALE)
    _assert_close(jax.device_get(got_mp), _mp_reference(), MP_NAMES, "explicit")
    _assert_close(
        jax.device_get(got_group), _group_reference("batch_t0.5"), GROUP_NAMES, "explicit"
    )


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\); got threshold=1.0"):
        grouping_loss(ZSUB, PATCHES, MASK, 1.0, threshold=1.0)
    with pytest.raises(ValueError, match="threshold must be in"):
        grouping_loss(ZSUB, PATCHES, MASK, 1.0, threshold=-0.1)
    with pytest.raises(
        ValueError, match=r"scope must be one of \('image', 'batch'\); got scope='x'"
    ):
        grouping_loss(ZSUB, PATCHES, MASK, 1.0, scope="x")
    with pytest.raises(ValueError, match=r"patches must be \[B, P, D\]; got \(16, 12\)"):
        grouping_loss(ZSUB, PATCHES[:, 0], MASK, 1.0)
    with pytest.raises(ValueError, match=r"zsub must be \[B, K, D\] with the B=16 and D=8"):
        grouping_loss(ZSUB, PATCHES[..., :8], MASK, 1.0)
    with pytest.raises(ValueError, match=r"zsub must be \[B, K, D\] with the B=8 and D=12"):
        grouping_loss(ZSUB, PATCHES[:8], MASK, 1.0)
    with pytest.raises(ValueError, match=r"sub_mask must be \[B, K\] = \(16, 3\).*got \(16, 2\)"):
        grouping_loss(ZSUB, PATCHES, MASK[:, :2], 1.0)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        grouping_loss(ZSUB, PATCHES, MASK, np.ones(2))
    with pytest.raises(ValueError, match=r"zimg must be \[B, D\]; got \(16, 3, 12\)"):
        multi_positive_contrastive_loss(ZSUB, ZSUB, MASK, 1.0)
    with pytest.raises(ValueError, match=r"zsub must be \[B, K, D\] .* got zsub \(16, 12\)"):
        multi_positive_contrastive_loss(ZIMG, ZIMG, MASK, 1.0)
    with pytest.raises(ValueError, match=r"with the B=16 and D=8 of zimg \(16, 8\)"):
        multi_positive_contrastive_loss(ZIMG[:, :8], ZSUB, MASK, 1.0)
    with pytest.raises(ValueError, match=r"sub_mask must be \[B, K\]"):
        multi_positive_contrastive_loss(ZIMG, ZSUB, MASK[:8], 1.0)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        multi_positive_contrastive_loss(ZIMG, ZSUB, MASK, np.ones((1,)))
    for fn, args in (
        (multi_positive_contrastive_loss, (ZIMG[:12], ZSUB[:12], MASK[:12], 1.0)),
        (grouping_loss, (ZSUB[:12], PATCHES[:12], MASK[:12], 1.0)),
    ):
        with (
            jax.set_mesh(MESHES["4x2"]),
            pytest.raises(ValueError, match=r"global batch size=12 is not divisible by the 8"),
        ):
            fn(*args)
