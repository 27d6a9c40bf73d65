"""Host input pipeline per core on web-size JPEGs: decode, random-resized crop to 224, flip and
tokenize (77 tokens) through this project's ops, a PIL loop written the way a PyTorch
DataLoader worker does it, and the decode / resize candidates behind input_pipeline/preprocess.py.

    python bench/input_pipeline.py [--num-images 200] [--repeats 3]

The simplejpeg and OpenCV rows need `pip install simplejpeg opencv-python-headless` (they are
left out without them).

Generates --num-images JPEG files (each side uniform in 300-1000 px, so aspect ratios up to
10:3; quality 90, 4:2:0 chroma; a colour gradient, flat shapes, blur, and noise at two scales,
which gives photo-like sizes: about 2.35 bits per pixel, median about 115 KB) and a caption each (5-25
pseudo-words) in a temporary directory, trains the project's byte-level BPE on captions of the
same kind, then runs every path over the same files: one process, one thread, pinned to one CPU,
timed in process CPU seconds (what a core spends: also less disturbed by other jobs than wall
time). The paths alternate round by round (--repeats rounds after an untimed warm-up round); a
path's figure is its best round, its median round is shown too.

Every path reads the file, decodes, crops (scale --crop-scale, aspect 3/4-4/3: the same box for
the same image and round, except the peer, which draws as torchvision does), resizes to 224,
flips with probability 1/2 and tokenizes the caption. The peer also normalises to float32 CHW on
the host, as torchvision's ToTensor + Normalize do; this project normalises on the accelerator
(preprocess.normalize_images inside the jitted step), so that cost is measured apart. "mad" is
the mean absolute difference (0-255 scale) of a path's 224 x 224 crop from the full-size decode
+ bicubic crop of the same box (the project's path before the DCT-scaled decode).

Then the accelerator side: FLOPs of one ViT-B/16 CLIP sample (jax cost analysis of the two-tower
model's forward at batch 1, lowered only, nothing allocated; forward + backward taken as 3x)
and the host cores one accelerator needs: samples/s at --mfu of its bf16 dense peak divided by
the images/s of one core.

Last line: `ours_images_per_sec_per_core=X peer_images_per_sec_per_core=Y ratio=Z`.
"""

from __future__ import annotations

import os

# One thread everywhere: the figures are per core.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import collections
import dataclasses
import io
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.machine import cpu_model
from input_pipeline import preprocess, transforms
from input_pipeline.tokenizers import Tokenizer, train_bpe_tokenizer

try:
    import simplejpeg
except ImportError:
    simplejpeg = None
try:
    import cv2

    cv2.setNumThreads(0)  # 0: OpenCV runs every function on the calling thread
except ImportError:
    cv2 = None

SIZE = 224
CONTEXT_LENGTH = 77
# Peak dense bf16 tensor-core throughput, TFLOP/s (NVIDIA's data sheets: H100 SXM, A100).
ACCELERATORS = (("H100 SXM", 989.0), ("A100", 312.0))


# ---------------------------------------------------------------------------------------------
# Data.


def synthetic_photo(rng: np.random.Generator, min_side: int, max_side: int) -> bytes:
    """A JPEG (quality 90) whose size in bytes is that of a photo of its pixel count: a colour
    gradient, 3-11 flat ellipses and rectangles, a light blur, then coarse (4 px) and fine
    noise, which supply the high-frequency content that sets a JPEG's size."""
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    top = corners[0, 0] * (1 - x) + corners[0, 1] * x
    bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
    im = Image.fromarray((top * (1 - y) + bottom * y).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 12))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    coarse = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.int16) - 128
    fine = rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(im, np.int16) + (coarse >> 2) + fine, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct lower-case pseudo-words of 1-4 consonant-vowel syllables."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.integers(1, 5)
        words.add(
            "".join(
                rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(syllables)
            )
        )
    return sorted(words)


def captions(rng: np.random.Generator, words: list[str], n: int) -> list[str]:
    """n alt-text-like captions of 5-25 words, drawn with Zipf-like frequencies (p ~ 1 / rank)."""
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 26)), p=p)) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Example:
    path: str  # the JPEG file
    caption: str


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# Timing.


class Laps:
    """Process CPU seconds per stage: lap(stage) charges the time since the previous lap (or
    start()) to `stage`."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._last = time.process_time()

    def start(self) -> None:
        self._last = time.process_time()

    def lap(self, stage: str) -> None:
        now = time.process_time()
        self.seconds[stage] += now - self._last
        self._last = now


# A path: (example, rng, laps) -> the 224 x 224 image it produced. It charges its work to the
# stages of STAGES and draws the crop first, then the flip, from rng.
Path = Callable[[Example, np.random.Generator, Laps], np.ndarray]
STAGES = ("decode", "crop+resize", "flip", "normalise", "tokenize")


@dataclasses.dataclass
class Ops:
    """The project's training ops, built from a config as the pipeline builds them."""

    crop: transforms.Transform
    flip: transforms.Transform
    choose_text: transforms.Transform
    tokenize: transforms.Transform

    @classmethod
    def build(cls, tokenizer: Tokenizer, crop_scale: tuple[float, float]) -> Ops:
        config = ml_collections.ConfigDict(
            {
                "pp": {
                    "image_size": SIZE,
                    "crop_scale": crop_scale,
                    "context_length": CONTEXT_LENGTH,
                },
                "data": {"text_keys": ("caption",)},
            }
        )
        ctx = transforms.Context(config, "bench JPEGs", ("image", "caption"), tokenizer)
        specs = ("random_resized_crop", "flip_lr", "choose_text", "tokenize")
        return cls(*transforms.build(specs, ctx, ("image", "tokens")))

    def finish(self, image: np.ndarray, ex: Example, rng: np.random.Generator, laps: Laps):
        """flip_lr, then choose_text + tokenize, charged to their stages."""
        image = self.flip({"image": image}, rng)["image"]
        laps.lap("flip")
        example = {"caption": ex.caption}
        example.update(self.choose_text(example, rng))
        self.tokenize(example, rng)
        laps.lap("tokenize")
        return image


# ---------------------------------------------------------------------------------------------
# The paths.


def project_paths(ops: Ops) -> dict[str, Path]:
    """The project's own ops as the pipeline calls them: decode first (the pipeline before the encoded path), or
    the encoded image handed to random_resized_crop (decoded at the scale its crop needs)."""

    def decoded_first(ex, rng, laps):
        example = {"image": preprocess.decode_image(read(ex.path)), "caption": ex.caption}
        laps.lap("decode")
        image = ops.crop(example, rng)["image"]
        laps.lap("crop+resize")
        return ops.finish(image, ex, rng, laps)

    def encoded_to_crop(ex, rng, laps):
        image = ops.crop({"image": read(ex.path), "caption": ex.caption}, rng)["image"]
        laps.lap("crop+resize")  # decode included: one call
        return ops.finish(image, ex, rng, laps)

    return {
        "ours, decode_image then the ops (decode first)": decoded_first,
        "ours, encoded image to the crop op (draft)": encoded_to_crop,
    }


def torchvision_crop_params(
    width: int, height: int, rng: np.random.Generator, scale, ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params: (top, left, h, w); after 10 misses
    the central crop of the aspect clamped into `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def peer_path(tokenizer: Tokenizer, crop_scale: tuple[float, float]) -> Path:
    """The PyTorch DataLoader worker's __getitem__ (torchvision's RandomResizedCrop(224,
    BICUBIC), RandomHorizontalFlip, ToTensor, Normalize on PIL images), written out in PIL and
    NumPy; the caption through the same tokenizer."""
    mean = np.asarray(preprocess.MEAN_RGB, np.float32)[:, None, None]
    std = np.asarray(preprocess.STD_RGB, np.float32)[:, None, None]

    def peer(ex, rng, laps):
        with Image.open(ex.path) as f:
            im = f.convert("RGB")
        laps.lap("decode")
        top, left, h, w = torchvision_crop_params(im.width, im.height, rng, crop_scale)
        im = im.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BICUBIC)
        laps.lap("crop+resize")
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        laps.lap("flip")
        x = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
        x = (x - mean) / std
        laps.lap("normalise")
        tokenizer.encode([ex.caption], CONTEXT_LENGTH)
        laps.lap("tokenize")
        return x

    return peer


def _box(im_height: int, im_width: int, rng, crop_scale) -> tuple[int, int, int, int, int]:
    """The project's crop (top, left, h, w) and the DCT reduction that crop allows."""
    top, left, ch, cw = preprocess.random_crop_box(im_height, im_width, rng, crop_scale)
    return top, left, ch, cw, preprocess.dct_reduction(ch, cw, SIZE, SIZE)


def candidate_paths(ops: Ops, crop_scale: tuple[float, float]) -> dict[str, Path]:
    """Decode + crop/resize variants, each followed by the project's flip and tokenize ops."""

    def pil(resample=Image.BICUBIC, draft=False, reduce=False, reducing_gap=None):
        def path(ex, rng, laps):
            with Image.open(io.BytesIO(read(ex.path))) as im:
                top, left, ch, cw, factor = _box(im.height, im.width, rng, crop_scale)
                box = (left, top, left + cw, top + ch)
                if draft and factor > 1:
                    im.draft(None, (im.width // factor, im.height // factor))
                    box = tuple(v / factor for v in box)
                im.load()
                laps.lap("decode")
                if reduce and factor > 1:  # a box-filter reduction of the full decode first
                    im, box = im.reduce(factor, box), None
                out = im.resize((SIZE, SIZE), resample, box=box, reducing_gap=reducing_gap)
                image = np.asarray(out)
                laps.lap("crop+resize")
            return ops.finish(image, ex, rng, laps)

        return path

    paths = {
        "PIL full, bicubic (resize with box: no array copies)": pil(),
        "PIL full, bilinear": pil(Image.BILINEAR),
        "PIL full, Image.reduce(f) then bicubic": pil(reduce=True),
        "PIL full, resize(reducing_gap=2)": pil(reducing_gap=2.0),
        "PIL draft 1/f, bicubic (chosen)": pil(draft=True),
        "PIL draft 1/f, bilinear": pil(Image.BILINEAR, draft=True),
    }
    if simplejpeg is not None:

        def sj(reduce):
            """reduce: None (full size), 'pow2' (the draft's 1/f) or 'm8' (libjpeg-turbo's
            smallest M/8 scale that keeps the crop >= 224)."""

            def path(ex, rng, laps):
                data = read(ex.path)
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                top, left, ch, cw, factor = _box(height, width, rng, crop_scale)
                min_h = min_w = 0
                if reduce == "pow2":
                    min_h, min_w = math.ceil(height / factor), math.ceil(width / factor)
                elif reduce == "m8":  # (never above full size: libjpeg-turbo could upscale)
                    min_h = min(height, math.ceil(height * SIZE / ch))
                    min_w = min(width, math.ceil(width * SIZE / cw))
                array = simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_height=min_h, min_width=min_w
                )
                # M/8 scaling gives ceil(side * M / 8) pixels: M from the width.
                scale = next(m / 8 for m in range(1, 9) if -(-width * m // 8) == array.shape[1])
                laps.lap("decode")
                if scale == 1.0:
                    crop = array[top : top + ch, left : left + cw]
                    image = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.BICUBIC))
                else:
                    box = tuple(v * scale for v in (left, top, left + cw, top + ch))
                    image = np.asarray(
                        Image.fromarray(array).resize((SIZE, SIZE), Image.BICUBIC, box=box)
                    )
                laps.lap("crop+resize")
                return ops.finish(image, ex, rng, laps)

            return path

        paths["simplejpeg full, PIL bicubic"] = sj(None)
        paths["simplejpeg 1/f, PIL bicubic"] = sj("pow2")
        paths["simplejpeg M/8 >= crop, PIL bicubic"] = sj("m8")
    if cv2 is not None:
        reduced = {
            1: cv2.IMREAD_COLOR,
            2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8,
        }

        def cv(use_reduced):
            def path(ex, rng, laps):
                data = read(ex.path)
                with Image.open(io.BytesIO(data)) as im:  # header only, for the crop's size
                    top, left, ch, cw, factor = _box(im.height, im.width, rng, crop_scale)
                factor = factor if use_reduced else 1
                array = cv2.imdecode(np.frombuffer(data, np.uint8), reduced[factor])
                array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
                laps.lap("decode")
                # INTER_AREA takes whole pixels: the scaled box is rounded.
                y0, x0, y1, x1 = (round(v / factor) for v in (top, left, top + ch, left + cw))
                image = cv2.resize(array[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                laps.lap("crop+resize")
                return ops.finish(image, ex, rng, laps)

            return path

        paths["OpenCV full, INTER_AREA"] = cv(False)
        paths["OpenCV IMREAD_REDUCED 1/f, INTER_AREA"] = cv(True)
    return paths


# ---------------------------------------------------------------------------------------------
# Measurement.


@dataclasses.dataclass
class Result:
    """One path's CPU and wall seconds and stage seconds per timed round, and its mad."""

    rounds_cpu_s: list[float] = dataclasses.field(default_factory=list)
    rounds_wall_s: list[float] = dataclasses.field(default_factory=list)
    stages: list[dict[str, float]] = dataclasses.field(default_factory=list)
    mad: float | None = None

    def best(self) -> int:
        return int(np.argmin(self.rounds_cpu_s))


def run_path(
    path: Path, examples: list[Example], seed: tuple[int, ...]
) -> tuple[Laps, float, list]:
    """Runs `path` over every example (rng per example from seed + its index); returns the
    laps, the wall seconds and the outputs."""
    laps, outputs = Laps(), []
    wall = time.perf_counter()
    for i, ex in enumerate(examples):
        rng = np.random.default_rng((*seed, i))
        laps.start()
        outputs.append(path(ex, rng, laps))
    return laps, time.perf_counter() - wall, outputs


def measure(
    paths: dict[str, Path], examples: list[Example], repeats: int, reference: str
) -> dict[str, Result]:
    """Warm-up round (untimed; outputs compared with `reference`'s for `mad`), then `repeats`
    timed rounds, the paths in rotated order each round; round r uses the same draws for
    every path."""
    results = {name: Result() for name in paths}
    warm = {name: run_path(path, examples, (0,))[2] for name, path in paths.items()}
    for name, outputs in warm.items():
        if outputs[0].shape == warm[reference][0].shape:
            diffs = [
                np.abs(a.astype(np.float32) - b).mean() for a, b in zip(outputs, warm[reference])
            ]
            results[name].mad = float(np.mean(diffs))
    names = list(paths)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            laps, wall, _ = run_path(paths[name], examples, (1, r))
            results[name].rounds_cpu_s.append(sum(laps.seconds.values()))
            results[name].rounds_wall_s.append(wall)
            results[name].stages.append(dict(laps.seconds))
    return results


def host_normalise_ms(repeats: int = 200) -> float:
    """CPU ms of preprocess.normalize_images on one uint8 224 x 224 x 3 image in NumPy: what
    the step would cost the host if it normalised there."""
    image = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    t = time.process_time()
    for _ in range(repeats):
        preprocess.normalize_images(image)
    return 1e3 * (time.process_time() - t) / repeats


def clip_b16_flops() -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one ViT-B/16 CLIP sample (224 px, 77 tokens):
    XLA's cost analysis of the lowered two-tower forward at batch 1 and of its gradient with
    respect to the parameters (abstract parameters: nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mlcd import models

    cfg = ml_collections.ConfigDict(
        {
            "image": {"variant": "B/16"},
            "text": {"variant": "B/16", "eos_id": 2, "pad_id": 0},
            "embed_dim": 512,
            "logit_scale_init": math.log(1 / 0.07),
            "logit_bias_init": None,
            "dtype": "bfloat16",
        }
    )
    graphdef, params = models.abstract_model(cfg)

    def forward(p, images, tokens):
        out = nnx.merge(graphdef, p)(images, tokens)
        return out["zimg"].astype(jnp.float32).sum() + out["ztxt"].astype(jnp.float32).sum()

    args = (
        params,
        jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, CONTEXT_LENGTH), jnp.int32),
    )
    fwd = jax.jit(forward).lower(*args).cost_analysis()["flops"]
    fwd_bwd = jax.jit(jax.grad(forward)).lower(*args).cost_analysis()["flops"]
    return float(fwd), float(fwd_bwd)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def write_examples(
    directory: str, rng: np.random.Generator, n: int, min_side: int, max_side: int
) -> tuple[list[Example], list[str], str]:
    """n JPEG files in `directory` with a caption each; 20 n captions (the first n are the
    examples', all are for the tokenizer); and a line describing the files."""
    texts = captions(rng, pseudo_words(rng, 3000), 20 * n)
    examples, sizes, pixels = [], [], []
    for i in range(n):
        data = synthetic_photo(rng, min_side, max_side)
        path = os.path.join(directory, f"{i:06d}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        examples.append(Example(path, texts[i]))
        with Image.open(io.BytesIO(data)) as im:
            pixels.append(im.width * im.height)
        sizes.append(len(data))
    kb = np.asarray(sizes) / 1e3
    about = (
        f"{n} JPEGs, sides {min_side}-{max_side} px, quality 90: {np.median(kb):.0f} KB median "
        f"({kb.min():.0f}-{kb.max():.0f}), {8 * sum(sizes) / sum(pixels):.2f} bits/pixel"
    )
    return examples, texts, about


PEER = "peer: PIL loop (PyTorch DataLoader worker)"
DECODE_FIRST = "ours, decode_image then the ops (decode first)"
DRAFT = "ours, encoded image to the crop op (draft)"


def print_paths(results: dict[str, Result], n: int) -> None:
    """The per-path table: CPU ms per stage (best round), images/s per core, ratio to PEER."""
    peer_rate = n / min(results[PEER].rounds_cpu_s)
    rows = []
    for name, res in results.items():
        stages = res.stages[res.best()]
        cells = [f"{1e3 * stages[s] / n:.2f}" if s in stages else "-" for s in STAGES]
        if name == DRAFT:
            cells[1] += " (with decode)"
        rate = n / min(res.rounds_cpu_s)
        rows.append(
            [
                name,
                *cells,
                f"{1e3 / rate:.2f}",
                f"**{rate:.0f}** ({n / statistics.median(res.rounds_cpu_s):.0f})",
                f"{n / min(res.rounds_wall_s):.0f}",
                f"{rate / peer_rate:.2f}",
                "-" if res.mad is None else f"{res.mad:.2f}",
            ]
        )
    header = ["path", *(f"{s} ms" for s in STAGES), "total ms", "images/s per core (median)"]
    print_table([*header, "wall images/s", "vs peer", "mad"], rows)


def print_accelerators(rates: dict[str, float], mfu: float) -> None:
    """FLOPs of a ViT-B/16 CLIP sample and the host cores per accelerator at `mfu` for each of
    `rates` (name -> images/s per core)."""
    fwd, fwd_bwd = clip_b16_flops()
    flops = 3 * fwd
    print(
        f"ViT-B/16 CLIP sample (224 px, 77 tokens): forward {fwd / 1e9:.1f} GFLOP (XLA cost "
        f"analysis, batch 1); forward + backward = 3x forward = {flops / 1e9:.1f} GFLOP (the "
        f"gradient's own cost analysis: {fwd_bwd / 1e9:.1f})"
    )
    rows = []
    for accel, peak in ACCELERATORS:
        samples = mfu * peak * 1e12 / flops
        cores = [f"{samples / rate:.1f}" for rate in rates.values()]
        rows.append([accel, f"{peak:.0f}", f"{mfu:.0%}", f"{samples:,.0f}", *cores])
    header = ["accelerator", "bf16 dense TFLOP/s", "MFU", "samples/s"]
    print_table([*header, *(f"cores: {name}" for name in rates)], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per path")
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=1000)
    parser.add_argument(
        "--crop-scale", type=float, nargs=2, default=(0.9, 1.0), help="area range (b16 preset)"
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed accelerator MFU")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    crop_scale = tuple(args.crop_scale)
    n = args.num_images

    affinity = os.sched_getaffinity(0)
    cpu = max(affinity) if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(args.seed)
            examples, texts, about = write_examples(tmp, rng, n, args.min_side, args.max_side)
            tokenizer = train_bpe_tokenizer(texts, vocab_size=49408)
            ops = Ops.build(tokenizer, crop_scale)
            paths = {
                PEER: peer_path(tokenizer, crop_scale),
                **project_paths(ops),
                **candidate_paths(ops, crop_scale),
            }
            load_before = os.getloadavg()[0]
            results = measure(paths, examples, args.repeats, DECODE_FIRST)
            load_after = os.getloadavg()[0]
            factors = collections.Counter()
            for i, ex in enumerate(examples):  # the warm-up round's crops
                with Image.open(ex.path) as im:
                    rng = np.random.default_rng((0, i))
                    factors[_box(im.height, im.width, rng, crop_scale)[4]] += 1
        normalise_ms = host_normalise_ms()
    finally:
        os.sched_setaffinity(0, affinity)

    reductions = ", ".join(f"1/{f}: {factors[f]}" for f in (1, 2, 4, 8))
    print(f"{about}; crop scale {crop_scale}; DCT reduction of the crops: {reductions}")
    print(
        f"CPU: {cpu_model()}; pinned to CPU {cpu}, one thread; load average {load_before:.1f} "
        f"-> {load_after:.1f}; best of {args.repeats} rounds (median)"
    )
    print_paths(results, n)
    print(
        f"normalise (preprocess.normalize_images, uint8 -> float32, NumPy, this core): "
        f"{normalise_ms:.2f} ms per image; the project runs it on the accelerator, in the step"
    )
    rate = lambda name: n / min(results[name].rounds_cpu_s)
    rates = {
        "ours (draft)": rate(DRAFT),
        "ours (decode first)": rate(DECODE_FIRST),
        "peer": rate(PEER),
    }
    print_accelerators(rates, args.mfu)
    print(
        f"ours_images_per_sec_per_core={rates['ours (draft)']:.1f} "
        f"peer_images_per_sec_per_core={rates['peer']:.1f} "
        f"ratio={rates['ours (draft)'] / rates['peer']:.2f}"
    )


if __name__ == "__main__":
    main()
