"""The learning-rate schedule as a function of the step alone: the job's scheduler, the dry run's curve and
`orch resume`'s choice past the schedule's end all read it here (the shapes are in docs/recipes.md)."""

from __future__ import annotations

import math
from collections.abc import Callable

from orchestrator.core.config import ScheduleSpec

DECAYS: dict[str, Callable[[float], float]] = {  # progress through the decay (0..1) -> share of peak - floor left
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1 - progress,
    "1-sqrt": lambda progress: 1 - math.sqrt(progress),
}


def lr_factor(step: int, spec: ScheduleSpec) -> float:
    """Multiplier of the peak lr at scheduler step `step` (0-based): the rate step `step` trains with.

    Warmup rises linearly to 1 at `warmup_steps` (step 0 already trains, at 1/warmup of the peak); the decay falls
    from 1 at `spec.decay_start` to `alpha` at `total_steps` and the rate stays there.
    """
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    start = spec.decay_start
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, spec.total_steps - start))
    return spec.alpha + (1 - spec.alpha) * DECAYS[shape(spec)](progress)


def shape(spec: ScheduleSpec) -> str:
    """The decay's shape: the schedule's name, or for wsd its decay_shape (1-sqrt when not given)."""
    if spec.name == "wsd":
        return spec.decay_shape or "1-sqrt"
    return spec.name


def key_steps(spec: ScheduleSpec, steps: int) -> list[int]:
    """The steps that show a schedule's curve in a few numbers: its start, the peak, the start and middle of the
    decay, its end, and the run's last step."""
    start, end = spec.decay_start, spec.total_steps
    return sorted({0, spec.warmup_steps, start, (start + end) // 2, end, steps - 1} - {-1})


def describe(spec: ScheduleSpec, peak: float, steps: int) -> str:
    """One line: the schedule, its phases and the rate at its key steps, and what the run's `steps` train."""
    if spec.name == "wsd":
        phases = (
            f"wsd: warmup {spec.warmup_steps:,}, stable to step {spec.decay_start:,}, {shape(spec)} decay of "
            f"{spec.decay_steps:,} steps"
        )
    else:
        phases = f"{spec.name}: warmup {spec.warmup_steps:,}, decay to step {spec.total_steps:,}"
    points = ", ".join(f"{step:,}: {peak * lr_factor(step, spec):.3g}" for step in key_steps(spec, steps))
    floor = f"floor {spec.alpha:g} × {peak:g} at step {spec.total_steps:,}"
    beyond = f"; steps {spec.total_steps:,}-{steps - 1:,} train at the floor" if steps > spec.total_steps else ""
    return f"{phases}, {floor}; lr at step {points}{beyond}"


def extended(spec: ScheduleSpec, steps: int) -> ScheduleSpec:
    """The schedule made to end at `steps`: a wsd schedule keeps its decay and lengthens its stable phase, cosine and
    linear stretch their decay."""
    return ScheduleSpec.model_validate({**spec.model_dump(), "total_steps": steps})


def extension_effect(spec: ScheduleSpec, steps: int, at: int, peak: float) -> str:
    """What extending the schedule to `steps` does to a run that continues from step `at`."""
    longer = extended(spec, steps)
    before, after = peak * lr_factor(at, spec), peak * lr_factor(at, longer)
    if spec.name == "wsd":
        what = (
            f"the stable phase lasts until step {longer.decay_start:,}, then the {spec.decay_steps:,}-step decay runs "
            f"again and ends at step {steps:,}"
        )
    else:
        what = f"the {spec.name} decay is stretched to end at step {steps:,}"
    return (
        f"{what}; steps before {at:,} keep the rates they trained with, and at step {at:,} the rate goes from "
        f"{before:.3g} to {after:.3g}"
    )
