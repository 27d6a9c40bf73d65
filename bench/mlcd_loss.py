"""Benchmark of mlcd_loss (forward + backward) on 8 fake CPU devices against a naive version,
and of MOFI's entity_classification_loss at its target size.

    python bench/mlcd_loss.py                      # the sweep below, one subprocess per run
    python bench/mlcd_loss.py --one sharded 1048576 --ratio 0.1   # a single run, JSON out
    python bench/mlcd_loss.py --one entity 2097152 --ratio 0.1    # MOFI's classifier, JSON out

Runs, at batch 1,024 and dimension 512 (ArcFace, s = 64, m = 0.3, l = 8 labels per image):
- sharded: `mlcd.losses.mlcd_loss` under `jax.set_mesh` on 8 fake CPU devices (Partial-FC
  layout, centers [C, D] split along C), with sample_ratio 0.1 and 1.0;
- naive: one device, no mesh, no sampling, the formula written densely: normalised copies of
  all centers, full [B, C] cosines and masks (what the loss looks like without sharding);
- entity: `mlcd.losses.entity_classification_loss` (MOFI's entity classifier: softmax with a
  uniform target over each image's l = 8 entities, s = 32, no margin) under `jax.set_mesh` on 8
  fake CPU devices, weights [C, D] split along C, at C = 1M and 2M entities (--entity_sizes) with
  sample_ratio --ratio: the same Partial-FC layout as the sharded MLCD runs (2M is MOFI's
  entity count, twice MLCD's 1M centers).
Each run is a fresh subprocess; its peak resident memory (VmHWM) is taken over the timed steps
only (reset after generating the inputs, compiling and one warm-up step). Naive runs
stop at the first C whose predicted peak (linear in C from the previous two runs) exceeds
--naive_budget_gib: the machine is shared, and the naive version's memory is O(B * C).

The fake devices share the machine's cores: per-step times compare the amount of work, not a
multi-device speed-up. Per-device temp memory comes from XLA's memory analysis of the compiled
step (the SPMD program is per device); "args + out" is the compiled step's per-device inputs
and outputs (its shard of the centers / weights and of their gradient, dominant at large C).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import contextlib
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlcd.losses import entity_classification_loss, mlcd_loss
from mlcd.losses.mlcd import MARGINS
from mlcd.partial_fc import num_sampled
from mlcd.sharding import make_mesh

SCALE, MARGIN, NUM_LABELS = 64.0, 0.3, 8
ENTITY_SCALE, ENTITY_MARGIN = 32.0, 0.0  # entity_classification_loss's defaults
KINDS = ("sharded", "naive", "entity")  # entity: entity_classification_loss, sharded
GIB = 2.0**30


def naive_loss(emb, centers, labels):
    """The MLCD formula with r = 1 on one device: full [B, C] cosines, dense masks."""
    e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    c = centers / jnp.linalg.norm(centers, axis=1, keepdims=True)  # a normalised copy [C, D]
    cos = e @ c.T  # [B, C]
    rows = jnp.arange(labels.shape[0])[:, None]
    pos = jnp.zeros(cos.shape, bool).at[rows, labels].set(True)  # [B, C]
    z_pos = SCALE * MARGINS["arcface"](cos, MARGIN)
    pos_term = jax.nn.softplus(jax.nn.logsumexp(jnp.where(pos, -z_pos, -jnp.inf), axis=1))
    neg_term = jax.nn.softplus(jax.nn.logsumexp(jnp.where(pos, -jnp.inf, SCALE * cos), axis=1))
    return jnp.mean(pos_term + neg_term)


def _rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or the last _reset_peak) of this process, GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Restarts VmHWM from the current RSS (Linux >= 4.0), so that generating the inputs and
    compiling do not count towards the peak of the timed steps."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(kind: str, num_classes: int, batch: int, dim: int, ratio: float, steps: int) -> dict:
    """Times `steps` forward + backward steps (after one compile + warm-up step)."""
    mesh = make_mesh((("data", -1), ("model", 1))) if kind != "naive" else None
    spec = NamedSharding(mesh, P(mesh.axis_names)) if mesh else None
    k_emb, k_centers, k_labels = jax.random.split(jax.random.key(0), 3)

    # Inputs are generated on the devices, already sharded: no host copy of the 2 GiB centers.
    def make(fn, key, shape):
        return jax.jit(lambda k: fn(k, shape), out_shardings=spec)(key)

    emb = make(jax.random.normal, k_emb, (batch, dim))
    centers = make(jax.random.normal, k_centers, (num_classes, dim))
    labels = make(
        lambda k, s: jax.random.randint(k, s, 0, num_classes, jnp.int32),
        k_labels,
        (batch, NUM_LABELS),
    )
    jax.block_until_ready((emb, centers, labels))

    if kind == "sharded":

        def loss(e, c, y, key):
            return mlcd_loss(e, c, y, scale=SCALE, margin=MARGIN, sample_ratio=ratio, rng=key)

    elif kind == "entity":

        def loss(e, c, y, key):
            return entity_classification_loss(
                e, c, y, scale=ENTITY_SCALE, margin=ENTITY_MARGIN, sample_ratio=ratio, rng=key
            )

    else:

        def loss(e, c, y, key):
            del key
            return naive_loss(e, c, y)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    keys = jax.random.split(jax.random.key(1), steps + 1)
    with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
        t0 = time.perf_counter()
        compiled = step.lower(emb, centers, labels, keys[0]).compile()
        mem = compiled.memory_analysis()
        value, grads = compiled(emb, centers, labels, keys[0])
        jax.block_until_ready((value, grads))
        warmup_s = time.perf_counter() - t0
        del grads
        rss_before = _rss_gib("VmRSS")
        _reset_peak()
        times = []
        for key in keys[1:]:
            t = time.perf_counter()
            value, grads = compiled(emb, centers, labels, key)
            jax.block_until_ready((value, grads))
            times.append(time.perf_counter() - t)
            del grads
    if not np.isfinite(float(value)):
        raise RuntimeError(f"non-finite loss {float(value)}")
    return dict(
        kind=kind,
        num_classes=num_classes,
        ratio=ratio if kind != "naive" else 1.0,
        devices=mesh.size if mesh else 1,
        loss=float(value),
        warmup_s=warmup_s,
        step_s=float(np.median(times)),
        step_s_min=float(min(times)),
        rss_before_gib=rss_before,
        peak_gib=_rss_gib("VmHWM"),
        temp_gib_per_device=getattr(mem, "temp_size_in_bytes", 0) / GIB,
        # Per device: its inputs (its shard of the centers / weights and of the batch) and
        # outputs (the loss and its shard of both gradients) of the compiled step.
        args_gib_per_device=getattr(mem, "argument_size_in_bytes", 0) / GIB,
        out_gib_per_device=getattr(mem, "output_size_in_bytes", 0) / GIB,
    )


def counted_gflop(result: dict, batch: int, dim: int) -> float:
    """Matmul FLOPs of one forward + backward step: 3 products of B x columns x D (scores,
    d/dfeatures, d/dcenters), columns = sampled classes over all devices (C when r = 1)."""
    columns = result["num_classes"]
    if result["ratio"] < 1:
        num_local = result["num_classes"] // result["devices"]
        columns = result["devices"] * num_sampled(num_local, result["ratio"])
    return 6 * batch * columns * dim / 1e9


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps GFLOP/s of a float32 n x n matmul on one device: the machine's ceiling now."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _spawn(kind: str, num_classes: int, args, ratio: float) -> dict:
    """run_one in a fresh process (clean peak memory); the naive one sees a single device."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={1 if kind == 'naive' else 8}"
    cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, str(num_classes)]
    cmd += [f"--batch={args.batch}", f"--dim={args.dim}", f"--ratio={ratio}"]
    cmd += [f"--steps={args.steps}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["gflop"] = counted_gflop(result, args.batch, args.dim)
    print(
        f"  {kind:8s} r={result['ratio']:<4} C={num_classes:>9,}: {result['step_s']:.2f} s/step, "
        f"peak {result['peak_gib']:.2f} GiB",
        flush=True,
    )
    return result


def _table(results: list[dict], dim: int) -> str:
    head = (
        "| version | devices | r | C | step (median) | GFLOP/step | GFLOP/s | compile + 1st step "
        "| RSS before steps | peak RSS in steps | centers + grad | XLA args + out / device "
        "| XLA temp / device |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        tensors = 2 * r["num_classes"] * dim * 4 / GIB
        lines.append(
            f"| {r['kind']} | {r['devices']} | {r['ratio']} | {r['num_classes']:,} | "
            f"{r['step_s']:.2f} s | {r['gflop']:.0f} | {r['gflop'] / r['step_s']:.0f} | "
            f"{r['warmup_s']:.1f} s | {r['rss_before_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | "
            f"{tensors:.2f} GiB | "
            f"{r['args_gib_per_device'] + r['out_gib_per_device']:.3f} GiB | "
            f"{r['temp_gib_per_device']:.3f} GiB |"
        )
    return "\n".join(lines)


def _uptime() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def sweep(args) -> None:
    print(f"{_uptime()}; matmul ceiling {matmul_gflops():.0f} GFLOP/s", flush=True)
    results = [_spawn("sharded", c, args, args.ratio) for c in _sizes(args.sizes)]
    results += [_spawn("sharded", c, args, 1.0) for c in _sizes(args.full_sizes)]
    naive = []
    for c in _sizes(args.naive_sizes):
        if len(naive) >= 2:
            (c0, p0), (c1, p1) = [(r["num_classes"], r["peak_gib"]) for r in naive[-2:]]
            predicted = p1 + (p1 - p0) / (c1 - c0) * (c - c1)
            if predicted > args.naive_budget_gib:
                print(f"  naive    C={c:>9,}: not run, predicted peak {predicted:.1f} GiB")
                break
        naive.append(_spawn("naive", c, args, 1.0))
    results += naive
    results += [_spawn("entity", c, args, args.ratio) for c in _sizes(args.entity_sizes)]
    print(f"{_uptime()}; matmul ceiling {matmul_gflops():.0f} GFLOP/s")
    print()
    print(
        f"mlcd_loss forward + backward, batch {args.batch}, dim {args.dim}, "
        f"{NUM_LABELS} labels/image, ArcFace s={SCALE:g} m={MARGIN}; entity: "
        f"entity_classification_loss, {NUM_LABELS} entities/image, s={ENTITY_SCALE:g} "
        f"m={ENTITY_MARGIN:g}"
    )
    print(_table(results, args.dim))


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", nargs=2, metavar=("KIND", "C"), help="sharded|naive|entity, C")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.1, help="sample_ratio of sharded runs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--sizes", default="16384,65536,262144,1048576", help="sharded, r")
    parser.add_argument("--full_sizes", default="16384,65536,262144", help="sharded, r = 1")
    parser.add_argument("--naive_sizes", default="16384,32768,65536,131072,262144,524288")
    parser.add_argument("--naive_budget_gib", type=float, default=10.0)
    parser.add_argument("--entity_sizes", default="1048576,2097152", help="entity classifier, r")
    args = parser.parse_args(argv)
    if args.one:
        kind, c = args.one
        if kind not in KINDS:
            parser.error(f"--one KIND must be one of {KINDS}; got {kind!r}")
        print(json.dumps(run_one(kind, int(c), args.batch, args.dim, args.ratio, args.steps)))
    else:
        sweep(args)


if __name__ == "__main__":
    main()
