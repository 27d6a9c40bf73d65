"""Export a trained encoder: python -m mlcd.export --workdir RUN --out DIR [--step N]
                              python -m mlcd.export --workdir RUN --out DIR --random-init

Writes the model of a run's checkpoint (its towers and, for two-tower models, the logit
scale) with its model config, preprocessing spec and tokenizer, so that
`mlcd.load_encoder(DIR)` needs nothing else (the format: mlcd/runs.py). The objective's
training-only heads (e.g. MLCD's class centers) are never exported, whatever the method.

--random-init exports the parameters the run's model config and seed initialise (no checkpoint
needed): the untrained baseline of the same architecture. For a run started from pretrained
weights (config.init_from) that is config.seed's initialisation, not those weights.

The export is written into a temporary sibling directory and renamed into place when
complete, so an interrupted export never leaves a directory that load_encoder would trust; a
failed export removes its temporary directory, and one left by a killed export is removed by
the next export to the same --out (which puts back an earlier export it was replacing). --out
is never a directory the tool did not write: the run itself, a directory above it, its
checkpoints (through symlinks too), or a non-empty directory that is not an mlcd export are
refused.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp

from input_pipeline import preprocess, tokenizers
from mlcd import cli, runs


def export(workdir: str, out: str, step: int | None = None, random_init: bool = False) -> str:
    """Writes the export of `workdir`'s checkpoint at `step` (default: latest) to `out`.

    random_init=True exports instead the parameters the run started from: freshly initialised
    with the run's model config and config.seed, exactly as `mlcd.train` initialises them
    (no checkpoint is read, only config.json). It is the untrained baseline for the same
    architecture: probes on it measure what the architecture alone gives. export.json then
    has "step": 0 and "random_init": true.
    """
    out = os.path.abspath(out)
    check_out(workdir, out)
    if random_init:
        if step is not None:
            raise ValueError("--random-init exports the initial parameters: do not give --step")
        config, params = runs.init_run_params(workdir)
        step = 0
    else:
        config, _, params, step = runs.restore_run_params(workdir, step)
    meta = {
        "step": int(step),
        "random_init": bool(random_init),
        "seed": int(config.seed),
        "source_workdir": os.path.abspath(workdir),
        "model": config.model.to_dict(),
        "preprocess": preprocess_spec(
            config.pp.image_size, config.pp.context_length, config.pp.get("text_clean")
        ),
        "data": config.data.to_dict(),
        "evals": config.evals.to_dict(),
    }
    tokenizer = config.tokenizer if config.model.get("text") is not None else None
    return write(out, params, meta, tokenizer)


def preprocess_spec(
    image_size: int, context_length: int, text_clean: str | None = None
) -> dict[str, Any]:
    """export.json's "preprocess": how the encoder expects its inputs (text_clean: the
    tokenizer's text cleaning, config.pp.text_clean; None is the tokenizer's default)."""
    return {
        "image_size": int(image_size),
        "resize": "shorter side to image_size (bicubic), then center crop",
        "mean_rgb": list(preprocess.MEAN_RGB),
        "std_rgb": list(preprocess.STD_RGB),
        "context_length": int(context_length),
        "text_clean": text_clean,
    }


def write(out: str, params: Any, meta: dict[str, Any], tokenizer: str | None) -> str:
    """Writes an export to `out` (absolute) atomically and returns `out`.

    params: the model's parameter tree; meta: export.json's fields (format and tokenizer are
    added here); tokenizer: the tokenizer file to copy in (None for an image-only model).
    The export is written into `<out>.tmp-<pid>` and renamed into place when complete (see
    the module doc); the caller has checked that `out` may be replaced (check_out /
    check_replaceable).
    """
    remove_stale_temporaries(out)
    tmp = f"{out}{_TMP}{os.getpid()}"
    os.makedirs(tmp)
    try:
        _write(tmp, params, meta, tokenizer)
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_TMP = ".tmp-"  # a temporary export is "<out>.tmp-<pid>"
_OLD = "-old"  # the export it replaces, while the new one is renamed in: "<out>.tmp-<pid>-old"


def check_out(workdir: str, out: str) -> None:
    """ValueError unless `out` (absolute) may receive an export of `workdir`: not the run
    directory, a directory above it or anything in its checkpoints, and either absent, empty
    or an earlier mlcd export (export.json of this FORMAT), which the new one replaces."""
    run = os.path.realpath(workdir)
    real = os.path.realpath(out)
    ckpt = os.path.realpath(os.path.join(run, "checkpoints"))
    if os.path.commonpath([real, run]) == real or os.path.commonpath([real, ckpt]) == ckpt:
        raise ValueError(
            f"--out {out}: that is the run {workdir}, a directory above it or inside its "
            "checkpoints; export to a directory of its own"
        )
    check_replaceable(out)


def check_replaceable(out: str) -> None:
    """ValueError unless `out` is absent, an empty directory or an earlier mlcd export."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not _is_export(out):
        raise ValueError(
            f"--out {out} is a non-empty directory that is not an mlcd export (no "
            f"{runs.EXPORT_FILE} of format {runs.FORMAT}); refusing to replace it: choose a new "
            "or empty directory"
        )


def _is_export(path: str) -> bool:
    """Whether `path` holds an export.json of this format (what an earlier export wrote)."""
    try:
        with open(os.path.join(path, runs.EXPORT_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == runs.FORMAT


def remove_stale_temporaries(out: str) -> None:
    """Clears what exports to `out` whose process is gone left next to it: `<out>.tmp-<pid>`
    (a new export being written) is removed; `<out>.tmp-<pid>-old` (the earlier export, moved
    aside while the new one was renamed in) is put back at `out` if nothing is there, else
    removed. A directory named after this process is stale too: it cannot be this export's
    yet (a container restarted with the same pid)."""
    for path in glob.glob(glob.escape(out) + _TMP + "*"):
        name = path[len(out + _TMP) :]
        pid = name.removesuffix(_OLD)
        if not pid.isdigit() or not os.path.isdir(path) or _alive(int(pid)):
            continue
        if name.endswith(_OLD) and not os.path.exists(out):
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether another process `pid` exists (this process's own pid counts as gone)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def swap_in(tmp: str, out: str) -> None:
    """Renames the complete export `tmp` to `out`; an earlier export there is moved aside first,
    put back if the new one cannot be renamed in, and removed only once the new one is in."""
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    old = f"{out}{_TMP}{os.getpid()}{_OLD}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write(tmp: str, params: Any, meta: dict[str, Any], tokenizer: str | None) -> None:
    """Writes the export's files into the (new, empty) directory `tmp`."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, runs.PARAMS_DIR), params)
        checkpointer.wait_until_finished()
    tokenizer_file = None
    if tokenizer is not None:
        tokenizer_file = tokenizers.tokenizer_file_name(tokenizer)
        shutil.copyfile(tokenizer, os.path.join(tmp, tokenizer_file))
    meta = {"format": runs.FORMAT, **meta, "tokenizer": tokenizer_file}
    with open(os.path.join(tmp, runs.EXPORT_FILE), "w") as f:
        json.dump(meta, f, indent=2)


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
