"""bench/device_check.sh --tiny on CPU: it runs to the end and prints each benchmark's line."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_tiny():
    out = subprocess.run(
        ["bash", "bench/device_check.sh", "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            # LLVM at -O0: the lines' FLOPs come from the HLO, and no speed is checked here.
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0",
        },
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for attention in ("fused", "xla"):
        line = next(x for x in out.stdout.splitlines() if f"attention={attention}:" in x)
        assert re.search(r"images_per_sec=\d+\.\d", line), line
        assert re.search(r"hlo_tflop=[\d.e-]+ counted_tflop=[\d.e-]+", line), line
        # No H100 / H200 here: no peak to divide by, and no cuDNN.
        assert "mfu_hlo=n/a mfu_counted=n/a cudnn_fmha=no" in line, line
    assert '"kind": "sharded", "num_classes": 16384' in out.stdout
    assert re.search(r"ours_images_per_sec_per_core=\d", out.stdout)
