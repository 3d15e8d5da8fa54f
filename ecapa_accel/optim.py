"""The optimizer a config names and its learning-rate schedule (a pure function of the optimizer step)."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def learning_rate(step: int, steps_per_epoch: int, horizon: int, cfg: OptimConfig,
                  anchor: list[float] | None = None) -> float:
    """LR after `step` optimizer steps: linear warmup, then cosine to `min_lr` at `horizon`, step decay or
    constant. `anchor` = (step, lr): a resume moved the horizon, and the cosine continues from that LR."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.decay_gamma ** math.floor(step / (cfg.decay_every_epochs * steps_per_epoch))
    start, peak = (warmup, cfg.lr) if not anchor or step < anchor[0] else (anchor[0], anchor[1])
    progress = min(1.0, (step - start) / max(1.0, horizon - start))
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)
