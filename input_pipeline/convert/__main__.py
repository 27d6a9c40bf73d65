"""CLI: python -m input_pipeline.convert --config configs/convert.py[:PRESET] [--config.k=v ...]

Bad input (a config key, a missing file or column, a repeated id, an image URL) is reported as
one line naming it, with exit status 2; MLCD_TRACEBACK=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from configs import common as config_lib
from input_pipeline.convert import run


def report(summary: dict[str, Any]) -> str:
    """What a user reads at the end: counts, the summary's path, how to train on it."""
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    vdir = os.path.join(summary["data_dir"], summary["dataset"], summary["version"])
    return "\n".join(
        [
            f"{summary['dataset']}/{summary['split']}: {summary['num_examples']} examples in "
            f"{summary['num_shards']} shards ({vdir})",
            f"  read {summary['num_read']}; skipped: {skipped}",
            f"  summary: {os.path.join(vdir, 'convert', summary['split'], 'summary.json')}",
            f"  train on it: --config.data.name={summary['dataset']} "
            f"--config.data.data_dir={summary['data_dir']} --config.data.split={summary['split']}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # tfds chatter
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="path/to/convert.py[:preset]")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.load_config(args.config)
        config_lib.parse_overrides(config, overrides)
        summary = run.convert(config)
    except (KeyError, ValueError, OSError) as e:
        if os.environ.get("MLCD_TRACEBACK"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
