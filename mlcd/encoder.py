"""Batched embedding of raw images and strings with a two-tower model's parameters.

Used by the trainer's periodic evaluations (with the live, possibly sharded parameters) and by
exported encoders, so both evaluate with exactly the same preprocessing and numerics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from input_pipeline import preprocess
from input_pipeline.tokenizers import Tokenizer
from mlcd import sharding
from mlcd.models.two_tower import l2_normalize

IMAGE_KEYS = ("embedding", "pre_logits", "patch_tokens", "patch_embeddings")


class Encoder:
    """embed_images(uint8 NHWC, any resolution) / embed_texts(list[str]) -> dicts of NumPy.

    Inputs are processed in fixed-size chunks (padded, then trimmed) so each tower compiles
    once, whatever the number of inputs; chunks are sharded over all devices of `mesh`.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        *,
        image_size: int,
        tokenizer: Tokenizer | None,
        context_length: int,
        mesh: Mesh,
        batch_size: int = 256,
    ):
        self.image_size = int(image_size)
        self.params = params
        self._tokenizer = tokenizer
        self._context_length = int(context_length)
        self._mesh = mesh
        # Round the chunk up to a multiple of the device count: the batch dim is sharded.
        self._batch_size = -(-batch_size // mesh.size) * mesh.size

        def image_fn(params, images, keys):
            model = nnx.merge(graphdef, params)
            out = model.encode_image(preprocess.normalize_images(images))
            out["embedding"] = l2_normalize(out["embedding"])
            # Per-patch vectors in the joint space, comparable to text embeddings (grounding,
            # zero-shot segmentation): the tower's projected patch tokens (ViT.__call__).
            out["patch_embeddings"] = l2_normalize(out["patch_embeddings"])
            return {k: out[k].astype(jnp.float32) for k in keys}

        def text_fn(params, tokens, keys):
            del keys  # the text tower has one output
            out = nnx.merge(graphdef, params).encode_text(tokens)
            return {"embedding": l2_normalize(out["embedding"].astype(jnp.float32))}

        # Replicated outputs: every host can read the embeddings (multi-host evaluation). Only
        # the requested keys are computed and gathered (`keys` is static).
        replicated = NamedSharding(mesh, P())
        self._image_fn = jax.jit(image_fn, static_argnums=2, out_shardings=replicated)
        self._text_fn = jax.jit(text_fn, static_argnums=2, out_shardings=replicated)
        self._in_sharding = sharding.batch_sharding(mesh)

    def _run(self, fn, inputs: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        n = len(inputs)
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        with jax.set_mesh(self._mesh):
            # No input still runs one (all-padding) chunk, so the empty outputs get their shapes.
            for start in range(0, max(n, 1), self._batch_size):
                chunk = inputs[start : start + self._batch_size]
                valid = len(chunk)
                if not valid:
                    chunk = np.zeros((1, *inputs.shape[1:]), inputs.dtype)
                pad = self._batch_size - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                # Every host holds the whole chunk, so device_put (not host_to_global, which
                # expects a per-host slice) places each device's rows.
                out = fn(self.params, jax.device_put(chunk, self._in_sharding), tuple(keys))
                for k in keys:
                    chunks[k].append(np.asarray(out[k])[:valid])
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def embed_images(
        self, images: np.ndarray, keys: Sequence[str] = ("embedding", "pre_logits", "patch_tokens")
    ) -> dict[str, np.ndarray]:
        """uint8 [N, H, W, 3] -> float32 arrays, after resize + center crop to image_size.

        keys: any of 'embedding' [N, E] (L2-normalised), 'pre_logits' [N, W] (pooled, before the
        projection), 'patch_tokens' [N, P, W] (after the final LN), 'patch_embeddings' [N, P, E]
        (patch tokens through the tower's patch projection, L2-normalised).
        """
        unknown = set(keys) - set(IMAGE_KEYS)
        if unknown:
            raise ValueError(f"embed_images: unknown keys {sorted(unknown)}; known: {IMAGE_KEYS}")
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"embed_images expects uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        resized = np.empty((len(images), self.image_size, self.image_size, 3), np.uint8)
        for i, image in enumerate(images):
            resized[i] = preprocess.resize_center_crop(image, self.image_size)
        return self._run(self._image_fn, resized, keys)

    def embed_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """list of N strings -> {'embedding': float32 [N, E] L2-normalised}."""
        if isinstance(texts, str):  # would be embedded as one text per character
            raise TypeError("embed_texts expects a list of strings, got a str: pass [text]")
        texts = list(texts)  # once: a generator is read here, not by a check and then empty
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(
                    f"embed_texts expects a list of strings; texts[{i}] is {type(t).__name__}"
                )
        if self._tokenizer is None:
            raise ValueError("this encoder has no text tower / tokenizer")
        tokens = self._tokenizer.encode(texts, self._context_length)
        return self._run(self._text_fn, tokens, ("embedding",))
