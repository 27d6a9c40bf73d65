"""Chaos test of the trainer: random faults, then resume with the same command, then compare.

    python bench/chaos.py --faults 20 [--preset clip|mlcd] [--seed 0] [--out /tmp/chaos]

Runs a tiny preset (shortened: `--steps` steps of batch 32 on a small synthetic_scenes build, a
checkpoint every 10 steps, a log record every 5) once without faults as the reference, then
`--faults` times with one random fault each, re-running the same command after the fault until
the run finishes. Each finished run must equal the reference bit for bit: params and optimizer
state of the last checkpoint, and every metrics.jsonl record (timing excluded).

Presets: clip (configs/clip.py:tiny) and mlcd (configs/mlcd.py:tiny). MLCD needs cluster
labels: a CLIP run of the same length is the teacher, `python -m mlcd.cluster` (configs/
cluster.py:tiny) clusters the train split into 64 centers, and the MLCD runs train on those
labels (joined from memory-mapped label files) with 8 devices (`--devices`), so the centers
and their optimizer moments are sharded 8 ways. The params compared include the centers.

Faults:
  sigkill           SIGKILL at a random moment (some land during an asynchronous save)
  sigterm           SIGTERM (preemption) at a random moment: the run checkpoints and exits 143
  corrupt_ckpt      SIGKILL, then bytes flipped in an array file of the latest checkpoint: the
                    resume falls back to the previous checkpoint
  corrupt_shard     bytes flipped in the train shard, then SIGKILL: compared with a reference
                    run on the same damaged data (its unreadable records dropped and counted)

Prints one table (fault, count, identical) and ends with `chaos: K/N identical`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = ("sigkill", "sigterm", "corrupt_ckpt", "corrupt_shard")
BUILD = {"train_size": 2048, "validation_size": 64, "test_size": 256, "image_size": 32}
PRESETS = {"clip": "configs/clip.py:tiny", "mlcd": "configs/mlcd.py:tiny"}
MLCD_CENTERS = 64  # divisible by the 8 devices the centers are sharded over


def overrides(data_dir: str, steps: int) -> list[str]:
    values = {
        "data.data_dir": data_dir,
        **{f"data.build.{k}": v for k, v in BUILD.items()},
        "pp.image_size": 32,
        "batch_size": 32,
        "total_steps": steps,
        "log_every": 5,
        "ckpt_every": 10,
        "eval_every": 0,
        "optim.warmup_steps": 10,
        **{f"evals.{k}.every": -1 for k in ("fewshot", "linear_probe", "digits", "grounding")},
        "evals.image_retrieval.every": -1,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def mlcd_overrides(labels: str) -> list[str]:
    """The MLCD preset's labels and centers, and all its evaluators off (its own list: it has
    no text tower, hence none of the image-text evaluators `overrides` names)."""
    sys.path.insert(0, ROOT)
    from configs import common

    evals = common.load_config(os.path.join(ROOT, PRESETS["mlcd"])).evals
    values = {
        "objective.labels": labels,
        "objective.centers_init": os.path.join(labels, "centroids.npy"),
        "objective.num_centers": MLCD_CENTERS,
        **{f"evals.{k}.every": -1 for k in evals},
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def command(
    data_dir: str, workdir: str, steps: int, preset: str = "clip", labels: str | None = None
) -> list[str]:
    args = overrides(data_dir, steps)
    if preset == "mlcd":
        args = [a for a in args if not a.startswith("--config.evals.")] + mlcd_overrides(labels)
    return [
        sys.executable,
        "-m",
        "mlcd.train",
        "--config",
        PRESETS[preset],
        "--workdir",
        workdir,
        *args,
    ]


def cluster_command(data_dir: str, teacher: str, out_dir: str) -> list[str]:
    """k-means labels for MLCD from a CLIP run's image embeddings of the train split."""
    values = {
        "teacher.workdir": teacher,
        "data.data_dir": data_dir,
        **{f"data.build.{k}": v for k, v in BUILD.items()},
        "out_dir": out_dir,
        "kmeans.num_centers": MLCD_CENTERS,
        "verbose": False,
    }
    return [
        sys.executable,
        "-m",
        "mlcd.cluster",
        "--config",
        "configs/cluster.py:tiny",
        *(f"--config.{k}={v}" for k, v in values.items()),
    ]


def run(
    cmd: list[str], kill_after: float | None = None, sig=signal.SIGKILL, after_checkpoints=0
) -> int:
    """Runs cmd (stdout/stderr to files beside its workdir); with kill_after, sends `sig`
    that many seconds after `after_checkpoints` checkpoints are on disk, unless it ended first.
    Returns the exit status."""
    workdir = cmd[cmd.index("--workdir") + 1]
    with open(workdir + ".log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
        if kill_after is not None:
            while proc.poll() is None and len(steps(workdir)) < after_checkpoints:
                time.sleep(0.05)
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        return proc.wait()


def flip_bytes(path: str, rng: random.Random, count: int = 64) -> None:
    """Inverts `count` bytes in the middle half of a file."""
    size = os.path.getsize(path)
    at = rng.randrange(size // 4, max(size // 4 + 1, 3 * size // 4 - count))
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(count)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def steps(workdir: str) -> list[int]:
    """The complete checkpoints of a run (orbax renames a step's directory into place last)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def array_files(step_dir: str) -> list[str]:
    """The data files of a checkpoint's arrays (ocdbt/zarr chunks), largest first."""
    files = [
        os.path.join(d, f)
        for d, _, names in os.walk(os.path.join(step_dir, "state"))
        for f in names
        if not f.startswith("_") and not f.endswith(".json")
    ]
    return sorted(files, key=os.path.getsize, reverse=True)


def final_state(workdir: str, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    import jax

    return [np.asarray(x) for x in jax.tree.leaves({k: state[k] for k in ("params", "opt_state")})]


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in rows]


def identical(a: str, b: str, steps: int) -> bool:
    same_state = all(
        np.array_equal(x, y, equal_nan=True)
        for x, y in zip(final_state(a, steps), final_state(b, steps), strict=True)
    )
    return same_state and records(a) == records(b)


def outcome(workdir: str, rc: int) -> str:
    """What a fault hit: the run's exit status, its preemption message, the checkpoints left."""
    with open(workdir + ".log", errors="replace") as f:
        preempted = [line for line in f if line.startswith("preempted (SIGTERM)")]
    said = f": {preempted[-1].split(';')[0]}" if preempted else ""
    return f"exit {rc}{said}; checkpoints {steps(workdir)}"


def finish(cmd: list[str], limit: int = 5) -> bool:
    """Re-runs the same command until it exits 0 (at most `limit` times)."""
    return any(run(cmd) == 0 for _ in range(limit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="/tmp/mlcd_chaos")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="clip")
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="fake CPU devices per run (XLA_FLAGS); default 8 for mlcd, as inherited for clip",
    )
    args = parser.parse_args()
    devices = args.devices or (8 if args.preset == "mlcd" else None)
    if devices:
        # Before jax is imported here (final_state): this process restores the runs' checkpoints.
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    data, damaged = os.path.join(args.out, "data"), os.path.join(args.out, "data_damaged")

    labels = None
    if args.preset == "mlcd":
        teacher, labels = os.path.join(args.out, "teacher"), os.path.join(args.out, "clusters")
        assert run(command(data, teacher, args.steps)) == 0, f"teacher run failed: {teacher}.log"
        with open(labels + ".log", "w") as log:
            clustered = subprocess.run(
                cluster_command(data, teacher, labels), cwd=ROOT, stdout=log, stderr=log
            )
        assert clustered.returncode == 0, f"clustering failed: {labels}.log"
    command_for = lambda data_dir, workdir: command(
        data_dir, workdir, args.steps, args.preset, labels
    )

    ref = os.path.join(args.out, "ref")
    assert run(command_for(data, ref)) == 0, f"reference run failed: {ref}.log"
    shutil.copytree(data, damaged)
    (shard,) = [
        os.path.join(d, f) for d, _, fs in os.walk(damaged) for f in fs if "train.array_record" in f
    ]
    flip_bytes(shard, rng)
    ref_damaged = os.path.join(args.out, "ref_damaged")
    t0 = time.perf_counter()  # a run on a built dataset: the span faults are drawn from
    assert run(command_for(damaged, ref_damaged)) == 0, f"see {ref_damaged}.log"
    run_s = time.perf_counter() - t0

    results: dict[str, list[bool]] = {f: [] for f in FAULTS}
    for i in range(args.faults):
        fault = FAULTS[i % len(FAULTS)]
        workdir = os.path.join(args.out, f"{i:02d}_{fault}")
        source, reference = (damaged, ref_damaged) if fault == "corrupt_shard" else (data, ref)
        cmd = command_for(source, workdir)
        if fault == "corrupt_ckpt":
            # Two checkpoints on disk (the older one to fall back to), then SIGKILL, then the
            # newest is damaged.
            rc = run(cmd, rng.uniform(0.0, 0.3) * run_s, signal.SIGKILL, after_checkpoints=2)
            hit = outcome(workdir, rc)
            flip_bytes(
                array_files(os.path.join(workdir, "checkpoints", str(steps(workdir)[-1])))[0], rng
            )
        else:
            sig = signal.SIGTERM if fault == "sigterm" else signal.SIGKILL
            hit = outcome(workdir, run(cmd, rng.uniform(0.2, 0.9) * run_s, sig))
        ok = finish(cmd) and identical(workdir, reference, args.steps)
        results[fault].append(ok)
        verdict = "identical" if ok else "DIFFERENT: " + workdir
        print(f"{i:2d} {fault:<14} {verdict}  ({hit})", flush=True)

    print(f"\n{args.preset}, {args.faults} faults, {time.perf_counter() - t_start:.0f} s in all")
    print("| fault | count | identical |\n|---|---:|---:|")
    for fault, oks in results.items():
        print(f"| {fault} | {len(oks)} | {sum(oks)}/{len(oks)} |")
    total = sum(len(v) for v in results.values())
    good = sum(sum(v) for v in results.values())
    print(f"chaos: {good}/{total} identical")


if __name__ == "__main__":
    main()
