"""MOFI vs CLIP on synthetic_scenes at equal compute: one command, one table, one bar chart.

    python bench/mofi_vs_clip.py [--steps 1000] [--out runs/mofi_vs_clip] [--teacher DIR] [--oracle]

1. Teacher: a CLIP tiny run on the long captions (the README's main job, 300 steps), unless
   --teacher names an existing one (a run directory or an export). It plays the CLIP model of MOFI's I2E recipe.
2. Annotation: python -m mlcd.annotate --config configs/annotate.py:tiny with that teacher:
   entity names found in the alt-text (`alt_text`), kept where the teacher agrees.
3. Four runs with the same image tower, steps (--steps), batch (128), optimiser and seed:
     clip        CLIP on the alt-text (the paper's baseline: CLIP on the original noisy text)
     mofi_sup    the entity classifier (image-only)
     mofi_con    CLIP-style contrastive with entity names as the text
     mofi_multi  both (the released MOFI models)
   With --oracle, a fifth: sup_oracle, the classifier on perfect labels (the entities the long
   captions name, unfiltered: precision and recall 1), which separates what the annotation
   loses from what the model and budget cannot learn.
4. Every run's final evaluation: image-to-image retrieval mAP (the headline; relevant = the same
   multiset of entities, which needs colour AND shape, and a looser rule, the same largest
   entity), the linear probes (shape included), and zero-shot where there is a text tower.

Prints one markdown table and writes <out>/mofi_vs_clip.png (and the table as
<out>/mofi_vs_clip.md). Re-running skips the steps whose outputs are complete (a run killed
half-way resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRICS = (
    ("image_retrieval/test/map", "image retrieval mAP, same entity set"),
    ("image_retrieval/test_largest/map", "image retrieval mAP, same largest entity"),
    ("linear_probe/largest_shape/top1", "linear probe: shape"),
    ("linear_probe/largest_color/top1", "linear probe: colour"),
    ("linear_probe/count/top1", "linear probe: count"),
    ("linear_probe/background/top1", "linear probe: background"),
    ("linear_probe/digits/top1", "linear probe: digits"),
    ("zeroshot/shape/top1", "zero-shot: shape"),
    ("zeroshot/color/top1", "zero-shot: colour"),
)
RUNS = {
    "clip": ("configs/clip.py:tiny", {"data.text_keys": "('alt_text',)"}),
    "mofi_sup": ("configs/mofi.py:tiny_sup", {}),
    "mofi_con": ("configs/mofi.py:tiny_con", {}),
    "mofi_multi": ("configs/mofi.py:tiny", {}),
}


def run(cmd: list[str], log: str) -> None:
    """Runs cmd from the repository root, appending its output to `log`; exits on failure."""
    print(f"$ {' '.join(cmd)}   (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"failed with exit status {rc}: see {log}")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)


def annotate(out_dir: str, data_dir: str, *overrides: str) -> None:
    """python -m mlcd.annotate --config configs/annotate.py:tiny into out_dir, unless done."""
    if not os.path.exists(os.path.join(out_dir, "annotations.json")):
        cmd = [sys.executable, "-m", "mlcd.annotate", "--config", "configs/annotate.py:tiny"]
        cmd += [f"--config.out_dir={out_dir}", f"--config.data.data_dir={data_dir}", *overrides]
        run(cmd, out_dir + ".log")


def final_metrics(workdir: str) -> dict[str, float] | None:
    """The records of a finished run's last step, merged (None if it has not finished)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    config = json.load(open(os.path.join(workdir, "config.json")))
    last = [r for r in rows if r["step"] == config["total_steps"]]
    merged = {k: v for r in last for k, v in r.items()}
    return merged if any(k.startswith("linear_probe/") for k in merged) else None


def train(name: str, spec: str, overrides: dict[str, str], workdir: str, data_dir: str) -> None:
    if final_metrics(workdir) is None:
        args = [f"--config.{k}={v}" for k, v in {"data.data_dir": data_dir, **overrides}.items()]
        cmd = [sys.executable, "-m", "mlcd.train", "--config", spec, "--workdir", workdir, *args]
        run(cmd, workdir + ".log")


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in METRICS:
        values = [results[n].get(key) for n in names]
        present = [v for v in values if v is not None]
        best = max(present) if present else None
        cells = [
            "n/a" if v is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}") for v in values
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    keys = [(k, label) for k, label in METRICS if any(k in r for r in results.values())]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, name in enumerate(names):
        values = [results[name].get(k, np.nan) for k, _ in keys]
        ax.bar(np.arange(len(keys)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(np.arange(len(keys)), [label for _, label in keys], rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(f"MOFI vs CLIP on synthetic_scenes, {steps} steps x 128 each (n/a: no bar)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="runs/mofi_vs_clip")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--oracle", action="store_true", help="also train on perfect labels")
    parser.add_argument(
        "--teacher", help="an existing CLIP run directory or export to annotate with"
    )
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir)

    teacher = os.path.abspath(args.teacher) if args.teacher else os.path.join(out, "teacher")
    if not args.teacher:
        train("teacher", "configs/clip.py:tiny", {}, teacher, data_dir)
    entities = os.path.join(out, "entities")
    kind = "export" if os.path.exists(os.path.join(teacher, "export.json")) else "workdir"
    other = "workdir" if kind == "export" else "export"
    annotate(entities, data_dir, f"--config.teacher.{kind}={teacher}", f"--config.teacher.{other}=")
    runs = dict(RUNS)
    if args.oracle:
        oracle = os.path.join(out, "entities_oracle")
        unfiltered = ("--config.filter.enabled=False", "--config.teacher.workdir=")
        annotate(oracle, data_dir, *unfiltered, "--config.data.text_key=long_caption")
        runs["sup_oracle"] = ("configs/mofi.py:tiny_sup", {"objective.annotations": oracle})

    results = {}
    for name, (spec, extra) in runs.items():
        overrides = {
            "total_steps": str(args.steps),
            "eval_every": "0",
            "ckpt_every": str(max(args.steps // 4, 1)),
        }
        overrides.update(extra)
        if spec.startswith("configs/mofi.py"):
            overrides.setdefault("objective.annotations", entities)
        workdir = os.path.join(out, name)
        train(name, spec, overrides, workdir, data_dir)
        results[name] = final_metrics(workdir)

    text = table(results)
    print(text)
    with open(os.path.join(out, "mofi_vs_clip.md"), "w") as f:
        f.write(text + "\n")
    plot(results, os.path.join(out, "mofi_vs_clip.png"), args.steps)
    print(f"wrote {out}/mofi_vs_clip.md and {out}/mofi_vs_clip.png")


if __name__ == "__main__":
    main()
