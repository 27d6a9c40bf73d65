"""Paper-scale train step, lowered and compiled (never run) on a simulated mesh of fake CPU devices.

    python bench/dry_run.py --config configs/mlcd.py:l14 [--devices 64] [--config.key=value ...]

The step is the trainer's own (mlcd.train_step.build_train_step: the model, the objective and
its heads, optimizer, state shardings of the config), built from ShapeDtypeStructs: no
parameter, optimizer moment, class center or batch is ever allocated, so a 1M x 768 center matrix and a ViT-L/14
compile on a 2-core CPU machine with 24 GB. XLA's SPMD partitioner turns the step into one
per-device program; its memory analysis is what one device of that mesh would need.

Prints, per device: the model's parameters and optimizer state, the objective's training-only
heads (e.g. class centers) with their AdamW moments, as the state's shardings place them, the
batch, and from `compiled.memory_analysis()` the
arguments, outputs (aliased to the donated state), temporaries and the peak they imply; then
the largest arrays of the compiled program, and whether any of its shapes has a head's first
dimension C (a [B, C] logits array or the full center matrix would).

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


def _parse(argv):
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
    return parser.parse_known_args(argv)


ARGS, OVERRIDES = _parse(sys.argv[1:])
# Before jax is imported: the fake devices exist only if the flag is set at backend start.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import common  # noqa: E402
from mlcd import sharding, train_state, tree_utils  # noqa: E402
from mlcd.checkpoint import abstract_like  # noqa: E402
from mlcd.train_step import build_train_step  # noqa: E402

GIB = 2.0**30
# Bytes per element of the HLO element types that appear in a train step.
HLO_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)


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


def main() -> None:
    t0 = time.perf_counter()
    config = common.load_config(ARGS.config)
    common.parse_overrides(config, OVERRIDES)
    # No dataset, so no tokenizer: a stand-in with the vocabulary size only sets the text
    # tower's embedding table (pad / EOS ids change no shape).
    vocab = types.SimpleNamespace(vocab_size=ARGS.vocab_size, eos_id=ARGS.vocab_size - 1, pad_id=0)
    config = train_state.resolve_model_config(config, vocab)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.batch_size, mesh, "config.batch_size")

    built = build_train_step(config, mesh)
    state = built.abstract_state
    batch = built.objective.abstract_batch(config.batch_size)
    batch = abstract_like(batch, {k: sharding.batch_sharding(mesh) for k in batch})
    microbatches = config.microbatches
    with jax.set_mesh(mesh):
        lowered = built.step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    t2 = time.perf_counter()
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
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    rows += [
        ("compiled: arguments (state + batch)", mem.argument_size_in_bytes),
        ("compiled: outputs (aliased to donated state)", mem.output_size_in_bytes),
        ("compiled: aliased", mem.alias_size_in_bytes),
        ("compiled: temporaries (activations, grads)", mem.temp_size_in_bytes),
        ("compiled: peak = args + outputs - aliased + temp", peak),
    ]

    b = config.batch_size
    head = (
        f"{ARGS.config} {' '.join(OVERRIDES)}: {mesh.size} devices {dict(mesh.shape)}, "
        f"global batch {b:,} ({b // mesh.size} per device, in {microbatches} microbatches), "
        f"image {config.pp.image_size} px, "
        f"model {config.model.image.variant} dtype {config.model.dtype}"
    )
    if num_centers:
        head += (
            f", objective {config.objective.name}, C = {num_centers:,} "
            f"({num_centers // mesh.size:,} per device), "
            f"r = {config.objective.get('sample_ratio')}"
        )
    print(head)
    print(f"lowered in {t1 - t0:.0f} s, compiled in {t2 - t1:.0f} s (XLA:CPU, nothing executed)")
    print()
    print("| per device | GiB |\n|---|---:|")
    for name, size in rows:
        print(f"| {name} | {size / GIB:.3f} |")
    print()
    print("Largest arrays of the per-device program:")
    for size, shape, op in largest_arrays(hlo, 6):
        print(f"  {size / GIB:8.3f} GiB  {shape:<28} {op}")
    if num_centers:
        dims = {int(d) for dims in re.findall(r"\w+\[([\d,]+)\]", hlo) for d in dims.split(",")}
        has_c = "yes" if num_centers in dims else "none"
        print(f"shapes with a dimension of C = {num_centers:,}: {has_c}")
    fits = peak <= ARGS.device_gib * GIB
    print(
        f"peak_gib={peak / GIB:.2f} device_gib={ARGS.device_gib:.0f} fits={'yes' if fits else 'no'}"
    )


if __name__ == "__main__":
    main()
