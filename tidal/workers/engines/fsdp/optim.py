"""AdamW and its learning-rate schedule, built from `OptimConfig`.

The schedule is a pure function of the optimizer-step index so it can be tested without a model:
linear warm-up over `warmup_steps`, then constant, cosine or linear decay that would reach
`min_lr_ratio * lr` at step index `total_steps` (one past the last update, as in Hugging Face's
schedules). The total is known up front: trainer steps x mini-batches x epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from tidal.config.schema import OptimConfig


def lr_multiplier(step: int, config: OptimConfig, total_steps: int) -> float:
    """Factor on `config.lr` for the optimizer step with 0-based index `step`.

    Warm-up uses (step + 1) / warmup_steps so the very first update already moves (a zero first
    learning rate would waste a step), and the last warm-up step reaches the full rate.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif config.schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"optim.schedule={config.schedule!r} is not one of constant, cosine, linear")
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over every trainable parameter (weight decay on all of them, as verl does)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return torch.optim.AdamW(
        trainable,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step."""
    if total_steps < 1:
        raise ValueError(f"total optimizer steps must be >= 1, got {total_steps}")
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, config, total_steps))
