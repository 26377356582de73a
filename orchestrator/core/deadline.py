"""When a job must stop to commit its last checkpoint before its scheduler ends it (docs/goodput.md#the-deadline).

The end is the earliest of: the job's end as its scheduler reports it now (a limit changed with `scontrol update`
included) and the start of a reservation that covers its nodes (sites end jobs there). The job stops at its last step
boundary before the end less a lead: the time to reach the next boundary and save there, measured in this run:

    lead = p95 of the intervals between step boundaries (validations and save stalls included)
         + the longest save-and-commit of the run so far (the planner's estimate before its first save)
         + SAFETY_MARGIN_S

The profile's `signal_delay_s` is the warning's floor, not when the job stops: a warning signal that the reported end
explains (it came at most `signal_delay_s` + the scheduler's check interval before that end) changes nothing; one it
does not explain (a preemption's warning) stops the job at the next boundary, as before.

`deadline.json` (owned here): every deadline a job of the run chose, its lead and why, and the time of the commit it
stopped with. Pure functions; nothing heavy is imported.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from orchestrator.core.files import write_json_atomic
from orchestrator.core.runfiles import RunFile, read_model

FILE = "deadline.json"
# Beyond a step and a save: the exit after the commit (rank 0 closes its tracker, then requeues), the stop's
# all-reduce, and the skew between the scheduler's clock and the node's (NTP: well under a second).
SAFETY_MARGIN_S = 10.0
PERCENTILE = 95


@dataclass(frozen=True)
class Lead:
    """How long before the end the job stops, in its parts."""

    step_s: float  # p95 interval between step boundaries
    steps_measured: int  # intervals it is from; 0: the planner's step time
    save_s: float  # longest save-and-commit of the run
    save_measured: bool  # False: the planner's estimate (no save of this run measured yet)
    margin_s: float = SAFETY_MARGIN_S

    @property
    def total_s(self) -> float:
        return self.step_s + self.save_s + self.margin_s

    def why(self) -> str:
        step = f"over {self.steps_measured} steps" if self.steps_measured else "planned"
        save = "measured, the run's longest" if self.save_measured else "planned, no save measured yet"
        return (
            f"p{PERCENTILE} step {self.step_s:.2f} s ({step}) + save and commit {self.save_s:.2f} s ({save}) "
            f"+ margin {self.margin_s:.0f} s"
        )


@dataclass(frozen=True)
class End:
    """A time at which the job would be ended, and what says so."""

    at: float
    source: str  # "time limit", "reservation NAME", "warning signal"


@dataclass(frozen=True)
class Deadline:
    end: End
    lead: Lead

    @property
    def stop_at(self) -> float:
        return self.end.at - self.lead.total_s

    def differs(self, other: Deadline | None) -> bool:
        """Worth a log line and a record: a new end, or a stop time that moved by more than a second and a tenth of
        the lead (step times jitter)."""
        if other is None or other.end != self.end:
            return True
        return abs(other.stop_at - self.stop_at) > max(1.0, 0.1 * self.lead.total_s)


def percentile_95(values: Sequence[float]) -> float:
    """The 95th percentile (inclusive method: never beyond the largest value); the value itself for one."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[PERCENTILE - 1]


def lead(intervals: Sequence[float], planned_step_s: float, save_s: float | None, planned_save_s: float) -> Lead:
    """The lead from the measured step intervals and longest save (None: none yet), else the planner's figures."""
    step_s = percentile_95(intervals) if intervals else planned_step_s
    return Lead(step_s, len(intervals), planned_save_s if save_s is None else save_s, save_s is not None)


def earliest(ends: Iterable[End | None]) -> End | None:
    return min((end for end in ends if end is not None), key=lambda end: end.at, default=None)


def signal_explained(arrived: float, reported_end: float | None, signal_delay_s: float, check_s: float) -> bool:
    """Whether a warning signal is the time limit's: the scheduler sends it once the end is `signal_delay_s` away,
    checking every `check_s`; a signal that comes earlier than that before the reported end warns of something
    else (a preemption)."""
    return reported_end is not None and reported_end - arrived <= signal_delay_s + check_s


# --- deadline.json --------------------------------------------------------------------------------------------------


class DeadlineRecord(RunFile):
    """One deadline a job chose (rank 0 writes one whenever its end or its stop time moves)."""

    job_id: str
    chosen: float  # when
    end: float
    source: str
    stop_at: float
    lead_s: float = Field(ge=0)
    step_s: float = Field(ge=0)
    save_s: float = Field(ge=0)
    save_measured: bool
    margin_s: float = Field(ge=0)
    why: str
    stopped_step: int | None = None  # the job's last record: the step it stopped and saved at
    committed: float | None = None  # when that save committed


def record(job_id: str, deadline: Deadline, now: float, stopped_step: int | None = None) -> DeadlineRecord:
    """`stopped_step`: the job stopped and saved at that step, committed `now`."""
    lead_ = deadline.lead
    return DeadlineRecord(
        job_id=job_id,
        chosen=now,
        end=deadline.end.at,
        source=deadline.end.source,
        stop_at=deadline.stop_at,
        lead_s=lead_.total_s,
        step_s=lead_.step_s,
        save_s=lead_.save_s,
        save_measured=lead_.save_measured,
        margin_s=lead_.margin_s,
        why=lead_.why(),
        stopped_step=stopped_step,
        committed=now if stopped_step is not None else None,
    )


def read_records(run_dir: Path) -> list[DeadlineRecord]:
    return read_model(run_dir / FILE, list[DeadlineRecord], [])


def append_record(run_dir: Path, entry: DeadlineRecord) -> None:
    write_json_atomic(run_dir / FILE, [r.model_dump() for r in [*read_records(run_dir), entry]])


def longest_save(records: Sequence[DeadlineRecord]) -> float | None:
    """The longest save-and-commit the run's earlier jobs measured; None before any."""
    return max((r.save_s for r in records if r.save_measured), default=None)


def commits(records: Sequence[DeadlineRecord]) -> list[float]:
    """When the saves that jobs stopped with committed."""
    return sorted(r.committed for r in records if r.committed is not None)
