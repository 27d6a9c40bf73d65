"""mlcd.clustering: top-k assignment and k-means against NumPy references, sharded and not.

Shapes are tiny and shared across tests so that each kernel compiles a handful of times.
Sharded runs use the 8 fake CPU devices (conftest.py) on meshes (8, 1), (4, 2), (2, 4).
"""

import importlib
import re
import sys

import jax
import numpy as np
import pytest

from mlcd import clustering
from mlcd.clustering import _data
from mlcd.sharding import make_mesh

# The package's `kmeans` attribute is the function; the module holds the kernels.
kmeans_mod = importlib.import_module("mlcd.clustering.kmeans")
assign_mod = importlib.import_module("mlcd.clustering.assign")
kernels_mod = importlib.import_module("mlcd.clustering._kernels")

MESHES = [(8, 1), (4, 2), (2, 4)]
N, D, K = 300, 8, 16


def mesh_of(shape):
    return make_mesh([("data", shape[0]), ("model", shape[1])])


def on_mesh(shape, fn, *args, **kwargs):
    """fn(*args, **kwargs) under jax.set_mesh (shape None: no mesh), outputs as NumPy."""
    if shape is None:
        out = fn(*args, **kwargs)
    else:
        with jax.set_mesh(mesh_of(shape)):
            out = fn(*args, **kwargs)
    return jax.tree.map(np.asarray, out)


def unit_rows(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """float32 [N, D] standard normal rows (not normalised)."""
    return np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)


@pytest.fixture(scope="module")
def int_data():
    """Small-integer rows and centers: exact float32 dot products with many ties."""
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, (37, D)).astype(np.float32)
    c = rng.integers(-1, 2, (K, D)).astype(np.float32)
    c[5] = c[2]  # identical centers on different shards: every row ties on them
    return x, c


def brute_topk(x, c, k):
    """Reference: stable argsort of -(x @ c.T) in float64 (ties: lower id first)."""
    s = x.astype(np.float64) @ c.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, axis=1)


def group_topk(s, k, group):
    """Reference of block_topk's grouped top-k: the best center (lowest id on ties) of each of
    the k best groups of `group` consecutive ids (lowest group on ties); returns ids, scores."""
    within = np.argmax(s.reshape(len(s), -1, group), axis=2)  # argmax: the first maximum
    best = np.take_along_axis(s.reshape(len(s), -1, group), within[..., None], axis=2)[..., 0]
    order = np.argsort(-best, axis=1, kind="stable")[:, :k]
    ids = order * group + np.take_along_axis(within, order, axis=1)
    return ids, np.take_along_axis(best, order, axis=1)


def numpy_lloyd(x, centers, iterations, spherical, candidates=None, refresh_every=1, group=1):
    """Reference Lloyd iterations (no empty clusters expected); returns centers, objectives.

    With `candidates` (k_c): iterations t % refresh_every == 0 score every center and keep each
    row's k_c best ids (grouped as in block_topk when group > 1); the others score only those
    (kmeans(..., candidates=k_c))."""
    x = x.astype(np.float64)
    c = centers.astype(np.float64)
    if spherical:
        x = unit_rows(x)
    objectives = []
    rows = np.arange(len(x))
    for t in range(iterations):
        if spherical:
            s = x @ c.T
        else:
            s = -((x[:, None, :] - c[None]) ** 2).sum(-1)
        if candidates is not None and t % refresh_every == 0:
            cand = group_topk(s, candidates, group)[0]
        if candidates is not None and t % refresh_every != 0:
            a = cand[rows, np.argmax(np.take_along_axis(s, cand, axis=1), axis=1)]
        else:
            a = np.argmax(s, axis=1)
        best = s[rows, a]
        objectives.append(best.mean() if spherical else -best.mean())
        sums = np.zeros_like(c)
        np.add.at(sums, a, x)
        counts = np.bincount(a, minlength=len(c))
        assert counts.min() > 0, "the reference assumes no empty cluster"
        c = unit_rows(sums) if spherical else sums / counts[:, None]
    return c, np.array(objectives)


# ----------------------------------------------------------------------------------------------
# assign_topk


@pytest.mark.parametrize("mesh", [None, *MESHES])
@pytest.mark.parametrize("k", [1, 3, K])
def test_assign_topk_matches_brute_force_with_ties(int_data, mesh, k):
    # k = 3 > K / 8 = 2: each shard must contribute all of its centers as candidates.
    x, c = int_data
    ids, sims = on_mesh(mesh, clustering.assign_topk, x, c, k)
    ref_ids, ref_sims = brute_topk(x, c, k)
    assert ids.dtype == np.int32 and sims.dtype == np.float32
    assert ids.shape == sims.shape == (len(x), k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 rows x 5 centers: several row blocks, several center tiles, and a last
    center tile padded (16 = 5 + 5 + 5 + 1; 8 per device = 5 + 3)."""
    monkeypatch.setattr(_data, "BLOCK_ROWS", 64)
    monkeypatch.setattr(_data, "CENTER_TILE", 5)


@pytest.mark.parametrize(("center_tile", "group"), [(1024, 4), (8, 2), (8, 1)])
def test_block_topk_in_groups_matches_reference(int_data, monkeypatch, center_tile, group):
    # Integer data: many ties, broken by the lowest id within a group and the lowest group.
    # center_tile 8: two tiles of 16 centers, merged; group 1 is the exact top-k.
    monkeypatch.setattr(_data, "CENTER_TILE", center_tile)
    x, c = int_data
    plan = _data.plan_rows(len(x), 1)
    xp = np.pad(x, ((0, plan.padded - len(x)), (0, 0)))
    vals, ids = jax.jit(lambda a, b: assign_mod.block_topk(a, b, 3, plan, None, group=group))(xp, c)
    ref_ids, ref_vals = group_topk(x.astype(np.float64) @ c.T.astype(np.float64), 3, group)
    np.testing.assert_array_equal(np.asarray(ids)[: len(x)], ref_ids)
    np.testing.assert_array_equal(np.asarray(vals)[: len(x)], ref_vals)
    np.testing.assert_array_equal(ref_ids[:, 0], brute_topk(x, c, 1)[0][:, 0])  # exact top-1


@pytest.mark.parametrize("mesh", [None, (4, 2)])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_assign_topk_tiled_matches_brute_force(int_data, small_tiles, mesh, k):
    x, c = int_data
    x = np.concatenate([x] * 4)  # 148 rows: 3 row blocks
    ids, sims = on_mesh(mesh, clustering.assign_topk, x, c, k)
    ref_ids, ref_sims = brute_topk(x, c, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims)


@pytest.mark.parametrize("mesh", [None, (4, 2)])
def test_assign_topk_cosine_streamed_from_memmap_and_inside_jit(data, tmp_path, mesh):
    x = unit_rows(data)
    c = unit_rows(data[:K] + 0.5)
    path = tmp_path / "x.npy"
    np.save(path, x)
    ref_ids, ref_sims = brute_topk(x, c, 4)
    ids, sims = on_mesh(
        mesh, clustering.assign_topk, np.load(path, mmap_mode="r"), c, 4, chunk_size=70
    )
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    assert np.all(sims <= 1 + 1e-6)
    jitted = jax.jit(lambda a, b: clustering.assign_topk(a, b, 4))
    ids, sims = on_mesh(mesh, jitted, x, c)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def test_assign_topk_errors(int_data):
    x, c = int_data
    with pytest.raises(ValueError, match=r"k=17 must be in \[1, K\] with K=16"):
        clustering.assign_topk(x, c, K + 1)
    with pytest.raises(ValueError, match=r"x must be a 2-D array \[N, D\]; got shape \(37,\)"):
        clustering.assign_topk(x[:, 0], c, 1)
    with pytest.raises(ValueError, match="x has D=8 columns but centers have D=7"):
        clustering.assign_topk(x, c[:, :7], 1)
    with jax.set_mesh(mesh_of((8, 1))), pytest.raises(ValueError, match="divisible by the 8"):
        clustering.assign_topk(x, c[:12], 1)


# ----------------------------------------------------------------------------------------------
# kmeans: references, sharding, streaming


@pytest.fixture(scope="module")
def reference_run(data):
    """Unsharded spherical run with return_info (shared by several tests)."""
    return clustering.kmeans(data, K, iterations=6, seed=3, return_info=True)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_matches_numpy_lloyd(data, spherical):
    init = data[::19][:K]
    res = clustering.kmeans(data, K, iterations=4, init=init, spherical=spherical, return_info=True)
    ref_centers, ref_obj = numpy_lloyd(data, unit_rows(init) if spherical else init, 4, spherical)
    np.testing.assert_allclose(np.asarray(res.centers), ref_centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, ref_obj, rtol=1e-5)
    np.testing.assert_allclose(res.faiss_objective, ref_obj * N, rtol=1e-5)
    assert res.seconds.shape == res.num_reseeded.shape == (4,)
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(res.centers, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("candidates", [None, 3])
def test_kmeans_rows_in_parallel_parts_match_numpy_reference(data, monkeypatch, candidates):
    # 3 parts of 100 rows, each scored on its own thread with its own sums (added in update).
    monkeypatch.setattr(kmeans_mod, "PARALLEL_MIN_ROWS", 100)
    monkeypatch.setattr(kmeans_mod.os, "cpu_count", lambda: 3)
    assert kmeans_mod._cpu_parts(N) == 3
    init = data[::19][:K]
    kw = dict(iterations=6, init=init, candidates=candidates, refresh_every=3, return_info=True)
    res = clustering.kmeans(data, K, **kw)
    ref_centers, ref_obj = numpy_lloyd(
        data, unit_rows(init), 6, True, candidates=candidates, refresh_every=3
    )
    np.testing.assert_allclose(np.asarray(res.centers), ref_centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, ref_obj, rtol=1e-5)


@pytest.mark.parametrize("mesh", MESHES)
def test_kmeans_sharded_equals_unsharded(data, reference_run, mesh):
    res = on_mesh(mesh, clustering.kmeans, data, K, iterations=6, seed=3, return_info=True)
    np.testing.assert_allclose(res.centers, reference_run.centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, reference_run.objective, rtol=1e-6)


@pytest.mark.parametrize("mesh", [None, (2, 4)])
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_tiled_matches_numpy_lloyd(data, small_tiles, mesh, spherical):
    init = data[::19][:K]
    res = on_mesh(mesh, clustering.kmeans, data, K, iterations=3, init=init, spherical=spherical)
    ref, _ = numpy_lloyd(data, unit_rows(init) if spherical else init, 3, spherical)
    np.testing.assert_allclose(res, ref, atol=1e-5)


@pytest.mark.parametrize("mesh", [None, (8, 1), (2, 4)])
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_candidates_match_numpy_reference(data, mesh, spherical):
    # k_c = 3 of 16 centers, an exact pass every 3 iterations: iterations 1, 2, 4 and 5 score
    # only each row's candidates. The random init puts every row far from its final center, so
    # rows do move beyond their 3 candidates and the result differs from exact Lloyd.
    init = data[::19][:K]
    kw = dict(iterations=6, init=init, spherical=spherical, return_info=True)
    res = on_mesh(mesh, clustering.kmeans, data, K, candidates=3, refresh_every=3, **kw)
    start = unit_rows(init) if spherical else init
    ref_centers, ref_obj = numpy_lloyd(data, start, 6, spherical, candidates=3, refresh_every=3)
    np.testing.assert_allclose(res.centers, ref_centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, ref_obj, rtol=1e-5)
    exact_centers, _ = numpy_lloyd(data, start, 6, spherical)
    assert np.abs(ref_centers - exact_centers).max() > 1e-3  # the test can tell them apart
    if spherical:
        assert np.all(np.diff(res.objective) >= -1e-6), res.objective


@pytest.mark.parametrize("mesh", [None, (2, 4)])
def test_kmeans_candidates_in_groups_match_numpy_reference(data, monkeypatch, mesh):
    # 48 centers in groups of 2: 24 groups on one device, 3 of the 6 centers per device on the
    # 8 devices of (2, 4) (each device's 3 group winners, merged across devices).
    monkeypatch.setattr(kmeans_mod, "CANDIDATE_GROUP", 2)
    init = data[::6][:48]
    kw = dict(iterations=5, init=init, candidates=3, refresh_every=2, return_info=True)
    res = on_mesh(mesh, clustering.kmeans, data, 48, **kw)
    ref_centers, ref_obj = numpy_lloyd(
        data, unit_rows(init), 5, True, candidates=3, refresh_every=2, group=2
    )
    np.testing.assert_allclose(res.centers, ref_centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, ref_obj, rtol=1e-5)
    ungrouped, _ = numpy_lloyd(data, unit_rows(init), 5, True, candidates=3, refresh_every=2)
    assert np.abs(ref_centers - ungrouped).max() > 1e-3  # the grouping shows in the result


def test_kmeans_candidates_all_centers_is_exact(data, reference_run):
    res = clustering.kmeans(
        data, K, iterations=6, seed=3, candidates=K, refresh_every=4, return_info=True
    )
    np.testing.assert_allclose(res.centers, reference_run.centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, reference_run.objective, rtol=1e-6)


@pytest.mark.parametrize("mesh", [None, (4, 2)])
def test_kmeans_candidates_streamed_equals_resident(data, mesh):
    kw = dict(iterations=5, seed=3, candidates=4, refresh_every=2, return_info=True)
    resident = clustering.kmeans(data, K, **kw)
    res = on_mesh(mesh, clustering.kmeans, data, K, chunk_size=70, **kw)
    np.testing.assert_allclose(res.centers, resident.centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, resident.objective, rtol=1e-6)


@pytest.mark.parametrize(("center_tile", "group", "euclidean"), [(1024, 4, False), (8, 2, True)])
@pytest.mark.parametrize("sort", [False, True])
def test_block_shortlist_matches_reference(data, monkeypatch, center_tile, group, euclidean, sort):
    # 16 centers: one tile of 16 in groups of 4 (ids j, j + 4, j + 8, j + 12), or two tiles of 8
    # in groups of 2 (ids j, j + 4 of each tile), merged. Continuous data: no ties.
    monkeypatch.setattr(_data, "CENTER_TILE", center_tile)
    x, c = data[:37], data[100 : 100 + K]
    bias = -0.5 * np.sum(c * c, axis=1) if euclidean else None
    plan = _data.plan_rows(len(x), 1)
    xp = np.pad(x, ((0, plan.padded - len(x)), (0, 0)))
    best, idx, vals, ids = jax.jit(
        lambda a, b, e: assign_mod.block_shortlist(a, b, e, 3, plan, group, sort=sort)
    )(xp, c, bias)
    best, idx, vals, ids = (np.asarray(a)[: len(x)] for a in (best, idx, vals, ids))
    exact = x.astype(np.float64) @ c.T.astype(np.float64) + (0 if bias is None else bias)
    # Reference shortlist from bfloat16-rounded inputs: each group's best, the 3 best groups.
    bf = jax.numpy.bfloat16
    approx = x.astype(bf).astype(np.float64) @ c.astype(bf).astype(np.float64).T
    approx += 0 if bias is None else bias
    tile = min(center_tile, K)
    members = np.arange(K).reshape(K // tile, group, tile // group).transpose(0, 2, 1)
    members = members.reshape(-1, group)  # [groups, group] center ids
    winners = members[np.arange(len(members)), np.argmax(approx[:, members], axis=2)]
    top = np.take_along_axis(winners, np.argsort(-np.max(approx[:, members], axis=2))[:, :3], 1)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(top, axis=1))
    np.testing.assert_allclose(vals, np.take_along_axis(exact, ids, axis=1), rtol=1e-5, atol=1e-5)
    if sort:
        assert np.all(np.diff(vals, axis=1) <= 0)
    np.testing.assert_array_equal(idx, np.argmax(exact, axis=1))  # the exact best
    np.testing.assert_allclose(best, np.max(exact, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("mesh", "spherical", "candidates"), [(None, True, 3), ((2, 4), True, 3), (None, False, None)]
)
def test_kmeans_bfloat16_scores_match_numpy_reference(data, mesh, spherical, candidates):
    # 16 centers < 2 groups per shortlist entry: no grouping, so the bfloat16 shortlists hold
    # each row's exact best 3 (refresh) or 4 (exact passes) and, re-scored in float32, give
    # float32 Lloyd's result (no near-ties on this data).
    init = data[::19][:K]
    start = unit_rows(init) if spherical else init
    kw = dict(iterations=6, init=init, spherical=spherical, return_info=True)
    res = on_mesh(
        mesh,
        clustering.kmeans,
        data,
        K,
        candidates=candidates,
        refresh_every=3,
        score_dtype="bfloat16",
        **kw,
    )
    ref_centers, ref_obj = numpy_lloyd(
        data, start, 6, spherical, candidates=candidates, refresh_every=3
    )
    np.testing.assert_allclose(res.centers, ref_centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, ref_obj, rtol=1e-5)


def test_kmeans_euclidean_sharded_equals_unsharded(data):
    ref = clustering.kmeans(data, K, iterations=4, seed=2, spherical=False)
    res = on_mesh((2, 4), clustering.kmeans, data, K, iterations=4, seed=2, spherical=False)
    np.testing.assert_allclose(res, ref, atol=1e-5)


def test_spherical_objective_never_decreases(reference_run):
    obj = reference_run.objective
    assert np.all(np.diff(obj) >= -1e-6), obj
    assert obj[-1] > obj[0]


@pytest.mark.parametrize("mesh", [None, (8, 1)])
def test_kmeans_streamed_from_memmap_equals_resident(data, reference_run, tmp_path, mesh):
    path = tmp_path / "x.npy"
    np.save(path, data)
    x = np.load(path, mmap_mode="r")
    res = on_mesh(
        mesh, clustering.kmeans, x, K, iterations=6, seed=3, chunk_size=70, return_info=True
    )
    np.testing.assert_allclose(res.centers, reference_run.centers, atol=1e-5)
    np.testing.assert_allclose(res.objective, reference_run.objective, rtol=1e-6)


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(5)
    blob_centers = unit_rows(np.concatenate([np.eye(D), -np.eye(D)]))  # 16 unit vectors
    labels = rng.integers(0, K, 800)
    x = unit_rows(blob_centers[labels] + 0.05 * rng.standard_normal((800, D)))
    centers = np.asarray(clustering.kmeans(x, K, iterations=10, init="kmeans++", seed=0))
    # Each recovered center is within a small angle of a distinct blob center.
    cos = centers @ blob_centers.T
    assert sorted(np.argmax(cos, axis=1).tolist()) == list(range(K))
    assert cos.max(axis=1).min() > 0.99


def test_kmeans_plus_plus_init_picks_distinct_data_rows(data):
    centers = np.asarray(clustering.kmeans(data, K, iterations=0, init="kmeans++", seed=4))
    rows = unit_rows(data)
    match = np.abs(centers[:, None, :] - rows[None]).max(-1) < 1e-6
    assert np.all(match.sum(1) == 1)  # every center is one data row ...
    assert len(set(np.argmax(match, 1).tolist())) == K  # ... and all are different rows
    again = clustering.kmeans(data, K, iterations=0, init="kmeans++", seed=4)
    np.testing.assert_array_equal(centers, np.asarray(again))


@pytest.mark.parametrize("mesh", [None, (8, 1)])
def test_empty_clusters_are_reseeded(data, mesh):
    # Centers 1, 6 and 11 duplicate center 0 (ties go to id 0): after the first assignment
    # they are empty, on three different shards of the (8, 1) mesh (2 centers per shard).
    init = unit_rows(data[::19][:K].copy())
    init[[1, 6, 11]] = init[0]
    res = on_mesh(mesh, clustering.kmeans, data, K, iterations=3, init=init, return_info=True)
    assert res.num_reseeded.tolist()[0] == 3
    assert len(np.unique(np.round(res.centers, 5), axis=0)) == K
    if mesh is not None:
        ref = clustering.kmeans(data, K, iterations=3, init=init, return_info=True)
        np.testing.assert_allclose(res.centers, ref.centers, atol=1e-5)
    # One iteration: the three re-seeded centers are distinct (normalised) data rows.
    one = np.asarray(clustering.kmeans(data, K, iterations=1, init=init))
    rows = unit_rows(data)
    for c in one[[1, 6, 11]]:
        assert np.abs(rows - c).max(1).min() < 1e-6


def test_no_device_holds_the_full_center_matrix(data):
    # K = 64 centers of D = 5 on 8 devices: 8 rows each. The compiled per-device programs of
    # the iteration must contain the [8, 5] local block, never [64, 5], nor a [304, 64] score
    # block ([304, 8] per device; 300 rows padded to 304).
    x = data[:, :5]
    with jax.set_mesh(mesh_of((8, 1))):
        res = clustering.kmeans(x, 64, iterations=1, return_info=True)
        centers = res.centers
        assert centers.sharding.shard_shape(centers.shape) == (8, 5)
        assert {s.data.shape for s in centers.addressable_shards} == {(8, 5)}
        chunks = kmeans_mod._Chunks(x, None, True, centers.sharding)
        chunk, num_valid = next(iter(chunks))
        sums, counts = np.zeros((64, 5), np.float32), np.zeros(64, np.int32)
        sums, counts = (jax.device_put(a, centers.sharding) for a in (sums, counts))
        candidates = jax.device_put(np.zeros((304, 3), np.int32), chunk.sharding)
        hlo = ""
        for mode, cand, k_c, score_dtype in [
            ("exact", None, None, "float32"),
            ("refresh", None, 3, "float32"),
            ("candidates", candidates, None, "float32"),
            ("exact", None, None, "bfloat16"),
            ("refresh", None, 3, "bfloat16"),
        ]:
            args = (chunk, num_valid, centers, sums, counts, cand)
            lowered = kernels_mod.accumulate.lower(
                *args,
                plan=chunks.plan,
                spherical=True,
                mode=mode,
                num_candidates=k_c,
                group=1,
                score_dtype=score_dtype,
            )
            hlo += lowered.compile().as_text()
        update_hlo = kernels_mod.update.lower(centers, (sums,), (counts,), None, spherical=True)
        update_hlo = update_hlo.compile().as_text()
    shapes = set(re.findall(r"b?f(?:16|32)\[[0-9,]+\]", hlo + update_hlo))
    assert "f32[8,5]" in shapes and "f32[304,8]" in shapes, shapes
    for dtype in ("f32", "bf16"):
        assert f"{dtype}[64,5]" not in shapes and f"{dtype}[304,64]" not in shapes, shapes


def test_verbose_progress_bar(data, capsys):
    clustering.kmeans(data, K, iterations=2, seed=3, verbose=True)
    err = capsys.readouterr().err
    assert "k-means" in err and "objective=" in err


def test_kmeans_errors(data):
    with pytest.raises(ValueError, match=r"num_centers=301 must be an int in \[1, N\] with N=300"):
        clustering.kmeans(data, N + 1)
    with pytest.raises(ValueError, match=r"x must be a 2-D array \[N, D\]; got shape \(300,\)"):
        clustering.kmeans(data[:, 0], 4)
    with jax.set_mesh(mesh_of((4, 2))), pytest.raises(ValueError, match="num_centers=12 must be"):
        clustering.kmeans(data, 12)
    with pytest.raises(ValueError, match="init must be one of"):
        clustering.kmeans(data, K, init="kmeans||")
    with pytest.raises(ValueError, match=r"init centers must have shape \[num_centers, D\]"):
        clustering.kmeans(data, K, init=data[:3])
    with pytest.raises(ValueError, match="backend must be one of"):
        clustering.kmeans(data, K, backend="sklearn")
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        clustering.kmeans(data, K, chunk_size=0)
    with pytest.raises(ValueError, match="leave chunk_size=None"):
        clustering.kmeans(data, K, backend="faiss", chunk_size=10)
    with pytest.raises(ValueError, match=r"candidates=17 must be None \(exact\) or an int in"):
        clustering.kmeans(data, K, candidates=K + 1)
    with pytest.raises(ValueError, match="refresh_every=0 must be an int >= 1"):
        clustering.kmeans(data, K, candidates=2, refresh_every=0)
    with pytest.raises(ValueError, match="candidates needs backend='jax'"):
        clustering.kmeans(data, K, candidates=2, backend="faiss")
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        clustering.kmeans(data, K, score_dtype="float16")
    with pytest.raises(ValueError, match="score_dtype='bfloat16' needs backend='jax'"):
        clustering.kmeans(data, K, score_dtype="bfloat16", backend="faiss")


# ----------------------------------------------------------------------------------------------
# faiss backend


def test_faiss_missing_gives_install_hint(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[faiss\]"):
        clustering.kmeans(data, K, backend="faiss")


@pytest.mark.parametrize("spherical", [True, False])
def test_faiss_backend_reaches_our_objective(data, spherical):
    pytest.importorskip("faiss")
    kw = dict(iterations=6, seed=3, spherical=spherical, return_info=True)
    ours = clustering.kmeans(data, K, **kw)
    theirs = clustering.kmeans(data, K, backend="faiss", **kw)
    # Same initial centers, same Lloyd iterations: the objectives agree closely.
    np.testing.assert_allclose(theirs.objective, ours.objective, rtol=1e-3)
    assert np.asarray(theirs.centers).shape == (K, D)
