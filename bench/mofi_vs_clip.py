"""MOFI vs CLIP on synthetic_scenes at equal compute: one command, one table, one bar chart.

    python bench/mofi_vs_clip.py [--steps 1000] [--out runs/mofi_vs_clip] [--teacher DIR] [--oracle]
        [--docs docs/evaluation.md]

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

Prints one markdown table (with the budget and each run's training wall time) and writes
<out>/mofi_vs_clip.png and <out>/mofi_vs_clip.md; with --docs (default docs/evaluation.md, ''
for none) the table and the chart also replace the `mofi_vs_clip` section of that page (between
its markers; the chart as docs/mofi_vs_clip.png). Re-running skips the steps whose outputs are
complete (a run killed half-way resumes from its checkpoint). The harness is bench/comparison.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import comparison

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


def annotate(out_dir: str, data_dir: str, *overrides: str) -> None:
    """python -m mlcd.annotate --config configs/annotate.py:tiny into out_dir, unless done."""
    if not os.path.exists(os.path.join(out_dir, "annotations.json")):
        cmd = [sys.executable, "-m", "mlcd.annotate", "--config", "configs/annotate.py:tiny"]
        cmd += [f"--config.out_dir={out_dir}", f"--config.data.data_dir={data_dir}", *overrides]
        comparison.run(cmd, out_dir + ".log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    comparison.add_arguments(parser, out="runs/mofi_vs_clip")
    parser.add_argument("--oracle", action="store_true", help="also train on perfect labels")
    parser.add_argument(
        "--teacher", help="an existing CLIP run directory or export to annotate with"
    )
    args = parser.parse_args()
    comparison.check_docs(parser, args.docs)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir)

    teacher = os.path.abspath(args.teacher) if args.teacher else os.path.join(out, "teacher")
    if not args.teacher:
        comparison.train("configs/clip.py:tiny", {}, teacher, data_dir)
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

    results, workdirs = {}, {}
    for name, (spec, extra) in runs.items():
        overrides = {**comparison.run_overrides(args.steps), **extra}
        if spec.startswith("configs/mofi.py"):
            overrides.setdefault("objective.annotations", entities)
        workdirs[name] = os.path.join(out, name)
        results[name] = comparison.train(spec, overrides, workdirs[name], data_dir)

    title = f"MOFI vs CLIP on synthetic_scenes, {args.steps} steps x 128 each (n/a: no bar)"
    comparison.report(
        results, METRICS, workdirs, out, "mofi_vs_clip", title, args.docs, alt="MOFI vs CLIP"
    )


if __name__ == "__main__":
    main()
