"""The text side of synthetic_scenes: captions, entity table and zero-shot prompts.

One small grammar serves long captions, short alt-text captions and zero-shot prompts, so that
prompts are in-distribution text for a model trained on the captions:
- long-caption object sentences always name the object's colour and shape ("there is a large red
  circle.", "the blue star is small."); size and position are optional;
- short captions drop attributes at random and use generic nouns, producing exactly the phrasings
  the prompts use: "a photo of the red object." (no shape), "the circle." (no colour);
- prompts use "the" before the class name, so they are grammatical for every class ("the orange
  object", never "a orange object"); captions use "the" as well as "a"/"an";
- alt-texts are the short captions plus web-style noise: sometimes an extra mention of an entity
  that is not in the image (alt-text names things not pictured), for entity annotation's teacher
  filter to remove.
Sentences of a long caption end with "." and contain no other ".", so `split_sentences` recovers
them exactly.
"""

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from input_pipeline.datasets.synthetic_scenes.scenes import (
    BACKGROUNDS,
    COLORS,
    PROBE_NAMES,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

OBJECT_TEMPLATES = (
    "{a} {size} {color} {shape}.",
    "there is {a} {size} {color} {shape}.",
    "{a} {color} {shape} {where}.",
    "there is {a} {color} {shape} {where}.",
    "{a} {size} {color} {shape} {where}.",
    "i can see {a} {color} {shape}.",
    "the {color} {shape} is {size}.",
    "the {color} {shape} sits {where}.",
    "one {size} {shape}, colored {color}.",
)
BACKGROUND_TEMPLATES = (
    "the background is {bg}.",
    "everything is on a {bg} background.",
    "a {bg} background.",
    "the scene has a {bg} background.",
)
GENERIC_NOUNS = ("object", "shape", "thing")
SHORT_PREFIXES = (
    "",
    "",
    "",
    "a photo of",
    "photo of",
    "picture of",
    "img",
    "image:",
    "stock photo",
)
SHORT_SUFFIXES = ("", "", "", "", "photo", "img", "jpg", "hd", "in the photo")
SHORT_SEPARATORS = (", ", " and ", " ", " + ")
# Alt-text noise: how often an alt-text mentions an entity that is not in the image, and how the
# mention is attached to the short caption (never " ": the two phrases stay apart).
ALT_NOISE_PROB = 0.3
ALT_SEPARATORS = (", ", " and ", " | ", " - ", " with ", " + ")

SHAPE_DESCRIPTIONS = {
    "circle": "round shape with no corners",
    "square": "four-sided shape with equal sides and right angles",
    "triangle": "three-sided shape pointing up",
    "star": "five-pointed star shape",
    "cross": "plus-shaped cross with four equal arms",
    "diamond": "square standing on one of its corners",
}


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    """A zero-shot classification task over the test split.

    label_key: the ClassLabel feature holding the target; class names are its names.
    templates: prompts with one "{}" slot for the class name; a class embedding is the mean of its
      prompts' embeddings.
    single_object: evaluate only on images with num_objects == 1 (the label names the only object).
    """

    label_key: str
    templates: tuple[str, ...]
    single_object: bool = True


ZEROSHOT_TASKS = {
    "shape": ZeroShotTask(
        label_key="largest_shape",
        templates=("the {}.", "a photo of the {}.", "the {} in the photo."),
    ),
    "color": ZeroShotTask(
        label_key="largest_color",
        templates=("the {} object.", "a photo of the {} object.", "the {} shape."),
    ),
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(obj: SceneObject) -> str:
    """Position phrase from the box centre, on a 3x3 grid ("in the top left", "on the right")."""
    cy, cx = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    row = ("top", "middle", "bottom")[min(int(cy * 3), 2)]
    col = ("left", "center", "right")[min(int(cx * 3), 2)]
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"in the {row} {col}"


def object_sentence(obj: SceneObject, rng: np.random.Generator) -> str:
    """One long-caption sentence naming `obj`'s colour and shape (size/position optional)."""
    template = _pick(rng, OBJECT_TEMPLATES)
    first = SIZES[obj.size] if template.startswith("{a} {size}") else COLORS[obj.color]
    return template.format(
        a=_article(first),
        size=SIZES[obj.size],
        color=COLORS[obj.color],
        shape=SHAPES[obj.shape],
        where=_where(obj),
    )


def long_caption(scene: Scene, rng: np.random.Generator) -> tuple[str, list[int]]:
    """Returns (caption, box_sentence).

    caption: one sentence per object plus one background sentence, in random order, joined by
      " ". box_sentence[j] is the index of object j's sentence in split_sentences(caption).
    """
    sentences = [object_sentence(obj, rng) for obj in scene.objects]
    sentences.append(_pick(rng, BACKGROUND_TEMPLATES).format(bg=BACKGROUNDS[scene.background]))
    order = rng.permutation(len(sentences))  # order[k] = which sentence goes to position k
    position = np.argsort(order)  # position[s] = where sentence s ended up
    caption = " ".join(sentences[s] for s in order)
    return caption, [int(position[j]) for j in range(len(scene.objects))]


def split_sentences(caption: str) -> list[str]:
    """Splits a long caption into its sentences, each keeping its final ".".

    Sentences are joined by " " and contain no "." but their last character, so splitting on ". "
    is exact: split_sentences(long_caption(...)[0])[k] is the k-th generated sentence.
    """
    parts = [p.strip() for p in caption.strip().split(". ")]
    parts = [p for p in parts if p]
    return [p if p.endswith(".") else p + "." for p in parts]


def _noisy_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    """Alt-text mention: colour and shape each dropped at random (never both), size rarely kept."""
    keep_color, keep_shape = rng.random() < 0.75, rng.random() < 0.7
    if not (keep_color or keep_shape):
        keep_color = rng.random() < 0.5
        keep_shape = not keep_color
    words = [SIZES[obj.size]] if rng.random() < 0.25 else []
    words += [COLORS[obj.color]] if keep_color else []
    words.append(SHAPES[obj.shape] if keep_shape else _pick(rng, GENERIC_NOUNS))
    determiner = _pick(rng, ("", _article(words[0]), "the", "one"))
    return " ".join([determiner, *words]) if determiner else " ".join(words)


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Noisy alt-text: a random subset (>= 1) of the objects in random order, attributes dropped,
    optional filler words ("photo of", "img", ...), sometimes the background, sometimes a "."."""
    kept = [obj for obj in scene.objects if rng.random() < 0.7] or [scene.largest]
    phrases = [_noisy_phrase(kept[k], rng) for k in rng.permutation(len(kept))]
    if rng.random() < 0.15:
        phrases.append(f"{BACKGROUNDS[scene.background]} background")
    text = _pick(rng, SHORT_SEPARATORS).join(phrases)
    text = " ".join(w for w in (_pick(rng, SHORT_PREFIXES), text, _pick(rng, SHORT_SUFFIXES)) if w)
    return text + "." if rng.random() < 0.3 else text


def entity_alias(color: str, shape: str) -> str:
    """The alias of entity (color, shape): the word order of the long-caption template "one
    {size} {shape}, colored {color}." ("circle, colored red" normalises to the alias)."""
    return f"{shape} colored {color}"


def alt_text(scene: Scene, short: str, rng: np.random.Generator) -> str:
    """Web-style alt-text: the short caption `short`, plus, with probability ALT_NOISE_PROB, a
    mention of an entity (colour + shape) drawn uniformly from those NOT in the scene, by its
    name ("blue star") or its alias ("star colored blue"), prepended or appended.

    `rng` must be a stream of its own (the builder's is np.random.default_rng([seed, split,
    index, 1])): drawing from the example's main stream would change every feature generated
    after the short caption, the image included.
    """
    if rng.random() >= ALT_NOISE_PROB:
        return short
    present = {obj.entity_id for obj in scene.objects}
    absent = [e for e in range(len(COLORS) * len(SHAPES)) if e not in present]
    entity = absent[int(rng.integers(len(absent)))]
    color, shape = COLORS[entity // len(SHAPES)], SHAPES[entity % len(SHAPES)]
    words = f"{color} {shape}" if rng.random() < 0.75 else entity_alias(color, shape)
    determiner = _pick(rng, ("", "", _article(words), "the"))
    mention = f"{determiner} {words}" if determiner else words
    separator = _pick(rng, ALT_SEPARATORS)
    if rng.random() < 0.5:
        return mention + separator + short
    body, stop = (short[:-1], ".") if short.endswith(".") else (short, "")
    return body + separator + mention + stop


def prompt_texts() -> Iterator[str]:
    """Every zero-shot prompt (each task's templates filled with each class name)."""
    for task in ZEROSHOT_TASKS.values():
        for template in task.templates:
            yield from (template.format(name) for name in PROBE_NAMES[task.label_key])


def entities() -> list[dict]:
    """The entity table: one entry per (colour, shape), id = color * len(SHAPES) + shape.

    Each entry: {id, name ("red circle"), aliases (["circle colored red"]: `entity_alias`, the
    phrasing of one long-caption template), description (one line), color, shape} where color
    and shape are the class names (COLORS[i], SHAPES[j]). The format is mlcd.entities'.
    """
    table = []
    for c, color in enumerate(COLORS):
        for s, shape in enumerate(SHAPES):
            desc = (
                f"{_article(SHAPE_DESCRIPTIONS[shape])} {SHAPE_DESCRIPTIONS[shape]}, solid {color}."
            )
            table.append(
                {
                    "id": c * len(SHAPES) + s,
                    "name": f"{color} {shape}",
                    "aliases": [entity_alias(color, shape)],
                    "description": desc,
                    "color": color,
                    "shape": shape,
                }
            )
    return table
