"""bench/dry_run.py: the microbatch counts and table of --remat_search (in process), and, as
subprocesses on 8 fake devices with the tiny MLCD config, the search itself and the report's
HLO FLOPs."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "bench_dry_run", os.path.join(ROOT, "bench", "dry_run.py")
)
dry_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dry_run)

# 256 / 8 devices = 32 rows per device: microbatches 1, 2 and 4 all divide it.
TINY = ["--config", "configs/mlcd.py:tiny", "--devices", "8", "--config.batch_size=256"]


def run_dry_run(*args: str) -> str:
    """stdout of bench/dry_run.py with TINY and `args`; fails the test on a non-zero exit."""
    out = subprocess.run(
        [sys.executable, "bench/dry_run.py", *TINY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        # The script adds its own device count to XLA_FLAGS: the test process's must not win.
        # LLVM at -O0: the peaks and FLOPs come from the HLO, and LLVM's optimisations take a
        # third of each compile. The tests' compilation cache (conftest): the report's two
        # steps are the search's (remat none, 1 and 2 microbatches), so they are cache hits.
        env={
            **os.environ,
            "XLA_FLAGS": "--xla_backend_optimization_level=0",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        },
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_microbatch_counts():
    assert dry_run.microbatch_counts(32, True, 32) == [1, 2, 4, 8, 16, 32]
    assert dry_run.microbatch_counts(32, True, 4) == [1, 2, 4]
    assert dry_run.microbatch_counts(12, True, 32) == [1, 2, 4]  # 8 does not divide 12 rows
    assert dry_run.microbatch_counts(32, False, 32) == [1]  # contrastive: the batch is one


def test_search_table():
    results = {"none": {1: 90.0, 2: 50.0}, "full": {1: 30.0}, "dots_saveable": {1: 85.5}}
    lines = dry_run.search_table(results, 80.0).splitlines()
    assert lines[0] == "| remat | 1 mb | 2 mb | fewest fitting 80 GiB |"
    assert lines[2:] == [
        "| none | 90.000 | 50.000 | 2 |",
        "| full | 30.000 | - | 1 |",
        "| dots_saveable | 85.500 | - | none |",
    ]


def test_remat_search_stops_at_first_fit():
    # Peaks of this step (XLA:CPU): none 0.11 / 0.07 GiB at 1 / 2 microbatches, full 0.04,
    # dots_saveable 0.06 at 1: 0.08 GiB takes 2 microbatches without remat, 1 with either.
    out = run_dry_run("--remat_search", "--device_gib", "0.08", "--max_microbatches", "4")
    compiled = re.findall(r"remat=(\w+) microbatches=(\d+): peak ([\d.]+) GiB", out)
    assert [(p, int(k)) for p, k, _ in compiled] == [
        ("none", 1),
        ("none", 2),
        ("full", 1),
        ("dots_saveable", 1),
    ]
    peaks = {(p, int(k)): float(g) for p, k, g in compiled}
    # Remat must shrink the peak: XLA:CPU would otherwise merge the recomputation away.
    assert peaks["full", 1] < peaks["dots_saveable", 1] < peaks["none", 1]
    # The table's last column: the fewest microbatches that fit, per policy.
    assert [line.split("|")[-2].strip() for line in out.rstrip().splitlines()[-3:]] == [
        "2",
        "1",
        "1",
    ]


def hlo_tflop(out: str) -> tuple[float, float]:
    """(per device, total) TFLOP of the report's 'HLO FLOPs per step' line."""
    line = next(x for x in out.splitlines() if x.startswith("HLO FLOPs per step"))
    per_device, total = map(float, re.findall(r"([\d.e+-]+) TFLOP", line))
    return per_device, total


def test_report_hlo_flops():
    one = run_dry_run()
    per_device, total = hlo_tflop(one)
    assert total == pytest.approx(8 * per_device, rel=1e-3)
    assert re.search(r"peak_gib=[\d.]+ device_gib=80 fits=yes", one)
    # XLA counts the scan's body once; the report multiplies it by the microbatch count, so
    # the step's FLOPs stay the same (the update, counted twice, is small).
    assert hlo_tflop(run_dry_run("--config.microbatches=2"))[1] == pytest.approx(total, rel=0.03)
