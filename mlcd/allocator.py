"""The C heap allocator of a CPU run: TCMalloc (or jemalloc) preloaded when the system has it.

Why: XLA:CPU allocates every executable's buffers (a train step's activations: hundreds of MB)
with malloc at each run and frees them after. glibc's malloc hands any block above its mmap
threshold (32 MiB at most) to the kernel: fresh pages, faulted in and zeroed on first touch,
unmapped on free. On the bench-tiny CLIP step (bench/train_step.py, batch 128) that is 322,666
page faults and 0.55-0.95 CPU-seconds of kernel time per step, 15-25% of the step; TCMalloc and
jemalloc (without decay) keep freed pages for the next step: 0 faults. PyTorch's tensors are
smaller than the threshold, which is why open_clip on glibc barely pays it. The allocator
changes no result: only where buffers live.

A process cannot swap its allocator once running, so `reexec_with_allocator()` restarts the
command (same pid, same argv) with the library in LD_PRELOAD; the command-line tools call it
first thing in their `__main__` blocks. MLCD_ALLOCATOR picks:
  unset or 'auto': TCMalloc, else jemalloc, when found (`ldconfig` or the usual lib dirs);
    none found: the run goes on as it is (the trainer's log says which allocator it runs on);
  'system': never preload (glibc's malloc, or whatever LD_PRELOAD already has);
  a path to a shared library: preload that one.
Debian / Ubuntu: `apt install libtcmalloc-minimal4`; conda: `conda install gperftools`.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV = "MLCD_ALLOCATOR"
# Set in the restarted process: a second restart would loop if the preload silently failed.
_RESTARTED = "MLCD_ALLOCATOR_RESTARTED"
# Preference order: (ctypes.util.find_library name, file name in the usual lib dirs).
_CANDIDATES = (
    ("tcmalloc_minimal", "libtcmalloc_minimal.so.4"),
    ("tcmalloc", "libtcmalloc.so.4"),
    ("jemalloc", "libjemalloc.so.2"),
)
_LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# jemalloc's default decay gives freed pages back to the kernel after ~10 s of disuse, and
# XLA's per-step buffers then fault in again (measured: as many faults as glibc); without
# decay it keeps them, as TCMalloc does.
_JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_allocator() -> str | None:
    """Path (or soname ld.so resolves) of the first of TCMalloc / jemalloc this system has."""
    for name, file_name in _CANDIDATES:
        for lib_dir in _LIB_DIRS:
            path = os.path.join(lib_dir, file_name)
            if os.path.exists(path):
                return path
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def mapped(*fragments: str, maps: str = "/proc/self/maps") -> str | None:
    """The first file mapped into this process (per `maps`) whose path contains one of
    `fragments`."""
    try:
        with open(maps) as f:
            for line in f:
                path = line.split()[-1]
                if any(fragment in path for fragment in fragments):
                    return path
    except OSError:  # no /proc (not Linux): nothing we can tell or do
        return None
    return None


def loaded_allocator() -> str | None:
    """The TCMalloc / jemalloc library this process runs on, or None."""
    return mapped("/libtcmalloc", "/libjemalloc")


def describe() -> str:
    """Which allocator this process runs on, for a run's log: the library, or why none."""
    library = loaded_allocator()
    if library:
        return library
    if os.environ.get(ENV) == "system":
        return f"system malloc ({ENV}=system)"
    return (
        "system malloc: no TCMalloc or jemalloc found, so XLA:CPU's buffers are faulted in "
        "again every step (15-25% of a small CPU step); install libtcmalloc-minimal4 (apt) "
        "or gperftools (conda)"
    )


def preload_env(library: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD (and, for jemalloc, decay off in MALLOC_CONF
    unless set) and the restart mark."""
    env = dict(env)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    if "jemalloc" in os.path.basename(library):
        env.setdefault("MALLOC_CONF", _JEMALLOC_CONF)
    env[_RESTARTED] = "1"
    return env


def reexec_with_allocator() -> None:
    """Restarts this command with TCMalloc / jemalloc preloaded (module docstring), or returns
    when there is nothing to do: MLCD_ALLOCATOR=system, not Linux, one already loaded, none
    found, or this process is the restart (then a preload that did not take is a warning)."""
    choice = os.environ.get(ENV, "auto")
    if choice == "system" or not sys.platform.startswith("linux"):
        return
    if os.environ.get(_RESTARTED):
        # This process is the restart: check that the preload took (ld.so skips a library it
        # cannot load with only a message on stderr).
        library = os.environ.get("LD_PRELOAD", "").split(":")[0]
        if not (library and mapped(os.path.basename(library))):
            print(
                f"warning: {ENV}: {library!r} is not loaded; on the system malloc.", file=sys.stderr
            )
        return
    if loaded_allocator():
        return
    if choice != "auto":
        if not os.path.isfile(choice):
            raise SystemExit(f"error: {ENV}={choice!r}: expected auto, system or a library file.")
        library = choice
    else:
        library = find_allocator()
        if library is None:  # describe() says so in the trainer's log
            return
    # Flushed so that nothing printed before the exec is lost or printed twice.
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]
    os.execve(sys.executable, argv, preload_env(library, dict(os.environ)))
