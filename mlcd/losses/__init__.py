"""Losses: each takes global arrays and returns a scalar; sharded when run under a mesh."""

from mlcd.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from mlcd.losses.mlcd import mlcd_loss

__all__ = ["mlcd_loss", "sigmoid_contrastive_loss", "softmax_contrastive_loss"]
