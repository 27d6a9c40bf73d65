"""Grounding by the pointing game: does the patch most similar to a sentence lie on its object?

Pairs (synthetic_scenes layout): for every object j < num_objects of an image, the sentence
split_sentences(long_caption)[box_sentence[j]] that describes it, and its box (ymin, xmin, ymax,
xmax) in [0, 1] image coordinates.

Rule. The image tower sees the square image as a g x g grid of patches, patch p covering cell
(row, col) = (p // g, p % g) (row-major, as the ViT flattens its patch grid), cell centre
((row + 0.5) / g, (col + 0.5) / g). A cell is ON the object if its centre lies inside the box
(bounds included), or if the cell contains the box centre (so an object smaller than a cell still
has one cell to point at). With s_p = cos(patch_embedding_p, text_embedding), the pair is a hit
when every patch attaining max_p s_p is on the object: exact ties count against the model (a
collapsed map that is constant scores 0, not the share of boxes that happen to cover patch 0).
Metric `grounding/<set>/pointing_acc`: the fraction of hits over all pairs. A model with random
maps scores about the mean fraction of cells on the object.

A PNG grid of the first `num_plot` images (their first object) shows the image with the box and
the argmax cell, the similarity heatmap over it, and the sentence; it is written atomically
(temporary file + rename) to `plot_path`, or to `out_dir`/grounding_<set>.png.
"""

import math
import os
import textwrap
from typing import Any

import numpy as np

from input_pipeline.datasets.synthetic_scenes import split_sentences
from mlcd.evaluators import EVALUATORS, common

# Pairs per similarity block: bounds the gathered [block, P, E] patch embeddings (64 x 128 x 4
# bytes = 32 KiB per pair).
_PAIR_BLOCK = 1024
_READ_KEYS = ("image", "boxes", "box_sentence", "num_objects")


def on_object_cells(boxes: np.ndarray, grid: int) -> np.ndarray:
    """Cells that count as pointing at each box (module docstring rule).

    Args:
      boxes: float [M, 4] (ymin, xmin, ymax, xmax) in [0, 1].
      grid: g, patches per side.

    Returns:
      bool [M, g * g], row-major cells.
    """
    boxes = np.asarray(boxes, np.float64)
    centres = (np.arange(grid) + 0.5) / grid
    ymin, xmin, ymax, xmax = (boxes[:, i, None] for i in range(4))
    rows = (ymin <= centres) & (centres <= ymax)  # [M, g]
    cols = (xmin <= centres) & (centres <= xmax)
    cells = rows[:, :, None] & cols[:, None, :]  # [M, g, g]
    r = np.clip(np.floor((ymin + ymax)[:, 0] / 2 * grid), 0, grid - 1).astype(int)
    c = np.clip(np.floor((xmin + xmax)[:, 0] / 2 * grid), 0, grid - 1).astype(int)
    cells[np.arange(len(boxes)), r, c] = True
    return cells.reshape(len(boxes), grid * grid)


def pointing_hits(similarity: np.ndarray, on_object: np.ndarray) -> np.ndarray:
    """bool [M]: every argmax patch of similarity [M, P] is on the object (on_object [M, P])."""
    at_max = similarity >= similarity.max(axis=1, keepdims=True)
    return ~(at_max & ~on_object).any(axis=1)


def grounding_pairs(data: dict[str, np.ndarray], caption_key: str, where: str) -> dict:
    """Every (image, object sentence, box) of the split.

    Returns:
      {'image': int64 [M] row of the image, 'text': int64 [M] index into 'sentences',
       'sentences': list[str] (distinct), 'boxes': float32 [M, 4]}.

    Raises:
      ValueError: a box_sentence index outside its caption's sentences, or no pair at all.
    """
    image_rows, texts, boxes = [], [], []
    for i in range(len(data["image"])):
        caption = data[caption_key][i]
        sentences = split_sentences(caption.decode() if isinstance(caption, bytes) else caption)
        for j in range(int(data["num_objects"][i])):
            s = int(data["box_sentence"][i][j])
            if s < 0:
                continue
            if s >= len(sentences):
                raise ValueError(
                    f"{where}: example {i} object {j} points to sentence {s} of a caption with "
                    f"{len(sentences)} sentences"
                )
            image_rows.append(i)
            texts.append(sentences[s])
            boxes.append(data["boxes"][i][j])
    if not image_rows:
        raise ValueError(f"{where}: no object with a sentence to ground")
    sentences, text_index = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    return {
        "image": np.asarray(image_rows, np.int64),
        "text": text_index.reshape(-1).astype(np.int64),
        "sentences": [str(s) for s in sentences],
        "boxes": np.asarray(boxes, np.float32),
    }


def similarity_maps(
    patches: np.ndarray, texts: np.ndarray, image_rows: np.ndarray, text_rows: np.ndarray
) -> np.ndarray:
    """s[m, p] = patches[image_rows[m], p] . texts[text_rows[m]]: float32 [M, P]."""
    out = []
    for start in range(0, len(image_rows), _PAIR_BLOCK):
        b = slice(start, start + _PAIR_BLOCK)
        out.append(np.einsum("mpe,me->mp", patches[image_rows[b]], texts[text_rows[b]]))
    return np.concatenate(out)


def plot_grounding(
    path: str,
    images: np.ndarray,
    maps: np.ndarray,
    boxes: np.ndarray,
    sentences: list[str],
    hits: np.ndarray,
    title: str,
) -> None:
    """A PNG grid, two examples per row: image + box (green) + argmax cell (red) | heatmap.

    Args:
      images: uint8 [n, R, R, 3]; maps: float [n, P] similarities; boxes: [n, 4] in [0, 1];
      sentences: n strings; hits: bool [n]; title: the figure's title.
    """
    # The object-oriented API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n, size = len(images), images.shape[1]
    grid = math.isqrt(maps.shape[1])
    rows = -(-n // 2)
    fig = Figure(figsize=(12, 3.4 * rows))
    FigureCanvasAgg(fig)
    # No ticks and a fixed layout: tick and tight-layout computations were 80% of the drawing
    # time (seconds per plot on a busy 2-core host).
    axes = fig.subplots(rows, 4, squeeze=False, subplot_kw={"xticks": [], "yticks": []})
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.05, hspace=0.3)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k in range(n):
        ax_img, ax_map = axes[k // 2, 2 * (k % 2)], axes[k // 2, 2 * (k % 2) + 1]
        ymin, xmin, ymax, xmax = boxes[k] * size
        best = int(np.argmax(maps[k]))
        cell = size / grid
        # Data coordinates = pixel edges (0..R) for the image, the heatmap and the boxes alike.
        ax_img.imshow(images[k], extent=(0, size, size, 0))
        ax_img.add_patch(
            Rectangle((xmin, ymin), xmax - xmin, ymax - ymin, fill=False, ec="lime", lw=2)
        )
        ax_img.add_patch(
            Rectangle(
                ((best % grid) * cell, (best // grid) * cell),
                cell,
                cell,
                fill=False,
                ec="red",
                lw=2,
            )
        )
        ax_img.set_title("\n".join(textwrap.wrap(sentences[k], 34)), fontsize=8)
        ax_map.imshow(images[k], extent=(0, size, size, 0))
        ax_map.imshow(
            maps[k].reshape(grid, grid),
            cmap="jet",
            alpha=0.55,
            extent=(0, size, size, 0),
            interpolation="nearest",
        )
        ax_map.set_title(f"{'hit' if hits[k] else 'miss'}  max cos {maps[k].max():.2f}", fontsize=8)
    fig.suptitle(title)
    common.atomic_savefig(fig, path)


@EVALUATORS.register("grounding")
class GroundingEvaluator:
    """Pointing-game accuracy of patch-text similarity maps: `grounding/<name>/pointing_acc`.

    The split is read once, on the first `run`; later runs re-embed it (and redraw the plot).
    """

    def __init__(
        self,
        builder: Any,
        *,
        split: str = "test",
        caption_key: str = "long_caption",
        max_examples: int | None = None,
        batch_size: int = 256,
        plot_path: str | None = None,
        out_dir: str | None = None,
        num_plot: int = 8,
        name: str | None = None,
    ):
        """Stores the settings; the split is read on the first `run`.

        Args:
          builder: a prepared tfds builder with synthetic_scenes' features (image, the caption,
            boxes, box_sentence, num_objects).
          split: split to evaluate on.
          caption_key: the caption whose sentences box_sentence indexes.
          max_examples: use only the first N images of the split.
          batch_size: images / sentences per embedding call.
          plot_path: where to write the PNG grid (overwritten on every run); default
            out_dir/grounding_<name>.png when out_dir is given, else no plot.
          num_plot: images in the grid.
          name: metric namespace (default: `split`).
        """
        self.builder = builder
        self.split = split
        self.caption_key = caption_key
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.name = name or split
        if plot_path is None and out_dir is not None:
            plot_path = os.path.join(out_dir, f"grounding_{self.name}.png")
        self.plot_path = plot_path
        self.num_plot = num_plot
        self._data: tuple[np.ndarray, dict] | None = None
        self._images = common.ResizedImages()

    def _load(self) -> tuple[np.ndarray, dict]:
        """(images, pairs from `grounding_pairs`), read once."""
        if self._data is None:
            where = f"grounding on {self.builder.name}/{self.split}"
            data = common.read_split(
                self.builder,
                self.split,
                [*_READ_KEYS, self.caption_key],
                max_examples=self.max_examples,
                desc=f"grounding {self.split}: reading",
            )
            images = common.as_rgb(data["image"], where=where)
            if images.shape[1] != images.shape[2]:
                # Boxes are in image coordinates; the encoder's centre crop of a non-square image
                # would move them.
                raise ValueError(f"{where}: images must be square, got {images.shape[1:3]}")
            self._data = (images, grounding_pairs(data, self.caption_key, where))
        return self._data

    def run(self, encoder: Any) -> dict[str, float]:
        """Embeds patches and sentences, scores the pointing game, writes the plot if asked.

        encoder: see `common` (embed_images with key 'patch_embeddings', embed_texts, image_size).
        """
        images, pairs = self._load()
        patches, grid = common.embed_patch_grid(
            encoder,
            self._images.get("images", images, encoder),
            self.batch_size,
            f"grounding {self.name}: images",
            "grounding",
        )
        texts = common.embed_texts(
            encoder, pairs["sentences"], self.batch_size, f"grounding {self.name}: sentences"
        )
        maps = similarity_maps(patches, texts, pairs["image"], pairs["text"])
        hits = pointing_hits(maps, on_object_cells(pairs["boxes"], grid))
        if self.plot_path:
            # The first pair of each of the first num_plot images (pairs are in image order).
            first = np.unique(pairs["image"], return_index=True)[1][: self.num_plot]
            plot_grounding(
                self.plot_path,
                images[pairs["image"][first]],
                maps[first],
                pairs["boxes"][first],
                [pairs["sentences"][t] for t in pairs["text"][first]],
                hits[first],
                f"grounding/{self.name}: pointing accuracy {np.mean(hits):.3f} "
                f"({len(hits)} sentences)",
            )
        return {f"grounding/{self.name}/pointing_acc": float(np.mean(hits))}
