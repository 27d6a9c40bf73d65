"""Export -> load_encoder -> evaluate reproduces the trainer's own evaluation exactly, from any
step and mesh; incomplete or mismatched exports are rejected with a message naming the problem;
export and evaluation of a run read only the encoder's parameters from its checkpoint."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorstore as ts
from conftest import tiny_overrides
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mlcd_fakes import dataset_ids, mlcd_overrides, random_cluster_output

import mlcd
from configs import common
from mlcd import evaluate, export, models, objectives, optim, runs, train, train_state
from mlcd.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(scenes_dir, tmp_path_factory):
    """A 4-step CLIP run on a (4, 2) mesh with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("run") / "clip")
    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    overrides = tiny_overrides(
        scenes_dir, total_steps=4, ckpt_every=2, mesh="(('data', 4), ('model', 2))"
    )
    common.parse_overrides(config, overrides)
    final = train.train_and_evaluate(config, workdir)
    return workdir, final


def test_export_reproduces_in_training_metrics_exactly(run, tmp_path):
    workdir, final = run
    out = export.export(workdir, str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["export.json", "params", "tokenizer.json"]
    encoder = mlcd.load_encoder(out)  # replicated over a (8,) mesh: not the training mesh
    spec = runs.read_export_meta(out)
    assert spec["step"] == 4
    results = evaluate.evaluate(encoder, spec, ["zeroshot", "retrieval"])
    assert results == {k: v for k, v in final.items() if k in results}
    assert len(results) >= 10

    # Same numbers straight from the run directory, without an export.
    from_run, _ = runs.encoder_from_run(workdir, None)
    images = np.random.default_rng(0).integers(0, 255, (5, 48, 40, 3), dtype=np.uint8)
    a = encoder.embed_images(images, keys=("embedding", "pre_logits", "patch_embeddings"))
    b = from_run.embed_images(images, keys=("embedding", "pre_logits", "patch_embeddings"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["embedding"].shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(a["embedding"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a["patch_embeddings"], axis=-1), 1.0, rtol=1e-5)
    t = encoder.embed_texts(["a red circle.", "the blue star is small."])["embedding"]
    assert t.shape == (2, 128)


def test_export_from_an_earlier_step_differs(run, tmp_path):
    workdir, _ = run
    early = mlcd.load_encoder(export.export(workdir, str(tmp_path / "e2"), step=2))
    late = mlcd.load_encoder(export.export(workdir, str(tmp_path / "e4")))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert not np.allclose(
        early.embed_images(images)["embedding"], late.embed_images(images)["embedding"]
    )
    with pytest.raises(ValueError, match=r"--step 3: no checkpoint at that step"):
        export.export(workdir, str(tmp_path / "e3"), step=3)


def test_incomplete_or_mismatched_export_is_rejected(run, tmp_path):
    workdir, _ = run
    out = export.export(workdir, str(tmp_path / "x"))
    with open(os.path.join(out, "export.json")) as f:
        meta = json.load(f)
    meta["model"]["embed_dim"] = 64
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"parameter 'image/proj/kernel' is \(128, 128\) on disk"):
        mlcd.load_encoder(out)
    os.remove(os.path.join(out, "export.json"))
    with pytest.raises(FileNotFoundError, match=r"not a complete mlcd export: export.json"):
        mlcd.load_encoder(out)
    with pytest.raises(FileNotFoundError, match="is not a training run"):
        export.export(str(tmp_path), str(tmp_path / "y"))


def test_evaluate_cli_writes_only_its_output(run, tmp_path, capsys):
    workdir, final = run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    out = str(tmp_path / "results.json")
    assert evaluate.main(["--workdir", workdir, "--evals", "retrieval", "--out", out]) == 0
    with open(out) as f:
        results = json.load(f)
    assert results["retrieval/test/i2t_r1"] == final["retrieval/test/i2t_r1"]
    assert "retrieval/test/t2i_r5" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    # DreamLIP's metrics run the same way: zero-shot segmentation (its PNG beside --out) and
    # sentence-level retrieval (the run config's retrieval_sentences entry).
    dense = str(tmp_path / "dense" / "results.json")
    args = ["--workdir", workdir, "--evals", "segmentation,retrieval_sentences", "--out", dense]
    assert evaluate.main(args) == 0
    with open(dense) as f:
        results = json.load(f)
    for key in ("segmentation/test/color_miou", "retrieval/test_sentences/t2i_r5"):
        assert 0.0 <= results[key] <= 1.0, key
    assert sorted(os.listdir(os.path.dirname(dense))) == ["results.json", "segmentation_test.png"]
    bad = os.path.join(workdir, "checkpoints", "r.json")
    assert evaluate.main(["--workdir", workdir, "--evals", "retrieval", "--out", bad]) == 2
    assert "never writes into" in capsys.readouterr().err
    # A mistyped --data_dir is an error, not a synthetic_scenes dataset generated there.
    typo = str(tmp_path / "dat")
    assert evaluate.main(["--workdir", workdir, "--evals", "retrieval", "--data_dir", typo]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: synthetic_scenes") and err.count("\n") == 1, err
    assert f"not prepared in {typo}; evaluation never generates data" in err
    assert not os.path.exists(typo)


def test_random_init_export_is_the_runs_initial_params(run, tmp_path, capsys):
    """--random-init exports exactly the parameters the trainer starts from (the run's model
    config and seed, on the run's own mesh and sharding rules), whatever mesh exports it."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mlcd import sharding

    workdir, _ = run
    out = str(tmp_path / "random")
    assert export.main(["--workdir", workdir, "--out", out, "--random-init"]) == 0
    assert "random-init" in capsys.readouterr().out
    meta = runs.read_export_meta(out)
    assert (meta["step"], meta["random_init"], meta["seed"]) == (0, True, 0)
    random = mlcd.load_encoder(out)

    config = runs.load_run_config(workdir)
    mesh = sharding.make_mesh(config.mesh)  # the training mesh, (4, 2)
    objective = objectives.build(config)
    _, abstract = train_state.abstract_params(config, objective)
    with jax.set_mesh(mesh):
        initial = train_state.init_params(
            config,
            objective,
            train_state.param_shardings(config, objective, abstract, mesh),
        )
    assert set(random.params) == set(initial)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        random.params,
        initial,
    )
    assert {x.sharding for x in jax.tree.leaves(random.params)} == {
        NamedSharding(random._mesh, P())
    }

    trained = mlcd.load_encoder(export.export(workdir, str(tmp_path / "trained")))
    images = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    assert not np.allclose(
        random.embed_images(images)["embedding"], trained.embed_images(images)["embedding"]
    )
    results = evaluate.evaluate(random, meta, ["retrieval"])
    assert 0 <= results["retrieval/test/i2t_r1"] <= 1

    assert export.main(["--workdir", workdir, "--out", out, "--random-init", "--step", "2"]) == 2
    assert "do not give --step" in capsys.readouterr().err


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _file_bytes_read() -> int:
    """Bytes tensorstore has read from local files in this process so far."""
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in metrics for v in m["values"])


@pytest.fixture(scope="module")
def mlcd_run(scenes_builder, scenes_dir, tmp_path_factory):
    """A 2-step MLCD run whose centers (8192 x 128) outweigh its image tower."""
    tmp = tmp_path_factory.mktemp("mlcd")
    labels_dir = random_cluster_output(
        str(tmp / "clusters"), dataset_ids(scenes_builder), 8192, 8, 128
    )
    config = common.load_config(os.path.join(ROOT, "configs/mlcd.py:tiny"))
    common.parse_overrides(
        config, mlcd_overrides(scenes_dir, labels_dir, **{"objective.num_centers": 8192})
    )
    train.train_and_evaluate(config, str(tmp / "run"))
    return str(tmp / "run")


def test_run_export_reads_only_the_encoder_params(mlcd_run, tmp_path):
    """restore_run_params reads the image tower and nothing else of the checkpoint: no
    optimizer state, step or rng, no class centers; evaluating the run directly gives the
    export's embeddings."""
    config = runs.load_run_config(mlcd_run)
    _, run_params = train_state.abstract_params(config, objectives.build(config))
    tx, _ = optim.make_optimizer(config.optim, run_params, config.total_steps)
    saved = _nbytes(train_state.abstract_state(tx, run_params))  # what the checkpoint holds
    _, encoder = models.abstract_model(config.model)
    encoder_bytes, centers_bytes = _nbytes(encoder), _nbytes(run_params["heads"])
    assert centers_bytes > encoder_bytes  # so reading the centers could not go unnoticed

    before = _file_bytes_read()
    _, _, params, step = runs.restore_run_params(mlcd_run)
    read = _file_bytes_read() - before
    assert step == 2 and sorted(params) == ["image"]  # no centers
    assert jax.tree.structure(params) == jax.tree.structure(encoder)
    assert _nbytes(params) == encoder_bytes < saved / 5
    # From disk: the encoder's arrays (compressed) plus metadata. The centers (> encoder_bytes)
    # or any AdamW moment of the tower (encoder_bytes each) would take it past the bound.
    assert read < 1.5 * encoder_bytes, (read, encoder_bytes, saved)
    replicated = NamedSharding(jax.tree.leaves(params)[0].sharding.mesh, P())
    assert {x.sharding for x in jax.tree.leaves(params)} == {replicated}

    # The evaluate path uses the same partial restore and the encoder's graphdef.
    from_run, spec = runs.load_model(workdir=mlcd_run)
    assert spec["step"] == 2 and sorted(from_run.params) == ["image"]
    exported = mlcd.load_encoder(export.export(mlcd_run, str(tmp_path / "export")))
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    keys = ("embedding", "pre_logits", "patch_tokens")
    a, b = exported.embed_images(images, keys=keys), from_run.embed_images(images, keys=keys)
    for k in keys:
        np.testing.assert_array_equal(a[k], b[k])

    bogus = {"params": {"extra": jax.ShapeDtypeStruct((3,), np.float32, sharding=replicated)}}
    with pytest.raises(ValueError, match=r"checkpoint 2 in .* has no 'params/extra'"):
        Checkpointer(mlcd_run, read_only=True).restore_subtree(2, bogus)


def test_runs_written_before_the_heads_moved_still_export(mlcd_run, tmp_path):
    """config.json of MLCD runs from before the objectives owned their heads kept the centers'
    settings under model (num_centers, centers_init): readers drop them."""
    old = str(tmp_path / "old_run")
    shutil.copytree(mlcd_run, old)
    path = os.path.join(old, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model"].update(num_centers=8192, centers_init="/gone/centroids.npy")
    with open(path, "w") as f:
        json.dump(config, f)
    assert "num_centers" not in runs.load_run_config(old).model
    meta = runs.read_export_meta(export.export(old, str(tmp_path / "export")))
    assert meta["model"] == runs.load_run_config(mlcd_run).model.to_dict()


def _snapshot(root) -> dict:
    return {
        os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
    }


def test_export_never_deletes_what_it_did_not_write(run, tmp_path, capsys):
    """--out the run itself, a directory above it, its checkpoints, or a non-empty directory
    that is not an export: refused with one line, nothing touched (export used to rmtree
    --out whatever it held, destroying the run). Checkpoints are recognised through a symlink,
    and an export.json is an export's only if it has the mlcd format."""
    workdir = str(tmp_path / "runs" / "clip")
    shutil.copytree(run[0], workdir)
    disk = tmp_path / "disk"  # its checkpoints on another disk, through a symlink
    disk.mkdir()
    shutil.move(os.path.join(workdir, "checkpoints"), disk / "checkpoints")
    os.symlink(disk / "checkpoints", os.path.join(workdir, "checkpoints"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    foreign = tmp_path / "other_tool"  # an export.json, but not of an mlcd export
    foreign.mkdir()
    (foreign / "export.json").write_text('{"format": "other-tool/3"}')
    before = _snapshot(tmp_path)
    refused = {
        workdir: "that is the run",
        str(tmp_path / "runs"): "a directory above it",
        os.path.join(workdir, "checkpoints"): "inside its checkpoints",
        os.path.join(workdir, "checkpoints", "new"): "inside its checkpoints",
        str(disk / "checkpoints" / "new"): "inside its checkpoints",
        str(other): "is a non-empty directory that is not an mlcd export",
        str(foreign): "is a non-empty directory that is not an mlcd export",
    }
    for out, reason in refused.items():
        assert export.main(["--workdir", workdir, "--out", out]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and err.count("\n") == 1, err
        assert reason in err, err
    assert _snapshot(tmp_path) == before

    # An empty directory, a directory inside the run, and an earlier export are fine.
    (tmp_path / "empty").mkdir()
    for out in (str(tmp_path / "empty"), os.path.join(workdir, "export"), str(tmp_path / "empty")):
        assert export.main(["--workdir", workdir, "--out", out]) == 0, capsys.readouterr().err
        assert runs.read_export_meta(out)["step"] == 4
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_failed_or_killed_exports_leave_no_temporary_copy(run, tmp_path, monkeypatch):
    workdir, _ = run
    out = str(tmp_path / "export")
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    alive = f"{out}.tmp-{os.getppid()}"  # a live process's export in progress: left alone
    # Named after this process: a killed export's, from a container restarted with the same
    # pid; it used to make this export fail (FileExistsError) for as long as it was there.
    for path in (f"{out}.tmp-{dead}", alive, f"{out}.tmp-{os.getpid()}"):
        os.makedirs(os.path.join(path, "params"))

    def fail(*args):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(export, "_write", fail)
        with pytest.raises(OSError, match="disk full"):
            export.export(workdir, out)
    assert os.listdir(tmp_path) == [os.path.basename(alive)]

    # Killed between moving the earlier export aside and renaming the new one in: the earlier
    # export is put back; with an export in place, such a leftover is only removed.
    export.export(workdir, out, step=2)
    os.replace(out, f"{out}.tmp-{dead}-old")
    export.remove_stale_temporaries(out)
    assert runs.read_export_meta(out)["step"] == 2
    os.makedirs(f"{out}.tmp-{dead}-old")
    export.remove_stale_temporaries(out)
    assert sorted(os.listdir(tmp_path)) == sorted(["export", os.path.basename(alive)])

    # The new export cannot be renamed in: the earlier one is put back, nothing is left over.
    replace = os.replace

    def failing_rename(src, dst):
        if src.endswith(f".tmp-{os.getpid()}"):
            raise OSError(f"cannot rename {src}")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_rename)
    with pytest.raises(OSError, match="cannot rename"):
        export.export(workdir, out)
    assert runs.read_export_meta(out)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["export", os.path.basename(alive)])
