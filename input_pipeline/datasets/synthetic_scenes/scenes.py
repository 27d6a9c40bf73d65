"""Scene vocabulary, scene sampling and rendering for synthetic_scenes.

A scene is 1..MAX_OBJECTS flat shapes (colour x shape x size) on a named background. Every choice
is made to stay learnable by a tiny ViT at 32-64 px:
- colours are 8 fully saturated hues about 45 degrees apart, so they never blur into each other;
- backgrounds are grey-level patterns (saturation ~0), so no background pixel looks like an object;
- the smallest size still spans ~8 px at 32 px, enough to tell a star from a circle;
- objects never overlap (rejection sampling with a gap), so every box holds exactly one object;
- the largest object is unique (at least one size class above the others), so the
  `largest_*` probe labels are unambiguous.
Shapes are drawn at SUPERSAMPLE x resolution and box-filtered down: edges are anti-aliased like a
photo rather than aliased staircases, which matters for shape recognition at 32 px.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

MAX_OBJECTS = 4

COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOR_RGB = np.array(
    [
        (225, 25, 25),
        (255, 135, 0),
        (240, 225, 15),
        (30, 185, 40),
        (0, 215, 225),
        (35, 65, 235),
        (145, 40, 205),
        (255, 85, 185),
    ],
    dtype=np.float32,
)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = ("small", "medium", "large")
# Object extent (box side) as a fraction of the image side, per size class.
SIZE_EXTENT = (0.26, 0.36, 0.48)
BACKGROUNDS = ("gray", "dark", "light", "striped", "noisy", "gradient")
COUNTS = ("one", "two", "three", "four")  # count label k means k + 1 objects
# Class names of each probe label (the ClassLabel features of the dataset).
PROBE_NAMES = {
    "largest_shape": SHAPES,
    "largest_color": COLORS,
    "count": COUNTS,
    "background": BACKGROUNDS,
}

SUPERSAMPLE = 4
_EXTENT_JITTER = 0.08  # +-8%: keeps size classes ordered (0.36 * 1.08 < 0.48 * 0.92)
_BORDER = 0.02  # minimum distance from a box to the image border, in image sides
_GAP = 0.03  # minimum gap between two boxes, in image sides
_PLACEMENT_TRIES = 100
_COLOR_JITTER = 12.0  # per-channel uniform jitter of object colours, in 0..255 units


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object. `box` = (ymin, xmin, ymax, xmax) in [0, 1] image coordinates."""

    color: int
    shape: int
    size: int
    box: tuple[float, float, float, float]

    @property
    def entity_id(self) -> int:
        return self.color * len(SHAPES) + self.shape


@dataclasses.dataclass(frozen=True)
class Scene:
    """A sampled scene: objects in placement order (the largest first) and a background id."""

    objects: tuple[SceneObject, ...]
    background: int

    @property
    def largest(self) -> SceneObject:
        return max(self.objects, key=lambda o: o.size)


def _sample_sizes(rng: np.random.Generator, n: int) -> list[int]:
    """Size classes with a unique maximum; returned largest first."""
    sizes = rng.integers(0, len(SIZES), n)
    top = sizes.max()
    tied = np.flatnonzero(sizes == top)
    if len(tied) > 1:
        if top < len(SIZES) - 1:
            sizes[tied[0]] += 1  # promote one of the tied objects
        else:
            sizes[tied[1:]] -= 1  # demote all but one
    return sorted(sizes.tolist(), reverse=True)


def _place(rng: np.random.Generator, size: int, placed: list) -> tuple | None:
    """Rejection-samples a square box of `size` at least _GAP away from every box in `placed`.

    All _PLACEMENT_TRIES candidates are drawn in one vectorised call (a fixed number of draws, so
    the stream stays deterministic) and the first that is free is returned; None if none is.
    """
    extent = SIZE_EXTENT[size] * rng.uniform(
        1 - _EXTENT_JITTER, 1 + _EXTENT_JITTER, _PLACEMENT_TRIES
    )
    y0, x0 = _BORDER + rng.uniform(0, 1, (2, _PLACEMENT_TRIES)) * (1 - 2 * _BORDER - extent)
    cand = np.stack([y0, x0, y0 + extent, x0 + extent], axis=1)  # [T, 4]
    if placed:
        o = np.asarray(placed)[None]  # [1, P, 4]
        c = cand[:, None]  # [T, 1, 4]
        # Two boxes are separated iff some axis has a gap of at least _GAP between them.
        apart = (
            (c[..., 2] + _GAP <= o[..., 0])
            | (o[..., 2] + _GAP <= c[..., 0])
            | (c[..., 3] + _GAP <= o[..., 1])
            | (o[..., 3] + _GAP <= c[..., 1])
        )
        free = np.flatnonzero(apart.all(axis=1))
    else:
        free = np.arange(1)
    return tuple(float(v) for v in cand[free[0]]) if len(free) else None


def sample_scene(rng: np.random.Generator) -> Scene:
    """Samples a scene: object count ~ U{1..4}, colour/shape uniform, sizes with a unique max.

    A non-largest object that finds no free spot is shrunk one size class and retried (it stays
    smaller than the largest); if even a small one does not fit, the objects are resampled with
    the same count, so the count stays uniform.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    while True:
        objects, boxes = [], []
        for k, size in enumerate(_sample_sizes(rng, n)):
            color, shape = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
            box = _place(rng, size, boxes)
            while box is None and k > 0 and size > 0:
                size -= 1
                box = _place(rng, size, boxes)
            if box is None:
                break
            boxes.append(box)
            objects.append(SceneObject(color=color, shape=shape, size=size, box=box))
        if len(objects) == n:
            return Scene(objects=tuple(objects), background=int(rng.integers(len(BACKGROUNDS))))


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float = 0.36) -> np.ndarray:
    a = arm
    outline = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a)]
    return np.array([*outline, (-1, a), (-1, -a), (-a, -a)], dtype=np.float64)


def _fit_unit_box(vertices: np.ndarray) -> np.ndarray:
    """Affinely stretches (x, y) vertices so their bounding box is exactly [-1, 1]^2."""
    lo, hi = vertices.min(0), vertices.max(0)
    return 2.0 * (vertices - lo) / (hi - lo) - 1.0


# Polygon outlines in (x, y), y pointing down, each filling [-1, 1]^2 so that an object's box is
# its drawn extent. The circle is drawn as an ellipse of the same box.
_POLYGONS = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": np.array([(0, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "star": _fit_unit_box(_star()),
    "cross": _cross(),
    "diamond": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], dtype=np.float64),
}


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Float32 [size, size, 3] background in 0..255, grey levels with a tint of at most +-6."""
    coords = np.arange(size, dtype=np.float32) / size
    yy, xx = coords[:, None], coords[None, :]  # broadcast to [size, size] where used
    if kind == "gray":
        img = rng.uniform(100, 150)
    elif kind == "dark":
        img = rng.uniform(15, 55)
    elif kind == "light":
        img = rng.uniform(185, 230)
    elif kind == "striped":
        low = rng.uniform(60, 110)
        period = rng.uniform(0.08, 0.2)
        direction = rng.choice([(1.0, 0.0), (0.0, 1.0), (0.7071, 0.7071), (0.7071, -0.7071)])
        phase = (direction[0] * yy + direction[1] * xx) / period
        img = np.where(np.floor(phase) % 2 == 0, low, low + rng.uniform(45, 80))
    elif kind == "noisy":
        img = rng.uniform(80, 170) + rng.normal(0.0, 25.0, (size, size))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / 0.7071 * 0.5 + 0.5
        a, b = rng.uniform(30, 90), rng.uniform(160, 220)
        img = a + (b - a) * np.clip(t, 0, 1)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    img = np.broadcast_to(img, (size, size)).astype(np.float32)
    tint = rng.uniform(-6, 6, 3).astype(np.float32)
    return img[..., None] + tint


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, big: int, fill) -> None:
    """Fills `obj`'s outline on a `big` x `big` canvas (SUPERSAMPLE x the image side) with `fill`.

    The one place the geometry lives: `render` (colour layer and alpha mask) and `segmentation`
    (label map) draw through it, so the label map covers exactly the rendered pixels.
    """
    y0, x0, y1, x1 = (v * big for v in obj.box)
    # PIL fills pixel centres inside [x0, x1 - 1]; subtracting 1 keeps the drawn extent = box.
    if SHAPES[obj.shape] == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        return
    unit = _POLYGONS[SHAPES[obj.shape]]
    cx, cy, hx, hy = (
        (x0 + x1 - 1) / 2,
        (y0 + y1 - 1) / 2,
        (x1 - 1 - x0) / 2,
        (y1 - 1 - y0) / 2,
    )
    draw.polygon([(cx + hx * u, cy + hy * v) for u, v in unit], fill=fill)


def render(scene: Scene, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Renders `scene` to a uint8 [image_size, image_size, 3] RGB image.

    Objects are drawn at SUPERSAMPLE x resolution on a black layer plus an alpha mask, then both are
    box-filtered down. Because the layer is black outside the objects, the filtered layer equals
    alpha * colour (premultiplied), so compositing is `bg * (1 - alpha) + layer`.

    Draws from `rng`, in this order: 3 uniforms per object (its colour jitter), then the
    background's. `segmentation` gives the objects' label map without touching any rng.
    """
    big = image_size * SUPERSAMPLE
    layer = Image.new("RGB", (big, big))
    mask = Image.new("L", (big, big))
    draw_layer, draw_mask = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for obj in scene.objects:
        rgb = COLOR_RGB[obj.color] + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, 3)
        fill = tuple(int(c) for c in np.clip(rgb, 0, 255))
        _draw_object(draw_layer, obj, big, fill)
        _draw_object(draw_mask, obj, big, 255)
    layer_arr = np.asarray(layer.reduce(SUPERSAMPLE), np.float32)  # box filter, SUPERSAMPLE^2 px
    alpha = np.asarray(mask.reduce(SUPERSAMPLE), np.float32)[..., None] / 255.0
    bg = _background(rng, BACKGROUNDS[scene.background], image_size)
    return np.clip(np.rint(bg * (1.0 - alpha) + layer_arr), 0, 255).astype(np.uint8)


def segmentation(scene: Scene, image_size: int) -> np.ndarray:
    """Per-pixel object labels of `render(scene, ..., image_size)`: uint8 [image_size, image_size].

    0 = background, j + 1 = object slot j (scene.objects[j], placement order). Pixel (y, x) is
    object j's when j's box-filtered alpha there is >= 0.5: j's outline drawn alone at SUPERSAMPLE
    x resolution and reduced exactly as `render` reduces its alpha mask (PIL's box filter,
    rounded to 0..255), so the test is "reduced value >= 128", i.e. at least half of the pixel's
    SUPERSAMPLE^2 sub-pixels covered. Objects never overlap, so two objects can both pass only
    on an exact half-half split of one pixel; the lower slot keeps it. A pixel that two objects
    share with under half each stays background although `render`'s combined alpha there may
    reach 0.5 (only at small sizes: the gap between boxes, 0.03 of the image side, is under one
    pixel below 34 px).

    A pure function of the scene: it takes no rng, so adding it to the dataset (1.2.0) left the
    value of every other feature unchanged.
    """
    big = image_size * SUPERSAMPLE
    out = np.zeros((image_size, image_size), np.uint8)
    # One canvas per object, reduced by PIL: ~0.1 ms for 4 objects at 64 px; counting each
    # object's sub-pixels on one shared label canvas with numpy took 0.15-0.7 ms.
    for j, obj in enumerate(scene.objects):
        mask = Image.new("L", (big, big))
        _draw_object(ImageDraw.Draw(mask), obj, big, 255)
        alpha = np.asarray(mask.reduce(SUPERSAMPLE))
        out[(alpha >= 128) & (out == 0)] = j + 1
    return out
