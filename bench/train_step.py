"""Benchmark of one CLIP train step (forward, backward, AdamW) against the matmul ceiling.

    python bench/train_step.py --model bench-tiny --batch 128

Prints a table, then exactly one line `images_per_sec=X achieved_gflops=Y matmul_gflops=Z`.

FLOPs counted per sample (the transformer blocks only, as in docs/benchmarks.md): per layer
24 N W^2 (QKV 6, attention output 2, MLP 16) + 4 N^2 W (q k^T and weights v) in the forward pass,
N = tokens incl. cls, W = width; x 3 for forward + backward; summed over both towers' layers.
The ceiling is a float32 n x n x n matmul (2 n^3 FLOPs) in the same process, timed once before
every step; reported numbers are best-of (min time) for both, plus the median of the per-pair
ratios (robust when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlcd import losses, models
from mlcd.models import layers, text, vit

EOS_ID, PAD_ID = 2, 0


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


def flops_per_sample(name: str) -> float:
    """Forward + backward FLOPs of both towers' transformer layers for one sample."""
    img = layers.resolve_variant("image", vit.VARIANTS, {"variant": name})
    txt = layers.resolve_variant("text", text.VARIANTS, {"variant": name})
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


def measure(name: str, batch: int, dtype: str, steps: int, warmup: int, matmul_size: int) -> dict:
    """Times ``steps`` train steps, each right after one ceiling matmul.

    The machine may be shared: alternating the two exposes both to the same background load, so
    their ratio stays meaningful; best-of (min) times are the least disturbed ones.
    """
    cfg = model_config(name, dtype)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    images, tokens = fake_batch(cfg, batch)
    matmul = make_matmul(matmul_size)

    t0 = time.perf_counter()
    for _ in range(warmup):
        params, opt_state, loss = step(params, opt_state, images, tokens)
    loss.block_until_ready()
    warmup_s = time.perf_counter() - t0
    step_s, matmul_s = [], []
    for _ in range(steps):
        matmul_s.append(matmul())
        t = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, images, tokens)
        loss.block_until_ready()
        step_s.append(time.perf_counter() - t)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss {float(loss)}")
    gflop = flops_per_sample(name) * batch / 1e9
    mm_gflop = 2 * matmul_size**3 / 1e9
    return dict(
        params_m=n_params / 1e6,
        gflop_per_step=gflop,
        warmup_s=warmup_s,
        step_s=np.array(step_s),
        images_per_sec=batch / min(step_s),
        achieved_gflops=gflop / min(step_s),
        matmul_gflops=mm_gflop / min(matmul_s),
        # Per pair (step, the matmul just before it): the ratio under the same load.
        pair_ratios=(gflop / np.array(step_s)) / (mm_gflop / np.array(matmul_s)),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench-tiny", help="variant for both towers")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps incl. compilation")
    parser.add_argument("--matmul_size", type=int, default=4096)
    args = parser.parse_args(argv)

    r = measure(args.model, args.batch, args.dtype, args.steps, args.warmup, args.matmul_size)
    step_ms = 1e3 * r["step_s"]
    rows = [
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
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(
        f"images_per_sec={r['images_per_sec']:.1f} achieved_gflops={r['achieved_gflops']:.1f} "
        f"matmul_gflops={r['matmul_gflops']:.1f}"
    )


if __name__ == "__main__":
    main()
