"""The learning-rate curve of a plan as a small PNG: what `orch submit --dry-run` (one curve per sweep point) and
`orch resume --beyond-schedule extend` draw."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core.config import Recipe
from orchestrator.core.schedule import key_steps, lr_factor

SAMPLES = 500  # points per curve: smooth at the PNG's width


def plot_schedules(curves: dict[str, Recipe], steps: int, path: Path) -> Path:
    """One curve per recipe (labelled by its key) over the run's `steps` and the schedules' ends, with the run's end
    marked; written to `path` (its folder made)."""
    from orchestrator.tools.compare import figure

    end = max([steps, *(recipe.schedule.total_steps for recipe in curves.values())])
    fig, ax = figure("Learning-rate schedule", "learning rate")
    fig.set_size_inches(7, 3.5)
    for label, recipe in curves.items():
        spec, peak = recipe.schedule, recipe.optimizer.lr
        xs = sorted({*(end * i // SAMPLES for i in range(SAMPLES + 1)), *key_steps(spec, steps)})
        ax.plot(xs, [peak * lr_factor(x, spec) for x in xs], label=label)
    ax.axvline(steps, color="grey", linestyle="--", linewidth=1, label=f"--steps {steps:,}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
