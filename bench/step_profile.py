"""Where the CLIP train step spends its time, ours next to open_clip's identical network.

    python bench/step_profile.py [--model bench-tiny] [--batch 128] [--threads 1] [--steps 3]

Both steps are bench/train_step.py's (MlcdTrainer, OpenClipTrainer: same widths, weights and
batch, float32), profiled in one process after warm-up: ours with jax.profiler (XLA:CPU's
thunk events, one per kernel or library call), open_clip's with torch.profiler (self CPU time
per aten op). Each event goes into one category:

  matmul: projections    dense products without batch dimensions: QKV, attention output,
                         MLP, patch embedding, heads, and their weight and input gradients
                         (ours: YNNPACK / oneDNN fusions and Eigen dots; torch: mm, addmm,
                         the patch convolution and its backward)
  matmul: attention      q k^T and weights @ v, forward and backward (ours: batched dots;
                         torch: its fused CPU flash attention, softmax included)
  copies, transposes     layout changes (ours: copy / transpose fusions; torch: copy_, clone)
  everything else        elementwise and reduction kernels (LayerNorm, GELU, softmax for ours,
                         loss), the optimizer, allocation and fill

Prints ms per step per category and side, each side's total, and the bound the profile puts
on the ratio: if everything of ours but its matmuls took no time, our step would still take
our matmul time, so images/s ours / theirs <= their total / our matmul time. The matmuls are
the same products on both sides; the 4096^3 float32 matmul of each library (printed too) is
the ceiling they run against. Threads: 1 by default, the load-robust setting (see
bench/train_step.py). Ends with one line
`matmul_ms=X peer_matmul_ms=Y total_ms=Z peer_total_ms=W ratio_bound=R`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step as ts  # bench/train_step.py: the two trainers

CATEGORIES = (
    "matmul: projections",
    "matmul: attention",
    "copies, transposes",
    "everything else",
)
# torch ops (self time) of the first three categories; all other ops are "everything else".
TORCH_CATEGORY = {
    "aten::mm": CATEGORIES[0],
    "aten::addmm": CATEGORIES[0],
    "aten::mkldnn_convolution": CATEGORIES[0],
    "aten::convolution_backward": CATEGORIES[0],
    "aten::bmm": CATEGORIES[1],
    "aten::_scaled_dot_product_flash_attention_for_cpu": CATEGORIES[1],
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": CATEGORIES[1],
    "aten::copy_": CATEGORIES[2],
    "aten::clone": CATEGORIES[2],
}
# XLA thunk names that are library calls (fusions of these kinds hold a dot), and copies.
LIBRARY_FUSION = re.compile(r"^(ynn|xnn|onednn)_fusion")


def hlo_dot_kinds(hlo: str) -> dict[str, str]:
    """{top-level instruction name: CATEGORIES[0] or [1]} for every instruction of the compiled
    step that is, or calls a computation holding, a dot: [1] when the dot has batch dimensions
    (attention's [B, H] batched products), else [0]."""
    batched_in = {}  # computation or dot instruction -> whether a dot of it has batch dims
    calls = {}  # instruction name -> called computation
    for computation, line in ts.hlo_instructions(hlo):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(", line)
        if not m:
            continue
        name, op = m.groups()
        if op == "dot":
            batched = "lhs_batch_dims" in line
            batched_in[computation] = batched_in.get(computation, False) or batched
            batched_in[name] = batched
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[name] = called.group(1)
    kinds = {}
    for name, batched in batched_in.items():
        kinds[name] = CATEGORIES[1] if batched else CATEGORIES[0]
    for name, called in calls.items():
        if called in batched_in:
            kinds[name] = CATEGORIES[1] if batched_in[called] else CATEGORIES[0]
    return kinds


def xla_category(name: str, dot_kinds: dict[str, str]) -> str:
    """The category of one XLA:CPU thunk event."""
    if name in dot_kinds:
        return dot_kinds[name]
    if LIBRARY_FUSION.match(name):  # a library fusion without a dot (none expected)
        return CATEGORIES[3]
    if "transpose" in name or name.startswith("copy") or "_copy" in name:
        return CATEGORIES[2]
    return CATEGORIES[3]


def profile_ours(trainer: ts.MlcdTrainer, steps: int) -> dict[str, float]:
    """ms per step per category of our step, from XLA:CPU's thunk events."""
    import jax

    dot_kinds = hlo_dot_kinds(trainer.hlo_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            wall = time.perf_counter() - start
        (path,) = [
            os.path.join(d, f) for d, _, fs in os.walk(tmp) for f in fs if f.endswith(".xplane.pb")
        ]
        data = jax.profiler.ProfileData.from_file(path)
    ms = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # the intra-op pool that runs the thunks
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "end: ")):
                    continue
                ms[xla_category(event.name, dot_kinds)] += event.duration_ns / 1e6 / steps
    ms["wall"] = 1e3 * wall / steps
    return ms


def profile_peer(trainer: ts.OpenClipTrainer, steps: int) -> dict[str, float]:
    """ms per step per category of open_clip's step, from torch.profiler's self CPU times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        wall = time.perf_counter() - start
    ms = collections.Counter()
    for event in prof.key_averages():
        ms[TORCH_CATEGORY.get(event.key, CATEGORIES[3])] += event.self_cpu_time_total / 1e3 / steps
    ms["wall"] = 1e3 * wall / steps
    return ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench-tiny", help="variant for both towers")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="XLA:CPU and torch threads")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps of each")
    args = parser.parse_args(argv)
    peer = ts.import_peer()
    if isinstance(peer, str):
        raise SystemExit(f"error: {peer}")
    torch, open_clip = peer
    ts.set_threads(args.threads, torch)

    cfg = ts.model_config(args.model, "float32")
    ours = ts.MlcdTrainer(cfg, args.batch)
    theirs = ts.OpenClipTrainer(
        torch, open_clip, cfg, ours.images, ours.tokens, ours.state_dict(cfg)
    )
    for _ in range(2):  # warm-up: compile, allocator pools, oneDNN primitive caches
        ours.step()
        theirs.step()
    mine, peer_ms = profile_ours(ours, args.steps), profile_peer(theirs, args.steps)
    timed = ts.make_matmul(4096)
    ceilings = (
        2 * 4096**3 / min(timed() for _ in range(3)) / 1e9,
        ts.torch_matmul_gflops(torch, 4096),
    )

    print(
        f"{args.model}, batch {args.batch}, float32, {args.threads} thread(s); heap allocator: "
        f"{ts.allocator.describe()}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"\n| ms per step | mlcd (XLA:CPU) | open_clip (torch {torch.__version__}) |")
    print("|---|---:|---:|")
    for c in CATEGORIES:
        print(f"| {c} | {mine[c]:.0f} | {peer_ms[c]:.0f} |")
    total, peer_total = (sum(m[c] for c in CATEGORIES) for m in (mine, peer_ms))
    print(f"| **sum of profiled events** | **{total:.0f}** | **{peer_total:.0f}** |")
    print(f"| wall time per profiled step | {mine['wall']:.0f} | {peer_ms['wall']:.0f} |")
    print(f"| float32 4096^3 matmul, GFLOP/s | {ceilings[0]:.0f} | {ceilings[1]:.0f} |")
    matmul = mine[CATEGORIES[0]] + mine[CATEGORIES[1]]
    peer_matmul = peer_ms[CATEGORIES[0]] + peer_ms[CATEGORIES[1]]
    bound = peer_ms["wall"] / matmul
    print(
        f"\nmatmuls: ours {matmul:.0f} ms, theirs {peer_matmul:.0f} ms ({matmul / peer_matmul:.2f}x)"
        f"; with all else free, mlcd / open_clip <= {peer_ms['wall']:.0f} / {matmul:.0f} = "
        f"{bound:.2f}"
    )
    print(
        f"matmul_ms={matmul:.0f} peer_matmul_ms={peer_matmul:.0f} total_ms={mine['wall']:.0f} "
        f"peer_total_ms={peer_ms['wall']:.0f} ratio_bound={bound:.2f}"
    )


if __name__ == "__main__":
    ts.allocator.reexec_with_allocator()  # as bench/train_step.py: TCMalloc where installed
    main()
