"""python -m mlcd.cluster on the small synthetic_scenes build with a 1-step CLIP teacher.

256 train examples in 4 embedding shards of 64, 16 centers (sharded over the 8 fake devices),
top-4 labels, 6 k-means iterations saved every 2. A crash in any stage, resumed, gives the
same files as the uninterrupted reference run; bad input fails before anything is written.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import SMALL_SCENES, tiny_overrides
from mlcd_fakes import write_cluster_output

import mlcd
from configs import common
from mlcd import cluster, export, label_store, train
from mlcd.clustering import pipeline, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, L, SHARD = 16, 4, 64


@pytest.fixture(scope="module")
def teacher(scenes_dir, tmp_path_factory):
    """(training workdir, export dir) of a 1-step CLIP tiny run (no evaluation)."""
    workdir = str(tmp_path_factory.mktemp("teacher") / "clip")
    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    common.parse_overrides(config, tiny_overrides(scenes_dir, total_steps=1, ckpt_every=1))
    config.evals = {}
    train.train_and_evaluate(config, workdir)
    return workdir, export.export(workdir, os.path.join(os.path.dirname(workdir), "export"))


def argv(scenes_dir, teacher, out_dir, **extra):
    """CLI arguments of the small clustering run (export teacher unless overridden)."""
    values = {
        "data.data_dir": scenes_dir,
        **{f"data.build.{k}": v for k, v in SMALL_SCENES.items()},
        "teacher.export": teacher[1],
        "teacher.workdir": "",
        "out_dir": out_dir,
        "verbose": False,
        "embed.shard_size": SHARD,
        "embed.batch_size": 32,
        "kmeans.num_centers": C,
        "kmeans.iterations": 6,
        "kmeans.save_every": 2,
        "assign.top_l": L,
        "assign.chunk_size": 48,  # several chunks per shard
        **extra,
    }
    return [
        "--config",
        os.path.join(ROOT, "configs/cluster.py:tiny"),
        *[f"--config.{k}={v}" for k, v in values.items()],
    ]


def config_of(args):
    config = common.load_config(args[1])
    common.parse_overrides(config, args[2:])
    return config


@pytest.fixture(scope="module")
def reference(scenes_dir, teacher, tmp_path_factory):
    """An uninterrupted run through the CLI; its output directory."""
    out = str(tmp_path_factory.mktemp("ref") / "clusters")
    assert cluster.main(argv(scenes_dir, teacher, out)) == 0
    return out


def embeddings(out_dir):
    paths = sorted(os.listdir(os.path.join(out_dir, store.EMBEDDINGS_DIR)))
    shards = [os.path.join(out_dir, store.EMBEDDINGS_DIR, p) for p in paths if p.endswith(".npz")]
    return store.EmbeddingShards(shards)


def assert_same_outputs(a, b):
    for name in (store.CENTROIDS_FILE, *label_store.LABEL_FILES, store.KMEANS_STATE_FILE):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    np.testing.assert_array_equal(np.asarray(embeddings(a)), np.asarray(embeddings(b)))
    meta_a, meta_b = store.load_clusters(a).meta, store.load_clusters(b).meta
    assert meta_a == meta_b


def test_end_to_end_outputs(reference, teacher, scenes_builder):
    out = store.load_clusters(reference)
    meta = out.meta
    assert meta["complete"] is True
    assert (meta["num_centers"], meta["top_l"], meta["embed_dim"]) == (C, L, 128)
    assert (meta["num_examples"], meta["split"], meta["features"]) == (256, "train", "image")
    assert meta["teacher"] == os.path.abspath(teacher[1]) and meta["teacher_step"] == 1
    assert meta["dataset"] == "synthetic_scenes"
    # Files the trainer reads: exact dtypes and shapes.
    assert out.centroids.dtype == np.float32 and out.centroids.shape == (C, 128)
    np.testing.assert_allclose(np.linalg.norm(out.centroids, axis=1), 1.0, rtol=1e-5)
    assert out.ids.dtype.kind == "U" and out.ids.shape == (256,)
    assert out.labels.dtype == np.int32 and out.labels.shape == (256, L)
    assert out.similarities.dtype == np.float32 and out.similarities.shape == (256, L)
    assert out.id_hashes.dtype == np.uint64 and out.id_hashes.shape == (256,)
    # Row i is example i of the split (the trainer joins by index), and its id hash is stable:
    # files written today must match the hashes of any later run.
    source = scenes_builder.as_data_source("train")
    ids = [source[i]["id"].decode() for i in range(256)]
    assert out.ids.tolist() == ids
    np.testing.assert_array_equal(out.id_hashes, label_store.id_hash(ids))
    assert label_store.id_hash(["train_00000000"]).tolist() == [1484004951770724266]
    assert all(isinstance(a, np.memmap) for a in out[1:])  # opened, not read
    table = label_store.LabelTable(reference, out.labels, out.id_hashes, C)
    np.testing.assert_array_equal(table.lookup(np.arange(256), ids), out.labels)
    np.testing.assert_array_equal(table.lookup([255], ids[-1:]), out.labels[-1:])

    # Embeddings are the teacher's, and labels are the brute-force top-l against the centroids.
    emb = np.asarray(embeddings(reference))
    images = np.stack([source[i]["image"] for i in range(8)])
    np.testing.assert_allclose(
        emb[:8], mlcd.load_encoder(teacher[1]).embed_images(images)["embedding"], atol=1e-6
    )
    sims = emb.astype(np.float64) @ out.centroids.T.astype(np.float64)
    brute = np.argsort(-sims, axis=1, kind="stable")[:, :L]
    np.testing.assert_array_equal(out.labels, brute)
    np.testing.assert_allclose(out.similarities, np.take_along_axis(sims, brute, 1), atol=1e-5)
    assert np.all(np.diff(meta["kmeans_objective"]) >= -1e-6)  # spherical Lloyd never worsens
    assert os.path.getsize(os.path.join(reference, store.PLOT_FILE)) > 10_000
    leftovers = [f for _, _, fs in os.walk(reference) for f in fs if ".tmp-" in f]
    assert leftovers == []


def test_rerun_of_a_complete_run_does_nothing(reference, scenes_dir, teacher, capsys):
    before = os.path.getmtime(os.path.join(reference, store.META_FILE))
    assert cluster.main(argv(scenes_dir, teacher, reference)) == 0
    assert os.path.getmtime(os.path.join(reference, store.META_FILE)) == before
    assert "mean top-1 similarity" in capsys.readouterr().out


def test_directory_of_an_older_version_is_refused(reference, scenes_dir, teacher, tmp_path):
    """An older version wrote labels.npz (keyed by id) instead of the label files: neither
    python -m mlcd.cluster nor load_clusters takes such a directory, and nothing is written."""
    out = shutil.copytree(reference, str(tmp_path / "clusters"))
    ids = np.load(os.path.join(out, label_store.IDS_FILE))
    for name in label_store.LABEL_FILES:
        os.remove(os.path.join(out, name))
    labels = np.zeros((256, L), np.int32)
    np.savez(os.path.join(out, store.OLD_LABELS_FILE), ids=ids, labels=labels)
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    message = (
        r"clusters holds labels\.npz but no labels\.npy: it was written by an older version of "
        r"python -m mlcd\.cluster; cluster again into a new config\.out_dir"
    )
    with pytest.raises(ValueError, match=message):
        cluster.run(config_of(argv(scenes_dir, teacher, out)))
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
    with pytest.raises(ValueError, match=message):
        store.load_clusters(out)


def test_load_clusters_checks_the_files(tmp_path):
    """A fake output (mlcd_fakes): complete, marked incomplete, unmarked, a file of the wrong
    dtype or missing."""
    ids = np.array([f"train_{i:08d}" for i in range(64)])
    labels = np.tile(np.arange(L, dtype=np.int32), (64, 1))
    path = write_cluster_output(str(tmp_path / "c"), ids, labels, np.ones((C, 8)))
    out = store.load_clusters(path)
    assert (out.meta["num_centers"], out.meta["top_l"]) == (C, L)
    np.testing.assert_array_equal(out.labels, labels)
    np.testing.assert_array_equal(out.id_hashes, label_store.id_hash(ids))

    label_store.save_npy(os.path.join(path, label_store.LABELS_FILE), labels.astype(np.int64))
    with pytest.raises(ValueError, match=r"c/labels\.npy: int64 \(64, 4\) does not match"):
        store.load_clusters(path)
    os.remove(os.path.join(path, label_store.LABELS_FILE))
    with pytest.raises(FileNotFoundError, match=r"c is not a complete clustering: labels\.npy is"):
        store.load_clusters(path)

    partial = write_cluster_output(
        str(tmp_path / "partial"), ids, labels, np.ones((C, 8)), complete=False
    )
    with pytest.raises(ValueError, match=r"partial/clusters\.json: complete is not true"):
        store.load_clusters(partial)
    os.remove(os.path.join(partial, store.META_FILE))
    with pytest.raises(FileNotFoundError, match=r"partial is not a complete clustering"):
        store.load_clusters(partial)


def wrap(monkeypatch, name, crash_at=None):
    """Counts calls of pipeline.<name> (the list returned); the crash_at-th one raises."""
    original, calls = getattr(pipeline, name), []

    def wrapped(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, name, wrapped)
    return calls


def test_crash_in_every_stage_then_resume_equals_uninterrupted(
    reference, scenes_dir, teacher, tmp_path, monkeypatch
):
    out = str(tmp_path / "clusters")
    config = config_of(argv(scenes_dir, teacher, out))

    def crash(name, n, counted=()):
        """Runs until the n-th call of pipeline.<name>, which raises; returns how often each
        of pipeline.<counted> was called (what the resumed run redid)."""
        with monkeypatch.context() as m:
            counts = {c: wrap(m, c) for c in counted}
            wrap(m, name, crash_at=n)
            with pytest.raises(RuntimeError, match="simulated crash"):
                cluster.run(config)
        assert not os.path.exists(os.path.join(out, store.META_FILE))
        return {c: len(v) for c, v in counts.items()}

    crash("write_embedding_shard", 3)  # embedding shards 0-1 written, 2 in progress
    assert sorted(os.listdir(os.path.join(out, store.EMBEDDINGS_DIR))) == [
        "shard_00000.npz",
        "shard_00001.npz",
        "teacher.json",
    ]
    redone = crash("save_kmeans_state", 2, ["write_embedding_shard"])  # iterations 0-1 saved
    assert redone == {"write_embedding_shard": 2}
    with np.load(os.path.join(out, store.KMEANS_STATE_FILE)) as z:
        assert int(z["iteration"]) == 2
    assert not os.path.exists(os.path.join(out, store.CENTROIDS_FILE))
    redone = crash("assign_topk", 2, ["kmeans", "write_embedding_shard"])  # shard 0 assigned
    assert redone == {"kmeans": 2, "write_embedding_shard": 0}  # blocks 2-3 and 4-5
    assert os.listdir(os.path.join(out, store.ASSIGN_DIR)) == ["shard_00000.npz"]
    redone = crash("_label_shard", 2, ["assign_topk", "kmeans"])  # label files half written
    assert redone == {"assign_topk": 3, "kmeans": 0}
    assert not [f for f in os.listdir(out) if f in label_store.LABEL_FILES or ".tmp-" in f]
    cluster.run(config)
    assert_same_outputs(reference, out)


@pytest.mark.parametrize(
    "backend, chunk_size, candidates",
    [("jax", 48, None), ("jax", None, None), ("jax", 48, 3), ("faiss", None, None)],
)
def test_kmeans_resume_equals_uninterrupted(backend, chunk_size, candidates, tmp_path, monkeypatch):
    """A run resumed from kmeans_state.npz ends with the same centroids and objective history
    as an uninterrupted one, re-seeding of empty clusters included (its seed derives from the
    block's first iteration); rows are read from 3 embedding shards (chunks straddle them).
    With kmeans.candidates, each 2-iteration block is one exact and one candidate pass."""
    rng = np.random.default_rng(0)
    # 20 distinct directions repeated: duplicate initial centers leave clusters empty.
    x = np.repeat(rng.standard_normal((20, 8)), 10, axis=0).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    config = common.load_config(os.path.join(ROOT, "configs/cluster.py:tiny"))
    config.verbose = False
    config.kmeans.update({"num_centers": 32, "iterations": 6, "save_every": 2, "backend": backend})
    config.kmeans.chunk_size = chunk_size
    config.kmeans.candidates = candidates
    config.kmeans.refresh_every = 2
    reseeded = []
    original = pipeline.kmeans

    def kmeans(*args, **kwargs):
        assert kwargs["candidates"] == candidates and kwargs["refresh_every"] == 2
        result = original(*args, **kwargs)
        reseeded.append(int(result.num_reseeded.sum()))
        return result

    monkeypatch.setattr(pipeline, "kmeans", kmeans)
    finals = []
    for name in ("whole", "resumed"):
        out = tmp_path / name
        os.makedirs(out / store.EMBEDDINGS_DIR)
        paths = [store.shard_path(str(out), store.EMBEDDINGS_DIR, s) for s in range(3)]
        for path, lo, hi in zip(paths, (0, 70, 140), (70, 140, 200), strict=True):
            ids = np.array([str(i) for i in range(lo, hi)])
            pipeline.write_embedding_shard(path, ids, x[lo:hi])
        emb = store.EmbeddingShards(paths)
        index = np.array([0, 69, 70, 71, 150, 199, 3])
        np.testing.assert_array_equal(emb[index], x[index])
        np.testing.assert_array_equal(emb[60:150], x[60:150])
        np.testing.assert_array_equal(np.asarray(emb), x)
        if name == "resumed":
            with monkeypatch.context() as m:
                wrap(m, "save_kmeans_state", crash_at=3)  # saved after iterations 2 and 4
                with pytest.raises(RuntimeError):
                    pipeline.run_kmeans(config, str(out), emb)
        finals.append(pipeline.run_kmeans(config, str(out), emb))
    np.testing.assert_array_equal(finals[0][0], finals[1][0])
    assert finals[0][1] == finals[1][1] and len(finals[0][1]) == 6
    if backend == "jax":  # faiss splits big clusters instead of re-seeding empty ones
        assert reseeded[-1] > 0  # the block the resumed run redid re-seeded empty clusters


def test_workdir_teacher_and_image_text_mean(reference, scenes_dir, teacher, tmp_path):
    out = str(tmp_path / "clusters")
    args = argv(
        scenes_dir,
        teacher,
        out,
        **{"teacher.export": "", "teacher.workdir": teacher[0], "teacher.step": 1},
        # One shard (tfds split slicing): this test is about the teacher and the features.
        **{"embed.features": "image_text_mean", "data.split": "train[:64]"},
    )
    assert cluster.main(args) == 0
    meta = store.load_clusters(out).meta
    assert (meta["features"], meta["teacher"]) == ("image_text_mean", os.path.abspath(teacher[0]))
    assert (meta["num_examples"], meta["split"]) == (64, "train[:64]")
    with np.load(os.path.join(out, store.EMBEDDINGS_DIR, "shard_00000.npz")) as z:
        got = z["emb"][:4]
    with np.load(os.path.join(reference, store.EMBEDDINGS_DIR, "shard_00000.npz")) as z:
        image = z["emb"][:4]  # from the export: the same parameters
    encoder = mlcd.load_encoder(teacher[1])
    text = encoder.embed_texts(_captions(config_of(args), 4))["embedding"]
    want = (image + text) / np.linalg.norm(image + text, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _captions(config, n):
    """The first n captions (config.data.caption_key) of the train split."""
    from input_pipeline import datasets

    data = config.data
    builder = datasets.get_builder(data.name, data.data_dir, **data.build.to_dict())
    source = builder.as_data_source("train")
    return [source[i][data.caption_key].decode() for i in range(n)]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"teacher.export": "/nonexistent/export"}, r"config.teacher.export=/nonexistent/export: "),
        ({"teacher.workdir": "runs/x"}, r"config.teacher: set exactly one"),
        ({"teacher.export": ""}, r"got neither"),
        ({"kmeans.num_centers": 512, "assign.top_l": 8}, r"num_centers=512 exceeds the 256"),
        ({"assign.top_l": 32}, r"config.assign.top_l=32 exceeds config.kmeans.num_centers=16"),
        ({"kmeans.num_centers": 12}, r"num_centers=12 must be divisible by the 8 devices"),
        ({"embed.features": "text"}, r"config.embed.features='text': one of"),
        ({"embed.features": "image_text_mean", "data.caption_key": "alt"}, r"no feature 'alt'"),
        ({"data.split": "bogus"}, r"config.data.split='bogus': Unknown split"),
        ({"kmeans.backend": "faiss", "kmeans.chunk_size": 64}, r"unset chunk_size"),
    ],
)
def test_bad_config_fails_before_writing(extra, message, scenes_dir, teacher, tmp_path, capsys):
    out = str(tmp_path / "clusters")
    assert cluster.main(argv(scenes_dir, teacher, out, **extra)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(out)


def test_incomplete_teacher_export_is_named(scenes_dir, teacher, tmp_path):
    broken = shutil.copytree(teacher[1], str(tmp_path / "export"))
    shutil.rmtree(os.path.join(broken, "params"))
    config = config_of(argv(scenes_dir, teacher, str(tmp_path / "c"), **{"teacher.export": broken}))
    with pytest.raises(FileNotFoundError, match=r"teacher.export=.*not a complete mlcd export"):
        cluster.run(config)


def test_resume_refuses_other_config_or_dims(reference, scenes_dir, teacher, tmp_path):
    out = shutil.copytree(reference, str(tmp_path / "clusters"))
    with pytest.raises(
        ValueError, match=r"config.kmeans.seed=1 differs from 0 in .*cluster_config"
    ):
        cluster.run(config_of(argv(scenes_dir, teacher, out, **{"kmeans.seed": 1})))
    # Centroids of another embedding size (as if the teacher had changed) are not continued.
    for name in (store.META_FILE, *label_store.LABEL_FILES, store.CENTROIDS_FILE):
        os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, store.ASSIGN_DIR))
    pipeline.save_kmeans_state(
        os.path.join(out, store.KMEANS_STATE_FILE), np.zeros((C, 64), np.float32), 2, [0.5, 0.6]
    )
    with pytest.raises(ValueError, match=r"kmeans_state.npz holds centroids of shape \(16, 64\)"):
        cluster.run(config_of(argv(scenes_dir, teacher, out)))
    # Missing shards are not embedded with a teacher of another size than the shards on disk.
    os.remove(os.path.join(out, store.KMEANS_STATE_FILE))
    os.remove(store.shard_path(out, store.EMBEDDINGS_DIR, 3))
    teacher_json = os.path.join(out, store.EMBEDDINGS_DIR, pipeline.TEACHER_FILE)
    with open(teacher_json) as f:
        label_store.save_json(teacher_json, {**json.load(f), "embed_dim": 64})
    with pytest.raises(ValueError, match=r"gives 128-dim embeddings, but the shards .* hold 64"):
        cluster.run(config_of(argv(scenes_dir, teacher, out)))
    assert not os.path.exists(store.shard_path(out, store.EMBEDDINGS_DIR, 3))
    # A directory that is not a clustering output is never written into.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty and has no cluster_config.json"):
        cluster.run(config_of(argv(scenes_dir, teacher, str(other))))


def test_presets_build():
    tiny = common.load_config(os.path.join(ROOT, "configs/cluster.py:tiny"))
    cluster.check_config(tiny)
    train_data = common.tiny_preset(common.base_config()).data
    assert tiny.data.data_dir == train_data.data_dir and tiny.data.split == "train"
    assert tiny.data.build.to_dict() == train_data.build.to_dict()
    assert tiny.teacher.workdir == "runs/clip_tiny" and tiny.teacher.export is None
    assert (tiny.kmeans.num_centers, tiny.assign.top_l, tiny.kmeans.iterations) == (256, 8, 20)
    laion = common.load_config(os.path.join(ROOT, "configs/cluster.py:laion"))
    cluster.check_config(laion)
    assert (laion.kmeans.num_centers, laion.assign.top_l) == (1_048_576, 8)
    assert laion.embed.features == "image" and laion.kmeans.chunk_size > 0
    assert json.loads(laion.to_json())["mesh"] == [["data", -1]]
