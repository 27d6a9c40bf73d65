"""Image embeddings shared by the evaluators of one evaluation round.

Each evaluator embeds its own images, and several embed the same ones: the test split (retrieval,
image retrieval, grounding, the probes' test sets), the probes' train examples. Embedding is most
of an evaluation's cost (the tiny model: ~3 ms an image on 2 cores), so wrapping the encoder for
one round computes every image once:

  shared = evaluators.SharedEmbeddings(encoder)   # new for every round
  metrics = {}
  for evaluator in evals:
      metrics.update(evaluator.run(shared))

Images are matched by content (BLAKE2b of shape and pixels), so subsets, other orders and other
batchings all hit. Outputs are computed in fixed groups (KEY_GROUPS): a request for 'embedding'
computes 'pre_logits' too (a few hundred floats an image, same forward pass), so the other pooled
key is then a hit. Fixed groups also keep results independent of the order the evaluators run
in: the encoder jit-compiles one program per set of requested keys, and two programs may round
differently in the last bits (enough to flip near-tied argmaxes of a randomly initialised model),
so every key always comes from the same program.

Valid for ONE set of parameters: the trainer updates its encoder's parameters between rounds, so
a round must never reuse an earlier round's wrapper.
"""

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# Output groups computed together; a key outside them is computed alone.
KEY_GROUPS = (("embedding", "pre_logits"),)


def key_group(key: str) -> tuple[str, ...]:
    """The outputs computed together with `key`."""
    return next((g for g in KEY_GROUPS if key in g), (key,))


def image_digest(image: np.ndarray) -> bytes:
    """128-bit content key of one image: its dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.dtype}{image.shape}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.digest()


class SharedEmbeddings:
    """An encoder (see `common`) that memoises `embed_images` per image and output key.

    `embed_texts` and `image_size` pass through. Memory: the outputs of every distinct image
    embedded this round (the tiny model's 2000-image test split with patch embeddings: ~70 MB).
    """

    def __init__(self, encoder: Any):
        self.encoder = encoder
        self.image_size = encoder.image_size
        self._cache: dict[tuple[bytes, str], np.ndarray] = {}
        self.computed = 0  # images x groups sent to the wrapped encoder (for tests and logs)

    def embed_images(
        self, images: np.ndarray, keys: Sequence[str] = ("embedding",)
    ) -> dict[str, np.ndarray]:
        """Like the wrapped encoder's: {key: [N, ...]} for images [N, H, W, 3]; for each key
        group, only the images missing one of its requested keys are embedded."""
        keys = tuple(keys)
        digests = [image_digest(im) for im in images]
        for group in dict.fromkeys(key_group(k) for k in keys):
            needed = [k for k in keys if k in group]
            missing = [
                i for i, d in enumerate(digests) if any((d, k) not in self._cache for k in needed)
            ]
            if missing:
                self._compute(np.asarray(images)[missing], [digests[i] for i in missing], group)
        return {
            k: np.stack([self._cache[(d, k)] for d in digests])
            for k in keys
            if all((d, k) in self._cache for d in digests)
        }

    def _compute(self, images: np.ndarray, digests: list[bytes], group: tuple[str, ...]) -> None:
        """Embeds `images` with exactly the keys of `group` and caches the rows."""
        out = self.encoder.embed_images(images, keys=group)
        self.computed += len(images)
        # A key the encoder did not return stays uncached: the caller's validation
        # (common.check_outputs) names it.
        for k in (k for k in group if k in out):
            values = np.asarray(out[k])
            if values.ndim == 0 or len(values) != len(images):
                raise ValueError(
                    f"embed_images {k!r} must have one row per image: {len(images)} images, "
                    f"got shape {values.shape}"
                )
            for digest, row in zip(digests, values):
                self._cache[(digest, k)] = row

    def embed_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The wrapped encoder's text embeddings (texts are cheap and rarely shared)."""
        return self.encoder.embed_texts(texts)
