"""Conversion rate of python -m input_pipeline.convert on web-like JPEGs.

    python bench/convert.py [--images 500] [--per-tar 50] [--workers 1,2] [--repeats 2]

Generates `--images` JPEGs (quality 85) with sides drawn uniformly from 300-1000 px, each a
smooth random colour field with random filled shapes and mild noise (sizes and decode cost of
photos: ~60-200 KB, 5-20 ms to decode), with 3-15 word captions, as img2dataset-style
WebDataset tars of `--per-tar` examples (one tar = one output shard) in a temporary directory.
Then converts them, one fresh output each time, in three modes:

  original   the default: every image decoded once (the check), original bytes stored;
  resized    image.max_shorter_side=256: the larger images decoded at a reduced JPEG scale,
             resized (Lanczos) and re-encoded (JPEG quality 95);
  small      the 'small' preset: every image re-encoded as JPEG quality 90, shorter side <= 256.

for each worker count in --workers, best of --repeats runs, and prints examples/s (the whole
run: planning, worker start-up, tfds metadata included), examples/s per worker, examples per
CPU-second (user + system time of the process and its workers: what a worker achieves on an
otherwise idle core, whatever else the machine runs) and the output size. The machine may be
shared: the load average is printed first and last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.machine import cpu_model
from configs import common
from input_pipeline.convert import run

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WORDS = (
    "a the photo of on in with red blue green small large dog cat car tree house street sky".split()
)
MODES = {
    "original": ("", {}),
    "resized": ("", {"image.max_shorter_side": 256}),
    "small": ("small", {}),
}


def web_like_jpeg(rng: np.random.Generator) -> bytes:
    """A JPEG of photo-like size and entropy: smooth colour field + shapes + noise."""
    w, h = (int(s) for s in rng.integers(300, 1001, size=2))
    field = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue()


def write_tars(root: str, images: int, per_tar: int) -> tuple[int, int]:
    """The WebDataset tars; returns (number of tars, total image bytes)."""
    rng = np.random.default_rng(0)
    total, tars = 0, 0
    for start in range(0, images, per_tar):
        with tarfile.open(os.path.join(root, f"{tars:05d}.tar"), "w") as tar:
            for i in range(start, min(start + per_tar, images)):
                key = f"{i:09d}"
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 16))))
                members = {
                    "jpg": web_like_jpeg(rng),
                    "txt": caption.encode(),
                    "json": json.dumps({"key": key, "caption": caption}).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                total += len(members["jpg"])
        tars += 1
    return tars, total


def convert_once(
    src: str, out: str, tars: int, mode: str, workers: int
) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds of this process and its workers, examples, output bytes) of
    one conversion into a fresh directory."""
    preset, values = MODES[mode]
    config = common.load_config(
        os.path.join(ROOT, "configs", "convert.py") + (f":{preset}" if preset else "")
    )
    values = {
        "name": "bench",
        "out_dir": out,
        "sources": f"{src}/{{00000..{tars - 1:05d}}}.tar",
        "num_workers": workers,
        "verbose": False,
        **values,
    }
    common.parse_overrides(config, [f"--config.{k}={v}" for k, v in values.items()])
    start, cpu = time.perf_counter(), _cpu_seconds()
    summary = run.convert(config)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    version_dir = os.path.join(out, "bench", "1.0.0")
    size = sum(
        os.path.getsize(os.path.join(version_dir, f))
        for f in os.listdir(version_dir)
        if "array_record" in f
    )
    return seconds, cpu, summary["num_examples"], size


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children (the workers:
    the pool is shut down before convert returns)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--per-tar", type=int, default=50)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    print(
        f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs; load average {os.getloadavg()}"
    )
    src = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        start = time.perf_counter()
        tars, total = write_tars(src, args.images, args.per_tar)
        print(
            f"{args.images} JPEGs, 300-1000 px, {total / args.images / 1e3:.0f} KB mean, in {tars} "
            f"tars (generated in {time.perf_counter() - start:.0f} s)\n"
        )
        print(
            f"{'mode':<10}{'workers':>8}{'seconds':>9}{'ex/s':>8}{'ex/s/worker':>13}"
            f"{'ex/CPU-s':>10}{'output MB':>11}"
        )
        for mode in MODES:
            for w in workers:
                runs = []
                for _ in range(args.repeats):
                    out = tempfile.mkdtemp(prefix="bench_convert_out_")
                    try:
                        runs.append(convert_once(src, out, tars, mode, w))
                    finally:
                        shutil.rmtree(out)
                seconds = min(r[0] for r in runs)
                cpu = min(r[1] for r in runs)
                _, _, n, size = runs[0]
                rate = n / seconds
                print(
                    f"{mode:<10}{w:>8}{seconds:>9.1f}{rate:>8.0f}{rate / w:>13.0f}"
                    f"{n / cpu:>10.0f}{size / 1e6:>11.1f}"
                )
    finally:
        shutil.rmtree(src)
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
