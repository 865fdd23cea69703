"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask (no decay on norms/biases)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import optax

from dcd_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
      lr: peak learning rate after warmup.
      warmup_steps: linear warmup from 0 to ``lr``.
      schedule: decay after warmup: ``cosine`` (to ``lr * final_lr_ratio``), ``linear`` (likewise) or ``constant``.
      final_lr_ratio: end of the decay as a fraction of ``lr``.
      weight_decay: decoupled AdamW decay, applied to matrices only (not norms, biases).
      b1, b2, eps: Adam moments.
      clip_norm: global gradient-norm clipping threshold (0 = off).
    """

    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"optim.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.warmup_steps < 0 or self.clip_norm < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_steps, clip_norm and weight_decay must be >= 0")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(step): linear warmup to ``lr`` over ``warmup_steps``, then the configured decay to ``total_steps``."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.final_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: matrices (ndim >= 2 without the layer axis)."""

    def is_matrix(path, leaf) -> bool:
        names = [getattr(p, "key", "") for p in path]
        stacked = names and names[0] == "layers"
        return (leaf.ndim - (1 if stacked else 0)) >= 2 and names[-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, params: Any) -> optax.GradientTransformation:
    tx = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask(params),
    )
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
