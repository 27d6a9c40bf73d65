"""Run logging: metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow) and a PNG
of the curves. Only process 0 writes, so multi-host runs produce one log.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import jax


class MetricWriter:
    """Appends `{"step": s, **metrics}` lines to <workdir>/metrics.jsonl and TensorBoard events."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._active = jax.process_index() == 0
        self._tb = None
        if not self._active:
            return
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        from tensorboardX import SummaryWriter  # imported lazily: only the writing host needs it

        self._tb = SummaryWriter(
            os.path.join(workdir, "tensorboard"),
            purge_step=None if resume_step is None else resume_step + 1,
        )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self._active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and math.isfinite(v):
                self._tb.add_scalar(k, v, global_step=step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, float]]:
    """The records of a metrics.jsonl file (an empty list if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int) -> None:
    """Drops records logged after `step` (by a run that was killed and is now resumed from
    `step`), rewriting the file atomically so a crash here cannot lose the earlier records."""
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) == len(records):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def plot_metrics(path: str, out_png: str) -> str:
    """Plots every metric of metrics.jsonl against step, one panel per metric, into `out_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in read_metrics(path):
        for k, v in r.items():
            if k != "step" and v is not None and math.isfinite(v):
                series[k].append((r["step"], v))
    names = sorted(series)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps, values = zip(*series[name], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 20 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
