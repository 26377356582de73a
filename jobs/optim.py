"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from lion_pytorch import Lion

from orchestrator.core.config import OptimizerSpec, ScheduleSpec


def build_optimizer(params, spec: OptimizerSpec) -> Lion:
    """LionW: Lion with decoupled weight decay."""
    return Lion(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, decoupled_weight_decay=True)


def lr_factor(step: int, spec: ScheduleSpec) -> float:
    """Multiplier of the peak lr at scheduler step `step` (0-based).

    Warmup rises linearly to 1 at `warmup_steps` (step 0 already trains, at 1/warmup of the peak);
    then a cosine falls from 1 to `alpha` at `total_steps` and stays there.
    """
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.total_steps - spec.warmup_steps))
    return spec.alpha + (1 - spec.alpha) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
