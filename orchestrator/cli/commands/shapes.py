"""What a node range may be granted (`orch submit --nodes MIN-MAX [--time-min T]`): per node count of the range, the
job's ranks, gradient accumulation and tokens/s, and Slurm's start hint for that shape and for the range as asked
(docs/goodput.md#backfill-shaped-jobs)."""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console

from orchestrator.cli.commands.budget import start_hint, when
from orchestrator.cli.submit import Request
from orchestrator.core.plan import fewest_nodes, shape_plans, shortest_limit_min
from orchestrator.core.schedulers.base import StartHint


def fixed(request: Request, nodes: int) -> Request:
    """The request of one shape of the range: exactly `nodes` nodes, the range's minimum time kept."""
    profile = request.profile
    slurm = profile.slurm.model_copy(update={"nodes_min": None}) if profile.slurm else None
    shape = profile.model_copy(update={"nodes": nodes, "slurm": slurm})
    return replace(request, profile=shape, plan=shape_plans(shape, request.plan)[nodes])


def hint_text(hint: StartHint) -> str:
    return f"{when(hint.start)} ({hint.note})" if hint.start is not None else f"none: {hint.note}"


def show_shapes(request: Request, console: Console) -> None:
    """One line per node count of the range, then the range as it is submitted."""
    profile = request.profile
    fewest, limit = fewest_nodes(profile), shortest_limit_min(profile)
    console.print(
        f"Node range {fewest}-{profile.nodes}, time limit {limit:g}-{profile.time_limit_min:g} min: the job trains "
        "on the shape it is granted (same samples per step, its own gradient accumulation)",
        style="bold", highlight=False, soft_wrap=True,
    )  # fmt: skip
    rows = [["nodes", "ranks", "grad accum", "tokens/s", "Slurm's start hint"]]
    for nodes in range(fewest, profile.nodes + 1):
        shape = fixed(request, nodes)
        plan = shape.plan
        speed = f"{plan.tokens_per_s:,.0f}" if plan.tokens_per_s else "-"
        rows.append([str(nodes), str(plan.world_size), str(plan.grad_accum), speed, hint_text(start_hint(shape))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.rjust(w) if i < 4 else cell for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        console.print(line.rstrip(), soft_wrap=True, highlight=False, markup=False)
    console.print(
        f"as asked ({fewest}-{profile.nodes} nodes): {hint_text(start_hint(request))}; sbatch --test-only's hint "
        "from the queue now, not a promise. tokens/s: the planner's estimate (- without the GPU's peak).",
        soft_wrap=True, highlight=False, markup=False,
    )  # fmt: skip
