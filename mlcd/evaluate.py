"""Standalone evaluation of an export or a training run.

    python -m mlcd.evaluate --checkpoint EXPORT_DIR --evals zeroshot,retrieval --out results.json
    python -m mlcd.evaluate --workdir RUN [--step N] --evals linear_probe,fewshot --out r.json

Evaluators are the ones the trainer runs (mlcd.evaluators), built the same way
(evaluators.build) from the run's `config.evals` entry of that name or type where one exists,
with defaults otherwise. The dataset is the one the model was trained with (from the run
config or the export's data spec), unless --data_dir points elsewhere. Nothing is written
except the --out file (and, for grounding and segmentation, their PNGs next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from input_pipeline import datasets
from mlcd import cli, evaluators, runs
from mlcd.encoder import Encoder

DEFAULT_EVALS = ("zeroshot", "retrieval")


def resolve_eval(name: str, configured: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(entry name, entry) for `name`: the run's config.evals entry of that name, else the
    first of that type, else an entry of type `name` with its defaults."""
    for key, entry in configured.items():
        if key == name:
            return key, entry
    for key, entry in configured.items():
        if entry.get("type", key) == name:
            return key, entry
    return name, {}


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
    builder = datasets.get_builder(
        data.name, data_dir or data.data_dir, build=False, **data.build.to_dict()
    )
    shared = evaluators.SharedEmbeddings(encoder)
    results: dict[str, float] = {}
    for name in evals:
        key, entry = resolve_eval(name, spec["evals"])
        evaluator, _ = evaluators.build(
            key, entry, builder=builder, out_dir=out_dir, default_every=0
        )
        results.update(evaluator.run(shared))
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
        "(zeroshot, retrieval, fewshot, linear_probe, image_retrieval, grounding, "
        "segmentation; a tiny run's config also names retrieval_sentences)",
    )
    parser.add_argument("--data_dir", default=None, help="dataset directory (default: the run's)")
    parser.add_argument("--out", default=None, help="JSON file for the flat metrics")
    args = parser.parse_args(argv)
    cli.setup_logging()

    def body():
        encoder, spec = runs.load_model(args.checkpoint, args.workdir, args.step)
        if args.out and args.workdir:
            ckpt_dir = os.path.abspath(os.path.join(args.workdir, "checkpoints"))
            if os.path.abspath(args.out).startswith(ckpt_dir + os.sep):
                raise ValueError(f"--out {args.out}: evaluation never writes into {ckpt_dir}")
        out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
        names = [e for e in args.evals.split(",") if e]
        results = evaluate(encoder, spec, names, args.data_dir, out_dir)
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

    return cli.run(body)


if __name__ == "__main__":
    cli.start_process()
    sys.exit(main())
