"""mlcd: config-driven JAX/Flax pretraining of visual encoders (CLIP / ALIGN / SigLIP, MLCD,
MOFI, DreamLIP). Public entry points: `mlcd.losses`, `mlcd.clustering`, `mlcd.load_encoder`."""

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: `import mlcd.losses` must not pull in the trainer, tfds and orbax.
    if name == "load_encoder":
        from mlcd.runs import load_encoder

        return load_encoder
    raise AttributeError(f"module 'mlcd' has no attribute {name!r}")
