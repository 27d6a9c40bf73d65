"""Optimizer from config: AdamW with linear warm-up + cosine decay, a weight-decay mask,
global-norm gradient clipping and per-parameter learning-rate multipliers.

    lr(step) = lr * step / warmup                                    for step < warmup
             = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)            after, p = progress in [0, 1]
with r = config.optim.min_lr_ratio. Decoupled weight decay (AdamW) is applied only to parameters
with >= 2 dims whose path does not match `config.optim.no_decay` (CLIP practice: no decay on
gains, biases, temperature, embeddings of position).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from mlcd import tree_utils


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warm-up + cosine schedule in absolute learning-rate units (not a multiplier)."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params: Any, no_decay: str) -> Any:
    """Tree of bools: True where AdamW's weight decay applies."""
    rules = ((no_decay, False), (".*", True))
    return tree_utils.map_with_path(
        lambda p, x: x.ndim >= 2 and tree_utils.first_match(p, rules, "config.optim.no_decay"),
        params,
    )


def lr_multipliers(params: Any, rules: tuple[tuple[str, float], ...]) -> Any:
    """Tree of floats from (regex, multiplier) rules; unmatched parameters get 1.0."""
    rules = (*tuple(rules), (".*", 1.0))
    return tree_utils.map_with_path(
        lambda p, _: float(tree_utils.first_match(p, rules, "config.optim.lr_mults")), params
    )


def _scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's multiplier (0 freezes a parameter)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    cfg: ml_collections.ConfigDict,
    params: Any,
    total_steps: int,
    lr_mults: tuple[tuple[str, float], ...] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax chain for `params` (a pytree of arrays or ShapeDtypeStructs) and its lr schedule.

    lr_mults: (regex, multiplier) rules matched before cfg.lr_mults (the objective's heads
    bring their own).
    """
    schedule = make_schedule(cfg, total_steps)
    lr_mults = (*lr_mults, *cfg.lr_mults)
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(params, cfg.no_decay),
        )
    )
    if lr_mults:
        parts.append(_scale_by_tree(lr_multipliers(params, lr_mults)))
    return optax.chain(*parts), schedule
