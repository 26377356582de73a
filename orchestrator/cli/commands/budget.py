"""`orch submit --dry-run --nodes 1,2,4,8` (one priced row per node count) and `orch budget` (an account's node-hours
against its allocation), and the warning `orch submit` gives when a plan needs more than the account has left."""

import json
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from rich.console import Console
from rich.table import Table

from orchestrator.cli.executors import from_frozen_code, job_script
from orchestrator.cli.show import show_warnings
from orchestrator.cli.submit import Request, build_request
from orchestrator.core import goodput
from orchestrator.core.budget import (
    CHEAPEST,
    EARLIEST,
    Budget,
    Shape,
    budget_of,
    by_account,
    failure_rate,
    marks,
    measured_speed,
    priced,
    run_costs,
)
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import Override
from orchestrator.core.plan import STARTUP_MIN
from orchestrator.core.rundir import Run
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.settings import runs_location
from orchestrator.core.yamlio import shown

States = Callable[[], list[tuple[Run, str]]]  # every run and its state as `orch status` sees it, asked when needed
UNREADABLE = ("damaged", "unknown")
NO_ACCOUNT = "runs without an account"
COLUMNS = (
    "nodes", "tokens/s", "wall time", "allocations", "node-h", "failures", "lost node-h", "Slurm's start hint",
    "expected finish", "",
)  # fmt: skip


def when(seconds: float | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def hours(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


# --- what-if plans ---------------------------------------------------------------------------------------------------


def shapes_of(
    profile: str,
    recipe: str | None,
    steps: int,
    overrides: list[Override],
    counts: list[int],
    states: States,
    now: float,
) -> tuple[list[Shape], list[Request], str]:
    """Each node count planned and priced (a count that cannot run: refused, with the reason), the requests that could
    run, and the failure rate used. Refused as a whole where no count can run."""
    requests: dict[int, Request] = {}
    refused: dict[int, str] = {}
    for nodes in counts:
        try:
            requests[nodes] = build_request(
                profile, recipe, steps, [*overrides, Override("profile", "nodes", nodes, "--nodes")]
            )
        except OrchError as err:
            refused[nodes] = str(err)
    if not requests:
        nodes, why = next(iter(refused.items()))
        raise OrchError(f"No node count of --nodes {','.join(map(str, counts))} can run; at {nodes}: {why}")
    first = next(iter(requests.values()))
    same = {}  # the earlier runs of this profile, with their goodput accounting
    for run, state in states():
        try:
            if state not in UNREADABLE and run.info.profile == first.info["profile"]:
                same[run] = goodput.of_run(run, state, now)
        except (OrchError, OSError):
            continue  # a run whose files cannot be read tells nothing here
    speed = measured_speed(list(same), first.info["profile"], first.info["recipe"])
    rate = failure_rate(list(same.values()))
    shapes = [
        priced(n, r.plan, speed, rate, start_hint(r), r.recipe.checkpoint.every_steps) for n, r in requests.items()
    ]
    shapes += [Shape(n, None, refused=why) for n, why in refused.items()]
    return sorted(shapes, key=lambda s: counts.index(s.nodes)), list(requests.values()), rate.describe()


def start_hint(request: Request):
    """The scheduler's guess of the start of the job this request would queue, asked with its exact script."""
    profile = request.profile
    run_dir = runs_location(profile) / "RUN_ID"
    script = job_script(from_frozen_code(profile, run_dir / "code"), request.plan, run_dir)
    return scheduler_of(profile.executor).start_hint(script)


def show_whatif(
    profile: str,
    recipe: str | None,
    steps: int,
    overrides: list[Override],
    counts: list[int],
    states: States,
    console: Console,
) -> None:
    """One row per node count, the earliest finish and the fewest node-hours marked, then what the figures rest on."""
    now = time.time()
    shapes, requests, rate = shapes_of(profile, recipe, steps, overrides, counts, states, now)
    first = requests[0]
    marked = marks(shapes, now)
    rows = [[*row(shape, now), ", ".join(marked.get(shape.nodes, []))] for shape in shapes]
    title = f"What-if: {first.info['profile']} / {first.info['recipe']}, {steps:,} steps (dry run: nothing submitted)"
    console.print(title, style="bold", highlight=False)
    for line in aligned([list(COLUMNS), *rows]):
        console.print(line, soft_wrap=True, highlight=False, markup=False)  # a row per line, however wide
    show_warnings(requests, console)
    for line in legend(shapes, rate, first):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def aligned(rows: list[list[str]]) -> list[str]:
    """Plain columns, numbers to the right: a table that copies as it prints."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    left = {COLUMNS.index("Slurm's start hint"), len(COLUMNS) - 1}
    return [
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def row(shape: Shape, now: float) -> list[str]:
    if shape.plan is None:
        return [str(shape.nodes), "impossible", *["-"] * 7]
    plan = shape.plan
    hint = shape.start.start if shape.start else None
    return [
        str(shape.nodes),
        "-" if not plan.tokens_per_s else f"{plan.tokens_per_s:,.0f}",
        "-" if shape.wall_h is None else f"{shape.wall_h:,.1f} h",
        str(plan.allocations) if shape.wall_h is not None else "-",
        hours(shape.node_hours),
        "-" if shape.wall_h is None else f"{shape.failures:.2f}",
        "-" if shape.wall_h is None else hours(shape.lost_node_hours),
        when(hint) if hint is not None else "none (below)",
        when(shape.finish(now)),
    ]


def legend(shapes: list[Shape], rate: str, request: Request) -> list[str]:
    """What each column rests on, each refused node count's reason and each start hint that did not come."""
    costed = [s for s in shapes if s.plan is not None]
    every = request.recipe.checkpoint.every_steps
    lines = [
        f"tokens/s: {'; '.join(dict.fromkeys(s.speed_source for s in costed))}.",
        f"wall time: training at that rate and {STARTUP_MIN} min of start-up per allocation of "
        f"{request.profile.time_limit_min / 60:g} h; node-h: nodes × wall time.",
        f"failures: expected at {rate}; each loses half a checkpoint interval ({every:,} steps) and a restart "
        f"({STARTUP_MIN} min): lost node-h.",
        f"{EARLIEST}: Slurm's start hint (else now), wall time and the time failures lose; waits in the queue after a "
        f"requeue come on top. {CHEAPEST}: node-h and lost node-h.",
        "Slurm's start hint: what `sbatch --test-only` answers from the queue now, a hint and not a promise.",
    ]
    for note in dict.fromkeys(s.start.note for s in costed if s.start and s.start.start is None):
        lines.append(f"no start hint: {note}")
    lines += [f"{s.nodes} node(s) impossible: {s.refused}" for s in shapes if s.plan is None]
    return lines


# --- the budget ------------------------------------------------------------------------------------------------------


def parse_since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").timestamp()
    except ValueError:
        raise OrchError(f"--since {shown(text)}: allowed: a date as YYYY-MM-DD, e.g. 2026-01-01.") from None


def check_allocation(value: float | None) -> None:
    if value is not None and not (0 < value < math.inf):
        raise OrchError(f"--allocation {value:g}: allowed: the account's node-hours, a number above 0.")


def budgets(
    states: States, account: str | None, allocation: float | None, since: float | None, now: float
) -> tuple[list[Budget], list[str]]:
    """The budget of the named account, else of every account orch's runs used, and the runs left out."""
    costs, skipped = run_costs(states(), now)
    groups = by_account(costs)
    if account is not None:
        named = [a for a in groups if a is not None and a.lower() == account.lower()]
        if named:
            groups = {named[0]: groups[named[0]]}
        elif account.lower() in (scheduler_of("slurm").accounts() or set()):
            groups = {account: []}
        else:
            used = ", ".join(a for a in groups if a is not None) or "none"
            raise OrchError(
                f"--account {shown(account)}: no run of orch used this account (the accounts its runs used: {used}), "
                "and Slurm's accounting does not know it (or does not answer here). Allowed: an account a run was "
                "submitted with (--account or the profile's slurm.account), or leave --account out for all of them."
            )
    if allocation is not None and len(groups) > 1:
        raise OrchError(
            f"--allocation {allocation:g} is one account's: orch's runs used {len(groups)} accounts "
            f"({', '.join(a or NO_ACCOUNT for a in groups)}); name one with --account."
        )
    return [budget_of(a, group, allocation, since, now) for a, group in groups.items()], skipped


def show_budget(
    states: States,
    account: str | None,
    allocation: float | None,
    since_text: str | None,
    as_json: bool,
    console: Console,
) -> None:
    check_allocation(allocation)
    since = parse_since(since_text)
    found, skipped = budgets(states, account, allocation, since, time.time())
    if as_json:
        print(json.dumps({"accounts": [b.as_dict() for b in found], "runs_left_out": skipped}, indent=2))
        return
    if not found:
        console.print("No runs yet: nothing has been spent.", highlight=False)
    for budget in found:
        show_one(budget, console)
    if skipped:
        console.print(f"Left out (unreadable): {'; '.join(skipped)}", highlight=False, markup=False, soft_wrap=True)


def show_one(budget: Budget, console: Console) -> None:
    live = sum(r.live for r in budget.runs)
    name = budget.account or NO_ACCOUNT
    table = Table(title=f"{name}: {len(budget.runs)} run(s) of orch, {live} in flight", title_justify="left")
    for column, justify in ((" ", "left"), ("node-h", "right"), ("what", "left")):
        table.add_column(column, justify=justify)
    table.add_row("spent", hours(budget.spent), "allocated to orch's runs that ended (their goodput accounting)")
    table.add_row("in flight", hours(budget.in_flight), "allocated so far to orch's runs queued or running")
    table.add_row("planned", hours(budget.planned), "what those still need for their steps")
    scheduler = budget.usage.node_hours
    table.add_row("Slurm", hours(scheduler), budget.usage.note + (f" ({budget.usage.jobs} jobs)" if scheduler else ""))
    table.add_row("allocation", hours(budget.allocation), budget.allocation_source)
    if budget.left is not None:
        source = "Slurm's total" if scheduler is not None else "orch's runs (spent and in flight)"
        table.add_row("left", hours(budget.left), f"allocation minus {source}")
        table.add_row("left after planned", hours(budget.left - budget.planned), "")
    console.print(table)
    since = when(budget.since)
    rate = f"burn rate: {budget.burn_per_day:,.1f} node-h/day since {since}"
    out = budget.runs_out
    if out is None:
        ending = "no allocation to run out of" if budget.allocation is None else "nothing burnt yet"
    elif out <= budget.now:
        ending = "the allocation is spent"
    else:
        ending = f"at this rate the allocation runs out on {when(out)}"
    console.print(f"{rate}; {ending}.", highlight=False, soft_wrap=True)


def allocation_warnings(requests: Sequence[Request], states: States) -> list[str]:
    """A warning for each account whose allocation (the profile's slurm.allocation_node_hours) has less left, after
    what its live runs still need, than these plans need."""
    needs: dict[str, tuple[float, float]] = {}
    for request in requests:
        slurm = request.profile.slurm
        node_hours = Shape(request.plan.nodes, request.plan).node_hours
        if slurm is None or slurm.account is None or slurm.allocation_node_hours is None or node_hours is None:
            continue
        need, _ = needs.get(slurm.account, (0.0, slurm.allocation_node_hours))
        needs[slurm.account] = (need + node_hours, slurm.allocation_node_hours)
    if not needs:
        return []
    now = time.time()
    costs, _ = run_costs(states(), now)
    warnings = []
    for account, (need, allocation) in needs.items():
        budget = budget_of(account, [c for c in costs if c.account == account], allocation, None, now)
        left = budget.left - budget.planned
        if need > left:
            warnings.append(
                f"Warning: the plan needs {need:,.0f} node-hours, and account {account} has {left:,.0f} left of its "
                f"{allocation:,.0f} (slurm.allocation_node_hours) after the {budget.planned:,.0f} its runs in flight "
                f"still need. `orch budget --account {account}` shows where they went."
            )
    return warnings
