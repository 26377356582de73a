"""The arithmetic that turns a profile, a recipe and a step count into a run: checked before submission."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import Profile, Recipe
from orchestrator.errors import OrchError


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step so that the global batch is exact."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise OrchError(
            f"Global batch {global_batch} is not a multiple of micro batch {micro_batch} × world size "
            f"{world_size} = {per_pass} (gradient accumulation would be {global_batch / per_pass:.3g}). "
            f"Change train.micro_batch_size in the recipe or the number of ranks so that "
            f"{global_batch} / (micro batch × ranks) is a whole number."
        )
    return global_batch // per_pass


@dataclass(frozen=True)
class Plan:
    steps: int
    world_size: int
    grad_accum: int
    tokens_per_step: int

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step


def make_plan(profile: Profile, recipe: Recipe, steps: int) -> Plan:
    if steps < 1:
        raise OrchError(f"--steps must be a positive number of optimizer steps, got {steps}.")
    train = recipe.train
    return Plan(
        steps=steps,
        world_size=profile.world_size,
        grad_accum=gradient_accumulation(train.global_batch_size, train.micro_batch_size, profile.world_size),
        tokens_per_step=train.global_batch_size * recipe.data.max_seq_len,
    )
