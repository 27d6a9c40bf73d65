"""Flax NNX models: ViT image tower, text transformer, and the two-tower wrapper."""

from mlcd.models.text import TextTransformer, build_text
from mlcd.models.two_tower import TwoTower, build_model, encoder_config, l2_normalize
from mlcd.models.vit import ViT, build_vit

__all__ = [
    "TextTransformer",
    "TwoTower",
    "ViT",
    "build_model",
    "build_text",
    "build_vit",
    "encoder_config",
    "l2_normalize",
]
