"""Weights in and out: open_clip / OpenAI CLIP checkpoints <-> mlcd exports.

    python -m mlcd.convert_weights from-open-clip CKPT --out EXPORT --tokenizer VOCAB
        [--model-config open_clip_config.json] [--quick-gelu]
    python -m mlcd.convert_weights to-open-clip (--checkpoint EXPORT | --workdir RUN [--step N])
        --out DIR

from-open-clip reads a checkpoint (``.safetensors``, a ``torch.save`` state dict ``.bin`` /
``.pt`` / ``.pth``, open_clip's training checkpoints, or OpenAI's TorchScript ``.pt``; torch
is not needed) and writes an mlcd export (mlcd/runs.py), usable everywhere an export is:
``mlcd.evaluate --checkpoint``, ``config.teacher.export`` of mlcd.cluster / mlcd.annotate,
and ``config.init_from`` of mlcd.train. The architecture comes from --model-config (the
open_clip JSON: a hub ``open_clip_config.json`` or a file of open_clip's model_configs/),
else from the checkpoint's shapes, with heads = width / 64 and exact GELU unless --quick-gelu
(OpenAI's weights use QuickGELU; a TorchScript file is OpenAI's, so it implies it).
--tokenizer is the vocabulary the text tower was trained with, e.g. open_clip's
``bpe_simple_vocab_16e6.txt.gz`` (it ships inside the open_clip pip package).

to-open-clip writes ``open_clip_model.safetensors`` and ``open_clip_config.json`` into DIR,
which open_clip loads with ``open_clip.create_model_and_transforms('local-dir:DIR')`` and
CLIP_benchmark with ``--model local-dir:DIR`` (a model trained with the CLIP BPE tokenizer
then tokenizes exactly as in training: open_clip's default tokenizer is that BPE). The
tokenizer file is copied next to them.

Both directions write atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from configs import common
from input_pipeline import preprocess
from input_pipeline.tokenizers import load_tokenizer
from mlcd import cli, export, open_clip_format, runs, torch_files

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"


def read_open_clip_config(path: str) -> dict[str, Any]:
    """The model config of an open_clip JSON file: its 'model_cfg' (hub open_clip_config.json)
    or the whole file (open_clip's model_configs/*.json)."""
    with open(path) as f:
        config = json.load(f)
    return config.get("model_cfg", config)


def import_open_clip(
    checkpoint: str,
    out: str,
    *,
    tokenizer: str | None,
    model_config: Mapping[str, Any] | None = None,
    quick_gelu: bool = False,
) -> str:
    """Converts an open_clip / OpenAI checkpoint to an mlcd export at `out`; returns `out`.

    model_config: open_clip's model config (see read_open_clip_config); None infers it from
    the checkpoint's shapes (open_clip_format.infer_open_clip_config). quick_gelu overrides
    the config's switch to True (forced for TorchScript files, which are OpenAI's).
    """
    out = os.path.abspath(out)
    export.check_replaceable(out)
    state = torch_files.read_state_dict(checkpoint)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    oc = dict(model_config or open_clip_format.infer_open_clip_config(state))
    if quick_gelu or torch_files.is_torchscript(checkpoint):
        oc["quick_gelu"] = True
    scalar = lambda name: float(np.asarray(state[name], np.float32)) if name in state else None
    model_cfg = open_clip_format.model_config(oc, scalar("logit_scale"), scalar("logit_bias"))
    params = open_clip_format.params_from_state_dict(state, model_cfg)
    text = model_cfg["text"]
    if text is not None:
        _check_tokenizer(tokenizer, text)
    meta = {
        "step": 0,
        "random_init": False,
        "seed": 0,
        "source_checkpoint": os.path.abspath(checkpoint),
        "open_clip_config": oc,
        "model": model_cfg,
        "preprocess": export.preprocess_spec(
            model_cfg["image"]["image_size"], text["context_length"] if text else 77
        ),
        # Evaluation defaults to the embedded dataset (mlcd.evaluate --data_dir to change it).
        "data": common.base_config().data.to_dict(),
        "evals": {},
    }
    return export.write(out, params, meta, tokenizer if text is not None else None)


def _check_tokenizer(path: str | None, text: Mapping[str, Any]) -> None:
    """ValueError unless `path` is a tokenizer with the text tower's vocabulary and ids."""
    if not path:
        raise ValueError(
            "--tokenizer is required for a checkpoint with a text tower: the vocabulary it was "
            "trained with (open_clip's bpe_simple_vocab_16e6.txt.gz for CLIP models)"
        )
    tok = load_tokenizer(path)
    found = {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id}
    if text["pool"] == "eos":
        found["eos_id"] = tok.eos_id
    for key, value in found.items():
        if value != text[key]:
            raise ValueError(
                f"--tokenizer {path}: {key} {value} does not match the checkpoint's text tower "
                f"({text[key]}); give the tokenizer the model was trained with"
            )


def export_open_clip(
    out: str,
    *,
    checkpoint: str | None = None,
    workdir: str | None = None,
    step: int | None = None,
) -> str:
    """Writes an export (`checkpoint`) or a run's checkpoint (`workdir`, `step`) as an
    open_clip model directory at `out` (see the module doc); returns `out`."""
    if (checkpoint is None) == (workdir is None):
        raise ValueError("give exactly one of --checkpoint (an export) or --workdir (a run)")
    if checkpoint is not None:
        meta = runs.read_export_meta(checkpoint)
        model_cfg, params = meta["model"], runs.load_encoder(checkpoint).params
        image_size = meta["preprocess"]["image_size"]
        tokenizer = os.path.join(checkpoint, meta["tokenizer"]) if meta["tokenizer"] else None
    else:
        config, _, params, _ = runs.restore_run_params(workdir, step)
        model_cfg, image_size = config.model.to_dict(), config.pp.image_size
        tokenizer = config.tokenizer if config.model.get("text") is not None else None
    oc = open_clip_format.open_clip_config(model_cfg)
    state = open_clip_format.state_dict_from_params(jax.device_get(params), model_cfg)
    config = {
        "model_cfg": oc,
        "preprocess_cfg": {
            "size": int(image_size),
            "mean": list(preprocess.MEAN_RGB),
            "std": list(preprocess.STD_RGB),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    out = os.path.abspath(out)
    if (
        os.path.exists(out)
        and os.listdir(out)
        and not os.path.isfile(os.path.join(out, OPEN_CLIP_CONFIG))
    ):
        raise ValueError(
            f"--out {out} is a non-empty directory without {OPEN_CLIP_CONFIG}; refusing to "
            "replace it: choose a new or empty directory"
        )
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        torch_files.write_safetensors(os.path.join(tmp, OPEN_CLIP_WEIGHTS), state)
        with open(os.path.join(tmp, OPEN_CLIP_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, os.path.join(tmp, os.path.basename(tokenizer)))
        export.swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlcd.convert_weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("from-open-clip", help="open_clip / OpenAI checkpoint -> mlcd export")
    imp.add_argument("checkpoint", help=".safetensors, .bin, .pt or .pth file")
    imp.add_argument("--out", required=True, help="export directory to write")
    imp.add_argument("--tokenizer", default=None, help="the text tower's vocabulary file")
    imp.add_argument("--model-config", default=None, help="open_clip model config JSON")
    imp.add_argument("--quick-gelu", action="store_true", help="QuickGELU (OpenAI's weights)")
    exp = sub.add_parser("to-open-clip", help="mlcd export or run -> open_clip model directory")
    source = exp.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an export directory")
    source.add_argument("--workdir", help="a training run directory")
    exp.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step")
    exp.add_argument("--out", required=True, help="directory to write")
    args = parser.parse_args(argv)
    cli.setup_logging()

    def body():
        if args.command == "from-open-clip":
            config = read_open_clip_config(args.model_config) if args.model_config else None
            out = import_open_clip(
                args.checkpoint,
                args.out,
                tokenizer=args.tokenizer,
                model_config=config,
                quick_gelu=args.quick_gelu,
            )
            print(f"imported {args.checkpoint} as the mlcd export {out}")
        else:
            out = export_open_clip(
                args.out, checkpoint=args.checkpoint, workdir=args.workdir, step=args.step
            )
            print(f"wrote the open_clip model {out} (open_clip: model name 'local-dir:{out}')")

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
