"""mlcd.allocator: the restart with a preloaded heap allocator, its opt-outs and its errors.

The restart runs in child processes (it replaces the process). Any shared library shows the
mechanics, so the always-run tests preload libm, which every Linux Python has mapped anyway
under its own name; the TCMalloc test needs the library installed."""

import os
import subprocess
import sys

import pytest

from mlcd import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints, after the restart (if any): LD_PRELOAD, the restart mark, and the allocator in use.
PROBE = (
    "from mlcd import allocator; allocator.reexec_with_allocator(); import os; "
    "print(os.environ.get('LD_PRELOAD', ''), os.environ.get('MLCD_ALLOCATOR_RESTARTED', ''), "
    "allocator.describe(), sep='|')"
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


def run_probe(code: str = PROBE, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLCD_ALLOCATOR")}
    full_env.update(env, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=60
    )


def libm_path() -> str:
    path = allocator.mapped("/libm.so")
    if path is None:
        pytest.skip("libm is not mapped into this Python")
    return path


@linux_only
def test_restart_preloads_the_named_library_once():
    lib = libm_path()
    out = run_probe(MLCD_ALLOCATOR=lib, LD_PRELOAD="")
    assert out.returncode == 0, out.stderr
    preload, restarted, _ = out.stdout.strip().split("|")
    assert preload == lib and restarted == "1"
    assert "not loaded" not in out.stderr


@linux_only
def test_existing_preload_is_kept_after_the_allocator():
    lib = libm_path()
    other = allocator.mapped("/libc.so") or pytest.skip("libc is not mapped")
    out = run_probe(MLCD_ALLOCATOR=lib, LD_PRELOAD=other)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("|")[0] == f"{lib}:{other}"


def test_system_means_no_restart():
    out = run_probe(MLCD_ALLOCATOR="system", LD_PRELOAD="")
    assert out.returncode == 0, out.stderr
    preload, restarted, described = out.stdout.strip().split("|")
    assert (preload, restarted) == ("", "")
    assert described == "system malloc (MLCD_ALLOCATOR=system)"


def test_missing_library_file_is_an_error_naming_the_variable(tmp_path):
    missing = str(tmp_path / "libnothing.so")
    out = run_probe(MLCD_ALLOCATOR=missing)
    assert out.returncode != 0
    assert f"MLCD_ALLOCATOR={missing!r}" in out.stderr and "expected auto, system" in out.stderr
    assert "Traceback" not in out.stderr


@linux_only
def test_a_preload_that_does_not_load_warns_instead_of_looping(tmp_path):
    # The restarted process (mark set) with a library that is not mapped: one warning, no exec.
    bogus = str(tmp_path / "libbogus.so")
    out = run_probe(LD_PRELOAD="", MLCD_ALLOCATOR_RESTARTED="1", MLCD_ALLOCATOR=bogus)
    assert out.returncode == 0, out.stderr
    assert "is not loaded; on the system malloc" in out.stderr


def test_preload_env_for_jemalloc_turns_decay_off_unless_set():
    env = allocator.preload_env("/x/libjemalloc.so.2", {"LD_PRELOAD": "/a.so"})
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so.2:/a.so"
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert env["MLCD_ALLOCATOR_RESTARTED"] == "1"
    kept = allocator.preload_env("/x/libjemalloc.so.2", {"MALLOC_CONF": "narenas:1"})
    assert kept["MALLOC_CONF"] == "narenas:1" and kept["LD_PRELOAD"] == "/x/libjemalloc.so.2"
    assert "MALLOC_CONF" not in allocator.preload_env("/x/libtcmalloc_minimal.so.4", {})


# A jitted computation whose temporaries exceed glibc's 32 MiB mmap threshold, warmed up, then
# the fewest minor page faults per run over 3 windows of 3 runs (an allocator may still grow
# its heap once in a while; glibc faults in every run).
FAULTS = (
    "from mlcd import allocator; allocator.reexec_with_allocator(); "
    "import resource, jax, jax.numpy as jnp; "
    "f = jax.jit(lambda x: jnp.tanh(x * 2.0 + 1.0) @ x.T); "
    "x = jnp.ones((2048, 4096)); [f(x).block_until_ready().shape for _ in range(3)]; "
    "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
    "window = lambda r0: [f(x).block_until_ready().shape for _ in range(3)] and faults() - r0; "
    "print(min(window(faults()) for _ in range(3)) / 3)"
)


@linux_only
def test_tcmalloc_removes_the_page_faults_of_xla_buffers():
    lib = allocator.find_allocator()
    if lib is None:
        pytest.skip("no TCMalloc / jemalloc installed (apt install libtcmalloc-minimal4)")
    system = run_probe(FAULTS, MLCD_ALLOCATOR="system", JAX_PLATFORMS="cpu")
    fast = run_probe(FAULTS, MLCD_ALLOCATOR="auto", LD_PRELOAD="", JAX_PLATFORMS="cpu")
    assert system.returncode == 0 and fast.returncode == 0, system.stderr + fast.stderr
    # The 32 MiB temporary costs ~8k faults per run on glibc (measured ~8.2k); none on TCMalloc.
    assert float(system.stdout) > 4000
    assert float(fast.stdout) < 0.1 * float(system.stdout)
