"""Few-shot ridge and logistic-regression probes: closed forms vs direct solves / scikit-learn,
known answers (one-hot features score 1, random ones chance), digits and tfds mock datasets,
and the errors. No jax: encoders are numpy functions (evaluator_fakes.FakeEncoder).
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from evaluator_fakes import FakeBuilder, FakeEncoder, random_embed, unit
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge

from mlcd import evaluators
from mlcd.evaluators import common, fewshot, labelled, linear_probe

KINDS = ("a", "b", "c")
PARITIES = ("even", "odd")


@pytest.fixture(autouse=True)
def _fresh_split_cache_and_one_blas_thread():
    """Fake builders are rebuilt per test; their cached splits must not outlive them. Reference
    fits run with one BLAS thread like the evaluators (threads only slow these small solves)."""
    with common.blas_threads(1):
        yield
    common.clear_split_cache()


def probe_builder(sizes=None, seed=0, test_kinds=KINDS):
    """Image pixel [0,0,0] = kind, [0,0,1] = parity, [1,0,:2] = the global example index.

    `kind` and `parity` are ClassLabels, `num` a plain integer feature; test examples only use
    `test_kinds`.
    """
    sizes = sizes or {"train": 300, "validation": 60, "test": 120}
    rng = np.random.default_rng(seed)
    splits, index = {}, 0
    for split, n in sizes.items():
        allowed = [KINDS.index(k) for k in (test_kinds if split == "test" else KINDS)]
        examples = []
        for _ in range(n):
            kind, parity = int(rng.choice(allowed)), index % 2
            image = np.zeros((4, 4, 3), np.uint8)
            image[0, 0, :2] = kind, parity
            image[1, 0, :2] = index // 256, index % 256
            examples.append(
                {"image": image, "kind": np.int64(kind), "parity": np.int64(parity), "num": 7}
            )
            index += 1
        splits[split] = examples
    features = {
        "kind": tfds.features.ClassLabel(names=KINDS),
        "parity": tfds.features.ClassLabel(names=PARITIES),
        "num": tfds.features.Scalar(np.int64),
    }
    return FakeBuilder("fake_probe", splits, features)


def kind_onehot(images):
    return np.eye(len(KINDS), dtype=np.float32)[images[:, 0, 0, 0]]


def noisy_kind(images, noise=1.0, dim=8):
    """One-hot kind in the first 3 dims plus per-image fixed Gaussian noise (a function of the
    example index, so every call gives the same features)."""
    index = images[:, 1, 0, 0].astype(int) * 256 + images[:, 1, 0, 1]
    x = np.stack([np.random.default_rng(i).normal(size=dim) * noise for i in index])
    x[:, : len(KINDS)] += 2 * kind_onehot(images)
    return x.astype(np.float32)


# ---------------------------------------------------------------------------- ridge maths


@pytest.mark.parametrize("n", [40, 6])  # N >= D + 1 (X^T X) and N < D + 1 (X X^T)
def test_ridge_weights_match_direct_solve_and_sklearn(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 9)) * 3 + 1, rng.integers(4, size=n)
    l2_regs = [2.0**-10, 1.0, 2.0**10]
    fit = fewshot.fit_ridge(x, y, 4)
    weights = fewshot.ridge_weights(fit, l2_regs)
    xd = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-5), np.full((n, 1), 100.0)], axis=1)
    targets = np.where(y[:, None] == np.arange(4), 1.0, -1.0)
    for w, lam in zip(weights, l2_regs):
        direct = np.linalg.solve(xd.T @ xd + lam * np.eye(10), xd.T @ targets)
        np.testing.assert_allclose(w, direct, rtol=1e-6, atol=1e-9)
        ridge = Ridge(alpha=lam, fit_intercept=False, solver="cholesky").fit(xd, targets)
        np.testing.assert_allclose(w, ridge.coef_.T, rtol=1e-6, atol=1e-9)
    x_test, y_test = rng.normal(size=(30, 9)), rng.integers(4, size=30)
    xt = np.concatenate([(x_test - x.mean(0)) / (x.std(0) + 1e-5), np.full((30, 1), 100.0)], 1)
    expected = [np.mean((xt @ w).argmax(1) == y_test) for w in weights]
    np.testing.assert_allclose(fewshot.accuracies(fit, weights, x_test, y_test), expected)


def test_sample_shots_nested_per_class_and_seeded():
    labels = np.repeat(np.arange(3), 10)
    pool = np.arange(2, 30)  # class 0 keeps 8 examples in the pool
    task = labelled.Task("t", "k", KINDS)
    shots = fewshot.sample_shots(labels, pool, 5, seed=0, task=task, where="w")
    assert shots.shape == (3, 5)
    for c, row in enumerate(shots):
        assert len(set(row)) == 5 and set(row) <= set(pool) and (labels[row] == c).all()
    np.testing.assert_array_equal(shots, fewshot.sample_shots(labels, pool, 5, 0, task, "w"))
    assert not np.array_equal(shots, fewshot.sample_shots(labels, pool, 5, 1, task, "w"))
    with pytest.raises(
        ValueError, match="w: class 'a' has 8 examples in the shot pool, fewer than 9"
    ):
        fewshot.sample_shots(labels, pool, 9, 0, task, "w")


# ---------------------------------------------------------------------------- few-shot evaluator


def test_fewshot_onehot_is_perfect_and_embeds_only_what_it_uses():
    builder = probe_builder()
    ev = evaluators.EVALUATORS.get("fewshot")(builder=builder, tasks="kind", shots=(1, 5), seeds=2)
    encoder = FakeEncoder({"pre_logits": kind_onehot})
    assert ev.run(encoder) == {"fewshot/kind/1shot": 1.0, "fewshot/kind/5shot": 1.0}
    embedded = sum(shape[0] for _, shape in encoder.image_calls)
    held = round(0.2 * 300)
    # held-out + at most 2 seeds x 3 classes x 5 shots from train, plus the test split
    assert held + 5 * 3 <= embedded - 120 <= held + 2 * 5 * 3
    assert {keys for keys, _ in encoder.image_calls} == {("pre_logits",)}
    assert ev.run(encoder) == {"fewshot/kind/1shot": 1.0, "fewshot/kind/5shot": 1.0}
    assert builder.opens == 2  # train and test, read once


def test_fewshot_random_features_are_at_chance():
    ev = fewshot.FewShotEvaluator(
        probe_builder(), tasks=("kind", "parity"), shots=(5,), representation="embedding"
    )
    metrics = ev.run(FakeEncoder(random_embed(0)))
    for key, p in (("fewshot/kind/5shot", 1 / 3), ("fewshot/parity/5shot", 1 / 2)):
        assert abs(metrics[key] - p) < 5 * np.sqrt(p * (1 - p) / 120), (key, metrics[key])


def test_fewshot_matches_direct_numpy_protocol():
    builder = probe_builder()
    l2_regs = [2.0**i for i in range(-4, 12, 3)]
    ev = fewshot.FewShotEvaluator(
        builder, tasks=("kind",), shots=(2, 6), seeds=3, l2_regs=l2_regs, max_train_examples=250
    )
    metrics = ev.run(FakeEncoder({"pre_logits": noisy_kind}))
    train = np.stack([ex["image"] for ex in builder.as_data_source("train")[:250]])
    test = np.stack([ex["image"] for ex in builder.as_data_source("test")])
    y_train, y_test = kind_onehot(train).argmax(1), kind_onehot(test).argmax(1)
    x_train, x_test = noisy_kind(train).astype(np.float64), noisy_kind(test).astype(np.float64)
    held = ev._data["held"]
    assert len(held) == 50 and not set(held) & set(ev._data["shots"]["kind"][0].ravel())

    def design(x, mean, std):
        return np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)

    for k in (2, 6):
        accs = []
        for shots in ev._data["shots"]["kind"]:
            idx = shots[:, :k].ravel()
            x, y = x_train[idx], y_train[idx]
            mean, std = x.mean(0), x.std(0) + 1e-5
            xd, targets = design(x, mean, std), np.where(y[:, None] == np.arange(3), 1.0, -1.0)
            best_acc, best_w = -1.0, None
            for lam in l2_regs:  # ascending: ">=" keeps the largest lambda among ties
                w = np.linalg.solve(xd.T @ xd + lam * np.eye(xd.shape[1]), xd.T @ targets)
                acc = np.mean((design(x_train[held], mean, std) @ w).argmax(1) == y_train[held])
                if acc >= best_acc:
                    best_acc, best_w = acc, w
            accs.append(np.mean((design(x_test, mean, std) @ best_w).argmax(1) == y_test))
        assert metrics[f"fewshot/kind/{k}shot"] == pytest.approx(np.mean(accs), abs=1e-12)


def test_fewshot_on_digits_upsamples_to_the_encoder_resolution():
    ev = evaluators.EVALUATORS.get("fewshot")(builder=None, dataset="digits", shots=(10,), seeds=1)
    pixels = lambda x: x[:, ::2, ::2, 0].reshape(len(x), -1).astype(np.float32)  # 16 -> 8 px
    encoder = FakeEncoder({"pre_logits": pixels}, image_size=16)
    metrics = ev.run(encoder)
    assert list(metrics) == ["fewshot/digits/10shot"] and metrics["fewshot/digits/10shot"] > 0.8
    assert {shape[1:] for _, shape in encoder.image_calls} == {(16, 16, 3)}


# ---------------------------------------------------------------------------- logistic probe


def test_sweep_log_c_binary_search_reaches_an_eighth_of_a_decade():
    calls = []

    def score(c):
        calls.append(c)
        return -abs(np.log10(c) - 1.3)

    best, tried = linear_probe.sweep_log_c(score, linear_probe.DEFAULT_C_GRID, refinements=4)
    assert np.log10(best) == pytest.approx(1.25)
    assert len(calls) == len(tried) == 15  # 7 coarse + 2 per round, no repeats
    assert min(tried) == -6 and max(tried) == 6
    # Ties go to the smaller C.
    best, _ = linear_probe.sweep_log_c(lambda c: 1.0, [1e-2, 1.0, 1e2], refinements=2)
    assert best == pytest.approx(1e-2)


def test_probe_accuracy_matches_sklearn_reference():
    rng = np.random.default_rng(0)
    y = rng.integers(4, size=260)
    x = rng.normal(size=(260, 6)) * [1, 5, 0.1, 2, 1, 3] + 0.8 * np.eye(4, 6)[y] + 3
    parts = [(x[:150], y[:150]), (x[150:200], y[150:200]), (x[200:], y[200:])]
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    top1, c = linear_probe.probe_accuracy(*parts, c_grid=grid, refinements=0, max_iter=500)
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = parts
    scaler = PCA(whiten=True).fit(x_tr)
    val_acc = [
        LogisticRegression(C=g, max_iter=500)
        .fit(scaler.transform(x_tr), y_tr)
        .score(scaler.transform(x_val), y_val)
        for g in grid
    ]
    best = grid[int(np.argmax(val_acc))]  # first max = smallest C among ties
    scaler = PCA(whiten=True).fit(np.concatenate([x_tr, x_val]))
    model = LogisticRegression(C=best, max_iter=500).fit(
        scaler.transform(np.concatenate([x_tr, x_val])), np.concatenate([y_tr, y_val])
    )
    assert c == pytest.approx(best)
    assert top1 == pytest.approx(model.score(scaler.transform(x_te), y_te), abs=1e-12)
    assert 0.4 < top1 < 1.0  # a task neither trivial nor hopeless, so selection mattered


def test_probe_accuracy_is_invariant_to_invertible_linear_maps():
    """Whitened features: the probe sees the same problem whatever full-rank map (here a random
    matrix, including a near-null feature like unit-norm embeddings have) precedes it."""
    rng = np.random.default_rng(3)
    y = rng.integers(3, size=300)
    x = rng.normal(size=(300, 5)) + np.eye(3, 5)[y]
    mixed = np.concatenate([x @ rng.normal(size=(5, 5)) * 50, x[:, :1] * 0 + 1e-9], axis=1)
    parts = lambda f: [(f[:150], y[:150]), (f[150:220], y[150:220]), (f[220:], y[220:])]
    kw = {"c_grid": [1e-3, 1e-1, 10.0], "refinements": 1}
    plain = linear_probe.probe_accuracy(*parts(x), **kw)
    assert linear_probe.probe_accuracy(*parts(mixed), **kw) == pytest.approx(plain)
    with pytest.raises(ValueError, match="features are constant"):
        linear_probe.probe_accuracy(*parts(np.ones((300, 2))), **kw)


def test_linear_probe_onehot_perfect_random_chance():
    builder = probe_builder()
    ev = evaluators.EVALUATORS.get("linear_probe")(builder=builder, refinements=1)
    assert [t.name for t in ev.tasks] == ["kind", "parity"]  # every ClassLabel, sorted
    both = lambda x: unit(np.concatenate([kind_onehot(x), np.eye(2)[x[:, 0, 0, 1]]], axis=1))
    encoder = FakeEncoder(both)
    assert ev.run(encoder) == {"linear_probe/kind/top1": 1.0, "linear_probe/parity/top1": 1.0}
    assert sorted(shape[0] for _, shape in encoder.image_calls) == [300 - 256, 60, 120, 256]
    metrics = ev.run(FakeEncoder(random_embed(1)))
    for key, p in (("linear_probe/kind/top1", 1 / 3), ("linear_probe/parity/top1", 1 / 2)):
        assert abs(metrics[key] - p) < 5 * np.sqrt(p * (1 - p) / 120), (key, metrics[key])


def test_linear_probe_on_digits_pixels():
    ev = linear_probe.LinearProbeEvaluator(None, dataset="digits", representation="pre_logits")
    pixels = lambda x: x[..., 0].reshape(len(x), -1).astype(np.float32)
    encoder = FakeEncoder({"pre_logits": pixels}, image_size=8)
    metrics = ev.run(encoder)
    assert list(metrics) == ["linear_probe/digits/top1"]
    assert metrics["linear_probe/digits/top1"] > 0.9  # logistic regression on raw digit pixels
    assert sum(shape[0] for _, shape in encoder.image_calls) == 1074 + 355 + 368  # all of digits


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_mock_datasets(name, tmp_path):
    """tfds mock data: random images, labels a function of the index (train == test under the
    mock). An encoder that recognises each image scores 1.0, through gray -> RGB for mnist and
    the train hold-out (the mock declares no validation split)."""
    with tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE):
        source = tfds.builder(name, data_dir=str(tmp_path)).as_data_source("train")
        label_of = {source[i]["image"][..., 0].tobytes(): source[i]["label"] for i in range(200)}
        size = source[0]["image"].shape[0]
        onehot = lambda x: np.eye(10, dtype=np.float32)[
            [label_of[im[..., 0].tobytes()] for im in x]
        ]
        lp = evaluators.EVALUATORS.get("linear_probe")(
            builder=None, dataset=name, data_dir=str(tmp_path), refinements=0
        )
        assert lp.run(FakeEncoder(onehot, image_size=size)) == {f"linear_probe/{name}/top1": 1.0}
        fs = evaluators.EVALUATORS.get("fewshot")(
            builder=None, dataset=name, data_dir=str(tmp_path), shots=(2,)
        )
        encoder = FakeEncoder({"pre_logits": onehot}, image_size=size)
        assert fs.run(encoder) == {f"fewshot/{name}/2shot": 1.0}


# ---------------------------------------------------------------------------- errors


def test_probe_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"linear_probe evaluator: unknown representation 'patch_tokens'; "
        r"known: \['pre_logits', 'embedding'\]",
    ):
        linear_probe.LinearProbeEvaluator(probe_builder(), representation="patch_tokens")
    with pytest.raises(
        ValueError,
        match=r"fewshot evaluator: 'num' is not a ClassLabel feature of dataset 'fake_probe'; "
        r"its ClassLabel features: \['kind', 'parity'\]",
    ):
        fewshot.FewShotEvaluator(probe_builder(), tasks=("kind", "num"))
    with pytest.raises(ValueError, match="dataset 'mnist' needs a data_dir"):
        linear_probe.LinearProbeEvaluator(None, dataset="mnist")
    with pytest.raises(ValueError, match="tfds does not know dataset 'no_such_set'"):
        linear_probe.LinearProbeEvaluator(None, dataset="no_such_set", data_dir=str(tmp_path))
    ev = linear_probe.LinearProbeEvaluator(None, dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"on mnist/train: the dataset is not prepared"):
        ev.run(FakeEncoder(kind_onehot))

    # Class 'c' only in the test split / only rarely in train.
    train_without_c = probe_builder(test_kinds=KINDS)
    train_without_c._splits["train"] = [
        ex for ex in train_without_c._splits["train"] if ex["kind"] != 2
    ]
    ev = linear_probe.LinearProbeEvaluator(train_without_c, tasks="kind")
    with pytest.raises(
        ValueError,
        match="linear_probe evaluator: task 'kind': class 'c' appears in fake_probe/validation "
        "but not in the train examples",
    ):
        ev.run(FakeEncoder(kind_onehot))
    ev = fewshot.FewShotEvaluator(train_without_c, tasks="kind")
    with pytest.raises(ValueError, match="task 'kind': class 'c' appears in fake_probe/test"):
        ev.run(FakeEncoder({"pre_logits": kind_onehot}))
    ev = fewshot.FewShotEvaluator(probe_builder(), tasks="kind", max_train_examples=40)
    with pytest.raises(
        ValueError,
        match=r"task 'kind' \(fake_probe/train\): class '.' has \d+ examples in the shot pool, "
        "fewer than 25 shots",
    ):
        ev.run(FakeEncoder({"pre_logits": kind_onehot}))
