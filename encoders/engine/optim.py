"""The optimiser and learning-rate schedule of a pretraining run (``optim`` config section)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cdir.core.errors import CdirError
from encoders.engine.config import OptimConfig


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    raise CdirError(f"optim.optimizer must be sgd or adamw, got {cfg.optimizer!r}")


def lr_factor(step: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    epoch_f = step / steps_per_epoch
    warm = cfg.warmup_epochs
    if warm > 0 and epoch_f < warm:
        return (step + 1) / (warm * steps_per_epoch)
    e = epoch_f if cfg.per_step else float(step // steps_per_epoch)
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - warm, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(e - warm, 0.0), span) / span))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(1 for m in cfg.milestones if e >= m)
    if cfg.schedule == "constant":
        return 1.0
    raise CdirError(f"optim.schedule must be cosine, step or constant, got {cfg.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg)
    )


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 step: int, steps_per_epoch: int, cfg: OptimConfig) -> None:
    """After loading a checkpoint's states, which carry the old hyperparameters: the config wins
    (a no-op when it is unchanged, so a resumed run replays the uninterrupted one exactly)."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * lr_factor(step, steps_per_epoch, cfg)
        group["weight_decay"] = cfg.weight_decay
        if cfg.optimizer == "sgd":
            group["momentum"] = cfg.momentum
        else:
            group["betas"] = tuple(cfg.betas)
