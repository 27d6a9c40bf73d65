"""The trainer end to end: every tiny config trains, bad input is rejected with a message that
names it, and a SIGKILLed run resumes to exactly the result of an uninterrupted one."""

import json
import os
import re
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


@pytest.mark.parametrize(
    ("extra", "workdir", "message"),
    [
        (["--config.log_every=0"], "w", "error: config.log_every=0 must be a positive integer"),
        (["--config.ckpt_every=0"], "w", "error: config.ckpt_every=0 must be a positive integer"),
        (["--config.mesh=(('data', 8, 1),)"], "w", "must be a (name, size) pair"),
        ([], "a_file", "File exists"),
        ([], "/proc/mlcd_test/w", "/proc/mlcd_test"),
    ],
)
def test_bad_loop_settings_and_workdirs_are_one_line_errors(
    extra, workdir, message, scenes_dir, tmp_path, capsys
):
    """Caught before anything is compiled or created: exit status 2 and one line naming the
    key or path (these used to be ZeroDivisionError, 'too many values to unpack', a
    traceback and 'error: 2')."""
    (tmp_path / "a_file").write_text("not a directory")
    if not workdir.startswith("/"):
        workdir = str(tmp_path / workdir)
    args = ["--config", "configs/clip.py:tiny", "--workdir", workdir, *tiny_overrides(scenes_dir)]
    assert train.main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "w")


def test_divergence_is_skipped_then_stops_and_checkpoints_stay_finite(scenes_dir, tmp_path):
    """lr = 1e6 makes the loss NaN within a few steps. Those steps leave the state unchanged
    (train/nonfinite = 1), the run stops after nonfinite.max_consecutive of them naming the
    first, and every checkpoint, including the last one retention keeps, is finite."""
    overrides = tiny_overrides(
        scenes_dir,
        total_steps=40,
        log_every=1,
        ckpt_every=2,
        **{"optim.lr": 1e6, "optim.warmup_steps": 1, "nonfinite.max_consecutive": 3},
    )
    workdir = str(tmp_path / "run")
    with pytest.raises(train.Diverged, match=r"not finite at 3 steps in a row from step (\d+)"):
        train.train_and_evaluate(_config("configs/clip.py:tiny", overrides), workdir)
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    flags = [r["train/nonfinite"] for r in records]
    assert flags[-3:] == [1.0, 1.0, 1.0] and 0.0 in flags, flags
    assert not all(np.isfinite([r["train/loss"] for r in records]))
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert len(steps) == 2  # keep_ckpts
    for step in steps:
        assert all(np.all(np.isfinite(x)) for x in _leaves(_final_state(workdir, step))), step


def test_resume_with_another_config_is_refused_naming_the_keys(scenes_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config("configs/clip.py:tiny", tiny_overrides(scenes_dir)), workdir)
    config_json = (tmp_path / "run" / "config.json").read_text()
    changed = tiny_overrides(scenes_dir, total_steps=3, **{"optim.lr": 0.5, "model.embed_dim": 64})
    message = (
        r"run was trained with another config: config.model.embed_dim=64 \(was 128\); "
        r"config.optim.lr=0.5 \(was 0.001\); config.total_steps=3 \(was 2\)\. .*"
        r"--allow_config_change=model.embed_dim,optim.lr,total_steps"
    )
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(_config("configs/clip.py:tiny", changed), workdir)
    assert (tmp_path / "run" / "config.json").read_text() == config_json  # untouched
    # Changes that do not alter results pass; an explicitly allowed one too.
    safe = tiny_overrides(scenes_dir, total_steps=3, log_every=3, keep_ckpts=3)
    final = train.train_and_evaluate(
        _config("configs/clip.py:tiny", safe), workdir, allow_config_change=("total_steps",)
    )
    assert "zeroshot/color/top1" in final
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 3


def _interrupt(args, run_dir, sig, first_ckpt_step=10):
    """Starts the run, sends `sig` as soon as its first checkpoint (`first_ckpt_step`) is on
    disk, waits; returns the exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlcd.train", *args, "--workdir", run_dir],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_ckpt = os.path.join(run_dir, "checkpoints", str(first_ckpt_step))
    deadline = time.time() + 300
    while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_sigkill_or_sigterm_then_resume_matches_uninterrupted_run(scenes_dir, tmp_path):
    """SIGKILL loses at most the steps since the last checkpoint, SIGTERM (preemption)
    checkpoints the step it arrives at and exits with PREEMPTED_EXIT; either way the same
    command resumes to exactly the uninterrupted run: params, optimizer state and every
    metrics.jsonl record (log_every does not divide ckpt_every, so a resume starts between two
    log records)."""
    steps = 120
    args = [
        "--config",
        "configs/clip.py:tiny",
        *tiny_overrides(
            scenes_dir, total_steps=steps, ckpt_every=10, log_every=4, **{"optim.warmup_steps": 10}
        ),
    ]
    ref_dir = str(tmp_path / "ref")
    ref = _run_main([*args, "--workdir", ref_dir])
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_state = _final_state(ref_dir, steps)
    ref_metrics = read_metrics(os.path.join(ref_dir, "metrics.jsonl"))

    for sig, want_rc in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, train.PREEMPTED_EXIT)):
        run_dir = str(tmp_path / sig.name)
        rc, err = _interrupt(args, run_dir, sig)
        assert rc == want_rc, err[-3000:]
        steps_done = [
            int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()
        ]
        assert max(steps_done) < steps, "the run finished before it could be interrupted"
        if sig == signal.SIGTERM:
            assert "preempted (SIGTERM) at step" in err and "re-run the same command" in err

        resumed = _run_main([*args, "--workdir", run_dir])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        for a, b in zip(_leaves(ref_state), _leaves(_final_state(run_dir, steps)), strict=True):
            np.testing.assert_array_equal(a, b)
        run_metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        assert _without_timing(run_metrics) == _without_timing(ref_metrics), sig.name
    losses = [r["train/loss"] for r in ref_metrics if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses  # and it actually learns


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in records]


def _final_state(workdir, step):
    """params and opt_state of a run's checkpoint, on one device (whatever the processes and
    devices that wrote it: orbax needs a target to restore another topology's checkpoint)."""
    import jax

    mngr = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mngr.item_metadata(step)["state"],
    )
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return {k: restored.state[k] for k in ("params", "opt_state")}


def _assert_same_run(run_dir, ref_dir, steps):
    """Bit for bit the same params and optimizer state at `steps`, and the same metrics.jsonl
    records (timing excluded)."""
    import jax

    ref = jax.tree_util.tree_flatten_with_path(_final_state(ref_dir, steps))[0]
    got = jax.tree_util.tree_flatten_with_path(_final_state(run_dir, steps))[0]
    assert [p for p, _ in got] == [p for p, _ in ref]
    for (path, a), (_, b) in zip(got, ref, strict=True):
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path)
        )
    run_metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    ref_metrics = read_metrics(os.path.join(ref_dir, "metrics.jsonl"))
    assert _without_timing(run_metrics) == _without_timing(ref_metrics)
    return [jax.tree_util.keystr(p) for p, _ in ref]


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


def test_sigterm_during_start_up_exits_143_and_leaves_nothing_behind(tmp_path):
    """SIGTERM before the first step (here while the dataset is being generated, the longest
    start-up phase) used to take the default action: rc -15, no message. It is a preemption
    like any other: exit status PREEMPTED_EXIT at once, with nothing to save, and the data
    build's temporary directory removed (a later run builds the data again)."""
    data_dir = tmp_path / "data"
    build = {"train_size": 1500, "validation_size": 16, "test_size": 16, "image_size": 16}
    overrides = tiny_overrides(str(data_dir), **{f"data.build.{k}": v for k, v in build.items()})
    run_dir = tmp_path / "run"
    args = ["--config", "configs/clip.py:tiny", *overrides, "--workdir", str(run_dir)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlcd.train", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    generating = lambda: list(data_dir.glob("synthetic_scenes/*/incomplete.*"))
    deadline = time.time() + 300
    while not generating() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the data build started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == train.PREEMPTED_EXIT, err[-3000:]
    assert "preempted (SIGTERM) during start-up, before the first step: nothing to save" in err
    assert "Traceback" not in err, err[-3000:]
    assert generating() == []
    assert not (run_dir / "checkpoints").exists() or not os.listdir(run_dir / "checkpoints")


def _two_process_commands(args, workdir):
    """(command, env) of two local processes x 4 CPU devices that form one 8-device mesh
    (jax.distributed + gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    distributed = [
        "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2",
    ]
    return [
        (
            [
                sys.executable,
                "-m",
                "mlcd.train",
                *args,
                "--workdir",
                workdir,
                *distributed,
                f"--config.distributed.process_id={i}",
            ],
            env,
        )
        for i in range(2)
    ]


def _mlcd_args(scenes_builder, scenes_dir, tmp_path, **extra):
    """configs/mlcd.py:tiny on SMALL_SCENES with random labels of 256 centers (sharded over
    the 8 devices with their optimizer moments) joined from memory-mapped label files."""
    labels_dir = random_cluster_output(
        str(tmp_path / "clusters"), dataset_ids(scenes_builder), 256, 8, 128
    )
    return ["--config", "configs/mlcd.py:tiny", *mlcd_overrides(scenes_dir, labels_dir, **extra)]


def test_mlcd_run_sigkilled_then_resumed_matches_uninterrupted_run(
    scenes_builder, scenes_dir, tmp_path
):
    """An MLCD run SIGKILLed after its first checkpoint resumes bit for bit: params (the
    encoder and the sharded centers), optimizer state, the label join's position and every
    metrics.jsonl record. The reference and the resume run in this process (cheaper), the
    killed run in its own."""
    steps = 12
    args = _mlcd_args(
        scenes_builder,
        scenes_dir,
        tmp_path,
        total_steps=steps,
        ckpt_every=3,
        log_every=2,
        **{"optim.warmup_steps": 2},
    )
    config = lambda: _config(args[1], args[2:])
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    train.train_and_evaluate(config(), ref_dir)

    rc, err = _interrupt(args, run_dir, signal.SIGKILL, first_ckpt_step=3)
    assert rc == -signal.SIGKILL, err[-3000:]
    done = [int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()]
    assert max(done) < steps, "the run finished before it could be killed"
    train.train_and_evaluate(config(), run_dir)
    paths = _assert_same_run(run_dir, ref_dir, steps)
    assert "['params']['heads']['centers']" in paths
    assert "['opt_state'][1][0]['mu']['heads']['centers']" in paths


def test_two_process_mlcd_run_preempted_on_one_host_resumes_exactly(
    scenes_builder, scenes_dir, tmp_path
):
    """SIGTERM to one of the two processes of a run: the hosts agree at the next log step,
    both checkpoint it and exit with PREEMPTED_EXIT, and the relaunch equals an uninterrupted
    2-process run bit for bit. (A 1-process run is not a reference: each host reads its own
    part of the data, so the batches differ.)"""
    steps = 14
    args = _mlcd_args(
        scenes_builder,
        scenes_dir,
        tmp_path,
        total_steps=steps,
        ckpt_every=3,
        log_every=2,
        **{"optim.warmup_steps": 2},
    )
    launches = []

    def start(workdir):
        """The two processes, their stderr to files (a full pipe would block one of them while
        the other waits for it in a collective)."""
        logs = [str(tmp_path / f"launch{len(launches)}_{i}.log") for i in range(2)]
        with open(logs[0], "w") as err0, open(logs[1], "w") as err1:
            procs = [
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
                for (cmd, env), err in zip(_two_process_commands(args, workdir), (err0, err1))
            ]
        launches.append(procs)
        return procs

    def finish(procs):
        """Exit statuses and the stderr of both processes."""
        codes = [p.wait(timeout=600) for p in procs]
        i = launches.index(procs)
        errs = [(tmp_path / f"launch{i}_{j}.log").read_text() for j in range(2)]
        return codes, errs

    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    codes, errs = finish(start(ref_dir))
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]

    procs = start(run_dir)
    first_ckpt = os.path.join(run_dir, "checkpoints", "3")
    deadline = time.time() + 300
    while not os.path.isdir(first_ckpt) and procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # host 1 only: host 0 learns of it at the log step
    codes, errs = finish(procs)
    assert codes == [train.PREEMPTED_EXIT] * 2, errs[0][-2000:] + errs[1][-2000:]
    for err in errs:
        assert "preempted (SIGTERM) at step" in err and "re-run the same command" in err
    done = [int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()]
    assert max(done) < steps, "the run finished before it could be preempted"

    codes, errs = finish(start(run_dir))
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    _assert_same_run(run_dir, ref_dir, steps)


def test_an_unreadable_config_json_is_named(tmp_path):
    """A torn or emptied config.json (a crash or a concurrent write used to leave one: now it
    is replaced atomically) is an error naming the file, not JSON's bare 'Expecting value'."""
    path = tmp_path / "config.json"
    path.write_text("")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a config \(invalid JSON"):
        train.check_resume_config(str(path), _config("configs/clip.py:tiny", []))
