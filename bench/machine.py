"""What the benchmarks print about the machine they ran on (speed claims name the CPU)."""

from __future__ import annotations

import platform
import subprocess


def _field(text: str, key: str) -> str:
    """The value of the first 'key: value' line of `text` ('' if none)."""
    lines = (line.split(":", 1) for line in text.splitlines() if line.startswith(key))
    return next((value.strip() for _, value in lines), "")


def cpu_model() -> str:
    """lscpu's model name (else /proc/cpuinfo's, else platform.processor()), with family /
    model and AVX-512 noted where /proc/cpuinfo exists."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return _field(lscpu, "Model name") or platform.processor() or "unknown CPU"
    name = _field(lscpu, "Model name") or _field(info, "model name") or "unknown CPU"
    family, model = _field(info, "cpu family"), _field(info, "model\t")
    return f"{name} (family {family}, model {model}){', AVX-512' if ' avx512f' in info else ''}"
