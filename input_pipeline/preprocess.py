"""Per-example image ops (NumPy + PIL on the host) and on-device normalisation.

Images leave the host as uint8 (4x less to transfer than float32) and are normalised inside the
jitted step by `normalize_images`, with CLIP's channel statistics.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# CLIP's RGB mean / std (of its pre-training images), in [0, 1] units.
MEAN_RGB = (0.48145466, 0.4578275, 0.40821073)
STD_RGB = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) or an already decoded array -> uint8 [H, W, 3]."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        image = data
    else:
        with Image.open(io.BytesIO(bytes(data))) as im:
            image = np.asarray(im.convert("RGB"))
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop: area fraction ~ U(scale), log aspect ~ U(log ratio); -> [size, size].

    Falls back to the whole image when 10 tries find no crop that fits.
    """
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        ch = round(math.sqrt(area / aspect))
        cw = round(math.sqrt(area * aspect))
        if 0 < ch <= h and 0 < cw <= w:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return _resize(image[top : top + ch, left : left + cw], size, size)
    return _resize(image, size, size)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Eval preprocessing: resize the shorter side to `size`, then take the central square."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = _resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def normalize_images(images):
    """uint8 [..., H, W, 3] -> float32, (x / 255 - mean) / std. Works on NumPy and jax arrays."""
    mean = np.asarray(MEAN_RGB, np.float32)
    std = np.asarray(STD_RGB, np.float32)
    return (images.astype(np.float32) / 255.0 - mean) / std
