"""Benchmark of one CLIP train step (forward, backward, AdamW) against the matmul ceiling and
against open_clip's identical network (the peer), in one process.

    python bench/train_step.py --model bench-tiny --batch 128 [--no-peer] [--threads N]

Prints a table (and the peer's table), then exactly one line
`images_per_sec=X achieved_gflops=Y matmul_gflops=Z`, which ends with
`peer_images_per_sec=P ratio=R` when the peer ran.

FLOPs counted per sample (the transformer blocks only, as in docs/benchmarks.md): per layer
24 N W^2 (QKV 6, attention output 2, MLP 16) + 4 N^2 W (q k^T and weights v) in the forward pass,
N = tokens incl. cls, W = width; x 3 for forward + backward; summed over both towers' layers.
The ceiling is a float32 n x n x n matmul (2 n^3 FLOPs) in the same process, timed once before
every step; reported numbers are best-of (min time) for both, plus the median of the per-pair
ratios (robust when other jobs share the cores).

The peer needs the `[torch]` extra (`pip install -e .[torch]`; without it a line says it is
skipped). It is open_clip.CLIP built from `mlcd.open_clip_format.open_clip_config` of the same
resolved model config, so widths, depths, heads, patch, context, vocabulary, activation (tanh
GELU through act_kwargs) and LayerNorm eps (norm_kwargs) match; it starts from our initial
parameters (converted with `state_dict_from_params`), so both first losses must agree. open_clip
has no patch-embedding bias (ours is folded into its position embeddings): W parameters and W
additions per patch token, negligible next to the counted FLOPs. Trained on the same batch
(NCHW), float32, eager, `torch.optim.AdamW` with our hyper-parameters, `open_clip.loss.ClipLoss`.
The two steps alternate in rounds (`--rounds` of `--round_steps` steps each, mlcd first), so
both meet the same background load; the ratio is the median over rounds of open_clip's median
step time over ours.

Heap allocator: the script restarts itself on TCMalloc (or jemalloc) when the system has one,
as the trainer does (mlcd.allocator; MLCD_ALLOCATOR=system keeps glibc's malloc). Both
libraries run in this one process, so both get it. The table shows which allocator ran and the
step's page faults: on glibc every XLA:CPU step faults its buffers in again.

Threads: `--threads` (default: the CPUs this process may run on) sizes XLA:CPU's pool
(PJRT_NPROC, read when JAX creates its CPU client) and torch's (`torch.set_num_threads`: OpenMP,
MKL, oneDNN); the two libraries never compute at the same time, so neither oversubscribes the
cores while the other runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlcd import allocator, losses, models, open_clip_format
from mlcd.models import layers, text, vit

EOS_ID, PAD_ID = 2, 0
# optax.adamw's and torch.optim.AdamW's shared settings (betas 0.9 / 0.999, eps 1e-8 are
# both libraries' defaults).
LR, WEIGHT_DECAY = 1e-4, 0.1
INSTALL_PEER = "pip install -e .[torch]"


def model_config(name: str, dtype: str) -> ml_collections.ConfigDict:
    """CLIP two-tower config of one named size for both towers (embedding dim 128 for the tiny
    sizes, CLIP's 512 / 768 otherwise)."""
    embed_dim = {"tiny": 128, "bench-tiny": 128, "L/14": 768}.get(name, 512)
    return ml_collections.ConfigDict(
        dict(
            image=dict(variant=name),
            text=dict(variant=name, eos_id=EOS_ID, pad_id=PAD_ID),
            embed_dim=embed_dim,
            logit_scale_init=float(np.log(1 / 0.07)),
            logit_bias_init=None,
            dtype=dtype,
        )
    )


def resolved_model_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """`cfg` as a plain dict with every tower setting spelled out (the variants' values under
    the config's overrides): the form mlcd.open_clip_format reads."""
    out = cfg.to_dict()
    out["image"] = layers.resolve_variant("image", vit.VARIANTS, cfg.image)
    out["text"] = layers.resolve_variant("text", text.VARIANTS, cfg.text)
    return out


def flops_per_sample(cfg: ml_collections.ConfigDict) -> float:
    """Forward + backward FLOPs of both towers' transformer layers for one sample."""
    resolved = resolved_model_config(cfg)
    img, txt = resolved["image"], resolved["text"]
    n_img = (img["image_size"] // img["patch_size"]) ** 2 + (img["pool"] == "cls")

    def tower(n, w, depth):
        return depth * (24 * n * w**2 + 4 * n**2 * w)

    fwd = tower(n_img, img["width"], img["depth"])
    fwd += tower(txt["context_length"], txt["width"], txt["depth"])
    return 3.0 * fwd


def fake_batch(cfg: ml_collections.ConfigDict, batch: int, seed: int = 0):
    """Normalised random images and token rows BOS + words + EOS + padding."""
    img = layers.resolve_variant("image", vit.VARIANTS, cfg.image)
    txt = layers.resolve_variant("text", text.VARIANTS, cfg.text)
    rng = np.random.default_rng(seed)
    r, length = img["image_size"], txt["context_length"]
    images = rng.standard_normal((batch, r, r, 3), dtype=np.float32)
    tokens = rng.integers(3, txt["vocab_size"], (batch, length), dtype=np.int32)
    lengths = rng.integers(2, length, batch)
    tokens[:, 0] = 1
    tokens[np.arange(batch), lengths] = EOS_ID
    tokens[np.arange(length)[None] > lengths[:, None]] = PAD_ID
    return jnp.asarray(images), jnp.asarray(tokens)


def make_train_step(graphdef, tx: optax.GradientTransformation):
    """jit(params, opt_state, images, tokens) -> (params, opt_state, loss).

    Params and optimizer state are donated: XLA updates them in place instead of allocating a
    second copy of both each step.
    """

    def loss_fn(params, images, tokens):
        out = nnx.merge(graphdef, params)(images, tokens)
        return losses.softmax_contrastive_loss(out["zimg"], out["ztxt"], out["logit_scale"])

    def step(params, opt_state, images, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


class MlcdTrainer:
    """Our side: the model's parameters, AdamW state and compiled train step on one fixed
    batch. `step()` runs one step and returns its loss (computed before the update)."""

    def __init__(self, cfg: ml_collections.ConfigDict, batch: int, seed: int = 0):
        model = models.build_model(cfg, rngs=nnx.Rngs(seed))
        self.num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        graphdef, self.params = nnx.split(model)
        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        self.opt_state = tx.init(self.params)
        self.images, self.tokens = fake_batch(cfg, batch, seed)
        start = time.perf_counter()
        # Compiled ahead of time so that the compile is timed on its own and the executable's
        # HLO can be inspected (matmul_paths) without a second compile.
        self._step = (
            make_train_step(graphdef, tx)
            .lower(self.params, self.opt_state, self.images, self.tokens)
            .compile()
        )
        self.compile_s = time.perf_counter() - start

    def hlo_text(self) -> str:
        """The compiled step's optimised HLO."""
        return self._step.as_text()

    def state_dict(self, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
        """The current parameters in open_clip's layout (patch bias folded into the position
        embeddings). Call it before the first step: the step donates the parameters."""
        params = nnx.to_pure_dict(self.params)
        return open_clip_format.state_dict_from_params(params, resolved_model_config(cfg))

    def step(self) -> float:
        self.params, self.opt_state, loss = self._step(
            self.params, self.opt_state, self.images, self.tokens
        )
        return float(loss)  # waits for the step


def import_peer() -> tuple[ModuleType, ModuleType] | str:
    """(torch, open_clip), or why they cannot be used (with the install command)."""
    try:
        import open_clip
        import torch
    except ImportError as e:
        return f"open_clip / torch not importable ({e}); install the extra: {INSTALL_PEER}"
    return torch, open_clip


class OpenClipTrainer:
    """The peer: open_clip.CLIP for the same resolved model config, float32, torch.optim.AdamW
    and open_clip.loss.ClipLoss, on the same batch. `step()` as MlcdTrainer.step."""

    def __init__(
        self,
        torch: ModuleType,
        open_clip: ModuleType,
        cfg: ml_collections.ConfigDict,
        images: Any,
        tokens: Any,
        state_dict: dict[str, np.ndarray],
    ):
        oc = open_clip_format.open_clip_config(resolved_model_config(cfg))
        self.model = open_clip.CLIP(**oc).train()
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY
        )
        self.loss_fn = open_clip.loss.ClipLoss()
        self.images = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
        self.tokens = torch.from_numpy(np.array(tokens)).long()

    def step(self) -> float:
        zimg, ztxt, logit_scale = self.model(self.images, self.tokens)
        loss = self.loss_fn(zimg, ztxt, logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int, torch: ModuleType | None) -> None:
    """Sizes XLA:CPU's and torch's thread pools. XLA reads PJRT_NPROC when it creates its CPU
    client, so this must run before JAX first touches a device (xla_threads() checks)."""
    os.environ["PJRT_NPROC"] = str(threads)
    if torch is not None:
        torch.set_num_threads(threads)


def xla_threads() -> int | None:
    """How many XLA:CPU intra-op ('XLAEigen') threads this process runs; None without /proc."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "comm")) as f:
                names.append(f.read())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return sum("XLAEigen" in name for name in names)


def page_faults(step: Callable[[], Any], steps: int = 2) -> tuple[float, float]:
    """(minor page faults, kernel CPU seconds) of this process per call of `step`, over
    `steps` calls: the cost of buffers the allocator hands back to the kernel (mlcd.allocator)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_minflt - before.ru_minflt) / steps, (after.ru_stime - before.ru_stime) / steps


def hlo_instructions(hlo: str):
    """(computation name without '%', line) for every line inside a computation of an HLO
    module's text (instructions, and the closing brace)."""
    computation = None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            header = line.split()
            computation = (header[1] if line.startswith("ENTRY") else header[0]).lstrip("%")
        elif computation is not None:
            yield computation, line


def matmul_paths(hlo: str) -> dict[str, int]:
    """Counts the compiled program's dot ops by the library that runs them: a dot inside a
    fusion of kind __ynn_fusion / __xnn_fusion / __onednn_fusion runs in YNNPACK / XNNPACK /
    oneDNN, a __onednn$matmul custom call in oneDNN, any other dot in XLA's own DotThunk
    (Eigen)."""
    library_of = {}  # called computation -> library, from the fusions that call it
    dots = collections.Counter()  # computation -> number of dots in it
    out = collections.Counter()
    for computation, line in hlo_instructions(hlo):
        if " dot(" in line:
            dots[computation] += 1
        elif 'custom_call_target="__onednn$matmul"' in line:
            out["oneDNN"] += 1
        called = re.search(r"calls=%?([\w.\-]+).*\"kind\":\"__(ynn|xnn|onednn)_fusion\"", line)
        if called:
            library_of[called.group(1)] = {"ynn": "YNNPACK", "xnn": "XNNPACK"}.get(
                called.group(2), "oneDNN"
            )
    for comp, n in dots.items():
        out[library_of.get(comp, "Eigen (XLA DotThunk)")] += n
    return dict(out)


def make_matmul(n: int):
    """() -> seconds of one float32 [n, n] @ [n, n] matmul (2 n^3 FLOPs), compiled and warm."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()

    def timed() -> float:
        t = time.perf_counter()
        f(a, b).block_until_ready()
        return time.perf_counter() - t

    return timed


def torch_matmul_gflops(torch: ModuleType, n: int, repeats: int = 3) -> float:
    """Best float32 n^3 matmul throughput of torch (MKL) on this machine, GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: MKL's first call sets up its buffers
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def timed_steps(step: Callable[[], float], n: int) -> tuple[list[float], float]:
    """(seconds of each of n steps, the last loss); RuntimeError on a non-finite loss."""
    seconds, loss = [], np.nan
    for _ in range(n):
        t = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - t)
        if not np.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss}")
    return seconds, loss


def alternate(steps: dict[str, Callable[[], float]], rounds: int, per_round: int):
    """{name: float [rounds, per_round] step seconds}: every round runs `per_round` steps of
    each in turn, so all of them see the same background load."""
    out = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            out[name].append(timed_steps(step, per_round)[0])
    return {name: np.array(times) for name, times in out.items()}


def measure(
    trainer: MlcdTrainer,
    cfg: ml_collections.ConfigDict,
    batch: int,
    steps: int,
    warmup: int,
    matmul_size: int,
) -> dict:
    """Times ``steps`` train steps, each right after one ceiling matmul, after ``warmup``
    (at least one) untimed steps; 'first_loss' is the loss of the very first step.

    The machine may be shared: alternating the two exposes both to the same background load, so
    their ratio stays meaningful; best-of (min) times are the least disturbed ones.
    """
    matmul = make_matmul(matmul_size)
    t0 = time.perf_counter()
    first_loss = trainer.step()
    timed_steps(trainer.step, warmup - 1)
    warmup_s = trainer.compile_s + time.perf_counter() - t0
    step_s, matmul_s = [], []
    for _ in range(steps):
        matmul_s.append(matmul())
        step_s += timed_steps(trainer.step, 1)[0]
    gflop = flops_per_sample(cfg) * batch / 1e9
    mm_gflop = 2 * matmul_size**3 / 1e9
    return dict(
        first_loss=first_loss,
        params_m=trainer.num_params / 1e6,
        gflop_per_step=gflop,
        warmup_s=warmup_s,
        step_s=np.array(step_s),
        images_per_sec=batch / min(step_s),
        achieved_gflops=gflop / min(step_s),
        matmul_gflops=mm_gflop / min(matmul_s),
        # Per pair (step, the matmul just before it): the ratio under the same load.
        pair_ratios=(gflop / np.array(step_s)) / (mm_gflop / np.array(matmul_s)),
    )


def print_rows(rows: list[tuple[str, str]]) -> None:
    """Prints (name, value) rows as two aligned columns."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def compare_peer(
    args: argparse.Namespace,
    torch: ModuleType,
    open_clip: ModuleType,
    ours: MlcdTrainer,
    state_dict: dict[str, np.ndarray],
    cfg: ml_collections.ConfigDict,
    r: dict,
) -> tuple[float, float]:
    """Builds the peer, alternates it with our step and prints its table; returns (the peer's
    best images/s, the median over rounds of ours / the peer's)."""
    peer = OpenClipTrainer(torch, open_clip, cfg, ours.images, ours.tokens, state_dict)
    first_loss = peer.step()  # the same weights and batch as our first step
    timed_steps(peer.step, max(args.warmup - 1, 0))
    times = alternate({"mlcd": ours.step, "open_clip": peer.step}, args.rounds, args.round_steps)
    ips = {name: args.batch / t for name, t in times.items()}
    per_round = np.median(times["open_clip"], axis=1) / np.median(times["mlcd"], axis=1)
    gflop = r["gflop_per_step"]
    rows = [
        ("peer", f"open_clip {open_clip.__version__} (torch {torch.__version__}), float32, eager"),
        (
            "params mlcd / open_clip",
            f"{ours.num_params:,} / {peer.num_params:,} (ours has a patch-embedding bias, "
            f"{ours.num_params - peer.num_params})",
        ),
        ("first loss mlcd / open_clip", f"{r['first_loss']:.5f} / {first_loss:.5f}"),
        (
            f"matmul {args.matmul_size}^3 GFLOP/s: XLA / torch",
            f"{r['matmul_gflops']:.1f} / {torch_matmul_gflops(torch, args.matmul_size):.1f}",
        ),
        (f"{args.rounds} rounds x {args.round_steps} steps", "each, alternating, mlcd first"),
    ]
    for name, v in ips.items():
        rows.append((f"{name} images / s: best / median", f"{v.max():.1f} / {np.median(v):.1f}"))
        share = gflop / times[name].min() / r["matmul_gflops"]
        rows.append((f"{name} achieved / XLA matmul (best)", f"{share:.1%}"))
    rows += [
        ("mlcd / open_clip: bests", f"{ips['mlcd'].max() / ips['open_clip'].max():.2f}"),
        ("mlcd / open_clip: rounds (median)", f"{np.median(per_round):.2f}"),
        ("load average (1 / 5 min)", "{:.1f} / {:.1f}".format(*os.getloadavg()[:2])),
    ]
    print()
    print_rows(rows)
    return float(ips["open_clip"].max()), float(np.median(per_round))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench-tiny", help="variant for both towers")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps incl. compilation")
    parser.add_argument("--matmul_size", type=int, default=4096)
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train open_clip's identical network, alternating with ours (float32 only)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="peer comparison: rounds")
    parser.add_argument("--round_steps", type=int, default=3, help="steps of each per round")
    parser.add_argument(
        "--threads",
        type=int,
        default=available_cpus(),
        help="XLA:CPU and torch intra-op threads (default: the CPUs this process may use)",
    )
    args = parser.parse_args(argv)

    if not args.peer:
        peer = "--no-peer"
    elif args.dtype != "float32":
        peer = f"the peer runs float32 only (--dtype {args.dtype})"
    else:
        peer = import_peer()
    if isinstance(peer, str):
        print(f"open_clip peer skipped: {peer}")
    set_threads(args.threads, None if isinstance(peer, str) else peer[0])

    cfg = model_config(args.model, args.dtype)
    ours = MlcdTrainer(cfg, args.batch)
    state_dict = None if isinstance(peer, str) else ours.state_dict(cfg)  # before any step
    r = measure(ours, cfg, args.batch, args.steps, max(args.warmup, 1), args.matmul_size)
    paths = matmul_paths(ours.hlo_text())
    faults, kernel_s = page_faults(ours.step)
    threads = f"XLA:CPU {xla_threads()} (PJRT_NPROC={os.environ['PJRT_NPROC']})"
    if not isinstance(peer, str):
        threads += f", torch {peer[0].get_num_threads()}"
    step_ms = 1e3 * r["step_s"]
    print_rows(
        [
            ("model", f"{args.model} ({args.dtype}), batch {args.batch}"),
            ("params", f"{r['params_m']:.2f} M"),
            ("counted GFLOP / step", f"{r['gflop_per_step']:.1f}"),
            ("compile + warm-up", f"{r['warmup_s']:.1f} s"),
            (
                "step min / median / max",
                " / ".join(f"{x:.0f}" for x in (step_ms.min(), np.median(step_ms), step_ms.max()))
                + " ms",
            ),
            ("images / s (best step)", f"{r['images_per_sec']:.1f}"),
            ("achieved GFLOP/s (best step)", f"{r['achieved_gflops']:.1f}"),
            (f"matmul {args.matmul_size}^3 GFLOP/s (best)", f"{r['matmul_gflops']:.1f}"),
            ("achieved / matmul (bests)", f"{r['achieved_gflops'] / r['matmul_gflops']:.1%}"),
            ("achieved / matmul (pairs: median)", f"{np.median(r['pair_ratios']):.1%}"),
            ("load average (1 min)", f"{os.getloadavg()[0]:.1f}"),
            ("intra-op threads", threads),
            ("dots in the step by library", ", ".join(f"{k} {v}" for k, v in paths.items())),
            ("heap allocator", allocator.describe()),
            ("page faults / step, kernel CPU", f"{faults:,.0f}, {kernel_s:.2f} s"),
        ]
    )
    last = (
        f"images_per_sec={r['images_per_sec']:.1f} achieved_gflops={r['achieved_gflops']:.1f} "
        f"matmul_gflops={r['matmul_gflops']:.1f}"
    )
    if not isinstance(peer, str):
        peer_ips, ratio = compare_peer(args, *peer, ours, state_dict, cfg, r)
        last += f" peer_images_per_sec={peer_ips:.1f} ratio={ratio:.2f}"
    print(last)


if __name__ == "__main__":
    allocator.reexec_with_allocator()  # TCMalloc where installed, for both libraries' steps
    main()
