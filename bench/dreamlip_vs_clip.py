"""DreamLIP vs CLIP on synthetic_scenes at equal compute: one command, one table, one bar chart.

    python bench/dreamlip_vs_clip.py [--steps 1000] [--batch 128] [--seed 0]
        [--out runs/dreamlip_vs_clip] [--data_dir data] [--docs docs/evaluation.md]
        [--only NAME[,NAME]]

Five runs with the same towers, steps (--steps), batch (--batch), optimiser and seed (--seed),
each `python -m mlcd.train`, adding DreamLIP's parts one at a time:
  clip_short  CLIP on the short caption (the alt-text a web crawl would give)
  clip_long   CLIP on the whole long caption (the clip preset's text_keys)
  dl_sub      DreamLIP with sub-captions: sentences of the long caption as positives
  dl_short    + the short caption in the sub-caption pool
  dl_group    + the grouping loss (the full method, configs/dreamlip.py:tiny)
Every run's final evaluation: image-text retrieval against the whole caption and against single
sentences, zero-shot, the pointing game, zero-shot segmentation and the linear probes.

Prints one markdown table (with the budget and each run's training wall time) and writes
<out>/dreamlip_vs_clip.md and .png; with --docs (default docs/evaluation.md, '' for none) the
table and the chart also replace the `dreamlip_vs_clip` section of that page (between its
markers, appended at its end the first time; the chart as docs/dreamlip_vs_clip.png).
Re-running skips the finished runs (a run killed half-way resumes from its checkpoint); --only
trains and reports a subset. The harness is bench/comparison.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import comparison
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METRICS = (
    ("retrieval/test/i2t_r1", "retrieval i->t R@1 (whole caption)"),
    ("retrieval/test/t2i_r1", "retrieval t->i R@1 (whole caption)"),
    ("retrieval/test_sentences/t2i_r1", "sentence -> image R@1"),
    ("retrieval/test_sentences/t2i_r5", "sentence -> image R@5"),
    ("retrieval/test_sentences/i2t_r1", "image -> sentence R@1"),
    ("zeroshot/color/top1", "zero-shot: colour"),
    ("zeroshot/shape/top1", "zero-shot: shape"),
    ("grounding/test/pointing_acc", "pointing game"),
    ("segmentation/test/color_miou", "segmentation mIoU: colour"),
    ("segmentation/test/shape_miou", "segmentation mIoU: shape"),
    ("linear_probe/largest_shape/top1", "linear probe: shape"),
    ("linear_probe/largest_color/top1", "linear probe: colour"),
    ("linear_probe/count/top1", "linear probe: count"),
    ("linear_probe/background/top1", "linear probe: background"),
)
RUNS = {
    "clip_short": ("configs/clip.py:tiny", {"data.text_keys": "('short_caption',)"}),
    "clip_long": ("configs/clip.py:tiny", {}),
    "dl_sub": ("configs/dreamlip.py:tiny_sub", {}),
    "dl_short": ("configs/dreamlip.py:tiny_short", {}),
    "dl_group": ("configs/dreamlip.py:tiny", {}),
}


def ambiguity(data_dir: str, batch: int, batches: int = 200, seed: int = 0) -> str:
    """Why sub-captions should teach shape: a markdown table of how many OTHER images of a
    random training batch a text also describes, if a model reads only colour words, or colour
    and shape words. A whole long caption names every object's colour and the background; one
    sentence names one object. Computed from the train split's labels (colors, shapes,
    background), `batches` random batches of `batch`."""
    from configs import common
    from input_pipeline import datasets

    build = common.load_config(os.path.join(comparison.ROOT, "configs/dreamlip.py:tiny"))
    build = build.data.build.to_dict()
    builder = datasets.get_builder("synthetic_scenes", data_dir, build=False, **build)
    source = builder.as_data_source("train")
    n = len(source)
    scenes = []
    for i in range(n):
        ex = source[i]
        k = int(ex["num_objects"])
        colors, shapes = ex["colors"][:k].tolist(), ex["shapes"][:k].tolist()
        scenes.append((colors, set(zip(colors, shapes, strict=True)), int(ex["background"])))
    rng = np.random.default_rng(seed)
    caption_colour, caption_both, sentence_colour, sentence_both = [], [], [], []
    for _ in range(batches):
        rows = [scenes[i] for i in rng.choice(n, batch, replace=False)]
        for i, (colors, entities, background) in enumerate(rows):
            others = rows[:i] + rows[i + 1 :]
            # The whole caption read through its colour words: the colour multiset + background.
            caption_colour.append(
                sum(sorted(c) == sorted(colors) and b == background for c, _, b in others)
            )
            caption_both.append(
                sum(
                    e == entities and sorted(c) == sorted(colors) and b == background
                    for c, e, b in others
                )
            )
            for color, shape in entities:
                sentence_colour.append(sum(color in c for c, _, _ in others))
                sentence_both.append(sum((color, shape) in e for _, e, _ in others))
    line = lambda name, a, b: (
        f"| {name} | {np.mean(a):.2f} | {np.mean(np.asarray(a) == 0):.0%} | {np.mean(b):.2f} | "
        f"{np.mean(np.asarray(b) == 0):.0%} |"
    )
    return "\n".join(
        [
            f"Other images in a random batch of {batch} that a text also describes (train split, "
            f"{batches} batches):",
            "",
            "| text | by its colour words: other images | unique | by colour and shape: other "
            "images | unique |",
            "|---|---:|---:|---:|---:|",
            line(
                "whole long caption (every object's colour, the background)",
                caption_colour,
                caption_both,
            ),
            line("one object sentence (its colour and shape)", sentence_colour, sentence_both),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    comparison.add_arguments(parser, out="runs/dreamlip_vs_clip")
    parser.add_argument("--batch", type=int, default=128, help="global batch of every run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(RUNS)}")
    args = parser.parse_args()
    comparison.check_docs(parser, args.docs)
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"--only: unknown run(s) {','.join(unknown)}; choose from {','.join(RUNS)}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir)

    results, workdirs = {}, {}
    for name in names:
        spec, extra = RUNS[name]
        overrides = {**comparison.run_overrides(args.steps, args.batch, args.seed), **extra}
        workdirs[name] = os.path.join(out, name)
        results[name] = comparison.train(spec, overrides, workdirs[name], data_dir)

    title = (
        f"DreamLIP vs CLIP on synthetic_scenes, {args.steps} steps x {args.batch} each, "
        f"seed {args.seed} (n/a: no bar)"
    )
    comparison.report(
        results,
        METRICS,
        workdirs,
        out,
        "dreamlip_vs_clip",
        title,
        args.docs,
        alt="DreamLIP vs CLIP",
        extra=ambiguity(data_dir, args.batch, seed=args.seed),
    )


if __name__ == "__main__":
    main()
