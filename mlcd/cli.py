"""What the command-line tools (python -m mlcd.train / evaluate / export / cluster / annotate) share:
logging set-up, the persistent compilation cache, and one way of reporting bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

from configs import common as config_lib
from mlcd import allocator

# Bad input (a config key, a path, a mesh, a batch size, an unknown name) and file-system
# refusals (a workdir that is a file, no permission): each tool reports these as one line
# naming the problem, with exit status 2.
USER_ERRORS = (KeyError, ValueError, OSError)


def setup_logging(*loggers: str) -> None:
    """WARNING by default, INFO for the named loggers, absl (tfds chatter) quiet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in loggers:
        logging.getLogger(name).setLevel(logging.INFO)
    # tfds/absl chatter (custom-config notices, the OpenCV hint) is not news to a user.
    logging.getLogger("absl").setLevel(logging.ERROR)


def start_process() -> None:
    """What a tool's `if __name__ == '__main__'` block does before main(): restart on TCMalloc
    where the system has it (mlcd.allocator: XLA:CPU's buffers otherwise cost page faults every
    step), then the persistent compilation cache. Not done by main(): both are process-wide
    state that a caller (a test) owns."""
    allocator.reexec_with_allocator()
    enable_compilation_cache()


def enable_compilation_cache() -> None:
    """Persistent XLA cache (default ~/.cache/mlcd/jax, or $JAX_COMPILATION_CACHE_DIR): a
    re-run or a resumed run skips the seconds-long compiles of the step and the towers.

    (start_process.)"""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = os.path.join(os.path.expanduser("~"), ".cache", "mlcd", "jax")
        jax.config.update("jax_compilation_cache_dir", cache)
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(body: Callable[[], None]) -> int:
    """Runs a tool's body: 0 when it returns, 2 with one 'error: ...' line on stderr for bad
    input (USER_ERRORS). MLCD_TRACEBACK=1 re-raises instead, to show where it was raised."""
    try:
        body()
    except USER_ERRORS as e:
        if os.environ.get("MLCD_TRACEBACK"):
            raise
        # str() of an OSError names the path ('[Errno 20] Not a directory: ...'), its args[0]
        # is only the errno; str() of a KeyError would quote the message.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def config_tool_main(
    prog: str,
    description: str,
    run_config: Callable[[Any], dict[str, Any]],
    report: Callable[[dict[str, Any], str], str],
    argv: Sequence[str] | None,
) -> int:
    """main() of a tool driven by one `--config path.py[:preset]` plus overrides (mlcd.cluster,
    mlcd.annotate): parses them, runs `run_config(config) -> meta`, prints
    `report(meta, out_dir)` (config.out_dir, absolute); errors as `run`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="path/to/config.py[:preset]")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    def body():
        config = config_lib.load_config(args.config)
        config_lib.parse_overrides(config, overrides)
        meta = run_config(config)
        print(report(meta, os.path.abspath(config.out_dir)))

    return run(body)
