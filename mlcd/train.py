"""The trainer: python -m mlcd.train --config configs/clip.py:tiny --workdir runs/clip_tiny

Sections, top to bottom: mesh -> data -> model, objective and train step -> state (resume, or
initialise from config.seed and config.init_from) -> evaluators -> loop -> final report. The
method (CLIP, SigLIP, MLCD, ...) is the objective that config.objective.name picks
(mlcd/objectives); nothing here branches on it. The train state is in mlcd/train_state.py, the
step in mlcd/train_step.py.

Every random choice (init, data order, augmentation, per-step rng) derives from config.seed,
and the data iterator's position is checkpointed, so a resumed run continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from configs import common as config_lib
from input_pipeline import datasets
from input_pipeline.pipeline import TrainIterator
from input_pipeline.tokenizers import load_tokenizer
from mlcd import allocator, cli, evaluators, label_store, sharding, train_state
from mlcd.checkpoint import Checkpointer
from mlcd.encoder import Encoder
from mlcd.metrics_writer import MetricWriter, plot_metrics, read_metrics
from mlcd.train_step import build_train_step

# Named, so that the CLI shows its INFO lines (cli.setup_logging leaves the root at WARNING).
log = logging.getLogger("mlcd.train")

# Steps dispatched ahead of the last completed one. JAX dispatches asynchronously: without a
# bound, the loop would run far ahead of the device between two log steps, the progress bar
# would count dispatches rather than finished steps, and batches would queue up in memory.
MAX_STEPS_AHEAD = 2

# Config keys that may change when a run resumes: they change how a run is logged, evaluated,
# checkpointed or laid out (a new mesh or device count changes only float rounding), not what
# it computes. Any other change is refused unless --allow_config_change names it.
RESUMABLE_CHANGES = (
    "log_every",
    "ckpt_every",
    "keep_ckpts",
    "eval_every",
    "evals",
    "mesh",
    "distributed",
    "nonfinite",
    "data.num_threads",
    "data.prefetch",
    "data.max_skipped",
    "data.data_dir",
    "tokenizer",
)

# Exit status after a preemption signal (SIGTERM) once the state is checkpointed: 128 + 15,
# what a process ended by SIGTERM reports, so a scheduler set to requeue preempted jobs on it
# (Kubernetes podFailurePolicy onExitCodes, a SLURM requeue script) requeues the run, which
# then resumes from that checkpoint.
PREEMPTED_EXIT = 143


class Preempted(BaseException):
    """SIGTERM arrived; the state of `step` is checkpointed and the run can be resumed (step
    None: during start-up, before the first step, when every state is on disk already).

    A BaseException, like KeyboardInterrupt: during start-up the signal handler raises it
    wherever the main thread is, and library code that wraps or retries on an Exception (tfds
    prefixes the message of one raised while it encodes an example) must let it through.
    """

    def __init__(self, step: int | None):
        super().__init__(
            f"preempted (SIGTERM) at step {step}: checkpoint saved"
            if step is not None
            else "preempted (SIGTERM) during start-up, before the first step: nothing to save"
        )
        self.step = step


class _Preemption:
    """SIGTERM handling of one train_and_evaluate call, from its first line on.

    During start-up (distributed set-up, data build, model, restore, evaluators) the state is
    the initial one or a restored checkpoint, so there is nothing to save: SIGTERM raises
    Preempted at once, wherever the main thread is, so that a long data build stops now (its
    pool and temporary directory cleaned up) rather than after the grace period; only the
    `deferred()` sections, which write files, finish first. From `start_loop()` on it only sets
    `requested`: the loop finishes the step, checkpoints it and raises Preempted.
    """

    def __init__(self):
        self.requested = False
        self._in_loop = False
        self._deferring = 0

    def __call__(self, signum, frame) -> None:
        self.requested = True
        if not self._in_loop and not self._deferring:
            raise Preempted(None)

    @contextlib.contextmanager
    def deferred(self):
        """A start-up section that SIGTERM must not cut short; Preempted follows it."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.requested and not self._in_loop and not self._deferring:
            raise Preempted(None)

    def start_loop(self) -> None:
        self._in_loop = True


@contextlib.contextmanager
def _preemption_handler():
    """Installs a _Preemption as the SIGTERM handler while the block runs."""
    preemption = _Preemption()
    # Signal handlers can only be set from the main thread (a library caller may be another).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, preemption) if in_main_thread else None
    try:
        yield preemption
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


class Diverged(ValueError):
    """config.nonfinite.max_consecutive non-finite steps in a row."""


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


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first invalid loop setting, before anything is built."""
    for key in ("total_steps", "log_every", "ckpt_every", "batch_size", "microbatches"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"config.{key}={config[key]!r} must be a positive integer")
    if (
        not isinstance(config.nonfinite.max_consecutive, int)
        or config.nonfinite.max_consecutive < 0
    ):
        raise ValueError(
            f"config.nonfinite.max_consecutive={config.nonfinite.max_consecutive!r} must be an "
            "integer >= 0 (0: never stop)"
        )


def check_resume_config(path: str, config: ml_collections.ConfigDict, allowed=()) -> None:
    """Refuses to resume a run whose config.json (`path`) differs from `config` in a key that
    changes results (anything but RESUMABLE_CHANGES and the `allowed` keys), naming them."""
    with open(path) as f:
        try:
            saved = json.load(f)
        except ValueError as e:  # the message alone names no file
            raise ValueError(f"{path}: not a config (invalid JSON: {e})") from None
    changed = config_lib.changed_keys(saved, config, (*RESUMABLE_CHANGES, *allowed))
    if changed:
        listed = "; ".join(f"config.{k}={new!r} (was {old!r})" for k, old, new in changed[:5])
        raise ValueError(
            f"{os.path.dirname(path)} was trained with another config: {listed}. Resume with "
            "the run's own config, train in a new --workdir, or, if the change is safe, allow "
            f"it with --allow_config_change={','.join(k for k, _, _ in changed)}"
        )


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize with the fields of config.distributed that are set."""
    if jax.config.jax_platforms in (None, "", "cpu") and cfg.coordinator_address:
        # Cross-process collectives on CPU (local multi-process runs and tests) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in cfg.items() if k != "enabled" and v is not None}
    jax.distributed.initialize(**kwargs)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: tuple[str, ...] = ()
) -> dict[str, float]:
    """Trains (resuming from workdir if it holds a checkpoint), evaluates, returns final metrics.

    A resumed run must have the config it was started with (check_resume_config; keys in
    `allow_config_change` may differ). Raises Preempted after SIGTERM (the state checkpointed)
    and Diverged after config.nonfinite.max_consecutive non-finite steps in a row.
    """
    check_config(config)
    # Before anything is built: a SIGTERM during start-up (which can last minutes: a data
    # build, a restore) is a preemption too, not the default action (rc -15, no message).
    with _preemption_handler() as preemption:
        return _train_and_evaluate(config, workdir, allow_config_change, preemption)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: tuple[str, ...],
    preemption: _Preemption,
) -> dict[str, float]:
    # ---- Distributed set-up and mesh ------------------------------------------------------
    if config.distributed.enabled:
        initialize_distributed(config.distributed)
        # jax.distributed installs a SIGTERM handler of its own (its preemption notifier, which
        # the loop does not poll): the trainer's takes the signal back.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, preemption)
    mesh = sharding.make_mesh(config.mesh)
    if jax.default_backend() == "cpu":
        log.info("heap allocator: %s", allocator.describe())
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
        if not config.tokenizer and not os.path.isfile(tokenizer_path):
            raise ValueError(
                f"config.tokenizer is not set and dataset {builder.name} has no tokenizer.json "
                "of its own: give --config.tokenizer (e.g. CLIP's bpe_simple_vocab_16e6.txt.gz)"
            )
        try:
            tokenizer = load_tokenizer(tokenizer_path, config.pp.text_clean)
        except ValueError as e:
            raise ValueError(f"config.tokenizer / config.pp.text_clean: {e}") from e
        with config.unlocked():
            config.tokenizer = os.path.abspath(tokenizer_path)  # config.json names the one used
    config = train_state.resolve_model_config(config, tokenizer)

    # ---- Objective, model and train step (compiled on its first call) ------------------------
    built = build_train_step(config, mesh)
    shardings, train_step = built.shardings, built.step
    # config.json describes the checkpoints: a resume must match it, and it is written only
    # once that is checked (a refused resume leaves the run untouched).
    ckpt = Checkpointer(workdir, keep=config.keep_ckpts)
    config_path = os.path.join(workdir, "config.json")
    if ckpt.latest_step() is not None and os.path.exists(config_path):
        check_resume_config(config_path, config, allow_config_change)
    if jax.process_index() == 0:
        # Replaced atomically: the other hosts may be reading it (check_resume_config above),
        # and a torn config.json would block every later resume.
        with preemption.deferred(), label_store.atomic_file(config_path) as f:
            f.write(config.to_json(indent=2).encode())
    train_iter = TrainIterator(
        builder,
        config,
        tokenizer,
        fields=built.objective.inputs,
        host_batch_size=config.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    # ---- State: resume if the workdir has a checkpoint, else initialise ----------------------
    # The newest checkpoint that restores; a damaged one is moved aside (never deleted) with a
    # warning, and the one before it is used.
    # Deferred: a restore moves damaged steps aside and the writer rewrites metrics.jsonl.
    with preemption.deferred():
        resumed = ckpt.restore_latest(built.abstract_state)
        resume_step = None if resumed is None else resumed[0]
        # Per-step metrics since the last log record: checkpointed with the data position, so
        # the first record after a resume averages the same steps as the uninterrupted run's.
        log_metrics: list[dict[str, Any]] = []
        if resumed is not None:
            _, state, data_state = resumed
            # Checkpoints written before the metrics were saved hold the iterator state alone.
            train_iter.set_state(data_state.get("iterator", data_state))
            log_metrics = [
                {k: np.float32(v) for k, v in m.items()}
                for m in data_state.get("pending_metrics", [])
            ]
            log.info("resumed from step %d", resume_step)
        writer = MetricWriter(workdir, resume_step=resume_step)
    if resumed is None:
        # Only a fresh run reads config.init_from: a resumed one continues from its own
        # checkpoint, which is what makes the resume exact (and needs no init_from on disk).
        with jax.set_mesh(mesh):
            state = train_state.init_state(config, built.objective, built.tx, shardings)
    num_params = sum(x.size for x in jax.tree.leaves(train_state.model_params(state["params"])))

    def save(step: int) -> None:
        pending = [{k: float(v) for k, v in m.items()} for m in jax.device_get(log_metrics)]
        data_state = {"iterator": train_iter.get_state(), "pending_metrics": pending}
        ckpt.save(step, state, data_state)

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
    nonfinite_run: list[int] = []  # steps of the current streak of non-finite steps
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

    def check_finite(steps_metrics: list[dict[str, Any]], last_step: int) -> None:
        """Follows the streak of non-finite steps; Diverged when it reaches the limit."""
        limit = config.nonfinite.max_consecutive
        first = last_step - len(steps_metrics) + 1
        for i, m in enumerate(steps_metrics):
            if m["train/nonfinite"] > 0:
                nonfinite_run.append(first + i)
            else:
                nonfinite_run.clear()
            if limit and len(nonfinite_run) >= limit:
                raise Diverged(
                    f"training diverged: the loss, gradients or updated parameters were not "
                    f"finite at {limit} steps in a row from step {nonfinite_run[0]} "
                    f"(config.nonfinite.max_consecutive={limit}); these steps left the state "
                    f"unchanged and every checkpoint in {ckpt.directory} is finite. Lower "
                    "config.optim.lr (or raise optim.warmup_steps / lower grad_clip_norm) and "
                    "resume from the last checkpoint"
                )

    # SIGTERM (preemption on TPU/GKE/SLURM) from here on: finish the current step, checkpoint
    # it, exit with PREEMPTED_EXIT. Hosts agree on the step: each host's flag is combined at
    # log steps.
    preemption.start_loop()

    def preempted() -> bool:
        if jax.process_count() == 1:
            return preemption.requested
        if step % config.log_every:
            return False
        flags = multihost_utils.process_allgather(np.int32(preemption.requested))
        return bool(np.max(flags))

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
                    fetched = jax.device_get(log_metrics)
                    means = jax.tree.map(lambda *v: float(np.mean(v)), *fetched)
                    finish_steps(0)
                    elapsed = time.perf_counter() - t_log
                    means["train/images_per_sec"] = images_seen / max(elapsed, 1e-9)
                    means["data/skipped_examples"] = train_iter.skipped
                    writer.write(step, means)
                    check_finite(fetched, step)
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
                        save(step)
                    if preempted():
                        if step % config.ckpt_every:
                            save(step)
                        raise Preempted(step)
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
                save(step)
    finally:
        bar.close()
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


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str, tuple[str, ...]]:
    parser = argparse.ArgumentParser(
        prog="python -m mlcd.train",
        description="Train from a config: --config FILE.py:PRESET --workdir DIR [--config.key=v]",
    )
    parser.add_argument("--config", required=True, help="path/to/config.py[:preset]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
    parser.add_argument(
        "--allow_config_change",
        default="",
        help="comma-separated config keys (or sections, e.g. optim) a resumed run may change; "
        "by default a resume with another value for anything that changes results is refused",
    )
    args, overrides = parser.parse_known_args(argv)
    config = config_lib.load_config(args.config)
    config_lib.parse_overrides(config, overrides)
    allowed = tuple(k.strip().removeprefix("config.") for k in args.allow_config_change.split(","))
    return config, args.workdir, tuple(k for k in allowed if k)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one line on stderr), PREEMPTED_EXIT after SIGTERM
    (checkpointed: re-run the same command to resume)."""
    cli.setup_logging(__name__, log.name)

    def body() -> None:
        config, workdir, allowed = parse_args(sys.argv[1:] if argv is None else argv)
        train_and_evaluate(config, workdir, allowed)

    try:
        return cli.run(body)
    except Preempted as e:
        print(f"{e}; re-run the same command to resume", file=sys.stderr)
        return PREEMPTED_EXIT


if __name__ == "__main__":
    cli.start_process()
    sys.exit(main())
