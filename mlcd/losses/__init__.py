"""Losses: each takes global arrays and returns a scalar; sharded when run under a mesh."""

from mlcd.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss

__all__ = ["sigmoid_contrastive_loss", "softmax_contrastive_loss"]
