"""The trainer end to end: every tiny config trains, bad input is rejected with a message that
names it, and a SIGKILLed run resumes to exactly the result of an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_overrides
from mlcd_fakes import dataset_ids, mlcd_overrides, random_cluster_output

import mlcd
from configs import common
from mlcd import export, runs, train
from mlcd.metrics_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [f"configs/{name}.py:tiny" for name in ("clip", "align", "siglip")]


def _config(spec, overrides):
    config = common.load_config(os.path.join(ROOT, spec))
    common.parse_overrides(config, overrides)
    return config


@pytest.mark.parametrize("spec", TINY)
def test_tiny_config_trains_two_steps(spec, scenes_dir, tmp_path):
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(_config(spec, tiny_overrides(scenes_dir)), workdir)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    for key in (
        "zeroshot/shape/top1",
        "zeroshot/color/top1",
        "retrieval/test/i2t_r1",
        "retrieval/test/t2i_r10",
    ):
        assert 0.0 <= final[key] <= 1.0, key
    assert records[-1]["step"] == 2 and "zeroshot/color/top1" in records[-1]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    for name in ("config.json", "curves.png", "tensorboard"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["objective"]["name"] == _config(spec, []).objective.name


def test_mlcd_tiny_trains_two_steps_and_exports_an_image_encoder(
    scenes_builder, scenes_dir, tmp_path
):
    labels_dir = random_cluster_output(
        str(tmp_path / "clusters"), dataset_ids(scenes_builder), 256, 8, 128
    )
    workdir = str(tmp_path / "run")
    config = _config("configs/mlcd.py:tiny", mlcd_overrides(scenes_dir, labels_dir))
    train.train_and_evaluate(config, workdir)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train_records = [r for r in records if "train/loss" in r]
    assert len(train_records) == 2
    for r in train_records:
        assert np.isfinite(r["train/loss"])
        np.testing.assert_allclose(r["train/loss"], r["train/pos_loss"] + r["train/neg_loss"])
        assert r["train/num_negatives"] == 256 - 8  # r = 1: every class but the 8 positives

    out = export.export(workdir, str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["export.json", "params"]  # no tokenizer: image-only
    meta = runs.read_export_meta(out)
    assert meta["model"] == runs.load_run_config(workdir).model.to_dict()
    saved = ocp.StandardCheckpointer().metadata(os.path.join(out, "params")).item_metadata
    assert sorted(saved) == ["image"]  # the centers head is training-only: not exported
    encoder = mlcd.load_encoder(out)
    emb = encoder.embed_images(np.zeros((3, 32, 32, 3), np.uint8))["embedding"]
    assert emb.shape == (3, 128)
    with pytest.raises(ValueError, match="no text tower"):
        encoder.embed_texts(["a red circle"])


def _run_main(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlcd.train", *args],
        cwd=ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    return env


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--config.optim.lrr=1"],
            "--config.optim.lrr: unknown config key. Did you mean: optim.lr",
        ),
        (["--config.mesh=(('data', 3), ('model', -1))"], "config.mesh="),
        (["--config.batch_size=12"], "config.batch_size=12 is not divisible by the 8 devices"),
        (["--config.data.name=mnist"], "mnist"),
    ],
)
def test_bad_input_stops_with_a_message(extra, message, scenes_dir, tmp_path):
    base = tiny_overrides(scenes_dir)
    if extra[0].startswith("--config.data.name"):
        base = [a for a in base if not a.startswith("--config.data.build")]
        extra = [*extra, f"--config.data.data_dir={tmp_path / 'empty'}"]
    r = _run_main(
        ["--config", "configs/clip.py:tiny", "--workdir", str(tmp_path / "w"), *base, *extra]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def _final_params(workdir, step):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state["params"]


def test_sigkill_then_resume_matches_uninterrupted_run(scenes_dir, tmp_path):
    steps = 120
    args = [
        "--config",
        "configs/clip.py:tiny",
        *tiny_overrides(
            scenes_dir, total_steps=steps, ckpt_every=10, log_every=10, **{"optim.warmup_steps": 10}
        ),
    ]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    ref = _run_main([*args, "--workdir", ref_dir])
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Start the same run, SIGKILL it as soon as its first checkpoint is complete on disk.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlcd.train", *args, "--workdir", run_dir],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_ckpt = os.path.join(run_dir, "checkpoints", "10")
    deadline = time.time() + 300
    while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = [int(d) for d in os.listdir(os.path.dirname(first_ckpt)) if d.isdigit()]
    assert max(steps_done) < steps, "the run finished before it could be killed"

    resumed = _run_main([*args, "--workdir", run_dir])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ref_params, run_params = _final_params(ref_dir, steps), _final_params(run_dir, steps)
    for a, b in zip(_leaves(ref_params), _leaves(run_params), strict=True):
        np.testing.assert_array_equal(a, b)
    ref_metrics = read_metrics(os.path.join(ref_dir, "metrics.jsonl"))
    run_metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    drop = ("train/images_per_sec",)
    clean = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
    assert clean(run_metrics) == clean(ref_metrics)
    losses = [r["train/loss"] for r in ref_metrics if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses  # and it actually learns


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_two_process_run(scenes_dir, tmp_path):
    """Two local processes x 4 CPU devices form one 8-device mesh (jax.distributed + gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "mh")
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlcd.train",
                "--config",
                "configs/clip.py:tiny",
                "--workdir",
                workdir,
                *tiny_overrides(scenes_dir),
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "Finished at step 2" in outs[0][0] and "Finished" not in outs[1][0]  # host 0 reports
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))  # written once, by host 0
    assert 0.0 <= records[-1]["retrieval/test/i2t_r1"] <= 1.0
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
