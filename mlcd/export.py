"""Export a trained encoder: python -m mlcd.export --workdir RUN --out DIR [--step N]
                              python -m mlcd.export --workdir RUN --out DIR --random-init

--random-init exports the parameters the run started from (its model config and seed, freshly
initialised; no checkpoint needed): the untrained baseline of the same architecture.

An export is self-contained (no training config needed to use it):
    DIR/export.json     format, model config, preprocessing spec, data spec, source step
    DIR/params/         the model parameters (orbax, restorable on any device layout)
    DIR/tokenizer.*     the text tokenizer, for two-tower models
`mlcd.load_encoder(DIR)` turns it back into an `Encoder` (embed_images / embed_texts).

The export is written into a temporary sibling directory and renamed into place when
complete, so an interrupted export never leaves a directory that load_encoder would trust.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from input_pipeline import preprocess
from input_pipeline.tokenizers import load_tokenizer
from mlcd import sharding, tree_utils
from mlcd.checkpoint import Checkpointer
from mlcd.encoder import Encoder
from mlcd.models import encoder_config
from mlcd.train import abstract_model, init_params

FORMAT = "mlcd-encoder/1"
EXPORT_FILE = "export.json"
PARAMS_DIR = "params"


def _replicated(tree: Any, mesh) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), tree
    )


def check_shapes(expected: Any, found: Any, what: str) -> None:
    """Raises naming the first parameter whose saved shape differs from the model's."""
    exp = {k: tuple(v.shape) for k, v in _flat(expected).items()}
    got = {k: tuple(v.shape) for k, v in _flat(found).items()}
    for name in sorted(set(exp) | set(got)):
        if exp.get(name) != got.get(name):
            raise ValueError(
                f"{what} does not match the model: parameter {name!r} is "
                f"{got.get(name, 'missing')} on disk, {exp.get(name, 'absent')} in the model "
                "(a checkpoint from a different model size?)"
            )


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tree_utils.path_str(p): x for p, x in leaves}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training run: {path} is missing")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_run_params(workdir: str, step: int | None = None):
    """(config, graphdef, params, step) of a training run's checkpoint: the exported encoder's
    graphdef and parameters (`encoder_config`: the model without its training-only heads),
    replicated over this process's devices (whatever mesh the run was trained on). Reads only.

    Only those parameters are read (Checkpointer.restore_subtree, an orbax partial restore):
    not the optimizer state, step or rng, nor MLCD's class centers. Restoring the whole train
    state replicated would put on every device, for an MLCD run at paper scale, the
    [1,048,576, 768] float32 centers and their two AdamW moments (3 x 3.2 GB) plus the towers'
    moments, only to read the image tower.
    """
    config = load_run_config(workdir)
    graphdef, abstract_params = abstract_model(encoder_config(config.model))
    ckpt = Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"--step {step}: no checkpoint at that step in {workdir} (have {steps})")
    mesh = sharding.make_mesh((("data", -1),))
    state = ckpt.restore_subtree(step, {"params": _replicated(abstract_params, mesh)})
    return config, graphdef, state["params"], step


def export(workdir: str, out: str, step: int | None = None, random_init: bool = False) -> str:
    """Writes the export of `workdir`'s checkpoint at `step` (default: latest) to `out`.

    Only the encoder is exported: training-only heads (MLCD's class centers) are left out, of
    both the parameters and the model config.

    random_init=True exports instead the parameters the run started from: freshly initialised
    with the run's model config and config.seed, exactly as `mlcd.train` initialises them
    (no checkpoint is read, only config.json). It is the untrained baseline for the same
    architecture: probes on it measure what the architecture alone gives. export.json then
    has "step": 0 and "random_init": true.
    """
    if random_init:
        if step is not None:
            raise ValueError("--random-init exports the initial parameters: do not give --step")
        config, params = init_run_params(workdir)
        step = 0
    else:
        config, _, params, step = restore_run_params(workdir, step)
    model_cfg = encoder_config(config.model)
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
    tokenizer_file = None
    if config.model.get("text") is not None:
        src = config.tokenizer
        tokenizer_file = "tokenizer" + os.path.splitext(src)[1]
        shutil.copyfile(src, os.path.join(tmp, tokenizer_file))
    meta = {
        "format": FORMAT,
        "step": int(step),
        "random_init": bool(random_init),
        "seed": int(config.seed),
        "source_workdir": os.path.abspath(workdir),
        "model": model_cfg,
        "preprocess": {
            "image_size": int(config.pp.image_size),
            "resize": "shorter side to image_size (bicubic), then center crop",
            "mean_rgb": list(preprocess.MEAN_RGB),
            "std_rgb": list(preprocess.STD_RGB),
            "context_length": int(config.pp.context_length),
        },
        "tokenizer": tokenizer_file,
        "data": config.data.to_dict(),
        "evals": config.evals.to_dict(),
    }
    with open(os.path.join(tmp, EXPORT_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def init_run_params(workdir: str):
    """(config, params): the encoder's parameters (`encoder_config`) freshly initialised from
    the run's model config and config.seed, as mlcd.train does at step 0 (the values do not
    depend on the mesh), replicated over this process's devices. The training-only heads are
    not created at all (MLCD's class centers would be [1,048,576, 768] on every device); the
    towers' values are unchanged by that, as the centers are drawn after them."""
    config = load_run_config(workdir)
    model_cfg = encoder_config(config.model)
    _, abstract_params = abstract_model(model_cfg)
    mesh = sharding.make_mesh((("data", -1),))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_params)
    with jax.set_mesh(mesh):
        params = init_params(model_cfg, int(config.seed), shardings)
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


def load_encoder(export_dir: str, batch_size: int = 256) -> Encoder:
    """The exported encoder, parameters replicated over this process's devices.

    enc.image_size; enc.embed_images(uint8 NHWC at any resolution) -> {'embedding',
    'pre_logits', 'patch_tokens', ...}; enc.embed_texts(list[str]) -> {'embedding'} (two-tower).
    """
    meta = read_export_meta(export_dir)
    graphdef, abstract_params = abstract_model(ml_collections.ConfigDict(meta["model"]))
    params_dir = os.path.join(os.path.abspath(export_dir), PARAMS_DIR)
    mesh = sharding.make_mesh((("data", -1),))
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir).item_metadata
        check_shapes(abstract_params, metadata, params_dir)
        params = checkpointer.restore(params_dir, _replicated(abstract_params, mesh))
    tokenizer = (
        load_tokenizer(os.path.join(export_dir, meta["tokenizer"])) if meta["tokenizer"] else None
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlcd.export", description=__doc__)
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="export the run's initial parameters instead of a checkpoint: freshly initialised "
        "with the run's model config and seed (the untrained baseline for probes); reads only "
        "the run's config.json",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.workdir, args.out, args.step, random_init=args.random_init)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "random-init parameters" if args.random_init else f"step {read_export_meta(out)['step']}"
    print(f"exported {what} of {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
