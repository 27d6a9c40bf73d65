"""Zero-shot semantic segmentation from patch embeddings (MaskCLIP-style): mIoU per task.

Data (synthetic_scenes >= 1.2.0): `segmentation`, uint8 [R, R] per image, 0 = background and
j + 1 = object slot j, and the slot arrays `colors` / `shapes` (int [K], -1 pads). The ground
truth of a task at a pixel is class 0 (background) where segmentation is 0, else 1 + the slot's
class id: 1 + colors[j] for the colour task (8 colours + background = 9 classes), 1 + shapes[j]
for the shape task (6 shapes + background = 7 classes).

Classifier (MaskCLIP: the image tower's projected patch tokens scored against text embeddings,
no training). Class c of a task has text embedding
  w_c = normalize(mean_t embed_text(template_t(name_c)))
with the task's zero-shot templates (`ZEROSHOT_TASKS` of input_pipeline.datasets.synthetic_scenes,
e.g. "the {} object.") and the class names COLORS / SHAPES, as the zero-shot evaluator builds its
classes. The background class is one embedding averaged over the caption grammar's background
sentences, every BACKGROUND_TEMPLATES x BACKGROUNDS ("the background is striped.", "a dark
background.", ...): in-distribution text for a model trained on the long captions.
Patch p of image n (`patch_embeddings` [N, P, E], L2-normalised, a g x g row-major grid over the
whole square image) scores s[n, p, c] = patch . w_c. The [g, g, C] score map is upsampled to the
image's R x R pixels bilinearly (half-pixel centres: patch (i, j) sits at pixel coordinates
((i + 0.5) R / g, (j + 0.5) R / g), pixel (y, x) at (y + 0.5, x + 0.5); edge pixels take the
nearest patch's scores, like jax.image.resize / PIL), and each pixel gets its argmax class (an
exact tie goes to the lower class index, background first).

Metrics, per task over the whole split (every pixel of every evaluated image):
  segmentation/<name>/<task>_miou: with I_c = #pixels predicted c AND labelled c and U_c =
    #pixels predicted c OR labelled c, accumulated over the split (not per image), IoU_c =
    I_c / U_c for every class with U_c > 0 (present in the ground truth or in the predictions
    of the split; background included) and the metric is their unweighted mean. A class
    predicted but never labelled counts with IoU 0; a class neither labelled nor predicted is
    left out.
  segmentation/<name>/<task>_pixel_acc: the fraction of pixels whose prediction is their label.

A PNG of the first `num_plot` images (image | truth | prediction, per task, with a legend of the
class colours) is written atomically to `plot_path`, or to `out_dir`/segmentation_<name>.png.
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from input_pipeline.datasets.synthetic_scenes import (
    BACKGROUNDS,
    PROBE_NAMES,
    ZEROSHOT_TASKS,
)
from input_pipeline.datasets.synthetic_scenes.captions import BACKGROUND_TEMPLATES
from input_pipeline.datasets.synthetic_scenes.scenes import COLOR_RGB
from mlcd.evaluators import EVALUATORS, common, zero_shot

SEGMENTATION_KEY = "segmentation"
# task -> the per-slot class array of the dataset that labels an object's pixels.
SLOT_KEYS = {"color": "colors", "shape": "shapes"}
BACKGROUND = "background"
# Images per upsampling block: bounds the [block, R, R, C] float32 score maps (64 x 64 x 64 x 9
# x 4 bytes = 9 MiB at 64 px).
_IMAGE_BLOCK = 64


def background_prompts() -> list[str]:
    """The background class's prompts: every caption-grammar background sentence."""
    return [t.format(bg=bg) for bg in BACKGROUNDS for t in BACKGROUND_TEMPLATES]


def task_classes(task: str) -> tuple[str, ...]:
    """Class names of `task`, index = class id: ('background', *object class names)."""
    return (BACKGROUND, *PROBE_NAMES[ZEROSHOT_TASKS[task].label_key])


def ground_truth(
    segmentation: np.ndarray, slot_classes: np.ndarray, num_object_classes: int, where: str
) -> np.ndarray:
    """Per-pixel class ids of one task.

    Args:
      segmentation: uint8 [N, H, W], 0 = background, j + 1 = object slot j.
      slot_classes: int [N, K], the class id of each slot (colors or shapes; -1 pads).
      num_object_classes: C, object class ids are 0..C-1.
      where: names the task and data in errors.

    Returns:
      int64 [N, H, W]: 0 for background, 1 + slot_classes[n, j] for object slot j.

    Raises:
      ValueError: a label naming a slot beyond K or a slot whose class is outside [0, C).
    """
    labels = np.asarray(segmentation).astype(np.int64)
    slots = np.asarray(slot_classes).astype(np.int64).reshape(len(labels), -1)
    n, k = slots.shape
    if labels.max(initial=0) > k:
        i = int(np.argmax(labels.reshape(n, -1).max(axis=1) > k))
        raise ValueError(f"{where}: example {i} labels a pixel with slot > {k - 1}")
    obj = labels > 0
    cls = np.take_along_axis(slots, np.maximum(labels - 1, 0).reshape(n, -1), axis=1)
    cls = cls.reshape(labels.shape)
    bad = obj & ((cls < 0) | (cls >= num_object_classes))
    if bad.any():
        i = int(np.argmax(bad.reshape(n, -1).any(axis=1)))
        raise ValueError(
            f"{where}: example {i} labels pixels with object slots whose class is outside "
            f"[0, {num_object_classes}) (a padded slot?): {slots[i].tolist()}"
        )
    return np.where(obj, cls + 1, 0)


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """float32 [out_size, in_size] M such that M @ v bilinearly resamples v (1-D, `in_size`
    samples) to `out_size`, half-pixel centres (module docstring); rows sum to 1."""
    # Output sample o sits at input coordinate u (input sample i at u = i), clamped to the
    # first/last sample: beyond them the nearest one is repeated.
    u = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = u - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


def predict(scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-pixel classes from patch scores.

    Args:
      scores: float [N, P, C], P = g * g patches in row-major order.
      height, width: the pixel resolution to upsample to.

    Returns:
      int64 [N, height, width]: argmax over C of the bilinearly upsampled [g, g, C] maps.
    """
    n, p, c = scores.shape
    grid = math.isqrt(p)
    my, mx = bilinear_matrix(height, grid), bilinear_matrix(width, grid)
    out = np.empty((n, height, width), np.int64)
    for start in range(0, n, _IMAGE_BLOCK):
        block = scores[start : start + _IMAGE_BLOCK].reshape(-1, grid, grid, c)
        rows = np.einsum("yi,nijc->nyjc", my, block)  # along y first, then x: separable
        up = np.einsum("nyjc,xj->nyxc", rows, mx)
        out[start : start + _IMAGE_BLOCK] = up.argmax(axis=-1)
    return out


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C] pixel counts, [true class, predicted class], over every pixel given."""
    idx = np.asarray(truth).reshape(-1) * num_classes + np.asarray(pred).reshape(-1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """float64 [C]: I_c / U_c from a confusion matrix; NaN where U_c = 0 (class neither labelled
    nor predicted)."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(axis=0) + conf.sum(axis=1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean of `iou_per_class` over the classes with a union > 0 (module docstring)."""
    return float(np.nanmean(iou_per_class(conf)))


def _palette(task: str) -> np.ndarray:
    """float [C, 3] RGB in 0..1 per class of `task`: background dark grey; the colour task's
    classes in their own hue, the shape task's in matplotlib's tab10 colours."""
    background = np.array([[0.2, 0.2, 0.2]])
    if task == "color":
        return np.concatenate([background, COLOR_RGB / 255.0])
    from matplotlib import colormaps

    tab = np.asarray(colormaps["tab10"].colors)[: len(task_classes(task)) - 1]
    return np.concatenate([background, tab])


def plot_segmentation(
    path: str,
    images: np.ndarray,
    truth: dict[str, np.ndarray],
    pred: dict[str, np.ndarray],
    title: str,
) -> None:
    """A PNG, one row per image: the image, then truth | prediction of every task, and a
    legend of each task's class colours.

    Args:
      images: uint8 [n, R, R, 3]; truth, pred: {task: int [n, R, R] class ids}; title: the
        figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    tasks = list(truth)
    n, size = len(images), images.shape[1]
    cols = 1 + 2 * len(tasks)
    fig = Figure(figsize=(2.0 * cols, 2.0 * n + 1.2))
    FigureCanvasAgg(fig)
    # No ticks and a fixed layout, as in the grounding plot: both cost seconds on a busy host.
    axes = fig.subplots(n, cols, squeeze=False, subplot_kw={"xticks": [], "yticks": []})
    legend_h = 1.0 / (2.0 * n + 1.2)  # the figure height the legend below the grid takes
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=legend_h + 0.01, top=0.93, wspace=0.04, hspace=0.15
    )
    extent = (0, size, size, 0)
    for k in range(n):
        axes[k, 0].imshow(images[k], extent=extent)
        for t, task in enumerate(tasks):
            colours = _palette(task)
            for off, (maps, label) in enumerate(((truth, "truth"), (pred, "prediction"))):
                ax = axes[k, 1 + 2 * t + off]
                ax.imshow(colours[maps[task][k]], extent=extent, interpolation="nearest")
                if k == 0:
                    ax.set_title(f"{task} {label}", fontsize=9)
    axes[0, 0].set_title("image", fontsize=9)
    for t, task in enumerate(tasks):
        colours = _palette(task)
        handles = [Patch(color=colours[c], label=name) for c, name in enumerate(task_classes(task))]
        fig.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(t / len(tasks), 0.0),
            ncol=3,
            fontsize=7,
            frameon=False,
            title=task,
            title_fontsize=8,
        )
    fig.suptitle(title, fontsize=10)
    common.atomic_savefig(fig, path)


@EVALUATORS.register("segmentation")
class SegmentationEvaluator:
    """Zero-shot segmentation mIoU and pixel accuracy per task (module docstring):
    `segmentation/<name>/{color,shape}_{miou,pixel_acc}`.

    The split is read once, on the first `run`; later runs re-embed it (and redraw the plot).
    """

    def __init__(
        self,
        builder: Any,
        *,
        split: str = "test",
        tasks: Sequence[str] = ("color", "shape"),
        max_examples: int | None = None,
        batch_size: int = 256,
        plot_path: str | None = None,
        out_dir: str | None = None,
        num_plot: int = 6,
        name: str | None = None,
    ):
        """Validates the tasks now; the split is read on the first `run`.

        Args:
          builder: a prepared tfds builder with synthetic_scenes' features (image,
            segmentation, colors, shapes): version >= 1.2.0.
          split: split to evaluate on.
          tasks: any of 'color', 'shape' (a str is one task).
          max_examples: use only the first N images of the split.
          batch_size: images / prompts per embedding call.
          plot_path: where to write the PNG (overwritten on every run); default
            out_dir/segmentation_<name>.png when out_dir is given, else no plot.
          num_plot: images in the plot.
          name: metric namespace (default: `split`).

        Raises:
          ValueError: an unknown or repeated task, or no task.
        """
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [t for t in tasks if t not in SLOT_KEYS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"segmentation: tasks must be distinct names among {sorted(SLOT_KEYS)}; got {tasks}"
            )
        self.builder = builder
        self.split = split
        self.tasks = tasks
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.name = name or split
        if plot_path is None and out_dir is not None:
            plot_path = os.path.join(out_dir, f"segmentation_{self.name}.png")
        self.plot_path = plot_path
        self.num_plot = num_plot
        self._data: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
        self._images = common.ResizedImages()

    def _load(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(uint8 images [N, R, R, 3], {task: int64 [N, R, R] ground-truth classes}), read
        once."""
        if self._data is None:
            where = f"segmentation on {self.builder.name}/{self.split}"
            keys = ["image", SEGMENTATION_KEY, *(SLOT_KEYS[t] for t in self.tasks)]
            data = common.read_split(
                self.builder,
                self.split,
                keys,
                max_examples=self.max_examples,
                desc=f"segmentation {self.split}: reading",
            )
            images = common.as_rgb(data["image"], where=where)
            if images.shape[1] != images.shape[2]:
                # The label maps are in image pixels; the encoder's centre crop of a non-square
                # image would cut the patch grid loose from them.
                raise ValueError(f"{where}: images must be square, got {images.shape[1:3]}")
            seg = np.asarray(data[SEGMENTATION_KEY])
            if seg.shape != images.shape[:3]:
                raise ValueError(
                    f"{where}: segmentation maps {seg.shape[1:]} do not match the images "
                    f"{images.shape[1:3]}"
                )
            truth = {
                task: ground_truth(
                    seg,
                    data[SLOT_KEYS[task]],
                    len(task_classes(task)) - 1,
                    f"{where} ({task} task, {SLOT_KEYS[task]!r})",
                )
                for task in self.tasks
            }
            self._data = (images, truth)
        return self._data

    def _background_embedding(self, encoder: Any) -> np.ndarray:
        """float32 [E], unit norm: the mean of the background prompts' embeddings."""
        z = common.embed_texts(
            encoder, background_prompts(), self.batch_size, "segmentation: background prompts"
        ).mean(axis=0)
        # The mean of unit vectors has norm <= 1: renormalise for cosine scores.
        return z / max(float(np.linalg.norm(z)), 1e-12)

    def _class_embeddings(self, encoder: Any, task: str, background: np.ndarray) -> np.ndarray:
        """float32 [C, E], rows L2-normalised: `background` first, then the task's classes."""
        objects = zero_shot.class_embeddings(
            encoder, task_classes(task)[1:], ZEROSHOT_TASKS[task].templates, self.batch_size
        )
        return np.concatenate([background[None], objects]).astype(np.float32)

    def run(self, encoder: Any) -> dict[str, float]:
        """Embeds patches and prompts, segments, scores; writes the plot if asked.

        encoder: see `common` (embed_images with key 'patch_embeddings', embed_texts, image_size).
        """
        images, truth = self._load()
        patches, _ = common.embed_patch_grid(
            encoder,
            self._images.get("images", images, encoder),
            self.batch_size,
            f"segmentation {self.name}: images",
            "segmentation",
        )
        size = images.shape[1]
        background = self._background_embedding(encoder)
        metrics, preds = {}, {}
        for task in self.tasks:
            w = self._class_embeddings(encoder, task, background)
            pred = predict(np.einsum("npe,ce->npc", patches, w), size, size)
            conf = confusion(truth[task], pred, len(w))
            metrics[f"segmentation/{self.name}/{task}_miou"] = mean_iou(conf)
            metrics[f"segmentation/{self.name}/{task}_pixel_acc"] = float(
                np.trace(conf) / conf.sum()
            )
            preds[task] = pred[: self.num_plot]
        if self.plot_path and self.num_plot > 0:
            summary = ", ".join(
                f"{t} mIoU {metrics[f'segmentation/{self.name}/{t}_miou']:.3f}" for t in self.tasks
            )
            plot_segmentation(
                self.plot_path,
                images[: self.num_plot],
                {t: truth[t][: self.num_plot] for t in self.tasks},
                preds,
                f"segmentation/{self.name}: {summary} ({len(images)} images)",
            )
        return metrics
