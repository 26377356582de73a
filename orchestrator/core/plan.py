"""The arithmetic that turns a profile, a recipe and a step count into a run: checked before submission."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.config import Profile, Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.estimate import flops_per_token, parameter_count, peak_memory_gb
from orchestrator.core.scheduler import SCHEDULERS

STARTUP_MIN = 10  # per allocation: environment, process group, checkpoint load
SAVE_BANDWIDTH_GB_S = 1.0  # per rank, a conservative write rate to the parallel filesystem
SIGNAL_SLACK_S = 60  # headroom in the signal's lead time beyond one step and one save


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int, hint: str = "") -> int:
    """Micro-batches each rank runs per optimizer step so that the global batch is exact."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise OrchError(
            f"Global batch {global_batch} is not a multiple of micro batch {micro_batch} × world size "
            f"{world_size} = {per_pass} (gradient accumulation would be {global_batch / per_pass:.3g}). "
            f"Change train.micro_batch_size in the recipe or the number of ranks so that "
            f"{global_batch} / (micro batch × ranks) is a whole number.{hint}"
        )
    return global_batch // per_pass


def working_node_counts(profile: Profile, recipe: Recipe) -> list[int]:
    """Node counts up to the partition's limit for which the global batch divides evenly."""
    per_node = recipe.train.micro_batch_size * profile.launch.tasks_per_node
    limit = profile.slurm.max_nodes if profile.slurm else 1
    return [n for n in range(1, limit + 1) if recipe.train.global_batch_size % (per_node * n) == 0]


@dataclass(frozen=True)
class Plan:
    steps: int
    nodes: int
    world_size: int
    micro_batch: int
    grad_accum: int
    tokens_per_step: int
    parameters: int
    flops_per_token: float
    peak_memory_gb: float
    tokens_per_s: float | None  # estimated from the profile's peak and expected MFU; None without a peak
    signal_delay_s: int
    stop_before_end_s: int  # the job stops itself this long before its time limit if no signal came first
    usable_min_per_allocation: float

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def hours(self) -> float | None:
        return self.total_tokens / self.tokens_per_s / 3600 if self.tokens_per_s else None

    @property
    def step_s(self) -> float:
        """Estimated seconds per optimizer step (0 without an estimate of tokens/s)."""
        return step_seconds(self.tokens_per_step, self.tokens_per_s)

    @property
    def save_s(self) -> float:
        """Estimated seconds to write a checkpoint."""
        return save_seconds(self.parameters, self.world_size)

    @property
    def allocations(self) -> int:
        """Jobs of one time limit each that the run needs (each requeue is one more)."""
        return max(1, math.ceil(self.hours * 60 / self.usable_min_per_allocation)) if self.hours else 1


def step_seconds(tokens_per_step: int, tokens_per_s: float | None) -> float:
    return tokens_per_step / tokens_per_s if tokens_per_s else 0.0


def save_seconds(parameters: int, world_size: int) -> float:
    """Weights and Lion momentum in fp32, each rank writing its shard."""
    return 8 * parameters / world_size / (SAVE_BANDWIDTH_GB_S * 1e9)


def make_plan(profile: Profile, recipe: Recipe, steps: int) -> Plan:
    if steps < 1:
        raise OrchError(f"--steps must be a positive number of optimizer steps, got {steps}.")
    train, world = recipe.train, profile.world_size
    micro = [m for m in range(1, train.global_batch_size + 1) if train.global_batch_size % (m * world) == 0]
    nodes = working_node_counts(profile, recipe)
    hint = (
        f" Micro batches that divide at {profile.nodes} node(s): {', '.join(map(str, micro)) or 'none'}."
        f" Node counts that work with micro batch {train.micro_batch_size}: {', '.join(map(str, nodes)) or 'none'}."
    )
    grad_accum = gradient_accumulation(train.global_batch_size, train.micro_batch_size, world, hint)
    flops = flops_per_token(recipe.model, recipe.data.max_seq_len)
    node = profile.node
    tokens_per_s = profile.gpus * node.peak_bf16_tflops * 1e12 * profile.expected_mfu / flops if node.gpus else None
    tokens_per_step = train.global_batch_size * recipe.data.max_seq_len
    parameters = sum(parameter_count(recipe.model).values())
    # The warning signal must leave time to finish the step in flight and save (weights + Lion momentum, fp32).
    step_s = step_seconds(tokens_per_step, tokens_per_s)
    save_s = save_seconds(parameters, world)
    scheduler = SCHEDULERS[profile.executor]
    signal_delay = profile.signal_delay_s
    if scheduler.sizes_signal_delay:
        signal_delay = max(signal_delay, math.ceil(2 * (step_s + save_s)) + SIGNAL_SLACK_S)
    usable = profile.time_limit_min - STARTUP_MIN - signal_delay / 60
    return Plan(
        steps=steps,
        nodes=profile.nodes,
        world_size=world,
        micro_batch=train.micro_batch_size,
        grad_accum=grad_accum,
        tokens_per_step=tokens_per_step,
        parameters=parameters,
        flops_per_token=flops,
        peak_memory_gb=peak_memory_gb(recipe, world),
        tokens_per_s=tokens_per_s,
        signal_delay_s=signal_delay,
        stop_before_end_s=signal_delay + scheduler.signal_check_s,
        usable_min_per_allocation=max(usable, 1.0),
    )


def check_time_limit(profile: Profile, path: Path | str, plan: Plan) -> None:
    """An allocation must outlast the time the job stops before its limit (the warning signal's lead time) by more
    than one step and one save, or no step could ever finish and be saved in it."""
    limit_s = profile.time_limit_min * 60
    needed_s = plan.stop_before_end_s + plan.step_s + plan.save_s
    if limit_s <= needed_s:
        raise OrchError(
            f"{path}: field 'time_limit_min' is {profile.time_limit_min:g} min ({limit_s:g} s), not longer than the "
            f"warning signal's lead time ({plan.stop_before_end_s} s before the limit) plus one step "
            f"({plan.step_s:.0f} s) and one save ({plan.save_s:.0f} s): no step could finish and be saved in it. "
            f"Allowed: more than {needed_s:.0f} s, e.g. --time {math.floor(needed_s / 60) + 1}."
        )
