"""Per-example image ops (NumPy + PIL on the host) and on-device normalisation.

Images leave the host as uint8 (4x less to transfer than float32) and are normalised inside the
jitted step by `normalize_images`, with CLIP's channel statistics.

The crops take a decoded array or the encoded image (bytes). Given bytes, they read the image
size from the header, choose the crop, and decode a JPEG at the smallest DCT scale (libjpeg's
1/2, 1/4 or 1/8, through `PIL.Image.draft`) that still leaves the crop at least the output
resolution: the decoder still reads every coefficient, but runs the inverse DCT, chroma
upsampling and colour conversion for 1/4 to 1/64 of the pixels, and the resize starts from
that many (bench/input_pipeline.py measures it; the numbers are in docs/benchmarks.md). Where no
reduction applies (PNG and other formats, a crop that needs the full scale) the result is
exactly that of `decode_image` followed by the same op on the array.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
from PIL import Image

# CLIP's RGB mean / std (of its pre-training images), in [0, 1] units.
MEAN_RGB = (0.48145466, 0.4578275, 0.40821073)
STD_RGB = (0.26862954, 0.26130258, 0.27577711)

# DCT-domain reductions libjpeg offers at decode (PIL's draft), largest first.
_REDUCTIONS = (8, 4, 2)


class UndecodableImageError(ValueError):
    """Encoded bytes PIL cannot decode (not an image, truncated, corrupt, too large)."""


@contextlib.contextmanager
def _decoding():
    # PIL reports bad data as OSError, SyntaxError, ValueError, struct.error, zlib.error, ...
    try:
        yield
    except Exception as e:
        raise UndecodableImageError(f"{type(e).__name__}: {e}") from e


def _is_array(image: np.ndarray | bytes) -> bool:
    """A decoded image [H, W(, C)], as opposed to encoded bytes (or a 1-D array of them)."""
    return isinstance(image, np.ndarray) and image.ndim >= 2


def _open(data: bytes | np.ndarray) -> Image.Image:
    """The encoded image opened lazily: only the header is parsed until pixels are needed."""
    return Image.open(io.BytesIO(bytes(data)))


def dct_reduction(height: int, width: int, min_height: int, min_width: int) -> int:
    """Largest DCT reduction (8, 4 or 2; 1 for none) that leaves a height x width region at
    least min_height x min_width pixels."""
    for factor in _REDUCTIONS:
        if height >= factor * min_height and width >= factor * min_width:
            return factor
    return 1


def _draft(im: Image.Image, factor: int) -> int:
    """Configures `im` (opened, not yet loaded) to decode at 1/factor of its size where its
    format can (JPEG, through libjpeg's DCT scaling); returns the factor it will be decoded at,
    1 for a full-size decode (PNG and every other format: PIL's draft is a no-op there)."""
    if factor == 1:
        return 1
    width, height = im.size
    drafted = im.draft(None, (width // factor, height // factor))
    # draft returns the original image's box in the reduced image: (0, 0, width / f, height / f).
    return 1 if drafted is None else round(width / drafted[1][2])


def _rgb(im: Image.Image) -> Image.Image:
    # convert() copies even an RGB image.
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(data: bytes | np.ndarray, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) or an already decoded array -> uint8 [H, W, 3].

    min_size: (height, width) the caller needs at least. A JPEG at least twice as large in both
    dimensions is then decoded at the smallest DCT scale, 1/2, 1/4 or 1/8, that keeps it at least
    that large (as ceil(H / f) x ceil(W / f)); anything else is decoded in full, as without it.
    """
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        image = data
    else:
        with _decoding(), _open(data) as im:
            if min_size is not None:
                _draft(im, dct_reduction(im.height, im.width, *min_size))
            image = np.asarray(_rgb(im))
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def random_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of an Inception-style crop of a height x width
    image: area fraction ~ U(scale), log aspect ~ U(log ratio); the whole image when 10 tries
    find no crop that fits."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        ch = round(math.sqrt(area / aspect))
        cw = round(math.sqrt(area * aspect))
        if 0 < ch <= height and 0 < cw <= width:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return top, left, ch, cw
    return 0, 0, height, width


def random_resized_crop(
    image: np.ndarray | bytes,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """The crop of random_crop_box, resized to uint8 [size, size, 3] (bicubic).

    `image` is a decoded array or the encoded image; the crop depends only on the image size
    and rng, so both give the same crop. Encoded, a JPEG whose crop is at least 2 * size on each
    side is decoded at 1/2, 1/4 or 1/8 scale (the smallest that keeps the crop >= size) and the
    crop box, scaled to match, is resized from that image; anything else gives exactly what the
    decoded array gives.
    """
    if _is_array(image):
        top, left, ch, cw = random_crop_box(*image.shape[:2], rng, scale, ratio)
        return _resize(image[top : top + ch, left : left + cw], size, size)
    with _decoding(), _open(image) as im:
        top, left, ch, cw = random_crop_box(im.height, im.width, rng, scale, ratio)
        factor = _draft(im, dct_reduction(ch, cw, size, size))
        rgb = _rgb(im)
        if factor == 1:
            # PIL's crop, then resize: the array path's pixels without its two full-size copies.
            crop = rgb.crop((left, top, left + cw, top + ch))
            return np.asarray(
                crop if crop.size == (size, size) else crop.resize((size, size), Image.BICUBIC)
            )
        # A fractional box: resize() samples the reduced image at exactly the scaled crop.
        box = (left / factor, top / factor, (left + cw) / factor, (top + ch) / factor)
        return np.asarray(rgb.resize((size, size), Image.BICUBIC, box=box))


def resize_center_crop(image: np.ndarray | bytes, size: int) -> np.ndarray:
    """Eval preprocessing: resize the shorter side to `size`, then take the central square.

    `image` is a decoded array or the encoded image; encoded, a JPEG at least 2 * size on its
    shorter side is decoded at the smallest DCT scale that keeps it >= size (decode_image's
    min_size).
    """
    if not _is_array(image):
        image = decode_image(image, min_size=(size, size))
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
