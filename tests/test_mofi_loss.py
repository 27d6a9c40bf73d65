"""MOFI losses: NumPy loop references, dense references for gradients, sharded vs references.

entity_classification_loss: np_classification (float64 loops over rows with explicit entity
sets and candidate sets) gives values and metrics; dense_classification (a separate dense
[B, C] jnp program, float64, differentiated by JAX) gives gradients and is itself checked
against np_classification (value, and central finite differences). The loss and its gradients
w.r.t. emb and weights are compared with them without a mesh and on 8-device meshes (8,),
(4, 2), (2, 4); with sample_ratio < 1 the references get the classes the sharded code samples
(partial_fc.sampled_classes) plus every positive.

entity_contrastive_loss: the same scheme with np_contrastive (loops over anchors and their
candidate sets) and dense_contrastive (masked [B, B] logits), gradients w.r.t. zimg, ztxt and
logit_scale.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shard_map_shapes
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import finite_differences, np_logsumexp

from mlcd import partial_fc as pfc
from mlcd.losses import (
    entity_classification_loss,
    entity_contrastive_loss,
    softmax_contrastive_loss,
)

# 8 devices -> b = 2 rows and C_local = 8 classes each; B, D, C, L all differ.
B, D, C, L = 16, 12, 64, 3
SCALE = 16.0
RNG_KEY = jax.random.key(5)


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return Mesh(np.array(devices).reshape(shape), ("data", "model"))


MESHES = {"8x1": _mesh((8, 1)), "4x2": _mesh((4, 2)), "2x4": _mesh((2, 4))}


def _put(mesh, *arrays):
    spec = NamedSharding(mesh, P(mesh.axis_names))
    return [jax.device_put(x, spec) for x in arrays]


def _assert_grads_close(got, want, names, what):
    for name, g, w in zip(names, got, want):
        # Elementwise rtol plus an absolute floor at 1e-5 of the largest entry (entries that
        # are sums of cancelling terms cannot be relatively accurate in float32).
        np.testing.assert_allclose(
            g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=f"{what}: d/d{name}"
        )


# ==============================================================================================
# Entity classification.


def _classification_data():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(C, D))
    ids = np.stack([rng.choice(C, size=L, replace=False) for _ in range(B)])
    ids[0] = -1  # no entity: left out of the mean
    ids[1, 1:] = -1  # padding after a valid id
    ids[2, 0] = -1  # padding before valid ids
    ids[3, 2] = ids[3, 0]  # a repeated id counts once
    ids[4, :] = np.arange(L)  # entities 0..2 on the first shard of 8
    ids[5, :] = [C - 1, 8, 9]  # last entity and the second shard
    ids[6] = -1  # a second row without entity
    # Embeddings drawn towards their first entity by varying amounts, so that the softmax is
    # neither uniform nor saturated and some rows are classified correctly, some not.
    first = weights[np.maximum(np.where(ids[:, 0] >= 0, ids[:, 0], ids[:, 1]), 0)]
    pull = np.linspace(0.0, 3.0, B)[rng.permutation(B)][:, None]
    emb = pull * first / np.linalg.norm(first, axis=1, keepdims=True) + rng.normal(size=(B, D))
    emb *= rng.uniform(0.5, 2.0, size=(B, 1))  # any norm: the loss normalises
    return emb, weights, ids.astype(np.int32)


EMB64, W64, IDS = _classification_data()
EMB, W = EMB64.astype(np.float32), W64.astype(np.float32)


def np_classification(emb, weights, ids, *, scale, margin, negatives=None, metrics=False):
    """The formula row by row; negatives: the sampled global class ids, or None (all)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weights / np.linalg.norm(weights, axis=1, keepdims=True)
    pool = set(range(len(w))) if negatives is None else {int(c) for c in negatives}
    losses, pos_cos, neg_cos, correct = [], [], [], []
    for i in range(len(e)):
        entities = sorted({int(c) for c in ids[i] if c >= 0})  # E_i, a set
        negs = sorted(pool - set(entities))  # N'_i: the candidates minus E_i
        cos = w @ e[i]
        neg_cos.extend(cos[negs])
        if not entities:
            continue
        logits = {c: scale * cos[c] for c in negs}
        logits.update({c: scale * (cos[c] - margin) for c in entities})
        lse = np_logsumexp(np.array(list(logits.values())))
        losses.append(np.mean([lse - logits[c] for c in entities]))
        pos_cos.extend(cos[entities])
        correct.append(max(cos[entities]) >= max(cos[negs], default=-np.inf))
    loss = np.mean(losses) if losses else 0.0
    if not metrics:
        return loss
    return loss, {
        "pos_cos": np.mean(pos_cos),
        "neg_cos": np.mean(neg_cos),
        "frac_with_entity": len(losses) / len(e),
        "accuracy": np.mean(correct),
        "num_negatives": len(neg_cos) / len(e),
    }


def dense_classification(emb, weights, ids, *, scale, margin, negatives=None):
    """(value, (d/demb, d/dweights)), float64, from dense [B, C] masks and logits: no gathers,
    sampling or collectives."""
    pos = np.zeros((len(ids), len(weights)), bool)
    for i, row in enumerate(ids):
        pos[i, row[row >= 0]] = True
    cand = np.ones(len(weights), bool)
    if negatives is not None:
        cand = np.isin(np.arange(len(weights)), negatives)
    cand = cand[None, :] | pos
    has = pos.any(axis=1)

    def loss(emb, weights):
        e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
        w = weights / jnp.linalg.norm(weights, axis=1, keepdims=True)
        logits = scale * (e @ w.T - margin * pos)
        lse = jax.nn.logsumexp(jnp.where(cand, logits, -jnp.inf), axis=1)
        target = jnp.sum(jnp.where(pos, logits, 0.0), axis=1) / np.maximum(pos.sum(1), 1)
        return jnp.sum(jnp.where(has, lse - target, 0.0)) / max(has.sum(), 1)

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(emb, weights)
        return float(value), tuple(np.asarray(g) for g in grads)


CLS_CASES = {
    "plain": dict(margin=0.0),
    "margin": dict(margin=0.3),
    "sampled": dict(margin=0.3, sample_ratio=0.5),  # k = 4 of 8 per shard, 32 of 64 on one
}


def _cls_fn(case):
    kwargs = dict(CLS_CASES[case], scale=SCALE)
    return lambda emb, w, ids, rng: entity_classification_loss(emb, w, ids, rng=rng, **kwargs)


CLS_VALUE_AND_GRAD = {
    case: jax.jit(jax.value_and_grad(_cls_fn(case), argnums=(0, 1))) for case in CLS_CASES
}


def _cls_ref_kwargs(case, num_shards, key=RNG_KEY):
    kwargs = dict(CLS_CASES[case], scale=SCALE)
    ratio = kwargs.pop("sample_ratio", 1.0)
    if ratio < 1:
        kwargs["negatives"] = np.asarray(pfc.sampled_classes(key, C, num_shards, ratio))
    return kwargs


@functools.cache
def _cls_reference(case, num_shards):
    kwargs = _cls_ref_kwargs(case, num_shards)
    _, grads = dense_classification(EMB64, W64, IDS, **kwargs)
    return np_classification(EMB64, W64, IDS, **kwargs), grads


def _cls_run(case, mesh=None, ids=IDS, key=RNG_KEY):
    if mesh is None:
        return jax.device_get(CLS_VALUE_AND_GRAD[case](EMB, W, ids, key))
    with jax.set_mesh(mesh):
        return jax.device_get(CLS_VALUE_AND_GRAD[case](*_put(mesh, EMB, W, ids), key))


def _cls_assert_close(got, want, what):
    (value, grads), (want_value, want_grads) = got, want
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=f"{what}: loss")
    _assert_grads_close(grads, want_grads, ("emb", "weights"), what)


# Spot checks: rows without entity, with a repeated id, with ids on two shards; weights that
# are entities of the batch, negatives only, first and last.
CLS_FD_COORDS = [(0, (i, d)) for i in (0, 3, 5, 9) for d in range(0, D, 3)] + [
    (1, (c, d)) for c in (0, 8, 20, 41, C - 1) for d in range(0, D, 3)
]


@pytest.mark.parametrize(("case", "num_shards"), [(c, 1) for c in CLS_CASES] + [("sampled", 8)])
def test_dense_classification_matches_numpy(case, num_shards):
    kwargs = _cls_ref_kwargs(case, num_shards)
    value, grads = dense_classification(EMB64, W64, IDS, **kwargs)
    fn = functools.partial(np_classification, ids=IDS, **kwargs)
    np.testing.assert_allclose(value, fn(EMB64, W64), rtol=1e-12)
    want = finite_differences(fn, (EMB64, W64), CLS_FD_COORDS)
    got = np.array([grads[which][idx] for which, idx in CLS_FD_COORDS])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CLS_CASES)
def test_classification_unsharded_matches_references(case):
    _cls_assert_close(_cls_run(case), _cls_reference(case, 1), f"{case} without mesh")


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("case", CLS_CASES)
def test_classification_sharded_matches_references(case, mesh_name):
    mesh = MESHES[mesh_name]
    _cls_assert_close(_cls_run(case, mesh), _cls_reference(case, mesh.size), f"{case} {mesh_name}")


def test_classification_unsharded_equals_sharded_with_all_classes():
    """r = 1: the sharded and the single-program paths compute the same function."""
    _cls_assert_close(_cls_run("margin", MESHES["2x4"]), _cls_run("margin"), "sharded vs not")


def test_classification_metrics_match_numpy():
    kwargs = dict(CLS_CASES["sampled"], scale=SCALE)
    with jax.set_mesh(MESHES["4x2"]):
        loss, metrics = jax.jit(
            lambda e, w, y, k: entity_classification_loss(
                e, w, y, rng=k, return_metrics=True, **kwargs
            )
        )(*_put(MESHES["4x2"], EMB, W, IDS), RNG_KEY)
    want_loss, want = np_classification(
        EMB64, W64, IDS, metrics=True, **_cls_ref_kwargs("sampled", 8)
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert set(metrics) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert 0 < want["accuracy"] < 1  # the data has both outcomes: the metric is exercised
    assert want["frac_with_entity"] == (B - 2) / B


def test_tiny_sample_ratio_keeps_every_positive():
    """r = 0.01: one sampled class per shard (8 of 64); every entity of the batch is still
    scored (value and gradients match the reference over positives + the sampled set) and
    gets a gradient, although almost none of them is sampled."""
    mesh, ratio, key = MESHES["4x2"], 0.01, jax.random.key(21)
    fn = jax.jit(
        jax.value_and_grad(
            lambda e, w, y, k: entity_classification_loss(
                e, w, y, scale=SCALE, margin=0.3, sample_ratio=ratio, rng=k
            ),
            argnums=(0, 1),
        )
    )
    with jax.set_mesh(mesh), pytest.warns(UserWarning, match="sampling 1 class per shard"):
        got = jax.device_get(fn(*_put(mesh, EMB, W, IDS), key))
    sampled = np.asarray(pfc.sampled_classes(key, C, 8, ratio))
    positives = np.unique(IDS[IDS >= 0])
    assert len(sampled) == 8 and len(np.setdiff1d(positives, sampled)) >= len(positives) - 8
    kwargs = dict(scale=SCALE, margin=0.3, negatives=sampled)
    want = np_classification(EMB64, W64, IDS, **kwargs)
    _cls_assert_close(got, (want, dense_classification(EMB64, W64, IDS, **kwargs)[1]), "r=0.01")
    g_weights = got[1][1]
    support = np.flatnonzero(np.any(g_weights != 0, axis=1))
    np.testing.assert_array_equal(support, np.union1d(positives, sampled))


def test_rows_without_entity_are_left_out():
    """Rows 0 and 6 have no entity: their embeddings get no gradient and do not move the loss,
    which is the mean of the other rows' terms (not divided by B)."""
    value, (g_emb, _) = _cls_run("margin")
    np.testing.assert_array_equal(g_emb[[0, 6]], 0.0)
    emb = EMB.copy()
    emb[[0, 6]] = np.random.default_rng(1).normal(size=(2, D))
    np.testing.assert_allclose(CLS_VALUE_AND_GRAD["margin"](emb, W, IDS, RNG_KEY)[0], value)
    keep = [i for i in range(B) if i not in (0, 6)]
    kwargs = dict(scale=SCALE, margin=0.3)
    per_row = [np_classification(EMB64[[i]], W64, IDS[[i]], **kwargs) for i in keep]
    np.testing.assert_allclose(value, np.mean(per_row), rtol=1e-5)


@pytest.mark.parametrize("mesh_name", [None, "4x2"])
def test_all_empty_batch_gives_zero_and_zero_grads(mesh_name):
    ids = np.full_like(IDS, -1)
    mesh = MESHES[mesh_name] if mesh_name else None
    for case in ("margin", "sampled"):
        value, grads = _cls_run(case, mesh, ids=ids)
        assert value == 0.0
        for g in grads:
            assert np.isfinite(g).all() and not g.any(), case
    with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
        _, metrics = entity_classification_loss(EMB, W, ids, return_metrics=True)
    assert metrics["frac_with_entity"] == 0 and metrics["accuracy"] == 0
    assert np.isfinite(jax.device_get(metrics["pos_cos"]))


def test_repeated_ids_count_once():
    ids = IDS.copy()
    ids[7] = [ids[7, 0], ids[7, 0], ids[7, 1]]
    once = ids.copy()
    once[7, 1] = -1
    got = _cls_run("margin", ids=ids)
    want = _cls_run("margin", ids=once)
    _cls_assert_close(got, want, "repeat vs once")
    # A multiset target would weight ids[7, 0] twice: a different value.
    twice = np.mean(
        [
            np_classification(EMB64[[7]], W64, np.array([[c, -1, -1]]), scale=SCALE, margin=0.3)
            for c in ids[7]
        ]
    )
    once_row = np_classification(EMB64[[7]], W64, once[[7]], scale=SCALE, margin=0.3)
    assert abs(twice - once_row) > 1e-3


@pytest.mark.parametrize("case", ["plain", "sampled"])
def test_classification_no_full_logits_and_sharded_weight_grad(case):
    mesh = MESHES["4x2"]
    c_local = C // mesh.size
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(CLS_VALUE_AND_GRAD[case])(EMB, W, IDS, RNG_KEY)
    shapes = shard_map_shapes(jaxpr)
    assert shapes, "no shard_map in the jaxpr"
    assert not [s for s in shapes if C in s], "a value with a full class dimension"
    k = c_local if case == "plain" else pfc.num_sampled(c_local, 0.5)
    assert (B, k) in shapes  # the gathered batch against this shard's (sampled) columns
    with jax.set_mesh(mesh):
        _, (_, g_w) = CLS_VALUE_AND_GRAD[case](*_put(mesh, EMB, W, IDS), RNG_KEY)
    assert {s.data.shape for s in g_w.addressable_shards} == {(c_local, D)}
    assert sorted(s.index[0].start for s in g_w.addressable_shards) == list(range(0, C, c_local))


def test_classification_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"emb \(16, 12\) and weights \(64, 8\)"):
        entity_classification_loss(EMB, W[:, :8], IDS)
    with pytest.raises(ValueError, match=r"entity_ids must be \[B, l\] with B=16; got \(8, 3\)"):
        entity_classification_loss(EMB, W, IDS[:8])
    with pytest.raises(ValueError, match="entity_ids must be integers"):
        entity_classification_loss(EMB, W, IDS.astype(np.float32))
    with pytest.raises(ValueError, match=r"sample_ratio must be in \(0, 1\]; got 1.5"):
        entity_classification_loss(EMB, W, IDS, sample_ratio=1.5)
    with pytest.raises(ValueError, match=r"sample_ratio=0.1 < 1 samples random negatives"):
        entity_classification_loss(EMB, W, IDS, sample_ratio=0.1)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        entity_classification_loss(EMB, W, IDS, margin=-0.1)
    with pytest.raises(ValueError, match="scale must be > 0"):
        entity_classification_loss(EMB, W, IDS, scale=0.0)
    ids = IDS.copy()
    ids[9, 2] = C
    with pytest.raises(
        ValueError,
        match=rf"entity_ids must be class ids in \[0, 64\) or -1 .* \[-1, 64\], e.g. row 9: "
        rf"\[{ids[9, 0]}, {ids[9, 1]}, 64\]",
    ):
        entity_classification_loss(EMB, W, ids)
    ids[9, 2] = -3
    with pytest.raises(ValueError, match=r"got values in \[-3, .*e.g. row 9"):
        entity_classification_loss(EMB, W, ids)
    with (
        jax.set_mesh(MESHES["4x2"]),
        pytest.raises(ValueError, match=r"number of entities C=60 is not divisible by the 8"),
    ):
        entity_classification_loss(EMB, W[:60], np.minimum(IDS, 59))


# ==============================================================================================
# Entity contrastive.

CB, CD, NUM_ENT = 16, 8, 6  # few entities: many texts name entities of other images


def _contrastive_data():
    rng = np.random.default_rng(2)
    image_ents = np.full((CB, 3), -1, np.int64)
    text_ents = np.full(CB, -1, np.int64)
    for i in range(CB):
        ents = rng.choice(NUM_ENT, size=rng.integers(1, 4), replace=False)
        image_ents[i, : len(ents)] = ents
        text_ents[i] = rng.choice(ents)
    image_ents[3] = [2, -1, 2]  # a repeated id and padding in the middle
    text_ents[3] = 2
    for i in (0, 5, 11):  # no entity text: left out entirely
        text_ents[i] = -1
    image_ents[11] = -1  # ... with and without image entities
    zimg = rng.normal(size=(CB, CD))
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    ztxt = zimg + 0.8 * rng.normal(size=(CB, CD))
    ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
    return zimg, ztxt, image_ents.astype(np.int32), text_ents.astype(np.int32)


ZIMG64, ZTXT64, IMG_ENTS, TXT_ENTS = _contrastive_data()
ZIMG, ZTXT = ZIMG64.astype(np.float32), ZTXT64.astype(np.float32)
LOGIT_SCALE = 5.0


def np_contrastive(zimg, ztxt, image_ents, text_ents, scale, *, reduction="mean"):
    """Loops over anchors, each with its explicit candidate list."""
    n = len(zimg)
    valid = [j for j in range(n) if text_ents[j] >= 0]

    def kept(i, j):  # is pair (i, j) in both softmaxes?
        return i == j or text_ents[j] not in set(image_ents[i].tolist())

    l_i2t = l_t2i = 0.0
    for i in valid:
        logits = np.array([scale * zimg[i] @ ztxt[j] for j in valid if kept(i, j)])
        l_i2t += np_logsumexp(logits) - scale * zimg[i] @ ztxt[i]
    for j in valid:
        logits = np.array([scale * zimg[i] @ ztxt[j] for i in valid if kept(i, j)])
        l_t2i += np_logsumexp(logits) - scale * zimg[j] @ ztxt[j]
    if not valid:
        return 0.0
    l_i2t, l_t2i = l_i2t / len(valid), l_t2i / len(valid)
    return (l_i2t + l_t2i) / 2 if reduction == "mean" else l_i2t + l_t2i


def dense_contrastive(zimg, ztxt, image_ents, text_ents, scale, *, reduction="mean"):
    """(value, (d/dzimg, d/dztxt, d/dscale)), float64, from a dense masked [B, B] program."""
    valid = text_ents >= 0
    named = (image_ents[:, :, None] == text_ents[None, None, :]).any(1) & valid[None, :]
    keep = valid[:, None] & valid[None, :] & (np.eye(len(valid), dtype=bool) | ~named)

    def loss(zimg, ztxt, scale):
        logits = scale * zimg @ ztxt.T
        diag = jnp.diagonal(logits)
        masked = jnp.where(keep, logits, -jnp.inf)
        # Invalid rows: an empty (all -inf) softmax; give them a finite dummy and drop them.
        rows = jax.nn.logsumexp(jnp.where(valid[:, None], masked, 0.0), axis=1)
        cols = jax.nn.logsumexp(jnp.where(valid[None, :], masked, 0.0), axis=0)
        n = max(valid.sum(), 1)
        l_i2t = jnp.sum(jnp.where(valid, rows - diag, 0.0)) / n
        l_t2i = jnp.sum(jnp.where(valid, cols - diag, 0.0)) / n
        return (l_i2t + l_t2i) / 2 if reduction == "mean" else l_i2t + l_t2i

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(zimg, ztxt, float(scale))
        return float(value), tuple(np.asarray(g) for g in grads)


CON_VALUE_AND_GRAD = {
    r: jax.jit(
        jax.value_and_grad(
            functools.partial(entity_contrastive_loss, reduction=r), argnums=(0, 1, 4)
        )
    )
    for r in ("mean", "sum")
}


def _con_run(reduction="mean", mesh=None, text_ents=TXT_ENTS, image_ents=IMG_ENTS):
    fn = CON_VALUE_AND_GRAD[reduction]
    if mesh is None:
        return jax.device_get(fn(ZIMG, ZTXT, image_ents, text_ents, LOGIT_SCALE))
    with jax.set_mesh(mesh):
        args = _put(mesh, ZIMG, ZTXT, image_ents, text_ents)
        return jax.device_get(fn(*args, LOGIT_SCALE))


@functools.cache
def _con_reference(reduction):
    args = (ZIMG64, ZTXT64, IMG_ENTS, TXT_ENTS, LOGIT_SCALE)
    return np_contrastive(*args, reduction=reduction), dense_contrastive(
        *args, reduction=reduction
    )[1]


def _con_assert_close(got, want, what):
    (value, grads), (want_value, want_grads) = got, want
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=f"{what}: loss")
    _assert_grads_close(grads, want_grads, ("zimg", "ztxt", "logit_scale"), what)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dense_contrastive_matches_numpy(reduction):
    args = (ZIMG64, ZTXT64, IMG_ENTS, TXT_ENTS, LOGIT_SCALE)
    value, grads = dense_contrastive(*args, reduction=reduction)
    fn = functools.partial(np_contrastive, image_ents=IMG_ENTS, text_ents=TXT_ENTS)
    fn = functools.partial(fn, reduction=reduction)
    np.testing.assert_allclose(value, np_contrastive(*args, reduction=reduction), rtol=1e-12)
    coords = [(w, (i, d)) for w in (0, 1) for i in (0, 3, 7, 11, 15) for d in range(CD)]
    coords += [(2, ())]
    want = finite_differences(
        lambda a, b, s: fn(a, b, scale=s), (ZIMG64, ZTXT64, LOGIT_SCALE), coords
    )
    got = np.array([grads[w][idx] for w, idx in coords])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    # The rows without an entity text are left out entirely: no gradient reaches them.
    for g in grads[:2]:
        np.testing.assert_array_equal(g[[0, 5, 11]], 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contrastive_unsharded_matches_references(reduction):
    _con_assert_close(_con_run(reduction), _con_reference(reduction), f"{reduction} no mesh")


@pytest.mark.parametrize("mesh_name", MESHES)
def test_contrastive_sharded_matches_references(mesh_name):
    got = _con_run("mean", MESHES[mesh_name])
    _con_assert_close(got, _con_reference("mean"), f"mean on {mesh_name}")


def test_contrastive_mask_changes_the_value():
    """The data has removed pairs; plain CLIP over the valid rows (nothing removed) differs,
    and with unique text entities named by no other image the two coincide."""
    named = (IMG_ENTS[:, :, None] == TXT_ENTS[None, None, :]).any(1) & (TXT_ENTS >= 0)
    np.fill_diagonal(named, False)
    valid = TXT_ENTS >= 0
    assert named[valid][:, valid].sum() >= 10  # removed pairs among the valid rows
    got = float(_con_run()[0])
    plain = float(softmax_contrastive_loss(ZIMG[valid], ZTXT[valid], LOGIT_SCALE))
    assert abs(got - plain) > 1e-2
    # Entity i for image i and text i only: nothing is removed, every row valid.
    own = np.arange(CB, dtype=np.int32)
    same = _con_run(text_ents=own, image_ents=np.stack([own, own * 0 - 1], 1))[0]
    np.testing.assert_allclose(same, softmax_contrastive_loss(ZIMG, ZTXT, LOGIT_SCALE), rtol=1e-6)


@pytest.mark.parametrize("mesh_name", [None, "2x4"])
def test_contrastive_no_valid_row_gives_zero(mesh_name):
    mesh = MESHES[mesh_name] if mesh_name else None
    value, grads = _con_run("mean", mesh, text_ents=np.full(CB, -1, np.int32))
    assert value == 0.0
    for g in grads:
        assert np.isfinite(g).all() and not np.any(g)


def test_contrastive_local_blocks_only():
    """Inside shard_map: [b, B] logit blocks, never [B, B]."""
    mesh = MESHES["4x2"]
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(CON_VALUE_AND_GRAD["mean"])(
            ZIMG, ZTXT, IMG_ENTS, TXT_ENTS, LOGIT_SCALE
        )
    shapes = shard_map_shapes(jaxpr)
    assert (CB // 8, CB) in shapes
    assert (CB, CB) not in shapes


def test_contrastive_bad_inputs_raise():
    args = [ZIMG, ZTXT, IMG_ENTS, TXT_ENTS, LOGIT_SCALE]
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        entity_contrastive_loss(*args, reduction="max")
    with pytest.raises(ValueError, match=r"zimg \(16, 8\) and ztxt \(8, 8\)"):
        entity_contrastive_loss(ZIMG, ZTXT[:8], *args[2:])
    with pytest.raises(ValueError, match=r"image_entities must be \[B, l\] with B=16"):
        entity_contrastive_loss(ZIMG, ZTXT, IMG_ENTS[:, 0], *args[3:])
    with pytest.raises(ValueError, match=r"text_entities must be \[B\] with B=16; got \(16, 3\)"):
        entity_contrastive_loss(ZIMG, ZTXT, IMG_ENTS, IMG_ENTS, LOGIT_SCALE)
    with pytest.raises(ValueError, match="text_entities must be integers"):
        entity_contrastive_loss(ZIMG, ZTXT, IMG_ENTS, TXT_ENTS * 1.0, LOGIT_SCALE)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        entity_contrastive_loss(*args[:4], np.ones(2))
    bad = TXT_ENTS.copy()
    bad[7] = -2
    with pytest.raises(
        ValueError, match=r"text_entities must be ids >= 0 or -1 .* \[-2, \d+\], e.g. row 7: -2"
    ):
        entity_contrastive_loss(ZIMG, ZTXT, IMG_ENTS, bad, LOGIT_SCALE)
    with (
        jax.set_mesh(MESHES["4x2"]),
        pytest.raises(ValueError, match=r"global batch size=12 is not divisible by the 8"),
    ):
        entity_contrastive_loss(ZIMG[:12], ZTXT[:12], IMG_ENTS[:12], TXT_ENTS[:12], 1.0)


# ==============================================================================================
# Both.


def test_explicit_axes_and_eager_match_references():
    """Explicit-axes mesh, replicated inputs, no outer jit: both losses reshard themselves."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        got_cls = jax.value_and_grad(_cls_fn("sampled"), argnums=(0, 1))(EMB, W, IDS, RNG_KEY)
        got_con = jax.value_and_grad(entity_contrastive_loss, argnums=(0, 1, 4))(
            ZIMG, ZTXT, IMG_ENTS, TXT_ENTS, LOGIT_SCALE
        )
    _cls_assert_close(jax.device_get(got_cls), _cls_reference("sampled", 8), "explicit")
    _con_assert_close(jax.device_get(got_con), _con_reference("mean"), "explicit")
