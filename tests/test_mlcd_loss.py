"""MLCD loss: NumPy references, sharded vs references.

References (float64): np_mlcd, the formula as a loop over rows with explicit class sets, gives
the values; dense_reference, a separate dense [B, C] jnp program differentiated by JAX, gives
full gradients and is itself checked against np_mlcd (value, and central finite differences at
a spread of coordinates). mlcd_loss (loss and gradients w.r.t. emb and centers) is compared with
them without a mesh, on a 1-device mesh and on 8-device meshes of three shapes. With
sample_ratio < 1 the references get the classes the sharded code samples
(partial_fc.sampled_classes); a statistical test checks that sampled set against the
support of the centers' gradient and its rate over many steps. The partial_fc blocks themselves
are tested in test_partial_fc.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shard_map_shapes
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import finite_differences

from mlcd import partial_fc as pfc
from mlcd.losses import mlcd_loss

# 8 devices -> b = 2 rows and C_local = 8 classes each; all dims differ from C so the jaxpr test
# can look for C.
B, D, C, L = 16, 12, 64, 3
RATIO = 0.5  # k = 4 of 8 classes per shard on 8 devices, 32 of 64 on one
SCALE = 32.0
RNG_KEY = jax.random.key(7)


def _data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(C, D))
    labels = np.stack([rng.choice(C, size=L, replace=False) for _ in range(B)])
    labels[0] = -1  # no positive at all: only the negative term
    labels[1, 1:] = -1  # padding after a valid id
    labels[2, 0] = -1  # padding before valid ids
    labels[3, 2] = labels[3, 0]  # a repeated id counts once
    labels[4, :] = np.arange(L)  # classes 0..2 on the first shard of 8
    labels[5, :] = np.array([C - 1, 8, 9])  # last class and the second shard
    # Embeddings drawn towards their first valid positive by varying amounts (cos about 0 to
    # 0.9), so that both terms and the margin carry gradient rather than saturating.
    first = centers[np.maximum(np.where(labels[:, 0] >= 0, labels[:, 0], labels[:, 1]), 0)]
    pull = np.linspace(0.0, 2.5, B)[rng.permutation(B)][:, None]
    emb = pull * first / np.linalg.norm(first, axis=1, keepdims=True) + rng.normal(size=(B, D))
    emb *= rng.uniform(0.5, 2.0, size=(B, 1))  # any norm: mlcd_loss normalises
    return emb, centers, labels.astype(np.int32)


EMB64, CENTERS64, LABELS = _data()
EMB, CENTERS = EMB64.astype(np.float32), CENTERS64.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Direct NumPy reference (float64).


def _np_margin(cos, margin, margin_type):
    """cos(theta + m) (ArcFace) or cos - m (CosFace), elementwise on a vector of cosines."""
    if margin_type == "cosface":
        return cos - margin
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    # theta + m > pi: insightface's convention, as documented in mlcd.py.
    return np.where(theta + margin > np.pi, cos - margin * np.sin(margin), np.cos(theta + margin))


def _softplus_logsumexp(z):
    """log(1 + sum_j exp(z_j)); 0 for an empty vector."""
    top = max(0.0, z.max(initial=0.0))
    return top + np.log(np.exp(-top) + np.exp(z - top).sum())


def np_mlcd(emb, centers, labels, *, scale, margin, margin_type, negatives=None, metrics=False):
    """The formula (docs/architecture.md, "Loss formulas") row by row; negatives: sampled global
    class ids or None (all)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    c = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    candidates = np.ones(len(c), bool)
    if negatives is not None:
        candidates = np.isin(np.arange(len(c)), negatives)
    losses, pos_cos, neg_cos, pos_terms, neg_terms = [], [], [], [], []
    for i in range(len(e)):
        positives = np.array(sorted({int(y) for y in labels[i] if y >= 0}), int)  # P_i, a set
        negs = candidates.copy()
        negs[positives] = False  # N'_i = candidates minus P_i
        cp = c[positives] @ e[i]
        cn = c[negs] @ e[i]
        pos_terms.append(_softplus_logsumexp(-scale * _np_margin(cp, margin, margin_type)))
        neg_terms.append(_softplus_logsumexp(scale * cn))
        losses.append(pos_terms[-1] + neg_terms[-1])
        pos_cos.extend(cp)
        neg_cos.extend(cn)
    loss = np.mean(losses)
    if not metrics:
        return loss
    return loss, {
        "pos_loss": np.mean(pos_terms),
        "neg_loss": np.mean(neg_terms),
        "pos_cos": np.mean(pos_cos),
        "neg_cos": np.mean(neg_cos),
        "num_negatives": len(neg_cos) / len(e),
    }


def dense_reference(emb, centers, labels, *, scale, margin, margin_type, negatives=None):
    """(value, (d/demb, d/dcenters)) of the formula, float64, from a dense [B, C] jnp program.

    Independent of mlcd_loss's code path (no gathers, sampling or collectives; arccos taken
    literally); its value and finite differences are checked against np_mlcd below.
    """
    num_classes = centers.shape[0]
    pos_mask = np.zeros((len(labels), num_classes), bool)
    for i, row in enumerate(labels):
        pos_mask[i, row[row >= 0]] = True
    candidates = np.ones(num_classes, bool)
    if negatives is not None:
        candidates = np.isin(np.arange(num_classes), negatives)
    neg_mask = candidates[None, :] & ~pos_mask

    def loss(emb, centers):
        e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
        c = centers / jnp.linalg.norm(centers, axis=1, keepdims=True)
        cos = e @ c.T
        if margin_type == "arcface":
            theta = jnp.arccos(cos)
            hard = theta + margin > np.pi
            z_pos = scale * jnp.where(hard, cos - margin * np.sin(margin), jnp.cos(theta + margin))
        else:
            z_pos = scale * (cos - margin)
        # log(1 + sum exp): no overflow at |z| <= scale in float64.
        pos = jnp.log1p(jnp.sum(jnp.where(pos_mask, jnp.exp(-z_pos), 0.0), axis=1))
        neg = jnp.log1p(jnp.sum(jnp.where(neg_mask, jnp.exp(scale * cos), 0.0), axis=1))
        return jnp.mean(pos + neg)

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(emb, centers)
        return float(value), tuple(np.asarray(g) for g in grads)


# ----------------------------------------------------------------------------------------------
# Cases: name -> mlcd_loss keyword arguments. The jitted value_and_grad functions are shared by
# all tests (jit retraces per context mesh).

CASES = {
    "arcface": dict(margin=0.3, margin_type="arcface"),
    "cosface": dict(margin=0.35, margin_type="cosface"),
    "arcface_sampled": dict(margin=0.3, margin_type="arcface", sample_ratio=RATIO),
}


def _loss_fn(case):
    kwargs = dict(CASES[case], scale=SCALE)
    return lambda emb, centers, labels, rng: mlcd_loss(emb, centers, labels, rng=rng, **kwargs)


VALUE_AND_GRAD = {
    case: jax.jit(jax.value_and_grad(_loss_fn(case), argnums=(0, 1))) for case in CASES
}


def _case_kwargs(case, num_shards):
    """np_mlcd / dense_reference keyword arguments of a case, sampling as on num_shards devices."""
    kwargs = dict(CASES[case], scale=SCALE)
    ratio = kwargs.pop("sample_ratio", 1.0)
    if ratio < 1:
        kwargs["negatives"] = np.asarray(pfc.sampled_classes(RNG_KEY, C, num_shards, ratio))
    return kwargs


@functools.cache
def _reference(case, num_shards):
    """(value, (d/demb, d/dcenters)) to compare mlcd_loss with: np_mlcd's value, the dense
    reference's gradients."""
    kwargs = _case_kwargs(case, num_shards)
    _, grads = dense_reference(EMB64, CENTERS64, LABELS, **kwargs)
    return np_mlcd(EMB64, CENTERS64, LABELS, **kwargs), grads


# Finite-difference spot checks of the dense reference: rows with no positive, with a repeated
# id, with ids on two shards; centers that are positives, negatives only, first and last.
FD_COORDS = [(0, (i, d)) for i in (0, 3, 5) for d in range(D)] + [
    (1, (c, d)) for c in (0, 8, 20, 41, C - 1) for d in range(D)
]


@pytest.mark.parametrize(("case", "num_shards"), [(c, 1) for c in CASES] + [("arcface_sampled", 8)])
def test_dense_reference_matches_numpy(case, num_shards):
    kwargs = _case_kwargs(case, num_shards)
    fn = functools.partial(np_mlcd, labels=LABELS, **kwargs)
    value, grads = dense_reference(EMB64, CENTERS64, LABELS, **kwargs)
    np.testing.assert_allclose(value, fn(EMB64, CENTERS64), rtol=1e-12)
    want = finite_differences(fn, (EMB64, CENTERS64), FD_COORDS)
    got = np.array([grads[which][idx] for which, idx in FD_COORDS])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def _assert_close(got, want, what):
    (value, (g_emb, g_centers)), (want_value, (w_emb, w_centers)) = got, want
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=f"{what}: loss")
    for name, g, w in (("emb", g_emb, w_emb), ("centers", g_centers, w_centers)):
        # Elementwise rtol plus an absolute floor at 1e-5 of the largest entry (entries that
        # are sums of cancelling terms cannot be relatively accurate in float32).
        np.testing.assert_allclose(
            g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=f"{what}: d/d{name}"
        )


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return Mesh(np.array(devices).reshape(shape), ("data", "model"))


MESHES = {"8x1": _mesh((8, 1)), "4x2": _mesh((4, 2)), "2x4": _mesh((2, 4)), "1x1": _mesh((1, 1))}


def _run(case, mesh=None):
    if mesh is None:
        return jax.device_get(VALUE_AND_GRAD[case](EMB, CENTERS, LABELS, RNG_KEY))
    spec = NamedSharding(mesh, P(mesh.axis_names))
    emb, centers, labels = (jax.device_put(x, spec) for x in (EMB, CENTERS, LABELS))
    with jax.set_mesh(mesh):
        return jax.device_get(VALUE_AND_GRAD[case](emb, centers, labels, RNG_KEY))


@pytest.mark.parametrize("case", CASES)
def test_unsharded_matches_numpy(case):
    _assert_close(_run(case), _reference(case, 1), f"{case} without mesh")


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_matches_numpy(case, mesh_name):
    mesh = MESHES[mesh_name]
    _assert_close(_run(case, mesh), _reference(case, mesh.size), f"{case} on {mesh_name}")


def test_explicit_axes_and_eager_match_numpy():
    """Explicit-axes mesh with replicated inputs, no outer jit: the loss reshards itself."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        got = jax.value_and_grad(_loss_fn("arcface_sampled"), argnums=(0, 1))(
            EMB, CENTERS, LABELS, RNG_KEY
        )
    _assert_close(jax.device_get(got), _reference("arcface_sampled", 8), "explicit axes")


def test_metrics_match_numpy():
    mesh = MESHES["4x2"]
    kwargs = dict(CASES["arcface_sampled"], scale=SCALE)
    with jax.set_mesh(mesh):
        loss, metrics = jax.jit(
            lambda e, c, y, k: mlcd_loss(e, c, y, rng=k, return_metrics=True, **kwargs)
        )(EMB, CENTERS, LABELS, RNG_KEY)
    kwargs.pop("sample_ratio")
    negatives = np.asarray(pfc.sampled_classes(RNG_KEY, C, 8, RATIO))
    want_loss, want = np_mlcd(EMB64, CENTERS64, LABELS, negatives=negatives, metrics=True, **kwargs)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert set(metrics) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------
# ArcFace margin edge cases.


def test_arcface_gradients_finite_at_cos_plus_minus_one():
    emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    # cos = 1 exactly, 1 - 4.5e-6 (differentiated, sin(theta) = 3e-3), and -1 exactly.
    centers = jnp.array([[1.0, 0.0], [1.0, 3e-3]])
    labels = jnp.array([[0], [1], [0]])
    value, grads = jax.value_and_grad(mlcd_loss, argnums=(0, 1))(emb, centers, labels)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in grads)


def test_arcface_hard_positive_branch_matches_references():
    """theta + m > pi: z+ = s (cos - m sin m), slope 1 in cos, for row 0 (cos = -0.99)."""
    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    centers = np.array([[-0.99, np.sqrt(1 - 0.99**2)], [0.6, 0.8]])
    labels = np.array([[0], [1]], np.int32)
    kw = dict(scale=4.0, margin=0.3, margin_type="arcface")
    got = jax.value_and_grad(mlcd_loss, argnums=(0, 1))(
        emb.astype(np.float32), centers.astype(np.float32), labels, **kw
    )
    want = (np_mlcd(emb, centers, labels, **kw), dense_reference(emb, centers, labels, **kw)[1])
    _assert_close(jax.device_get(got), want, "hard positive")


# ----------------------------------------------------------------------------------------------
# Sampling: the sampled set, positives always kept, the rate.


def test_sampling_support_and_rate():
    """Over 200 steps on 8 devices: the centers' gradient is nonzero exactly on the sampled
    classes plus every positive of the batch, every step; each class is sampled at rate k/C_l."""
    mesh, steps, ratio = MESHES["8x1"], 200, 0.25  # k = 2 of 8 per shard
    labels = LABELS.copy()
    labels[6:] = -1  # few positives, so most classes are negatives only
    positives = np.unique(labels[labels >= 0])
    keys = jax.random.split(jax.random.key(3), steps)
    sampled = np.zeros((steps, C), bool)
    for t, ids in enumerate(
        jax.device_get(jax.vmap(lambda k: pfc.sampled_classes(k, C, 8, ratio))(keys))
    ):
        sampled[t, ids] = True

    @jax.jit
    def support(centers, key):
        g = jax.grad(mlcd_loss, argnums=1)(
            EMB, centers, labels, scale=8.0, sample_ratio=ratio, rng=key
        )
        return jnp.any(g != 0, axis=1)

    with jax.set_mesh(mesh):
        centers = jax.device_put(CENTERS, NamedSharding(mesh, P(mesh.axis_names)))
        nonzero = np.stack([jax.device_get(support(centers, k)) for k in keys])

    assert nonzero[:, positives].all(), "a positive lost its gradient"
    others = np.setdiff1d(np.arange(C), positives)
    np.testing.assert_array_equal(nonzero[:, others], sampled[:, others])
    assert (sampled.reshape(steps, 8, C // 8).sum(-1) == 2).all()  # k per shard, every step
    # Binomial(200, 1/4) per class: mean 50, sd 6.1; +-5 sd.
    counts = sampled.sum(0)
    assert counts.min() >= 50 - 31 and counts.max() <= 50 + 31, counts


def test_degenerate_sampling_warns_and_stays_finite():
    """r * C_local < 1 -> one sampled class; a row whose positives include it has no negative."""
    key = jax.random.key(11)
    (only,) = np.asarray(pfc.sampled_classes(key, C, 1, 0.01))
    labels = LABELS.copy()
    labels[7] = [only, -1, -1]
    with pytest.warns(UserWarning) as record:
        value, grads = jax.value_and_grad(mlcd_loss, argnums=(0, 1))(
            EMB, CENTERS, labels, scale=SCALE, sample_ratio=0.01, rng=key
        )
    messages = " | ".join(str(w.message) for w in record)
    assert "sampling 1 class per shard" in messages
    assert "rows whose positives cover the sample get no negative term" in messages
    want = np_mlcd(
        EMB64,
        CENTERS64,
        labels,
        scale=SCALE,
        margin=0.3,
        margin_type="arcface",
        negatives=np.array([only]),
    )
    np.testing.assert_allclose(value, want, rtol=1e-5)
    assert all(np.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# The sharded path holds no [B, C] array and keeps the centers' gradient sharded.


@pytest.mark.parametrize("case", ["arcface", "arcface_sampled"])
def test_no_full_logits_and_sharded_center_grad(case):
    mesh = MESHES["4x2"]
    c_local = C // mesh.size
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(VALUE_AND_GRAD[case])(EMB, CENTERS, LABELS, RNG_KEY)
    shapes = shard_map_shapes(jaxpr)
    assert shapes, "no shard_map in the jaxpr"
    assert not [s for s in shapes if C in s], "a value with a full class dimension"
    k = c_local if case == "arcface" else pfc.num_sampled(c_local, RATIO)
    assert (B, k) in shapes  # the gathered batch against this shard's (sampled) columns

    spec = NamedSharding(mesh, P(mesh.axis_names))
    with jax.set_mesh(mesh):
        _, (_, g_centers) = VALUE_AND_GRAD[case](
            *(jax.device_put(x, spec) for x in (EMB, CENTERS, LABELS)), RNG_KEY
        )
    assert {s.data.shape for s in g_centers.addressable_shards} == {(c_local, D)}
    starts = sorted(s.index[0].start for s in g_centers.addressable_shards)
    assert starts == list(range(0, C, c_local))


# ----------------------------------------------------------------------------------------------
# Errors.


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"margin_type must be one of .* got 'sphereface'"):
        mlcd_loss(EMB, CENTERS, LABELS, margin_type="sphereface")
    with pytest.raises(ValueError, match=r"emb \(16, 12\) and centers \(64, 8\)"):
        mlcd_loss(EMB, CENTERS[:, :8], LABELS)
    with pytest.raises(ValueError, match=r"labels must be \[B, l\] with B=16; got \(8, 3\)"):
        mlcd_loss(EMB, CENTERS, LABELS[:8])
    with pytest.raises(ValueError, match="labels must be integers"):
        mlcd_loss(EMB, CENTERS, LABELS.astype(np.float32))
    with pytest.raises(ValueError, match=r"sample_ratio must be in \(0, 1\]; got 0.0"):
        mlcd_loss(EMB, CENTERS, LABELS, sample_ratio=0.0)
    with pytest.raises(
        ValueError, match=r"sample_ratio=0.1 < 1 samples random negatives: pass rng"
    ):
        mlcd_loss(EMB, CENTERS, LABELS, sample_ratio=0.1)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        mlcd_loss(EMB, CENTERS, LABELS, margin=-0.1)


def test_labels_out_of_range_raise_with_example():
    labels = LABELS.copy()
    labels[9, 1] = C
    with pytest.raises(
        ValueError, match=r"\[0, 64\) or -1 .* got values in \[-1, 64\], e.g. row 9"
    ):
        mlcd_loss(EMB, CENTERS, labels)
    # Under jit labels are traced and cannot be checked: an id >= C is ignored like padding.
    got = VALUE_AND_GRAD["cosface"](EMB, CENTERS, labels, RNG_KEY)[0]
    labels[9, 1] = -1
    np.testing.assert_array_equal(got, VALUE_AND_GRAD["cosface"](EMB, CENTERS, labels, RNG_KEY)[0])
    labels[9, 1] = -2
    with pytest.raises(ValueError, match=r"got values in \[-2, "):
        mlcd_loss(EMB, CENTERS, labels)


def test_indivisible_sizes_raise():
    with (
        jax.set_mesh(MESHES["4x2"]),
        pytest.raises(ValueError, match=r"number of centers C=60 is not divisible by the 8 dev"),
    ):
        mlcd_loss(EMB, CENTERS[:60], np.minimum(LABELS, 59))
    with (
        jax.set_mesh(MESHES["4x2"]),
        pytest.raises(ValueError, match=r"global batch size=12 is not divisible by the 8 dev"),
    ):
        mlcd_loss(EMB[:12], CENTERS, LABELS[:12])
