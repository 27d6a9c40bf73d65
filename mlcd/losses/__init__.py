"""Losses: each takes global arrays and returns a scalar; sharded when run under a mesh."""

from mlcd.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from mlcd.losses.dreamlip import grouping_loss, multi_positive_contrastive_loss
from mlcd.losses.mlcd import mlcd_loss
from mlcd.losses.mofi import entity_classification_loss, entity_contrastive_loss

__all__ = [
    "entity_classification_loss",
    "entity_contrastive_loss",
    "grouping_loss",
    "mlcd_loss",
    "multi_positive_contrastive_loss",
    "sigmoid_contrastive_loss",
    "softmax_contrastive_loss",
]
