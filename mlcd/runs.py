"""Reading training runs and exports (never writing them): their configs, the encoder's
parameters, and `Encoder`s over either. Shared by the evaluate, export and cluster CLIs, and
by the trainer's config.init_from (open_pretrained, restore_pretrained).

An export (written by python -m mlcd.export) is self-contained:
    DIR/export.json     format, model config, preprocessing spec, data spec, source step
    DIR/params/         the model's parameters (orbax, restorable on any device layout)
    DIR/tokenizer.*     the text tokenizer, for two-tower models
A run directory (python -m mlcd.train) holds config.json (resolved: every tower setting
written out) and checkpoints/ of the whole train state; only the model's parameters are read
from it here, never the heads (training-only), optimizer state, step or rng.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from input_pipeline.tokenizers import load_tokenizer
from mlcd import models, sharding, tree_utils
from mlcd.checkpoint import Checkpointer
from mlcd.encoder import Encoder

FORMAT = "mlcd-encoder/1"
EXPORT_FILE = "export.json"
PARAMS_DIR = "params"
# Keys that config.json of MLCD runs written before the objectives owned their heads kept
# under config.model (the class centers); they are not part of the model, so readers drop them.
_LEGACY_HEAD_KEYS = ("num_centers", "centers_init")


def replicated(tree: Any, mesh) -> Any:
    """ShapeDtypeStructs of `tree` replicated over `mesh`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), tree
    )


def _local_mesh():
    return sharding.make_mesh((("data", -1),))


def check_shapes(expected: Any, found: Any, what: str) -> None:
    """Raises naming the first parameter whose saved shape differs from the model's."""
    exp, got = tree_utils.shapes(expected), tree_utils.shapes(found)
    for name in sorted(set(exp) | set(got)):
        if exp.get(name) != got.get(name):
            raise ValueError(
                f"{what} does not match the model: parameter {name!r} is "
                f"{got.get(name, 'missing')} on disk, {exp.get(name, 'absent')} in the model "
                "(a checkpoint from a different model size?)"
            )


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config.json (as the trainer resolved it)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training run: {path} is missing")
    with open(path) as f:
        config = json.load(f)
    for key in _LEGACY_HEAD_KEYS:
        config["model"].pop(key, None)
    return ml_collections.ConfigDict(config)


def restore_run_params(workdir: str, step: int | None = None):
    """(config, graphdef, params, step) of a training run's checkpoint at `step` (default: the
    latest): the model's parameters, replicated over this process's devices (whatever mesh
    the run was trained on). Reads only.

    Only the model's parameters are read (Checkpointer.restore_subtree, an orbax partial
    restore). Restoring the whole train state replicated would put on every device, for an
    MLCD run at paper scale, the [1,048,576, 768] float32 centers and their two AdamW moments
    (3 x 3.2 GB) plus the towers' moments, only to read the image tower.
    """
    config = load_run_config(workdir)
    graphdef, abstract_params = models.abstract_model(config.model)
    ckpt = Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"--step {step}: no checkpoint at that step in {workdir} (have {steps})")
    target = {"params": replicated(abstract_params, _local_mesh())}
    return config, graphdef, ckpt.restore_subtree(step, target)["params"], step


def init_run_params(workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params): the model's parameters freshly initialised from the run's model
    config and config.seed, equal to the trainer's step-0 model parameters (models.init_params;
    the values do not depend on the mesh), replicated over this process's devices."""
    config = load_run_config(workdir)
    _, abstract_params = models.abstract_model(config.model)
    mesh = _local_mesh()
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_params)
    with jax.set_mesh(mesh):
        params = models.init_params(config.model, int(config.seed), shardings)
    return config, params


def read_export_meta(export_dir: str) -> dict[str, Any]:
    """export.json of a complete export, or an error naming what is missing."""
    for name in (EXPORT_FILE, PARAMS_DIR):
        if not os.path.exists(os.path.join(export_dir, name)):
            raise FileNotFoundError(
                f"{export_dir} is not a complete mlcd export: {name} is missing"
            )
    with open(os.path.join(export_dir, EXPORT_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{export_dir}/{EXPORT_FILE}: format {meta.get('format')!r} != {FORMAT}")
    if meta.get("tokenizer") and not os.path.exists(os.path.join(export_dir, meta["tokenizer"])):
        raise FileNotFoundError(f"{export_dir} is incomplete: {meta['tokenizer']} is missing")
    return meta


class Pretrained(NamedTuple):
    """The model parameters of an export or of a training run's latest checkpoint, to start
    another run from (config.init_from; open_pretrained, restore_pretrained)."""

    path: str  # absolute
    kind: str  # 'export' | 'run'
    model: ml_collections.ConfigDict  # the model config the parameters were written for
    step: int  # the checkpoint step (an export's: the step it was exported from)
    tokenizer: str | None  # the tokenizer file its text tower was trained with, if any
    shapes: dict[str, tuple[int, ...]]  # {parameter path: shape} of every model parameter


def open_pretrained(path: str, what: str) -> Pretrained:
    """The export at `path` if it holds export.json, else the training run at `path` if it
    holds config.json (its latest complete checkpoint); reads metadata only. Errors name
    `what` (e.g. "config.init_from='DIR'"): a missing directory, one that is neither, a run
    without a checkpoint, an export whose parameters differ from its export.json."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no such directory")
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, EXPORT_FILE)):
        meta = read_export_meta(path)
        model = ml_collections.ConfigDict(meta["model"])
        _, abstract_params = models.abstract_model(model)
        params_dir = os.path.join(path, PARAMS_DIR)
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(params_dir).item_metadata
        check_shapes(abstract_params, metadata, f"{what}: {params_dir}")
        tokenizer = os.path.join(path, meta["tokenizer"]) if meta["tokenizer"] else None
        return Pretrained(
            path, "export", model, int(meta["step"]), tokenizer, tree_utils.shapes(abstract_params)
        )
    if os.path.exists(os.path.join(path, "config.json")):
        config = load_run_config(path)
        ckpt = Checkpointer(path, read_only=True)
        steps = ckpt.all_steps()
        ckpt.close()
        if not steps:
            raise FileNotFoundError(f"{what}: a training run without a complete checkpoint")
        # The trainer wrote the checkpoint's parameters from this very model config.
        _, abstract_params = models.abstract_model(config.model)
        return Pretrained(
            path,
            "run",
            config.model,
            max(steps),
            config.tokenizer,
            tree_utils.shapes(abstract_params),
        )
    raise ValueError(
        f"{what} is neither an mlcd export (no {EXPORT_FILE}) nor a training run (no config.json)"
    )


def restore_pretrained(source: Pretrained, target: Any) -> Any:
    """The parameters of `source` at the leaves of `target`, a subtree of its model parameters
    as ShapeDtypeStructs with shardings, read directly onto those shardings: each process reads
    only its own shards, no host holds them whole, and nothing outside `target` is read (an
    orbax partial restore; of a run: not its heads or optimizer state)."""
    if source.kind == "run":
        ckpt = Checkpointer(source.path, read_only=True)
        try:
            return ckpt.restore_subtree(source.step, {"params": target})["params"]
        finally:
            ckpt.close()
    restore = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(source.path, PARAMS_DIR), args=restore)


def load_encoder(export_dir: str, batch_size: int = 256) -> Encoder:
    """The exported encoder, parameters replicated over this process's devices.

    enc.image_size; enc.embed_images(uint8 NHWC at any resolution) -> {'embedding',
    'pre_logits', 'patch_tokens', ...}; enc.embed_texts(list[str]) -> {'embedding'} (two-tower).
    """
    meta = read_export_meta(export_dir)
    graphdef, abstract_params = models.abstract_model(ml_collections.ConfigDict(meta["model"]))
    params_dir = os.path.join(os.path.abspath(export_dir), PARAMS_DIR)
    mesh = _local_mesh()
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir).item_metadata
        check_shapes(abstract_params, metadata, params_dir)
        params = checkpointer.restore(params_dir, replicated(abstract_params, mesh))
    tokenizer = (
        load_tokenizer(
            os.path.join(export_dir, meta["tokenizer"]), meta["preprocess"].get("text_clean")
        )
        if meta["tokenizer"]
        else None
    )
    return Encoder(
        graphdef,
        params,
        image_size=meta["preprocess"]["image_size"],
        tokenizer=tokenizer,
        context_length=meta["preprocess"]["context_length"],
        mesh=mesh,
        batch_size=batch_size,
    )


def encoder_from_run(
    workdir: str, step: int | None = None, batch_size: int = 256
) -> tuple[Encoder, dict[str, Any]]:
    """(Encoder over a run's checkpoint, spec {'data', 'evals', 'step'}); see restore_run_params."""
    config, graphdef, params, step = restore_run_params(workdir, step)
    tokenizer = (
        load_tokenizer(config.tokenizer, config.pp.get("text_clean"))
        if config.model.get("text")
        else None
    )
    encoder = Encoder(
        graphdef,
        params,
        image_size=config.pp.image_size,
        tokenizer=tokenizer,
        context_length=config.pp.context_length,
        mesh=_local_mesh(),
        batch_size=batch_size,
    )
    return encoder, {"data": config.data.to_dict(), "evals": config.evals.to_dict(), "step": step}


def load_model(
    checkpoint: str | None = None,
    workdir: str | None = None,
    step: int | None = None,
    batch_size: int = 256,
) -> tuple[Encoder, dict[str, Any]]:
    """(encoder, spec) of an export directory (`checkpoint`) or a training run (`workdir`, at
    checkpoint `step`, default the latest); exactly one of the two. spec = {'data': the
    dataset it was trained on, 'evals': its config.evals, 'step': the checkpoint step}.
    `batch_size`: images / texts per jitted call of the encoder."""
    if (checkpoint is None) == (workdir is None):
        raise ValueError("give exactly one of an export directory or a training workdir")
    if checkpoint is not None:
        return load_encoder(checkpoint, batch_size), read_export_meta(checkpoint)
    return encoder_from_run(workdir, step, batch_size)
