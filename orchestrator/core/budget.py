"""What-if plans and the node-hour budget of an account (docs/goodput.md, "What-if plans and the budget").

A what-if plan prices one run at several node counts: tokens/s (measured by an earlier run of the same profile and
recipe where one trained, else the planner's), wall time, allocations, node-hours, the work that failures are
expected to lose at the failure rate earlier runs of the profile observed (else goodput's prior), and when the run
would finish if submitted now (the scheduler's start hint on top). The budget of an account adds up the node-hours
its runs were allocated (their goodput accounting), splits off those of runs still in flight and what those still
need to train, and weighs them against the account's allocation. Arithmetic over run directories and the
scheduler's answers; nothing heavy is imported.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from orchestrator.core import goodput
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.config import Profile
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import STARTUP_MIN, Plan, make_plan
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import SPOOL, spool_entries
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.schedulers.base import StartHint, Usage

DAY_S = 86400.0
MIN_BURN_WINDOW_S = 3600.0  # a burn rate over less than an hour would extrapolate a start-up's minutes to days

# --- what-if plans ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speed:
    """Tokens/s per rank that an earlier run of the same profile and recipe measured: the median over its steps."""

    per_rank: float
    run_id: str
    world_size: int


def measured_speed(runs: list[Run], profile: str, recipe: str) -> Speed | None:
    """From the newest of `runs` (oldest first) submitted with these profile and recipe names that trained steps."""
    for run in reversed(runs):
        if (run.info.profile, run.info.recipe) != (profile, recipe):
            continue
        rates = [e["metrics"]["tokens_per_s"] for e in spool_entries(run.dir / SPOOL) if "tokens_per_s" in e["metrics"]]
        if rates:
            world = run.profile().world_size
            return Speed(statistics.median(rates) / world, run.id, world)
    return None


@dataclass(frozen=True)
class FailureRate:
    """Failures and preemptions per allocated device-hour, as earlier runs observed them, else goodput's prior."""

    interruptions: int
    device_hours: float  # allocated to the runs observed

    @property
    def prior(self) -> bool:
        return not self.interruptions

    @property
    def per_device_hour(self) -> float:
        if self.prior:
            return 1 / goodput.PRIOR_DEVICE_HOURS_PER_INTERRUPTION
        return self.interruptions / self.device_hours

    def describe(self) -> str:
        if self.prior:
            return (
                f"one per {goodput.PRIOR_DEVICE_HOURS_PER_INTERRUPTION:,.0f} device-hours, goodput's prior (Llama 3's "
                f"rate): earlier runs of the profile observed no failure in {self.device_hours:,.1f} device-hours"
            )
        return (
            f"one per {1 / self.per_device_hour:,.1f} device-hours, as earlier runs of the profile observed: "
            f"{self.interruptions} failure(s)/preemption(s) in {self.device_hours:,.1f} device-hours"
        )


def failure_rate(accounted: list[tuple[goodput.History, goodput.Goodput]]) -> FailureRate:
    """The rate of the runs' goodput accounting: their interruptions over their allocated device-hours."""
    return FailureRate(sum(h.interruptions for h, _ in accounted), sum(g.allocated_h for _, g in accounted))


@dataclass(frozen=True)
class Shape:
    """The run at one node count: its plan (None: that node count cannot run, `refused` says why), priced."""

    nodes: int
    plan: Plan | None
    refused: str = ""
    speed_source: str = ""  # where tokens/s comes from
    failures: float = 0.0  # expected over the run
    lost_h: float = 0.0  # wall hours they are expected to lose
    start: StartHint | None = None

    @property
    def wall_h(self) -> float | None:
        """Training at the row's tokens/s and one start-up per allocation; None without tokens/s."""
        if self.plan is None or not self.plan.hours:
            return None
        return self.plan.hours + self.plan.allocations * STARTUP_MIN / 60

    @property
    def node_hours(self) -> float | None:
        return None if self.wall_h is None else self.nodes * self.wall_h

    @property
    def lost_node_hours(self) -> float:
        return self.nodes * self.lost_h

    @property
    def expected_node_hours(self) -> float | None:
        """What the run is expected to be charged: its node-hours and those failures lose."""
        return None if self.node_hours is None else self.node_hours + self.lost_node_hours

    def finish(self, now: float) -> float | None:
        """Submitted now: the scheduler's start hint (else now), the wall time and the time failures lose."""
        if self.wall_h is None:
            return None
        start = self.start.start if self.start and self.start.start is not None else now
        return max(start, now) + (self.wall_h + self.lost_h) * 3600


def priced(
    nodes: int, plan: Plan, speed: Speed | None, rate: FailureRate, start: StartHint | None, every_steps: int
) -> Shape:
    """The shape of `plan` at the measured speed where there is one; failures each lose half a checkpoint interval
    (`every_steps`) of work and a restart."""
    if speed is not None:
        plan = replace(plan, tokens_per_s=speed.per_rank * plan.world_size)
        source = f"measured by run {speed.run_id} ({speed.per_rank:,.0f} per rank at {speed.world_size} ranks)"
    elif plan.tokens_per_s:
        source = f"the planner's: {plan.mfu:.0%} MFU ({plan.mfu_source})"
    else:
        source = "no estimate: the profile gives no GPU peak and no earlier run measured this recipe"
    shape = Shape(nodes, plan, speed_source=source, start=start)
    if shape.wall_h is None:
        return shape
    failures = rate.per_device_hour * plan.world_size * shape.wall_h
    per_failure_h = every_steps * plan.step_s / 3600 / 2 + STARTUP_MIN / 60
    return replace(shape, failures=failures, lost_h=failures * per_failure_h)


EARLIEST = "earliest finish"
CHEAPEST = "fewest node-hours"


def marks(shapes: list[Shape], now: float) -> dict[int, list[str]]:
    """By node count: the shape with the earliest expected finish and the one with the fewest expected node-hours
    (node-hours and those failures lose); on a tie, the fewer nodes."""
    costed = [s for s in shapes if s.wall_h is not None]
    if not costed:
        return {}
    found: dict[int, list[str]] = {}
    for mark, key in ((EARLIEST, lambda s: s.finish(now)), (CHEAPEST, lambda s: s.expected_node_hours)):
        found.setdefault(min(costed, key=lambda s: (key(s), s.nodes)).nodes, []).append(mark)
    return found


# --- the budget of an account ----------------------------------------------------------------------------------------


def account_of(profile: Profile) -> str | None:
    return profile.slurm.account if profile.slurm else None


@dataclass(frozen=True)
class RunCost:
    """One run's node-hours: allocated so far (its goodput accounting) and, while it is live, those its steps left
    still need."""

    run_id: str
    account: str | None
    executor: str
    live: bool
    node_hours: float
    remaining_node_hours: float
    created: float
    allocation_node_hours: float | None  # its profile's slurm.allocation_node_hours


def run_cost(run: Run, state: str, now: float) -> RunCost:
    profile = run.profile()
    history, accounted = goodput.of_run(run, state, now)
    live = state in goodput.LIVE
    return RunCost(
        run_id=run.id,
        account=account_of(profile),
        executor=profile.executor,
        live=live,
        node_hours=accounted.allocated_h / history.devices_per_node,
        remaining_node_hours=remaining_node_hours(run, profile, history) if live else 0.0,
        created=run.info.created,
        allocation_node_hours=profile.slurm.allocation_node_hours if profile.slurm else None,
    )


def remaining_node_hours(run: Run, profile: Profile, history: goodput.History) -> float:
    """The steps after the newest checkpoint up to the run's length, at its median measured step time (else the
    planner's), on its nodes."""
    left = max(0, run.info.steps - (committed_step(run.checkpoints_dir) or 0))
    measured = [s.step_s for s in history.steps if s.step_s > 0]
    step_s = statistics.median(measured) if measured else make_plan(profile, run.recipe(), run.info.steps).step_s
    return left * step_s * profile.nodes / 3600


@dataclass(frozen=True)
class Budget:
    """An account's node-hours against its allocation, at `now`, counted from `since`."""

    account: str | None
    runs: list[RunCost]
    allocation: float | None
    allocation_source: str
    usage: Usage  # the scheduler's accounting: every job of the account
    since: float
    now: float

    @property
    def spent(self) -> float:
        """Allocated to runs that ended."""
        return sum(r.node_hours for r in self.runs if not r.live)

    @property
    def in_flight(self) -> float:
        """Allocated so far to runs still queued, running or stalled."""
        return sum(r.node_hours for r in self.runs if r.live)

    @property
    def planned(self) -> float:
        """What the live runs still need to train their steps."""
        return sum(r.remaining_node_hours for r in self.runs)

    @property
    def used(self) -> float:
        """The scheduler's total where its accounting answers (every job of the account), else orch's runs'."""
        return self.usage.node_hours if self.usage.node_hours is not None else self.spent + self.in_flight

    @property
    def left(self) -> float | None:
        return None if self.allocation is None else self.allocation - self.used

    @property
    def burn_per_day(self) -> float:
        """Node-hours a day since `since`."""
        return self.used / max(self.now - self.since, MIN_BURN_WINDOW_S) * DAY_S

    @property
    def runs_out(self) -> float | None:
        """When the allocation is spent at the burn rate (now where it is); None without an allocation or a burn."""
        if self.left is None or not self.burn_per_day:
            return None
        return self.now + max(self.left, 0.0) / self.burn_per_day * DAY_S

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "runs": len(self.runs),
            "runs_in_flight": sum(r.live for r in self.runs),
            "spent_node_hours": self.spent,
            "in_flight_node_hours": self.in_flight,
            "planned_node_hours": self.planned,
            "scheduler_node_hours": self.usage.node_hours,
            "scheduler_jobs": self.usage.jobs,
            "scheduler_note": self.usage.note,
            "used_node_hours": self.used,
            "allocation_node_hours": self.allocation,
            "allocation_source": self.allocation_source,
            "left_node_hours": self.left,
            "left_after_planned_node_hours": None if self.left is None else self.left - self.planned,
            "since": self.since,
            "burn_node_hours_per_day": self.burn_per_day,
            "runs_out": self.runs_out,
        }


def by_account(costs: list[RunCost]) -> dict[str | None, list[RunCost]]:
    """The runs' costs grouped by account (None: runs without one, such as local runs), in order of first use."""
    groups: dict[str | None, list[RunCost]] = {}
    for cost in costs:
        groups.setdefault(cost.account, []).append(cost)
    return groups


def allocation_of(costs: list[RunCost], given: float | None) -> tuple[float | None, str]:
    """The allocation given on the command line, else the one the newest run's profile names."""
    if given is not None:
        return given, "--allocation"
    named = next((c for c in reversed(costs) if c.allocation_node_hours is not None), None)
    if named is None:
        return None, "none given: pass --allocation NODE_HOURS or set slurm.allocation_node_hours in the profile"
    return named.allocation_node_hours, f"slurm.allocation_node_hours of run {named.run_id}'s profile"


YEAR_S = 365 * DAY_S


def run_costs(states: list[tuple[Run, str]], now: float) -> tuple[list[RunCost], list[str]]:
    """Each run's cost, from the runs and their states as `orch status` sees them; a run whose files cannot be read
    (or whose scheduler did not answer) is left out with the reason."""
    costs, skipped = [], []
    for run, state in states:
        if state in ("damaged", "unknown"):
            skipped.append(f"{run.id} ({state})")
            continue
        try:
            costs.append(run_cost(run, state, now))
        except (OrchError, OSError) as err:
            skipped.append(f"{run.id} ({err})")
    return costs, skipped


def budget_of(
    account: str | None, costs: list[RunCost], given: float | None, since: float | None, now: float
) -> Budget:
    """The account's budget from its runs' costs, the allocation given (else its profiles'), counted from `since`
    (else its first run's creation; a year back without runs) and the scheduler's accounting of the account."""
    allocation, source = allocation_of(costs, given)
    since = since if since is not None else min((c.created for c in costs), default=now - YEAR_S)
    if account is None:
        usage = Usage(None, 0, "runs without an account (local ones): no accounting to ask")
    else:
        usage = scheduler_of(costs[-1].executor if costs else "slurm").usage(account, since)
    return Budget(account, costs, allocation, source, usage, since, now)
