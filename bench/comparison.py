"""The harness of the method-vs-CLIP studies (bench/mofi_vs_clip.py, bench/dreamlip_vs_clip.py).

Each study trains a few tiny runs with `python -m mlcd.train` as subprocesses at equal compute,
then reports one markdown table (the best value per metric in bold, "n/a" where a run has no
such metric), one grouped bar chart (no bar for n/a) and, optionally, the same table and chart
in a docs page between the markers `<!-- begin: NAME -->` and `<!-- end: NAME -->`.

Runs are resumable: a run whose last step's records are in `<workdir>/metrics.jsonl` is not
trained again (a run killed half-way resumes from its checkpoint). The wall time of the train
subprocess that finished a run is kept in `<workdir>/bench_time.json`, so a re-run that skips
the training still reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlcd import label_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_FILE = "bench_time.json"

Results = dict[str, dict[str, float]]
Metrics = Sequence[tuple[str, str]]  # (key in metrics.jsonl, label in the table)


def run(cmd: list[str], log: str) -> float:
    """Runs cmd from the repository root, appending its output to `log`; exits on failure.

    Returns the wall seconds it took.
    """
    print(f"$ {' '.join(cmd)}   (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"failed with exit status {rc}: see {log}")
    seconds = time.perf_counter() - t0
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def final_metrics(workdir: str) -> dict[str, float] | None:
    """The records of a finished run's last step, merged (None if it has not finished)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    last = [r for r in rows if r["step"] == config["total_steps"]]
    merged = {k: v for r in last for k, v in r.items()}
    return merged if any(k.startswith("linear_probe/") for k in merged) else None


def train_seconds(workdir: str) -> float | None:
    """Wall seconds of the train subprocess that finished the run (None if not recorded)."""
    try:
        with open(os.path.join(workdir, TIME_FILE)) as f:
            return float(json.load(f)["train_seconds"])
    except (OSError, ValueError, KeyError):
        return None


def train(spec: str, overrides: dict[str, str], workdir: str, data_dir: str) -> dict[str, float]:
    """Trains `python -m mlcd.train --config spec` into workdir unless it has finished.

    Returns its final metrics; records the training's wall time in <workdir>/bench_time.json.
    """
    if final_metrics(workdir) is None:
        args = [f"--config.{k}={v}" for k, v in {"data.data_dir": data_dir, **overrides}.items()]
        cmd = [sys.executable, "-m", "mlcd.train", "--config", spec, "--workdir", workdir, *args]
        seconds = run(cmd, workdir + ".log")
        record = json.dumps({"train_seconds": round(seconds, 1)}) + "\n"
        atomic_write(os.path.join(workdir, TIME_FILE), record.encode())
    metrics = final_metrics(workdir)
    if metrics is None:
        sys.exit(f"{workdir}: training ended without the final evaluation (see {workdir}.log)")
    return metrics


def run_overrides(steps: int, batch: int | None = None, seed: int | None = None) -> dict:
    """The per-run config overrides of a study: the budget, no periodic evaluation."""
    overrides = {"total_steps": str(steps)}
    if batch is not None:
        overrides["batch_size"] = str(batch)
    if seed is not None:
        overrides["seed"] = str(seed)
    overrides.update(eval_every="0", ckpt_every=str(max(steps // 4, 1)))
    return overrides


def table(results: Results, metrics: Metrics) -> str:
    """A markdown table, a row per metric and a column per run; the best in bold, n/a if absent."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in metrics:
        values = [results[n].get(key) for n in names]
        present = [v for v in values if v is not None]
        best = max(present) if present else None
        cells = [
            "n/a" if v is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}") for v in values
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Results, metrics: Metrics, path: str, title: str) -> None:
    """Grouped bars, a group per metric (those no run has left out) and a bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    keys = [(k, label) for k, label in metrics if any(k in r for r in results.values())]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(12, 0.9 * len(keys)), 4.5))
    for i, name in enumerate(names):
        values = [results[name].get(k, np.nan) for k, _ in keys]
        ax.bar(np.arange(len(keys)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(np.arange(len(keys)), [label for _, label in keys], rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_line(workdirs: dict[str, str]) -> str:
    """Steps x batch and seed of the runs, read from their config.json (per run if they differ)."""

    def budget(workdir: str) -> str:
        with open(os.path.join(workdir, "config.json")) as f:
            c = json.load(f)
        return f"{c['total_steps']} steps x {c['batch_size']} images, seed {c['seed']}"

    each = {name: budget(w) for name, w in workdirs.items()}
    if len(set(each.values())) == 1:
        return f"Budget of every run: {next(iter(each.values()))}."
    return "Budget: " + "; ".join(f"`{n}` {b}" for n, b in each.items()) + "."


def times_line(workdirs: dict[str, str]) -> str:
    """The wall time of each run's training (n/a where it was not recorded)."""

    def fmt(seconds: float | None) -> str:
        return "n/a" if seconds is None else f"{seconds / 60:.1f} min"

    return (
        "Train wall time: "
        + ", ".join(f"`{n}` {fmt(train_seconds(w))}" for n, w in workdirs.items())
        + "."
    )


def atomic_write(path: str, data: bytes) -> None:
    """Writes path all or nothing (`label_store.atomic_file`), keeping an existing file's mode.

    A new file gets the default mode (0o666 minus the umask).
    """
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else None
    with label_store.atomic_file(path) as f:
        f.write(data)
        if mode is not None:
            os.fchmod(f.fileno(), mode)


def write_docs_section(
    doc_path: str, name: str, markdown: str, png_src: str, alt: str | None = None
) -> None:
    """Puts `markdown` and the image link into doc_path between the markers of `name`.

    Replaces the text between `<!-- begin: NAME -->` and `<!-- end: NAME -->` (the pair is
    appended at the end of the file if absent), and copies png_src next to the doc as NAME.png.
    Both files are written atomically: a crash leaves each one old or new, never half-written.
    """
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    with open(doc_path, encoding="utf-8") as f:
        text = f.read()
    body = f"{begin}\n![{alt or name}]({name}.png)\n\n{markdown.strip()}\n{end}"
    counts = text.count(begin), text.count(end)
    if counts == (0, 0):
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + body + "\n"
    elif counts == (1, 1) and text.index(begin) < text.index(end):
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + body + text[stop:]
    else:
        raise ValueError(f"{doc_path}: expected one {begin!r} before one {end!r}, found {counts}")

    png_dst = os.path.join(os.path.dirname(os.path.abspath(doc_path)), f"{name}.png")
    if not (os.path.exists(png_dst) and os.path.samefile(png_src, png_dst)):
        with open(png_src, "rb") as f:
            atomic_write(png_dst, f.read())
    atomic_write(doc_path, text.encode("utf-8"))


def add_arguments(parser: argparse.ArgumentParser, out: str, steps: int = 1000) -> None:
    """The options every study has: --steps, --out, --data_dir, --docs."""
    parser.add_argument("--steps", type=int, default=steps, help="train steps of every run")
    parser.add_argument("--out", default=out, help="where the runs and the report go")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument(
        "--docs",
        default="docs/evaluation.md",
        help="the docs page whose section this study rewrites ('' = write no docs)",
    )


def check_docs(parser: argparse.ArgumentParser, docs: str) -> None:
    """Fails before any training if --docs names a page that is not there."""
    if docs and not os.path.isfile(docs):
        parser.error(f"--docs {docs}: no such file ('' to write no docs)")


def report(
    results: Results,
    metrics: Metrics,
    workdirs: dict[str, str],
    out: str,
    name: str,
    title: str,
    docs: str = "",
    alt: str | None = None,
    extra: str = "",
) -> str:
    """Prints the table, the budget, the times and `extra` (markdown, e.g. a study's own
    measurements); writes <out>/NAME.md and .png and the docs."""
    parts = [table(results, metrics), budget_line(workdirs), times_line(workdirs), extra]
    markdown = "\n\n".join(p for p in parts if p)
    print(markdown)
    md, png = os.path.join(out, f"{name}.md"), os.path.join(out, f"{name}.png")
    atomic_write(md, (markdown + "\n").encode("utf-8"))
    plot(results, metrics, png, title)
    print(f"wrote {md} and {png}")
    if docs:
        write_docs_section(docs, name, markdown, png, alt=alt)
        print(f"wrote the section {name!r} of {docs}")
    return markdown
