"""Export a trained encoder: python -m mlcd.export --workdir RUN --out DIR [--step N]
                              python -m mlcd.export --workdir RUN --out DIR --random-init

Writes the model of a run's checkpoint (its towers and, for two-tower models, the logit
scale) with its model config, preprocessing spec and tokenizer, so that
`mlcd.load_encoder(DIR)` needs nothing else (the format: mlcd/runs.py). The objective's
training-only heads (e.g. MLCD's class centers) are never exported, whatever the method.

--random-init exports the parameters the run started from (its model config and seed,
freshly initialised; no checkpoint needed): the untrained baseline of the same architecture.

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

import orbax.checkpoint as ocp

from input_pipeline import preprocess
from mlcd import cli, runs


def export(workdir: str, out: str, step: int | None = None, random_init: bool = False) -> str:
    """Writes the export of `workdir`'s checkpoint at `step` (default: latest) to `out`.

    random_init=True exports instead the parameters the run started from: freshly initialised
    with the run's model config and config.seed, exactly as `mlcd.train` initialises them
    (no checkpoint is read, only config.json). It is the untrained baseline for the same
    architecture: probes on it measure what the architecture alone gives. export.json then
    has "step": 0 and "random_init": true.
    """
    if random_init:
        if step is not None:
            raise ValueError("--random-init exports the initial parameters: do not give --step")
        config, params = runs.init_run_params(workdir)
        step = 0
    else:
        config, _, params, step = runs.restore_run_params(workdir, step)
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, runs.PARAMS_DIR), params)
        checkpointer.wait_until_finished()
    tokenizer_file = None
    if config.model.get("text") is not None:
        src = config.tokenizer
        tokenizer_file = "tokenizer" + os.path.splitext(src)[1]
        shutil.copyfile(src, os.path.join(tmp, tokenizer_file))
    meta = {
        "format": runs.FORMAT,
        "step": int(step),
        "random_init": bool(random_init),
        "seed": int(config.seed),
        "source_workdir": os.path.abspath(workdir),
        "model": config.model.to_dict(),
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
    with open(os.path.join(tmp, runs.EXPORT_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


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
    cli.setup_logging()

    def body():
        out = export(args.workdir, args.out, args.step, random_init=args.random_init)
        step = runs.read_export_meta(out)["step"]
        what = "random-init parameters" if args.random_init else f"step {step}"
        print(f"exported {what} of {args.workdir} to {out}")

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
