"""The shapes `orch submit --nodes` asks for, read in one place (a number, a range MIN-MAX, or a what-if's list
N1,N2,...), and what a node range may be granted (`orch submit --nodes MIN-MAX [--time-min T]`): per node count of
the range, the job's ranks, gradient accumulation and tokens/s, and Slurm's start hint for that shape and for the
range as asked (docs/goodput.md#backfill-shaped-jobs)."""

from dataclasses import dataclass, replace

from rich.console import Console

from orchestrator.cli.commands.budget import start_hint, when
from orchestrator.cli.submit import Request
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import fewest_nodes, shape_plans, shortest_limit_min
from orchestrator.core.schedulers.base import StartHint
from orchestrator.core.yamlio import shown


@dataclass(frozen=True)
class NodesAsked:
    """`--nodes` as given: one count, a range (`low` to `counts[0]`), or several counts for a what-if to price."""

    counts: list[int]
    low: int | None = None  # a range's minimum: Slurm may start the job on any count from it to counts[0]


def parse_nodes(text: str) -> NodesAsked:
    """`--nodes N`, `MIN-MAX` (two whole numbers, 0 < MIN < MAX) or `N1,N2,...` (distinct positive counts)."""
    if "-" in text:
        low, _, high = (part.strip() for part in text.partition("-"))
        if not (low.isdigit() and high.isdigit() and 0 < int(low) < int(high)):
            raise OrchError(
                f"--nodes {shown(text)}: a node range is MIN-MAX, two whole numbers with 0 < MIN < MAX (e.g. 1-4): "
                "Slurm starts the job on any count in it that it can grant first. Allowed: a range, a number of nodes "
                "(e.g. 2), or with --dry-run a list of numbers separated by commas (e.g. 1,2,4,8)."
            )
        return NodesAsked([int(high)], int(low))
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts) or len(set(parts)) != len(parts):
        raise OrchError(
            f"--nodes {shown(text)}: allowed: a number of nodes (e.g. 2), or with --dry-run a list of distinct "
            "numbers separated by commas (e.g. 1,2,4,8) to compare them."
        )
    return NodesAsked([int(part) for part in parts])


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
