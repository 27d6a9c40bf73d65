"""Standalone evaluation of an export or a training run.

    python -m mlcd.evaluate --checkpoint EXPORT_DIR --evals zeroshot,retrieval --out results.json
    python -m mlcd.evaluate --workdir RUN [--step N] --evals linear_probe,fewshot --out r.json

Evaluators are the ones the trainer runs periodically (mlcd.evaluators), configured from the
run's `config.evals` where an entry of that type exists, with defaults otherwise. The dataset is
the one the model was trained with (from the run config or the export's data spec), unless
--data_dir points elsewhere. Nothing is written except the --out file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from input_pipeline import datasets
from input_pipeline.tokenizers import load_tokenizer
from mlcd import evaluators, sharding
from mlcd.encoder import Encoder
from mlcd.export import load_encoder, read_export_meta, restore_run_params

DEFAULT_EVALS = ("zeroshot", "retrieval")


def _encoder_from_run(
    workdir: str, step: int | None, batch_size: int = 256
) -> tuple[Encoder, dict[str, Any]]:
    """Encoder over a run's checkpoint (its config.json is already resolved by the trainer).
    Only the encoder's parameters are read, replicated: no optimizer state, no class centers
    (see restore_run_params)."""
    config, graphdef, params, step = restore_run_params(workdir, step)
    tokenizer = load_tokenizer(config.tokenizer) if config.model.get("text") else None
    encoder = Encoder(
        graphdef,
        params,
        image_size=config.pp.image_size,
        tokenizer=tokenizer,
        context_length=config.pp.context_length,
        mesh=sharding.make_mesh((("data", -1),)),
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
    return _encoder_from_run(workdir, step, batch_size)


def resolve_eval(name: str, configured: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(evaluator type, kwargs) for `name`: an entry of the run's config.evals (by entry name,
    then by type), or else the evaluator type `name` with its defaults."""
    entries = [(k, v) for k, v in configured.items() if k == name]
    entries += [(k, v) for k, v in configured.items() if v.get("type", k) == name]
    if not entries:
        return name, {}
    key, cfg = entries[0]
    return cfg.get("type", key), {k: v for k, v in cfg.items() if k not in ("type", "every")}


def evaluate(
    encoder: Encoder,
    spec: dict[str, Any],
    evals: Sequence[str],
    data_dir: str | None = None,
    out_dir: str | None = None,
) -> dict[str, float]:
    """Runs the named evaluators on `encoder`; spec = {'data': ..., 'evals': ...} of the run.
    Evaluators that write files (plots) write them under `out_dir` (default: none written)."""
    data = ml_collections.ConfigDict(spec["data"])
    builder = datasets.get_builder(data.name, data_dir or data.data_dir, **data.build.to_dict())
    shared = evaluators.SharedEmbeddings(encoder)
    results: dict[str, float] = {}
    for name in evals:
        kind, kwargs = resolve_eval(name, spec["evals"])
        cls = evaluators.get(kind)
        if "out_dir" in inspect.signature(cls).parameters:
            kwargs["out_dir"] = out_dir
        results.update(cls(builder=builder, **kwargs).run(shared))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlcd.evaluate", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an export directory (python -m mlcd.export)")
    source.add_argument("--workdir", help="a training run directory")
    parser.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step")
    parser.add_argument(
        "--evals",
        default=",".join(DEFAULT_EVALS),
        help="comma-separated config.evals entry names or evaluator types "
        "(zeroshot, retrieval, fewshot, linear_probe, image_retrieval, grounding)",
    )
    parser.add_argument("--data_dir", default=None, help="dataset directory (default: the run's)")
    parser.add_argument("--out", default=None, help="JSON file for the flat metrics")
    args = parser.parse_args(argv)
    try:
        encoder, spec = load_model(args.checkpoint, args.workdir, args.step)
        if args.out and args.workdir:
            ckpt_dir = os.path.abspath(os.path.join(args.workdir, "checkpoints"))
            if os.path.abspath(args.out).startswith(ckpt_dir + os.sep):
                raise ValueError(f"--out {args.out}: evaluation never writes into {ckpt_dir}")
        out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
        names = [e for e in args.evals.split(",") if e]
        results = evaluate(encoder, spec, names, args.data_dir, out_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"{'metric':<40} {'value':>10}")
    print(f"{'-' * 40} {'-' * 10}")
    for k, v in sorted(results.items()):
        print(f"{k:<40} {v:>10.4f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"step": spec["step"], **results}, f, indent=2)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
