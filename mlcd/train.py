"""The trainer: python -m mlcd.train --config configs/clip.py:tiny --workdir runs/clip_tiny

Sections, top to bottom: mesh -> data -> model, objective and train step -> state (init or
resume) -> evaluators -> loop -> final report. The method (CLIP, SigLIP, MLCD, ...) is the
objective that config.objective.name picks (mlcd/objectives); nothing here branches on it. The
train state is in mlcd/train_state.py, the step in mlcd/train_step.py.

Every random choice (init, data order, augmentation, per-step rng) derives from config.seed,
and the data iterator's position is checkpointed, so a resumed run continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from configs import common as config_lib
from input_pipeline import datasets
from input_pipeline.pipeline import TrainIterator
from input_pipeline.tokenizers import load_tokenizer
from mlcd import cli, evaluators, sharding, train_state
from mlcd.checkpoint import Checkpointer, abstract_like
from mlcd.encoder import Encoder
from mlcd.metrics_writer import MetricWriter, plot_metrics, read_metrics
from mlcd.train_step import build_train_step

# Steps dispatched ahead of the last completed one. JAX dispatches asynchronously: without a
# bound, the loop would run far ahead of the device between two log steps, the progress bar
# would count dispatches rather than finished steps, and batches would queue up in memory.
MAX_STEPS_AHEAD = 2


def run_evaluators(evals, encoder: Encoder, step: int, final: bool) -> dict[str, float]:
    """Runs the evaluators due at `step` ({name: (evaluator, every)}; all of them if final)."""
    due = [ev for ev, every in evals.values() if final or (every > 0 and step % every == 0)]
    # One SharedEmbeddings per round (params change between rounds): images that several
    # evaluators use are embedded once.
    shared = evaluators.SharedEmbeddings(encoder)
    results = {}
    for evaluator in due:
        results.update(evaluator.run(shared))
    return results


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize with the fields of config.distributed that are set."""
    if jax.config.jax_platforms in (None, "", "cpu") and cfg.coordinator_address:
        # Cross-process collectives on CPU (local multi-process runs and tests) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in cfg.items() if k != "enabled" and v is not None}
    jax.distributed.initialize(**kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from workdir if it holds a checkpoint), evaluates, returns final metrics."""
    # ---- Distributed set-up and mesh ------------------------------------------------------
    if config.distributed.enabled:
        initialize_distributed(config.distributed)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.batch_size, mesh, "config.batch_size")
    microbatches = config.microbatches
    if config.batch_size % (microbatches * mesh.size):
        raise ValueError(
            f"config.batch_size={config.batch_size} does not split into config.microbatches="
            f"{microbatches} slices over {mesh.size} devices"
        )
    if config.batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by {jax.process_count()} hosts"
        )
    os.makedirs(workdir, exist_ok=True)

    # ---- Data -------------------------------------------------------------------------------
    get_builder = lambda: datasets.get_builder(
        config.data.name, config.data.data_dir, **config.data.build.to_dict()
    )
    if jax.process_count() > 1:
        # Host 0 builds a missing dataset first, so hosts sharing a filesystem never write the
        # same directory concurrently; the others then find it prepared (or, on host-local
        # disks, build their own identical copy).
        if jax.process_index() == 0:
            get_builder()
        multihost_utils.sync_global_devices("dataset_ready")
    builder = get_builder()
    tokenizer = None
    if config.model.get("text") is not None:  # image-only models (MLCD) need no tokenizer
        tokenizer_path = config.tokenizer or os.path.join(builder.data_dir, "tokenizer.json")
        tokenizer = load_tokenizer(tokenizer_path)
        with config.unlocked():
            config.tokenizer = os.path.abspath(tokenizer_path)  # config.json names the one used
    config = train_state.resolve_model_config(config, tokenizer)

    # ---- Objective, model and train step (compiled on its first call) ------------------------
    built = build_train_step(config, mesh)
    shardings, train_step = built.shardings, built.step
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    train_iter = TrainIterator(
        builder,
        config,
        tokenizer,
        fields=built.objective.inputs,
        host_batch_size=config.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    # ---- State: initialise, or resume if the workdir has a checkpoint -------------------------
    with jax.set_mesh(mesh):
        state = train_state.init_state(config, built.objective, built.tx, shardings)
    num_params = sum(x.size for x in jax.tree.leaves(train_state.model_params(state["params"])))
    ckpt = Checkpointer(workdir, keep=config.keep_ckpts)
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        state, data_state = ckpt.restore(resume_step, abstract_like(state, shardings))
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", resume_step)
    writer = MetricWriter(workdir, resume_step=resume_step)

    # ---- Evaluators ---------------------------------------------------------------------------
    evals = {}
    for name, entry in config.evals.items():
        evaluator, every = evaluators.build(
            name,
            entry.to_dict(),
            builder=builder,
            out_dir=os.path.join(workdir, "eval"),
            default_every=config.eval_every,
        )
        if every >= 0:
            evals[name] = (evaluator, every)

    # One encoder (its towers compile once); it is pointed at the live params before each eval.
    encoder = Encoder(
        built.graphdef,
        train_state.model_params(state["params"]),
        image_size=config.pp.image_size,
        tokenizer=tokenizer,
        context_length=config.pp.context_length,
        mesh=mesh,
    )

    # ---- Loop ---------------------------------------------------------------------------------
    step = int(resume_step or 0)
    total = int(config.total_steps)
    log_metrics: list[dict[str, jax.Array]] = []
    in_flight: collections.deque[jax.Array] = collections.deque()  # losses of unfinished steps
    images_seen, t_log = 0, time.perf_counter()
    bar = tqdm(
        total=total,
        initial=step,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )

    def finish_steps(keep: int) -> None:
        """Waits until at most `keep` steps are unfinished, counting finished ones on the bar
        (so its rate and ETA are of completed steps, not of dispatches)."""
        while len(in_flight) > keep or (in_flight and in_flight[0].is_ready()):
            in_flight.popleft().block_until_ready()
            bar.update(1)

    # Order within a step: log, evaluate, then checkpoint. Everything metrics.jsonl holds up to
    # a checkpoint's step is then complete, so a resumed run (which drops later records) logs
    # exactly what an uninterrupted run would. The last checkpoint follows the final evaluation.
    try:
        with jax.set_mesh(mesh):
            while step < total:
                batch = sharding.host_to_global(next(train_iter), mesh)
                state, metrics = train_step(state, batch)
                step += 1
                images_seen += config.batch_size
                log_metrics.append(metrics)
                in_flight.append(metrics["train/loss"])
                finish_steps(MAX_STEPS_AHEAD)
                if step % config.log_every == 0 or step == total:
                    # Fetching metrics syncs with the device: do it only at log time.
                    means = jax.tree.map(lambda *v: float(np.mean(v)), *jax.device_get(log_metrics))
                    finish_steps(0)
                    elapsed = time.perf_counter() - t_log
                    means["train/images_per_sec"] = images_seen / max(elapsed, 1e-9)
                    means["data/skipped_examples"] = train_iter.skipped
                    writer.write(step, means)
                    bar.set_postfix(
                        loss=f"{means['train/loss']:.4f}",
                        img_s=f"{means['train/images_per_sec']:.0f}",
                    )
                    log_metrics, images_seen, t_log = [], 0, time.perf_counter()
                if step < total:
                    encoder.params = train_state.model_params(state["params"])
                    results = run_evaluators(evals, encoder, step, final=False)
                    if results:
                        writer.write(step, results)
                        t_log = time.perf_counter()  # evaluation is not training throughput
                    if step % config.ckpt_every == 0:
                        ckpt.save(step, state, train_iter.get_state())
            finish_steps(0)
            bar.close()

            # ---- Final evaluation and checkpoint ----------------------------------------------
            if resume_step == total:  # a finished run started again: report, do not redo
                final = {
                    k: v
                    for r in read_metrics(writer.path)
                    if r["step"] == total
                    for k, v in r.items()
                    if "/" in k and not k.startswith(("train/", "data/"))
                }
            else:
                encoder.params = train_state.model_params(state["params"])
                final = run_evaluators(evals, encoder, step, final=True)
                writer.write(step, final)
                ckpt.save(step, state, train_iter.get_state())
    finally:
        ckpt.close()  # waits for pending asynchronous saves
        writer.close()
    if jax.process_index() == 0:
        png = plot_metrics(writer.path, os.path.join(workdir, "curves.png"))
        last_train = [r for r in read_metrics(writer.path) if "train/loss" in r]
        summary = {**(last_train[-1] if last_train else {}), **final}
        summary.pop("step", None)
        print(format_report(summary, workdir, png, num_params, step))
    return final


def format_report(metrics: dict[str, float], workdir: str, png: str, num_params: int, step: int):
    lines = [
        "",
        f"Finished at step {step} ({num_params / 1e6:.2f}M parameters).",
        f"{'metric':<34} {'value':>10}",
        f"{'-' * 34} {'-' * 10}",
    ]
    lines += [f"{k:<34} {v:>10.4f}" for k, v in sorted(metrics.items())]
    lines += [
        "",
        f"outputs:  {os.path.abspath(workdir)}",
        f"  checkpoints/    metrics.jsonl    tensorboard/    config.json    {os.path.basename(png)}",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    parser = argparse.ArgumentParser(
        prog="python -m mlcd.train",
        description="Train from a config: --config FILE.py:PRESET --workdir DIR [--config.key=v]",
    )
    parser.add_argument("--config", required=True, help="path/to/config.py[:preset]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
    args, overrides = parser.parse_known_args(argv)
    config = config_lib.load_config(args.config)
    config_lib.parse_overrides(config, overrides)
    return config, args.workdir


def main(argv: Sequence[str] | None = None) -> int:
    cli.setup_logging(__name__)

    def body() -> None:
        config, workdir = parse_args(sys.argv[1:] if argv is None else argv)
        train_and_evaluate(config, workdir)

    return cli.run(body)


if __name__ == "__main__":
    cli.enable_compilation_cache()
    sys.exit(main())
