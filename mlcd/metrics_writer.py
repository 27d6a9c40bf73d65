"""Run logging: metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow) and a PNG
of the curves. Only process 0 writes, so multi-host runs produce one log.

The log always describes one run, each step once: a resumed run drops what was logged after its
checkpoint (it logs those steps again), and a run that starts from step 0 drops everything a
killed earlier run logged before its first checkpoint. A line cut short by a crash mid-write is
dropped when the log is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from typing import Any

import jax


class MetricWriter:
    """Appends `{"step": s, **metrics}` lines to <workdir>/metrics.jsonl and TensorBoard events."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        """resume_step: the step of the checkpoint the run resumed from; None for a run that
        starts from step 0, which first removes the records and event files already there."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._active = jax.process_index() == 0
        self._tb = None
        if not self._active:
            return
        tb_dir = os.path.join(workdir, "tensorboard")
        if resume_step is None:
            self._start_over(tb_dir)
        else:
            truncate_after(self.path, resume_step)
        from tensorboardX import SummaryWriter  # imported lazily: only the writing host needs it

        self._tb = SummaryWriter(
            tb_dir, purge_step=None if resume_step is None else resume_step + 1
        )

    def _start_over(self, tb_dir: str) -> None:
        """Removes metrics.jsonl and the TensorBoard event files (`events.out.tfevents.*`, the
        names tensorboardX writes; anything else stays). They can only be from a run killed
        before its first checkpoint, whose steps this run logs again: appending would log those
        steps twice, and TensorBoard would show both curves."""
        names = sorted(os.listdir(tb_dir)) if os.path.isdir(tb_dir) else []
        events = [os.path.join(tb_dir, n) for n in names if n.startswith("events.out.tfevents.")]
        stale = [self.path] if os.path.exists(self.path) else []
        stale += [p for p in events if os.path.isfile(p)]
        if stale:
            logging.warning(
                "%s: removing the log of an earlier run that left no checkpoint (%s); this run "
                "starts from step 0",
                os.path.dirname(self.path),
                ", ".join(os.path.relpath(p, os.path.dirname(self.path)) for p in stale),
            )
        for path in stale:
            os.remove(path)

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
    """The records of a metrics.jsonl file (an empty list if it does not exist). A torn last
    line (no newline, not JSON: a write cut short by a crash) is dropped with a warning; a bad
    line anywhere else is a ValueError naming the file and line."""
    return _read(path)[0]


def _read(path: str) -> tuple[list[dict[str, float]], bool]:
    """(records, whole): whole is False when the file does not end with a newline (a torn line
    was dropped, or the last record lacks its newline): appending to it needs a rewrite first."""
    if not os.path.exists(path):
        return [], True
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")  # the last item is what follows the last newline ('' normally)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not an object with a step")
        except ValueError as e:
            if number == len(lines):
                logging.warning(
                    "%s: dropping its torn last line %r (a write cut short)", path, line[:60]
                )
                return records, False
            raise ValueError(f"{path}:{number}: not a metrics record ({e})") from None
        records.append(record)
    return records, text.endswith("\n") or not text


def truncate_after(path: str, step: int) -> None:
    """Drops records logged after `step` (by a run that was killed and is now resumed from
    `step`), and a torn last line, rewriting the file atomically so a crash here cannot lose
    the earlier records. A file that needs neither is left untouched."""
    records, whole = _read(path)
    kept = [r for r in records if r["step"] <= step]
    if whole and len(kept) == len(records):
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
