"""The one trainer: python -m mlcd.train --config configs/clip.py:tiny --workdir runs/clip_tiny

Sections, top to bottom: config -> mesh -> data -> model -> optimizer -> checkpoint (resume)
-> train step -> evaluators -> loop -> final report. The objective (CLIP, SigLIP, ...) is picked
by name from config.objective; nothing below branches on the method.

The train state is a plain dict {params, opt_state, step, rng} of global jax.Arrays sharded by
`config.sharding_rules`, so the same code runs on 1 CPU and on a multi-host mesh. Every random
choice (init, data order, augmentation, per-step rng) derives from config.seed, and the data
iterator's position is checkpointed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from configs import common as config_lib
from input_pipeline import datasets, preprocess
from input_pipeline.pipeline import TrainIterator
from input_pipeline.tokenizers import Tokenizer, load_tokenizer
from mlcd import evaluators, objectives, optim, sharding
from mlcd.checkpoint import Checkpointer, abstract_like
from mlcd.encoder import Encoder
from mlcd.metrics_writer import MetricWriter, plot_metrics, read_metrics
from mlcd.models import build_model, layers, vit
from mlcd.models import text as text_tower


def resolve_model_config(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer | None
) -> ml_collections.ConfigDict:
    """Fills the model fields that follow from data and tokenizer (resolution, vocabulary), then
    expands each tower's named variant into all of its settings.

    Why the expansion: config.json (and every export made from the run) then records the exact
    architecture, so a later change to a variant's defaults in mlcd/models can never rebuild an
    old checkpoint with a different shape.
    """
    config = ml_collections.ConfigDict(config)  # copy: never edit the caller's config
    with config.unlocked():
        config.model.image.image_size = config.pp.image_size
        config.model.image = {
            "variant": config.model.image.variant,
            **layers.resolve_variant("image", vit.VARIANTS, config.model.image.to_dict()),
        }
        if config.model.get("text") is not None and tokenizer is not None:
            config.model.text.vocab_size = tokenizer.vocab_size
            config.model.text.eos_id = tokenizer.eos_id
            config.model.text.pad_id = tokenizer.pad_id
            config.model.text.context_length = config.pp.context_length
            config.model.text = {
                "variant": config.model.text.variant,
                **layers.resolve_variant("text", text_tower.VARIANTS, config.model.text.to_dict()),
            }
    return config


def abstract_model(model_cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, abstract params as a pure dict of ShapeDtypeStructs), allocating nothing."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("models must keep all their state in nnx.Param (found other variables)")
    return graphdef, nnx.to_pure_dict(params)


def init_params(model_cfg: ml_collections.ConfigDict, seed: int, shardings: Any) -> Any:
    """Parameters created directly with their final sharding (no host ever holds them whole).

    With model_cfg.centers_init set, the class centers are then replaced by that file's rows
    (see load_centers).
    """

    @jax.jit
    def init():
        model = build_model(model_cfg, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    params = jax.jit(init, out_shardings=shardings)()
    if model_cfg.get("centers_init"):
        params["centers"] = load_centers(
            model_cfg.centers_init, params["centers"].shape, shardings["centers"]
        )
    return params


def load_centers(
    path: str, shape: tuple[int, ...], out_sharding: jax.sharding.Sharding
) -> jax.Array:
    """float32 `shape` [C, E] array from a .npy file (config.model.centers_init, e.g. the
    centroids.npy of python -m mlcd.cluster), placed with `out_sharding`.

    The file is memory-mapped and each process reads only the rows its devices hold: 1M x 768
    float32 centers are 3 GB, which no host needs whole. Rows are used as stored (spherical
    k-means centroids are unit-norm; the loss normalises anyway).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.model.centers_init={path!r}: no such file")
    data = np.load(path, mmap_mode="r")
    if data.shape != tuple(shape):
        raise ValueError(
            f"config.model.centers_init={path!r} holds an array of shape {data.shape}, but the "
            f"model's centers are {tuple(shape)} (config.model.num_centers, "
            "config.model.embed_dim)"
        )
    return jax.make_array_from_callback(
        tuple(shape), out_sharding, lambda index: np.asarray(data[index], np.float32)
    )


def abstract_state(tx: optax.GradientTransformation, abstract_params: Any) -> dict[str, Any]:
    """The train state {params, opt_state, step, rng} as ShapeDtypeStructs, allocating nothing."""
    return {
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    }


def state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, mesh
) -> dict[str, Any]:
    """NamedShardings of the train state: optimizer moments take their parameter's sharding
    (so a center row's Adam state lives on the device that owns the row); the rest, including
    step and rng, is replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {
        "params": param_shardings,
        "opt_state": optax.tree_map_params(
            tx,
            lambda _, s: s,
            jax.eval_shape(tx.init, abstract_params),
            param_shardings,
            transform_non_params=lambda _: replicated,
        ),
        "step": replicated,
        "rng": replicated,
    }


def init_state(
    model_cfg: ml_collections.ConfigDict, seed: int, tx: optax.GradientTransformation, shardings
) -> dict[str, Any]:
    """The initial train state, every array created directly with `shardings` (state_shardings).

    Call under jax.set_mesh(mesh).
    """
    params = init_params(model_cfg, seed, shardings["params"])
    return {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), shardings["rng"]),
    }


def make_train_step(
    graphdef, objective, tx, schedule, state_shardings, batch_sharding, mesh, microbatches=1
):
    """Jitted (state, batch) -> (state, metrics); the input state's buffers are donated.

    microbatches = k > 1 computes the gradient in k sequential slices of the batch (a lax.scan
    accumulating the sum), so activations take 1/k of the memory for the same update. Only
    for objectives whose loss is a mean of per-example terms (`objective.per_example`, e.g.
    MLCD: all slices share the step's rng, hence its sampled negatives): the loss and
    gradient are then the full batch's. In-batch contrastive losses are refused: a slice would
    see only B/k negatives.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if microbatches > 1 and not getattr(objective, "per_example", False):
        raise ValueError(
            f"config.microbatches={microbatches}: objective {type(objective).__name__} compares "
            "examples across the batch, so a microbatch would change its loss; use 1"
        )

    def grads_of(params, batch, step_rng):
        images = preprocess.normalize_images(batch["image"])

        def loss_fn(params):
            out = nnx.merge(graphdef, params)(images, batch.get("tokens"))
            return objective(out, batch, step_rng)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def accumulated_grads_of(params, batch, step_rng):
        # Microbatch j = rows j, j + k, j + 2k, ...: every device keeps B / (k N) of its own
        # rows in each slice, so splitting moves no data.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(-1, microbatches, *x.shape[1:]), 0, 1), batch
        )

        def body(total, mb):
            value, grads = grads_of(params, mb, step_rng)
            # Gradients summed in the parameters' own layout (FSDP: reduce-scattered per slice).
            grads = jax.lax.with_sharding_constraint(grads, state_shardings["params"])
            return jax.tree.map(jnp.add, total, (value, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, first, step_rng))
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / microbatches, total)

    def step_fn(state, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        compute = grads_of if microbatches == 1 else accumulated_grads_of
        (loss, aux), grads = compute(state["params"], batch, step_rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": jax.random.key_data(rng),
        }
        metrics = {
            "train/loss": loss,
            "train/lr": schedule(state["step"]),
            "train/grad_norm": optax.tree.norm(grads),
            **{f"train/{k}": v for k, v in aux.items()},
        }
        return new_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


class TrainStep(NamedTuple):
    """A train step, jitted but not yet compiled, and the pieces it was built from."""

    graphdef: nnx.GraphDef  # the model's structure; nnx.merge(graphdef, params) rebuilds it
    tx: optax.GradientTransformation  # optim.make_optimizer(config.optim, ...)
    shardings: dict[str, Any]  # NamedShardings of the train state (`state_shardings`)
    abstract_state: dict[str, Any]  # ShapeDtypeStructs of the train state, with `shardings`
    step: Any  # jitted (state, batch) -> (state, metrics), state donated (`make_train_step`)


def build_train_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    microbatches: int | None = None,
    objective: Any = None,
) -> TrainStep:
    """The train step of `config` on `mesh`, built from shapes only: allocates nothing.

    The one place that assembles it, shared by the trainer, bench/dry_run.py (which lowers
    `step` on `abstract_state` for a fake mesh) and the tests of the compiled step:
    abstract_model(config.model) -> param shardings from config.sharding_rules ->
    optim.make_optimizer(config.optim, ..., config.total_steps) -> state_shardings ->
    make_train_step, the batch's first dimension split over all mesh axes
    (sharding.batch_sharding).

    Args:
      config: a resolved config (`resolve_model_config`: the model's variants expanded).
      mesh: the device mesh the state and batch are sharded over (sharding.make_mesh).
      microbatches: gradient-accumulation slices; None: config.microbatches.
      objective: the loss (an `objectives` instance); None: the one config.objective names.

    Returns:
      TrainStep. Nothing is traced or compiled yet: jax.jit compiles `step` on its first call or
      `.lower`; call or lower it under jax.set_mesh(mesh). Create the real state with
      init_state(config.model, seed, tx, shardings).

    Raises:
      ValueError: microbatches > 1 with an objective that compares examples across the batch.
    """
    if microbatches is None:
        microbatches = config.microbatches
    if objective is None:
        objective = objectives.get(config.objective.name)(config.objective)
    graphdef, abstract_params = abstract_model(config.model)
    param_shardings = sharding.param_shardings(abstract_params, config.sharding_rules, mesh)
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
    shardings = state_shardings(tx, abstract_params, param_shardings, mesh)
    step = make_train_step(
        graphdef,
        objective,
        tx,
        schedule,
        shardings,
        sharding.batch_sharding(mesh),
        mesh,
        microbatches=microbatches,
    )
    return TrainStep(
        graphdef=graphdef,
        tx=tx,
        shardings=shardings,
        abstract_state=abstract_like(abstract_state(tx, abstract_params), shardings),
        step=step,
    )


def make_evaluators(
    config: ml_collections.ConfigDict, builder, out_dir: str
) -> dict[str, tuple[Any, int]]:
    """{name: (evaluator, every)} from config.evals = {name: {type, every, **kwargs}}.

    every: evaluate each `every` steps (default config.eval_every); 0 = only after the last
    step; < 0 = never (the entry is skipped). Evaluators that write files (an `out_dir`
    argument) write them under `out_dir`.
    """
    out = {}
    for name, ecfg in config.evals.items():
        kwargs = ecfg.to_dict()
        cls = evaluators.get(kwargs.pop("type", name))
        every = int(kwargs.pop("every", config.eval_every))
        if every < 0:
            continue
        if "out_dir" in inspect.signature(cls).parameters:
            kwargs.setdefault("out_dir", out_dir)
        out[name] = (cls(builder=builder, **kwargs), every)
    return out


def run_evaluators(evals, encoder: Encoder, step: int, final: bool) -> dict[str, float]:
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
    config = resolve_model_config(config, tokenizer)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    train_iter = TrainIterator(
        builder,
        config,
        tokenizer,
        host_batch_size=config.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    # ---- Model, optimizer and train step (compiled on its first call) ------------------------
    built = build_train_step(config, mesh)
    shardings, train_step = built.shardings, built.step
    with jax.set_mesh(mesh):
        state = init_state(config.model, config.seed, built.tx, shardings)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    # ---- Checkpoint: resume if the workdir has one ------------------------------------------
    ckpt = Checkpointer(workdir, keep=config.keep_ckpts)
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        state, data_state = ckpt.restore(resume_step, abstract_like(state, shardings))
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", resume_step)
    writer = MetricWriter(workdir, resume_step=resume_step)

    # ---- Evaluators ---------------------------------------------------------------------------
    evals = make_evaluators(config, builder, os.path.join(workdir, "eval"))

    # One encoder (its towers compile once); it is pointed at the live params before each eval.
    encoder = Encoder(
        built.graphdef,
        state["params"],
        image_size=config.pp.image_size,
        tokenizer=tokenizer,
        context_length=config.pp.context_length,
        mesh=mesh,
    )

    # ---- Loop ---------------------------------------------------------------------------------
    step = int(resume_step or 0)
    total = int(config.total_steps)
    log_metrics: list[dict[str, jax.Array]] = []
    images_seen, t_log = 0, time.perf_counter()
    bar = tqdm(
        total=total,
        initial=step,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
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
                bar.update(1)
                if step % config.log_every == 0 or step == total:
                    # Fetching metrics syncs with the device: do it only at log time.
                    means = jax.tree.map(lambda *v: float(np.mean(v)), *jax.device_get(log_metrics))
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
                    encoder.params = state["params"]
                    results = run_evaluators(evals, encoder, step, final=False)
                    if results:
                        writer.write(step, results)
                        t_log = time.perf_counter()  # evaluation is not training throughput
                    if step % config.ckpt_every == 0:
                        ckpt.save(step, state, train_iter.get_state())
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
                encoder.params = state["params"]
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


def enable_compilation_cache() -> None:
    """Persistent XLA cache (default ~/.cache/mlcd/jax, or $JAX_COMPILATION_CACHE_DIR): a
    re-run or a resumed run skips the seconds-long compiles of the step and the towers."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = os.path.join(os.path.expanduser("~"), ".cache", "mlcd", "jax")
        jax.config.update("jax_compilation_cache_dir", cache)
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)
    # tfds/absl chatter (custom-config notices, the OpenCV hint) is not news to a user.
    logging.getLogger("absl").setLevel(logging.ERROR)
    enable_compilation_cache()
    try:
        config, workdir = parse_args(sys.argv[1:] if argv is None else argv)
        train_and_evaluate(config, workdir)
    except (KeyError, ValueError, FileNotFoundError) as e:
        # Bad input (config key, mesh, batch size, dataset directory...): one clear line.
        # MLCD_TRACEBACK=1 shows where it was raised.
        if os.environ.get("MLCD_TRACEBACK"):
            raise
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
