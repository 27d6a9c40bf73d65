"""Paper-scale train step, lowered and compiled (never run) on a simulated mesh of fake CPU devices.

    python bench/dry_run.py --config configs/mlcd.py:l14 [--devices 64] [--config.key=value ...]
    python bench/dry_run.py --config configs/mlcd.py:l14 --remat_search [--device_gib 80]

The step is the trainer's own (mlcd.train_step.build_train_step: the model, the objective and
its heads, optimizer, state shardings of the config), built from ShapeDtypeStructs: no
parameter, optimizer moment, class center or batch is ever allocated, so a 1M x 768 center
matrix and a ViT-L/14 compile on a 2-core CPU machine with 24 GB. XLA's SPMD partitioner turns
the step into one per-device program; its memory analysis is what one device of that mesh
would need.

Prints, per device: the model's parameters and optimizer state, the objective's training-only
heads (e.g. class centers) with their AdamW moments, as the state's shardings place them, the
batch, and from `compiled.memory_analysis()` the arguments, outputs (aliased to the donated
state), temporaries and the peak they imply; the step's FLOPs from `compiled.cost_analysis()`
(per device, as partitioned, and that times the devices); then the largest arrays of the
compiled program, and whether any of its shapes has a head's first dimension C (a [B, C]
logits array or the full center matrix would).

--remat_search compiles instead, per remat policy (config.model.remat: none, full,
dots_saveable), microbatch counts 1, 2, 4, ... up to --max_microbatches (only 1 for in-batch
contrastive objectives, which refuse more) until the peak fits --device_gib, one progress line
per compile, and prints the table policy x microbatches -> peak GiB per device.

Numbers come from XLA:CPU's compiler, not the accelerator's: fusion and layout choices (and
bf16, which the CPU runs through float32 conversions) differ, so treat temporaries as an
estimate of the order of magnitude, and the state figures as exact.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import types
from collections.abc import Callable
from typing import NamedTuple


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, the remaining `--config.key=value` overrides)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="path/to/config.py[:preset]")
    parser.add_argument("--devices", type=int, default=64, help="fake CPU devices in the mesh")
    parser.add_argument("--device_gib", type=float, default=80.0, help="memory of one device")
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=49_408,
        help="text towers: the vocabulary a paper-scale tokenizer would give (OpenAI CLIP's BPE)",
    )
    parser.add_argument(
        "--remat_search",
        action="store_true",
        help="instead of one report: per remat policy, the fewest microbatches that fit",
    )
    parser.add_argument(
        "--max_microbatches",
        type=int,
        default=32,
        help="--remat_search: the largest microbatch count tried (powers of two up to it)",
    )
    return parser.parse_known_args(argv)


if __name__ == "__main__":
    # Before jax is imported: the fake devices exist only if the flag is set at backend start.
    # (Imported, e.g. by the tests, the importer has set up its devices already.)
    _devices = _parse(sys.argv[1:])[0].devices
    # XLA:CPU drops jax.checkpoint's optimization barriers (its cse_barrier_expander pass) and
    # CSE then merges the recomputation into the forward pass: remat would change nothing. The
    # GPU and TPU compilers keep them, so the dry run does too.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        f" --xla_force_host_platform_device_count={_devices}"
        " --xla_disable_hlo_passes=cse_barrier_expander"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import common  # noqa: E402
from mlcd import objectives, sharding, train_state, tree_utils  # noqa: E402
from mlcd.checkpoint import abstract_like  # noqa: E402
from mlcd.train_step import TrainStep, build_train_step  # noqa: E402

GIB = 2.0**30
# Bytes per element of the HLO element types that appear in a train step.
HLO_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)
# config.model.remat values (mlcd.models.layers.REMATS) in the order the search tries them.
REMAT_POLICIES = ("none", "full", "dots_saveable")


class CompiledStep(NamedTuple):
    """The config's train step compiled for its mesh, and what it was compiled from."""

    mesh: jax.sharding.Mesh
    built: TrainStep  # the step and its objective, optimizer and abstract state
    batch: dict[str, jax.ShapeDtypeStruct]  # the abstract global batch, sharded
    compiled: jax.stages.Compiled
    lower_s: float  # seconds to trace and lower
    compile_s: float  # seconds XLA took to compile


def load_config(path: str, overrides: list[str], vocab_size: int) -> ml_collections.ConfigDict:
    """The resolved config of `path` (path/to/config.py[:preset]) under `overrides`."""
    config = common.load_config(path)
    common.parse_overrides(config, overrides)
    # No dataset, so no tokenizer: a stand-in with the vocabulary size only sets the text
    # tower's embedding table (pad / EOS ids change no shape).
    vocab = types.SimpleNamespace(vocab_size=vocab_size, eos_id=vocab_size - 1, pad_id=0)
    return train_state.resolve_model_config(config, vocab)


def compile_step(config: ml_collections.ConfigDict) -> CompiledStep:
    """Lowers and compiles the train step of `config` (resolved) on the abstract state and
    batch, for the mesh of config.mesh over this process's devices; executes nothing."""
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.batch_size, mesh, "config.batch_size")
    built = build_train_step(config, mesh)
    batch = built.objective.abstract_batch(config.batch_size)
    batch = abstract_like(batch, {k: sharding.batch_sharding(mesh) for k in batch})
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = built.step.lower(built.abstract_state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    return CompiledStep(mesh, built, batch, compiled, t1 - t0, time.perf_counter() - t1)


def peak_bytes(compiled: jax.stages.Compiled) -> float:
    """Peak memory of one device running `compiled`, from XLA's memory analysis: arguments +
    outputs - the outputs aliased to donated arguments + temporaries."""
    mem = compiled.memory_analysis()
    return float(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


def hlo_flops(compiled: jax.stages.Compiled) -> float:
    """FLOPs of one device's program (after SPMD partitioning), from XLA's cost analysis.

    XLA counts a while loop's body once, whatever its trip count: with k > 1 microbatches (a
    lax.scan) this is one microbatch's forward + backward plus the update, not the step's (k
    times it overcounts only the update, small next to k forward + backward passes).
    """
    return float(compiled.cost_analysis()["flops"])


def microbatch_counts(batch_per_device: int, per_example: bool, largest: int) -> list[int]:
    """The microbatch counts a search tries, fewest first: powers of two up to `largest` that
    divide the per-device batch (each slice takes B / k rows of every device), or only 1 when
    the objective compares examples across the batch (make_train_step refuses k > 1)."""
    if not per_example:
        return [1]
    counts, k = [], 1
    while k <= largest and batch_per_device % k == 0:
        counts.append(k)
        k *= 2
    return counts


def remat_search(
    config: ml_collections.ConfigDict,
    device_gib: float,
    max_microbatches: int,
    log: Callable[[str], None] = print,
) -> dict[str, dict[int, float]]:
    """{remat policy: {microbatches: compiled peak GiB per device}} for every policy of
    REMAT_POLICIES: microbatch counts (microbatch_counts) are compiled fewest first, and a
    policy stops at the first whose peak fits `device_gib` (a paper-scale compile takes
    minutes on a CPU). `config` (resolved) is not modified; `log` gets one line per compile.
    """
    mesh = sharding.make_mesh(config.mesh)
    per_example = objectives.build(config).per_example
    counts = microbatch_counts(config.batch_size // mesh.size, per_example, max_microbatches)
    results = {}
    for policy in REMAT_POLICIES:
        results[policy] = {}
        for microbatches in counts:
            trial = config.copy_and_resolve_references()
            trial.model.remat, trial.microbatches = policy, microbatches
            step = compile_step(trial)
            peak = peak_bytes(step.compiled) / GIB
            results[policy][microbatches] = peak
            fits = peak <= device_gib
            log(
                f"remat={policy} microbatches={microbatches}: peak {peak:.3f} GiB per device, "
                f"{'fits' if fits else 'does not fit'} {device_gib:g} GiB "
                f"(compiled in {step.compile_s:.0f} s)"
            )
            if fits:
                break
    return results


def search_table(results: dict[str, dict[int, float]], device_gib: float) -> str:
    """Markdown table policy x microbatches -> peak GiB per device ('-': not compiled, as a
    fewer count fit already), and per policy the fewest microbatches that fit or 'none'."""
    counts = sorted({k for row in results.values() for k in row})
    lines = [
        "| remat | "
        + " | ".join(f"{k} mb" for k in counts)
        + f" | fewest fitting {device_gib:g} GiB |",
        "|---" + "|---:" * (len(counts) + 1) + "|",
    ]
    for policy, row in results.items():
        cells = [f"{row[k]:.3f}" if k in row else "-" for k in counts]
        fit = [k for k, peak in row.items() if peak <= device_gib]
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {fit[0] if fit else 'none'} |")
    return "\n".join(lines)


def per_device_bytes(tree) -> float:
    """Bytes one device holds of `tree`, ShapeDtypeStructs with shardings (None leaves: 0)."""
    return float(
        sum(
            np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * x.dtype.itemsize
            for x in jax.tree.leaves(tree)
        )
    )


def split_heads(tree):
    """(tree without the objective's heads, tree of only them), leaves replaced by None; works
    on params and optimizer state alike (a head's path has a 'heads' component)."""
    is_head = lambda p: train_state.HEADS in p.split("/")
    return (
        tree_utils.map_with_path(lambda p, x: None if is_head(p) else x, tree),
        tree_utils.map_with_path(lambda p, x: x if is_head(p) else None, tree),
    )


def largest_arrays(hlo: str, n: int) -> list[tuple[float, str, str]]:
    """The n largest arrays the per-device HLO computes (not its parameters): (bytes,
    'dtype[dims]', the op computing it), one entry per distinct shape."""
    found = {}
    pattern = r"= (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\("
    for dtype, dims, op in re.findall(pattern, hlo):
        if dtype in HLO_BYTES and op != "parameter" and f"{dtype}[{dims}]" not in found:
            size = np.prod([int(d) for d in dims.split(",") if d], dtype=np.float64)
            found[f"{dtype}[{dims}]"] = (float(size) * HLO_BYTES[dtype], op)
    return sorted(((b, shape, op) for shape, (b, op) in found.items()), reverse=True)[:n]


def report(args: argparse.Namespace, overrides: list[str], config: ml_collections.ConfigDict):
    """Compiles the step of `config` once and prints the per-device memory table, HLO FLOPs,
    the largest arrays and whether the peak fits args.device_gib."""
    step = compile_step(config)
    mesh, state, batch, compiled = step.mesh, step.built.abstract_state, step.batch, step.compiled
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()

    towers, _ = split_heads(state["params"])
    heads = state["params"].get(train_state.HEADS, {})
    tower_opt, head_opt = split_heads(state["opt_state"])
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(towers))
    rows = [
        (f"parameters ({num_params / 1e6:.1f}M, towers)", per_device_bytes(towers)),
        ("optimizer state (towers)", per_device_bytes(tower_opt)),
    ]
    for name, x in heads.items():
        shape = " x ".join(f"{d:,}" for d in x.shape)
        rows += [(f"head {name} ({shape})", per_device_bytes(x))]
    if heads:
        rows += [("optimizer state (heads)", per_device_bytes(head_opt))]
    rows += [(f"batch ({', '.join(batch)})", per_device_bytes(batch))]
    # C of the class-matrix heads: no shape of the step may have it (no [B, C] array).
    num_centers = max([x.shape[0] for x in heads.values() if x.ndim == 2], default=None)
    peak = peak_bytes(compiled)
    rows += [
        ("compiled: arguments (state + batch)", mem.argument_size_in_bytes),
        ("compiled: outputs (aliased to donated state)", mem.output_size_in_bytes),
        ("compiled: aliased", mem.alias_size_in_bytes),
        ("compiled: temporaries (activations, grads)", mem.temp_size_in_bytes),
        ("compiled: peak = args + outputs - aliased + temp", peak),
    ]

    b, microbatches = config.batch_size, config.microbatches
    head = (
        f"{args.config} {' '.join(overrides)}: {mesh.size} devices {dict(mesh.shape)}, "
        f"global batch {b:,} ({b // mesh.size} per device, in {microbatches} microbatches), "
        f"image {config.pp.image_size} px, "
        f"model {config.model.image.variant} dtype {config.model.dtype} "
        f"remat {config.model.remat} attention {config.model.attention}"
    )
    if num_centers:
        head += (
            f", objective {config.objective.name}, C = {num_centers:,} "
            f"({num_centers // mesh.size:,} per device), "
            f"r = {config.objective.get('sample_ratio')}"
        )
    print(head)
    print(
        f"lowered in {step.lower_s:.0f} s, compiled in {step.compile_s:.0f} s "
        "(XLA:CPU, nothing executed)"
    )
    print()
    print("| per device | GiB |\n|---|---:|")
    for name, size in rows:
        print(f"| {name} | {size / GIB:.3f} |")
    print()
    # XLA counts a scan's body once: k microbatches' forward + backward are k bodies.
    flops = hlo_flops(compiled) * microbatches
    scaled = f", {microbatches} x the loop body's" if microbatches > 1 else ""
    print(
        f"HLO FLOPs per step (XLA cost analysis of the SPMD-partitioned program{scaled}): "
        f"{flops / 1e12:.4g} TFLOP per device, {flops * mesh.size / 1e12:.4g} TFLOP total "
        f"over {mesh.size} devices"
    )
    print()
    print("Largest arrays of the per-device program:")
    for size, shape, op in largest_arrays(hlo, 6):
        print(f"  {size / GIB:8.3f} GiB  {shape:<28} {op}")
    if num_centers:
        dims = {int(d) for dims in re.findall(r"\w+\[([\d,]+)\]", hlo) for d in dims.split(",")}
        has_c = "yes" if num_centers in dims else "none"
        print(f"shapes with a dimension of C = {num_centers:,}: {has_c}")
    fits = peak <= args.device_gib * GIB
    print(
        f"peak_gib={peak / GIB:.2f} device_gib={args.device_gib:.0f} fits={'yes' if fits else 'no'}"
    )


def main(argv: list[str] | None = None) -> None:
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config, overrides, args.vocab_size)
    if not args.remat_search:
        report(args, overrides, config)
        return
    print(
        f"{args.config} {' '.join(overrides)}: remat search on {jax.device_count()} devices, "
        f"global batch {config.batch_size:,}, device {args.device_gib:g} GiB",
        flush=True,
    )
    results = remat_search(
        config, args.device_gib, args.max_microbatches, lambda line: print(line, flush=True)
    )
    print()
    print(search_table(results, args.device_gib))


if __name__ == "__main__":
    main()
