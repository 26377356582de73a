"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from lion_pytorch import Lion

from jobs.compat import set_last_lr
from orchestrator.core.config import OptimizerSpec, ScheduleSpec
from orchestrator.core.schedule import lr_factor


def build_optimizer(params, spec: OptimizerSpec) -> Lion:
    """LionW: Lion with decoupled weight decay."""
    return Lion(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, decoupled_weight_decay=True)


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over `lr_factor`. A checkpoint restores the step; the rate at that step is then taken from the
    recipe's schedule, not from the checkpoint, so that a schedule changed by `orch resume --beyond-schedule extend`
    applies from the first step after the resume (an unchanged schedule gives the very same rate)."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec) -> None:
        super().__init__(optimizer, lambda step: lr_factor(step, spec))  # a function: state_dict leaves it out

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        rates = [base * factor(self.last_epoch) for factor, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = lr
        set_last_lr(self, rates)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec) -> StepSchedule:
    return StepSchedule(optimizer, spec)
