"""input_pipeline.preprocess on encoded images: JPEGs decoded at a DCT scale (PIL's draft) for
the crop they feed, everything else exactly as the decoded array; and a smoke run of
bench/input_pipeline.py."""

import importlib.util
import io
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from input_pipeline import preprocess

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] with content that locates every pixel: red ramps along x, green along y,
    blue a slow wave, plus a few flat discs (edges for the resampling to smear if misplaced)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 23.0 + y / 37.0)], axis=-1
    )
    rng = np.random.default_rng(seed)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, height / 4)
        rgb[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return rgb.astype(np.uint8)


def _encode(image: Image.Image | np.ndarray, fmt: str, **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.fixture
def draft_scales(monkeypatch):
    """The DCT scale of every JPEG draft, in call order."""
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        out = original(self, mode, size)
        scales.append(self.decoderconfig[0])
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    return scales


@pytest.mark.parametrize(
    "region, needed, factor",
    [
        ((100, 100), (50, 50), 2),
        ((99, 100), (50, 50), 1),
        ((200, 450), (50, 50), 4),
        ((400, 400), (50, 50), 8),
        ((4000, 4000), (50, 50), 8),
        ((400, 150), (50, 50), 2),
        ((10, 10), (16, 16), 1),
    ],
)
def test_dct_reduction(region, needed, factor):
    assert preprocess.dct_reduction(*region, *needed) == factor


def test_encoded_crops_shape_and_dtype():
    jpeg = _encode(_smooth(300, 400), "JPEG", quality=90)
    rng = np.random.default_rng(0)
    for data in (jpeg, _encode(_smooth(300, 400), "PNG")):
        out = preprocess.random_resized_crop(data, 48, rng, scale=(0.3, 1.0))
        assert out.shape == (48, 48, 3) and out.dtype == np.uint8
        out = preprocess.resize_center_crop(data, 48)
        assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    # Encoded bytes may come as a 1-D uint8 array.
    out = preprocess.random_resized_crop(np.frombuffer(jpeg, np.uint8), 48, rng)
    assert out.shape == (48, 48, 3)
    image = preprocess.decode_image(jpeg, min_size=(70, 100))  # 300 x 400 at 1/4
    assert image.shape == (75, 100, 3) and image.dtype == np.uint8
    assert preprocess.decode_image(jpeg, min_size=(151, 100)).shape == (300, 400, 3)
    assert preprocess.decode_image(jpeg).shape == (300, 400, 3)


def test_draft_decoded_crop_is_close_to_the_full_decode(draft_scales):
    jpeg = _encode(_smooth(480, 640), "JPEG", quality=95)
    full = preprocess.decode_image(jpeg)
    for seed in range(8):
        got = preprocess.random_resized_crop(jpeg, 64, np.random.default_rng(seed), (0.3, 1.0))
        want = preprocess.random_resized_crop(full, 64, np.random.default_rng(seed), (0.3, 1.0))
        assert _mad(got, want) < 2.0, seed
    assert draft_scales and all(s > 1 for s in draft_scales)
    assert (
        _mad(preprocess.resize_center_crop(jpeg, 64), preprocess.resize_center_crop(full, 64)) < 2.0
    )


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_crop_box_is_scaled_to_the_reduced_image(factor, draft_scales):
    # Square crops of half the side, ~24 f px: at least f x 16, under 2 f x 16, so reduction f.
    size, side = 16, 2 * 24 * factor
    jpeg = _encode(_smooth(side, side + 12, seed=factor), "JPEG", quality=95)
    full = preprocess.decode_image(jpeg)
    for seed in range(4):
        crop = dict(scale=(0.25, 0.25), ratio=(1.0, 1.0))
        got = preprocess.random_resized_crop(jpeg, size, np.random.default_rng(seed), **crop)
        # The same crop, reduced and resized by hand from PIL's reduced decode.
        top, left, ch, cw = preprocess.random_crop_box(
            side, side + 12, np.random.default_rng(seed), **crop
        )
        with Image.open(io.BytesIO(jpeg)) as im:
            im.draft(None, (im.width // factor, im.height // factor))
            box = tuple(v / factor for v in (left, top, left + cw, top + ch))
            want = np.asarray(im.resize((size, size), Image.BICUBIC, box=box))
        np.testing.assert_array_equal(got, want)
        exact = preprocess.random_resized_crop(full, size, np.random.default_rng(seed), **crop)
        assert _mad(got, exact) < 3.0, seed
    assert draft_scales[::2] == [factor] * 4  # the library's draft, then the test's own


def test_png_and_unreduced_jpeg_are_exactly_the_array_path(draft_scales):
    png = _encode(_smooth(480, 640), "PNG")
    decoded = preprocess.decode_image(png)
    np.testing.assert_array_equal(preprocess.decode_image(png, min_size=(32, 32)), decoded)
    small_jpeg = _encode(_smooth(100, 120), "JPEG", quality=90)  # crops below 2 x 64: no draft
    for data, scale in ((png, (0.05, 1.0)), (small_jpeg, (0.5, 1.0))):
        array = preprocess.decode_image(data)
        for seed in range(10):
            got = preprocess.random_resized_crop(data, 64, np.random.default_rng(seed), scale)
            want = preprocess.random_resized_crop(array, 64, np.random.default_rng(seed), scale)
            assert got.tobytes() == want.tobytes() and got.shape == want.shape
        for size in (64, 200):  # down, up (the JPEG's shorter side, 100, is < 2 x 64)
            got = preprocess.resize_center_crop(data, size)
            assert got.tobytes() == preprocess.resize_center_crop(array, size).tobytes()
    assert not draft_scales


def _modes() -> dict[str, bytes]:
    rgb = Image.fromarray(_smooth(256, 320))
    return {
        "grayscale JPEG": _encode(rgb.convert("L"), "JPEG", quality=95),
        "CMYK JPEG": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "palette PNG": _encode(rgb.convert("P"), "PNG"),
        "RGBA PNG": _encode(rgb.convert("RGBA"), "PNG"),
        "grayscale PNG": _encode(rgb.convert("L"), "PNG"),
    }


@pytest.mark.parametrize("kind", list(_modes()))
def test_every_mode_decodes_to_rgb(kind):
    data = _modes()[kind]
    full = preprocess.decode_image(data)
    assert full.shape == (256, 320, 3) and full.dtype == np.uint8
    reduced = preprocess.decode_image(data, min_size=(64, 64))
    assert reduced.shape == ((64, 80, 3) if "JPEG" in kind else (256, 320, 3))
    got = preprocess.random_resized_crop(data, 32, np.random.default_rng(0), (0.9, 1.0))
    want = preprocess.random_resized_crop(full, 32, np.random.default_rng(0), (0.9, 1.0))
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    assert _mad(got, want) < 3.0
    if "grayscale" in kind:
        assert (got == got[..., :1]).all()


def test_bench_smoke(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "bench_input_pipeline", os.path.join(BENCH, "input_pipeline.py")
    )
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    bench.main(["--num-images", "3", "--repeats", "1", "--min-side", "240", "--max-side", "480"])
    out = capsys.readouterr().out
    for row in (bench.PEER, bench.DECODE_FIRST, bench.DRAFT, "PIL draft 1/f, bicubic (chosen)"):
        assert f"| {row} |" in out
    assert "| H100 SXM | 989 | 40% |" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"ours_images_per_sec_per_core=[\d.]+ peer_images_per_sec_per_core=[\d.]+ ratio=[\d.]+",
        last,
    ), last


def test_teacher_images_decode_at_reduced_scale_and_name_bad_examples():
    # mlcd.cluster / mlcd.annotate embed teacher inputs through labelling.load_image: a large
    # JPEG is decoded at the scale the resize needs; undecodable bytes name the example.
    from mlcd import labelling

    rng = np.random.default_rng(0)
    pixels = np.clip(np.cumsum(rng.normal(size=(400, 600, 3)), axis=1) + 128, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=90)
    got = labelling.load_image({"image": buf.getvalue(), "id": b"a"}, 64)
    full = preprocess.resize_center_crop(preprocess.decode_image(buf.getvalue()), 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(float) - full).mean() < 3
    with pytest.raises(ValueError, match=r"example 'broken': cannot decode its image"):
        labelling.load_image({"image": b"\xff\xd8 not a jpeg", "id": b"broken"}, 64)
