"""Goodput: where every allocated device-hour of a run went, read from its run directory (docs/goodput.md).

An allocation is one start of a job (an entry of attempts.json). It spans from its start (the job's process start) to
the job's next start (a requeue), or where the job ended, to its end (its stop, else its last sign of life): the time
until another job of the run starts is not allocated. The newest runs to now while the run is running, stalled or
queued on its job. Times its devices (nodes × GPUs per node; ranks on CPU profiles), its time went to:

- startup: from the start to the first step;
- counted: the compute of steps whose results survive (in metrics.jsonl, at or before the newest checkpoint);
- uncommitted: the compute of steps after the newest checkpoint (they count once one commits; a failure loses them);
- rolled back: the compute of steps a resume discarded (rolled_back.jsonl);
- data wait, evaluation, checkpoint stall: what each step's metrics measured (`data_wait_fraction`, `eval_s`,
  `checkpoint_stall_s`);
- other: the rest of the job's life (per-step bookkeeping, the final save and exit);
- after last commit: where a job stopped itself at its deadline (deadline.json), from the commit of the save it
  stopped with to the allocation's end: its exit, and a requeue's wait for the next start;
- idle: from the job's last sign of life (its last step, heartbeat, stop or failure report) to its next start, or
  to the watchdog's stop of a hung job;
- not recorded: time in allocations of jobs that measured none of this (jobs from before it existed).

Goodput = counted / allocated. Pure functions over the run's typed files; nothing heavy is imported.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from orchestrator.core import deadline
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.config import CheckpointSpec
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import ROLLED_BACK, SPOOL, Attempt, spool_entries

PARTS = (
    "startup",
    "counted",
    "uncommitted",
    "rolled_back",
    "data_wait",
    "evaluation",
    "checkpoint_stall",
    "other",
    "after_last_commit",
    "idle",
    "not_recorded",
)
ALWAYS_MEASURED = ("counted", "uncommitted", "data_wait", "not_recorded")  # every job's metrics had these
MARKER = "checkpoint_stall_s"  # every step of a job that measures its parts carries it
# Without an observed interruption: Llama 3's 419 unexpected interruptions in 54 days on 16,384 H100 GPUs
# (The Llama 3 Herd of Models, 2024, section 3.3.4), about one per 50,000 GPU-hours, scaled to the run's devices.
PRIOR_DEVICE_HOURS_PER_INTERRUPTION = 50_000.0
Fate = Literal["counted", "uncommitted", "rolled_back"]
LIVE = ("running", "stalled", "queued")  # states in which the newest allocation's span is still open


class Step(NamedTuple):
    """One trained step as its spooled metrics tell it (seconds; `end` is when it was spooled). A tuple: a run has
    hundreds of thousands."""

    step: int
    end: float
    step_s: float
    data_wait_s: float
    eval_s: float
    stall_s: float | None  # None: the job did not measure stalls (nor evaluation time)
    fate: Fate

    @property
    def start(self) -> float:
        return self.end - self.step_s - self.eval_s

    @property
    def compute_s(self) -> float:
        return self.step_s - self.data_wait_s


def step_of(entry: dict[str, Any], fate: Fate) -> Step:
    """A spool line as a Step; the stall on a step is the wait in the save after the step before it (the job spools a
    step's metrics before saving)."""
    metrics = entry["metrics"]
    step_s = float(metrics.get("step_time_s", 0.0))
    return Step(
        step=entry["step"],
        end=entry["time_ms"] / 1000,
        step_s=step_s,
        data_wait_s=float(metrics.get("data_wait_fraction", 0.0)) * step_s,
        eval_s=float(metrics.get("eval_s", 0.0)),
        stall_s=float(metrics[MARKER]) if MARKER in metrics else None,
        fate=fate,
    )


@dataclass
class History:
    """What the accounting reads from a run directory."""

    attempts: list[Attempt]
    steps: list[Step]
    signs: list[float]  # other times a job was seen alive: heartbeats, stops, failure reports (and now, if running)
    devices_per_node: int
    device: str  # "GPU", or "CPU rank" on profiles without GPUs
    interruptions: int  # allocations that ended by a failure or a preemption
    checkpoint: CheckpointSpec  # the recipe's
    newest_job: str | None = None  # the run's newest job: only its allocation can still be open
    commits: list[float] = field(default_factory=list)  # when the saves jobs stopped with at a deadline committed


def read_history(run: Run, state: str, now: float, committed: int | None = None) -> History:
    """The run's history as `orch status` sees it in `state`; `committed` overrides the newest committed step (a job
    accounting for itself just before its final save)."""
    profile, recipe, attempts = run.profile(), run.recipe(), run.attempts
    committed = committed_step(run.checkpoints_dir) if committed is None else committed
    kept = spool_entries(run.dir / SPOOL)
    spooled = {(e["step"], e["time_ms"]) for e in kept}
    steps = [step_of(e, "counted" if committed is not None and e["step"] <= committed else "uncommitted") for e in kept]
    rolled_back = {(e["step"], e["time_ms"]): e for e in spool_entries(run.dir / ROLLED_BACK)}
    steps += [step_of(e, "rolled_back") for key, e in rolled_back.items() if key not in spooled]
    progress, jobs = run.progress, run.jobs
    cancelled = {j.job_id for j in jobs if j.cancelled}
    # a stop is a sign of life, except a watchdog's: the job had hung since its last step
    signs = [a.stopped for a in attempts if a.stopped and a.ended != "hang"] + ([progress.updated] if progress else [])
    signs += [f.time for job in {a.job_id for a in attempts} for f in run.failures(job)]
    if state == "running":
        signs.append(now)
    judged = attempts[:-1] if state in ("running", "completed") else attempts  # the newest has not failed (yet)
    interruptions = sum(not planned(a) and a.job_id not in cancelled for a in judged)
    gpus = profile.node.gpus
    return History(
        attempts=attempts,
        steps=sorted(steps, key=lambda s: s.end),
        signs=signs,
        devices_per_node=gpus or profile.launch.tasks_per_node,
        device="GPU" if gpus else "CPU rank",
        interruptions=interruptions,
        checkpoint=recipe.checkpoint,
        newest_job=jobs[-1].job_id if jobs else None,
        commits=deadline.commits(deadline.read_records(run.dir)),
    )


def planned(attempt: Attempt) -> bool:
    """Ended by a requeue at the time limit or by completing (a stop without a cause): not a failure, a preemption or
    a hang."""
    return attempt.ended == "requeued" or (attempt.ended is None and attempt.stopped is not None)


@dataclass(frozen=True)
class Goodput:
    device: str
    allocated_h: float  # device-hours
    wall_h: float  # hours the allocations spanned
    parts_h: dict[str, float | None]  # device-hours; None: no job of the run measured this part
    steps: dict[str, int]  # steps counted, uncommitted, rolled back

    @property
    def percent(self) -> float | None:
        return 100 * self.parts_h["counted"] / self.allocated_h if self.allocated_h else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "device": self.device,
            "allocated_h": self.allocated_h,
            "wall_h": self.wall_h,
            "parts_h": self.parts_h,
            "steps": self.steps,
            "parts_not_recorded": [part for part, hours in self.parts_h.items() if hours is None],
        }

    def metrics(self) -> dict[str, float]:
        """For MLflow: goodput/percent, goodput/allocated_h and goodput/<part>_h of the parts measured."""
        measured = {f"goodput/{part}_h": hours for part, hours in self.parts_h.items() if hours is not None}
        percent = {} if self.percent is None else {"goodput/percent": self.percent}
        return {**percent, "goodput/allocated_h": self.allocated_h, **measured}


@dataclass
class Tally:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))  # device-seconds
    measured: set[str] = field(default_factory=lambda: set(ALWAYS_MEASURED))
    steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("counted", "uncommitted", "rolled_back"), 0))

    def add(self, part: str, seconds: float, devices: int) -> None:
        self.seconds[part] += seconds * devices
        self.measured.add(part)


def account(history: History, until: float | None) -> Goodput:
    """The breakdown; `until`: now while the run is in a LIVE state (its newest allocation's span is still open), else
    None."""
    tally, wall_s, allocated_s = Tally(), 0.0, 0.0
    tally.measured.add("after_last_commit")  # zero where no job stopped at a deadline
    attempts, ends = history.attempts, [s.end for s in history.steps]  # steps are in the order they ended
    for k, attempt in enumerate(attempts):
        start, devices = attempt.start, attempt.nodes * history.devices_per_node
        following = attempts[k + 1] if k + 1 < len(attempts) else None
        next_start = following.start if following else math.inf
        steps = history.steps[bisect.bisect_left(ends, start) : bisect.bisect_left(ends, next_start)]
        last_seen = max([start, *(t for t in history.signs if start <= t < next_start), *(s.end for s in steps)])
        if following is not None and following.job_id == attempt.job_id:
            end = next_start  # the job requeued: its wait and restart are its own
        elif following is None and until is not None and attempt.job_id == history.newest_job:
            end = until
        else:  # the job ended (a hang at its stop, after its last sign of life); a later job is a new allocation
            end = min(next_start, max(last_seen, attempt.stopped or last_seen))
        wall_s, allocated_s = wall_s + end - start, allocated_s + (end - start) * devices
        commit = max((c for c in history.commits if start <= c <= end), default=None)
        allocation(tally, steps, start, last_seen, end, devices, commit)
    hours = {part: tally.seconds[part] / 3600 if part in tally.measured else None for part in PARTS}
    return Goodput(history.device, allocated_s / 3600, wall_s / 3600, hours, tally.steps)


def allocation(
    tally: Tally, steps: list[Step], start: float, last_seen: float, end: float, devices: int, commit: float | None
) -> None:
    """One allocation's share of the parts. A job that measured its parts (every step carries a stall) gets the full
    breakdown; an older one only what every job's metrics had, the rest of its span is not recorded. `commit`: when
    the save the job stopped with at its deadline committed, if it did."""
    compute, stepping, evaluating, stalled, measured = dict.fromkeys(tally.steps, 0.0), 0.0, 0.0, 0.0, True
    for s in steps:
        compute[s.fate] += s.step_s - s.data_wait_s
        tally.steps[s.fate] += 1
        stepping, evaluating = stepping + s.step_s, evaluating + s.eval_s
        if s.stall_s is None:
            measured = False
        else:
            stalled += s.stall_s
    for fate, seconds in compute.items():
        if seconds:
            tally.add(fate, seconds, devices)
    tally.add("data_wait", stepping - sum(compute.values()), devices)
    if not measured:
        tally.add("not_recorded", end - start - stepping, devices)
        return
    tally.measured.add("rolled_back")  # such a job also keeps the steps a rollback drops
    first = max(start, steps[0].start if steps else last_seen)
    tally.add("startup", first - start, devices)
    tally.add("evaluation", evaluating, devices)
    tally.add("checkpoint_stall", stalled, devices)
    if commit is not None and commit >= (steps[-1].end if steps else first):
        tally.add("other", commit - first - stepping - evaluating - stalled, devices)
        tally.add("after_last_commit", end - commit, devices)
        tally.add("idle", 0.0, devices)  # its wait for the next start is in the part above
        return
    tally.add("other", last_seen - first - stepping - evaluating - stalled, devices)
    tally.add("idle", end - last_seen, devices)


def before_final_save(run: Run, done: int, metrics: dict[str, float], now: float) -> Goodput:
    """The breakdown as a job sees it at its last step `done`, whose metrics are not spooled yet: running, with the
    final save about to commit that step."""
    history = read_history(run, "running", now, committed=done)
    history.steps.append(step_of({"step": done, "time_ms": int(now * 1000), "metrics": metrics}, "counted"))
    return account(history, now)


def of_run(run: Run, state: str, now: float | None = None) -> tuple[History, Goodput]:
    """The history and breakdown `orch status RUN` shows for a run in `state`."""
    now = time.time() if now is None else now
    history = read_history(run, state, now)
    return history, account(history, now if state in LIVE else None)


# --- the checkpoint interval ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """Young/Daly: the checkpoint interval that minimises the expected time lost to saves and to failures."""

    save_stall_s: float | None  # median measured stall of a save at the recipe's cadence
    saves_measured: int
    step_s: float | None  # median measured step time
    interruptions: int
    wall_h: float
    mtbf_h: float | None  # observed allocated wall hours per interruption, else the prior's
    prior: bool  # no interruption observed: mtbf_h is the prior's
    every_steps: int  # the recipe's

    @property
    def interval_s(self) -> float | None:
        """Daly's refinement of Young's sqrt(2 δ M) (J. T. Daly, 2006), M once δ reaches 2M."""
        if self.save_stall_s is None or not self.mtbf_h:
            return None
        delta, mtbf = self.save_stall_s, self.mtbf_h * 3600
        if delta >= 2 * mtbf:
            return mtbf
        ratio = delta / (2 * mtbf)
        return math.sqrt(2 * delta * mtbf) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - delta

    @property
    def interval_steps(self) -> int | None:
        if self.interval_s is None or not self.step_s:
            return None
        return max(1, round(self.interval_s / self.step_s))

    def expected_loss(self, every_steps: int) -> float | None:
        """Share of the time lost to saves and to the work since the last save at a failure (first order)."""
        if self.save_stall_s is None or not self.mtbf_h or not self.step_s:
            return None
        interval = every_steps * self.step_s
        return self.save_stall_s / interval + (interval + self.save_stall_s) / (2 * self.mtbf_h * 3600)

    def as_dict(self) -> dict[str, Any]:
        return {
            "save_stall_s": self.save_stall_s,
            "saves_measured": self.saves_measured,
            "step_s": self.step_s,
            "interruptions": self.interruptions,
            "wall_h": self.wall_h,
            "mtbf_h": self.mtbf_h,
            "mtbf_from_prior": self.prior,
            "interval_s": self.interval_s,
            "interval_steps": self.interval_steps,
            "recipe_every_steps": self.every_steps,
            "expected_loss_recipe": self.expected_loss(self.every_steps),
            "expected_loss_suggested": self.expected_loss(self.interval_steps) if self.interval_steps else None,
        }


def suggest(history: History, goodput: Goodput) -> Suggestion:
    """From the measured median save stall and step time and the run's observed interruptions per allocated hour."""
    stalls = save_stalls(history)
    step_times = [s.step_s for s in history.steps if s.step_s > 0]
    interruptions = history.interruptions
    if interruptions:
        mtbf_h = goodput.wall_h / interruptions
    else:
        devices = max((a.nodes for a in history.attempts), default=1) * history.devices_per_node
        mtbf_h = PRIOR_DEVICE_HOURS_PER_INTERRUPTION / devices
    return Suggestion(
        save_stall_s=statistics.median(stalls) if stalls else None,
        saves_measured=len(stalls),
        step_s=statistics.median(step_times) if step_times else None,
        interruptions=interruptions,
        wall_h=goodput.wall_h,
        mtbf_h=mtbf_h,
        prior=not interruptions,
        every_steps=history.checkpoint.every_steps,
    )


def save_stalls(history: History) -> list[float]:
    """Stalls of the saves at the recipe's cadence, carried by the step after the saved one; a job's first step
    carries none (no save came before it in that job)."""
    ends = [s.end for s in history.steps]
    firsts = {bisect.bisect_left(ends, a.start) for a in history.attempts}
    return [
        s.stall_s
        for i, s in enumerate(history.steps)
        if s.stall_s is not None and history.checkpoint.due(s.step - 1) and s.step > 1 and i not in firsts
    ]
