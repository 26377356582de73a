"""What orch asks of a scheduler: the protocol that `local.py` (submitit's LocalExecutor: processes on this machine)
and `slurm.py` implement, so that no other module asks which scheduler a job runs under.

A job belongs to the folder it keeps its files in (`Job.folder`: a run's `submitit/`), as the scheduler itself
knows it (the local controller's command line, Slurm's StdOut path), not to whichever run directory names its id: a
run directory copied while its job ran names the original's job, which is not the copy's to stop or to count as
alive.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.core.errors import OrchError

if TYPE_CHECKING:  # the schemas are built where a profile is read, not by `orch status`
    from orchestrator.core.config import Profile


@dataclass(frozen=True)
class Job:
    """A job as orch recorded it, and the folder it was queued to keep its files in, which says whose it is."""

    executor: str
    job_id: str
    submitted: float
    folder: Path


@dataclass(frozen=True)
class PartitionFacts:
    """What Slurm itself says of a partition (`scontrol show partition`), over what a profile assumes."""

    name: str
    max_time_min: float | None  # None: UNLIMITED
    min_nodes: int
    max_nodes: int | None  # None: UNLIMITED
    grace_time_s: int  # how long a preempted job has between SIGTERM and SIGKILL
    preempt_mode: str
    state: str
    cpus: int = 0  # all its nodes' CPUs together
    nodes: int = 0


@dataclass(frozen=True)
class StartHint:
    """When the scheduler says a job submitted now would start, asked without queueing it: a hint, not a promise."""

    start: float | None  # seconds since the epoch; None: the scheduler gave none
    note: str  # where it would run, or why there is no hint


@dataclass(frozen=True)
class Usage:
    """What the scheduler's accounting charged an account since a time: every job of the account, not only orch's."""

    node_hours: float | None  # allocated nodes × elapsed hours; None: the accounting did not answer
    jobs: int
    note: str  # what was counted, or why there is no answer


class ForeignJob(OrchError):
    """A live job that a run directory names but that keeps its files elsewhere: never signalled on its behalf."""

    def __init__(self, job: Job, owner: Path) -> None:
        super().__init__(foreign(job, owner))


def foreign(job: Job, owner: Path) -> str:
    return (
        f"job {job.job_id} is not this run's: it writes to {owner}, this run's jobs to {job.folder} (the run "
        "directory was copied or moved while that job ran); orch leaves it alone"
    )


def same_folder(found: Path, expected: Path) -> bool:
    """One folder, whichever links lead to it (ORCH_HOME's runs folder links to a profile's `paths.runs`)."""
    return os.path.realpath(found) == os.path.realpath(expected)


@dataclass(frozen=True)
class Ends:
    """What a scheduler says will end a running job: its end time as it stands now (a changed time limit included)
    and the earliest reservation on its nodes that it is not part of (sites end jobs where one starts)."""

    end: float | None  # seconds since the epoch; None: the scheduler gave none
    reservation: tuple[str, float] | None  # its name and start


def log_files(folder: Path, job_id: str, rank: int) -> list[Path]:
    """A rank's stdout and stderr, as submitit names them under every scheduler (appended to across requeues)."""
    return [folder / job_id / f"{job_id}_{rank}_log.{kind}" for kind in ("out", "err")]


class Scheduler(Protocol):
    name: str  # what a profile's `executor` says
    sizes_signal_delay: bool  # whether the plan sizes the warning signal's lead time (else the profile's is used)
    signal_check_s: int  # how much earlier than asked the warning signal may come
    excludes_hosts: bool  # whether a job can be kept off hosts where its tries failed
    dependencies: bool  # whether a job can wait in the queue for another (Slurm's --dependency)
    one_machine: bool  # whether its jobs run on, and are seen from, this machine only

    # Submitting, on a login node or a laptop.
    def job_id_problem(self, job_id: str) -> str | None:
        """Why `job_id` cannot be one of this scheduler's (it reaches `kill` and `scancel`); None where it can."""

    def executor(self, profile: Profile, folder: Path, max_requeues: int, signal_delay_s: int) -> Any:
        """A configured submitit executor whose jobs keep their files under `folder`, requeued at their time limit
        up to `max_requeues` times, warned `signal_delay_s` before it (submitit is imported here, not before)."""

    def submission(self, profile: Profile, log: Path, max_requeues: int) -> AbstractContextManager[None]:
        """The context in which the executor's `submit` is called, for a job that may requeue itself `max_requeues`
        times."""

    def script(self, profile: Profile, folder: Path, max_requeues: int, signal_delay_s: int) -> str | None:
        """The job script the scheduler would receive, where there is one."""

    def array_executor(self, profile: Profile, folder: Path, signal_delay_s: int, parallelism: int) -> Any:
        """An executor for an array of tasks (`map_array`), at most `parallelism` of them running at once where the
        scheduler can be told so."""

    def partitions(self) -> dict[str, PartitionFacts] | None:
        """Every partition the scheduler reaches; None where it has none or cannot say."""

    def excluding(self, profile: Profile, hosts: list[str]) -> Profile:
        """The profile whose jobs keep off `hosts`, where the scheduler can do that."""

    def excluded(self, profile: Profile) -> list[str]:
        """The hosts the profile's jobs keep off (what `excluding` gave it, and the profile's own exclusions)."""

    # Planning and accounting, on a login node or a laptop.
    def start_hint(self, script: str | None) -> StartHint:
        """When a job of this script (`script`) would start if submitted now; nothing is queued."""

    def usage(self, account: str, since: float) -> Usage:
        """Node-hours its accounting charged `account` since `since` (seconds since the epoch), every job of it."""

    def accounts(self) -> set[str] | None:
        """The accounts its accounting knows, lower-case; None where it has none or cannot say."""

    # Asking about jobs and stopping them.
    def folders(self, jobs: Sequence[Job]) -> dict[str, Path | None]:
        """One query for many jobs: by job id, the folder each live job keeps its files in, as the scheduler knows
        it; None for a job that is gone."""

    def cancel(self, job: Job) -> None:
        """Stop a job of `job.folder` (its checkpoints stay); nothing is signalled that is not that folder's."""

    def any_task_alive(self, jobs: Sequence[Job]) -> bool:
        """Whether a task of these arrays' jobs is queued, running or requeued."""

    # Inside a job, on its nodes.
    def rank_started(self) -> None:
        """First thing in every rank: tie the rank's life to its job's."""

    def requeue(self, job_id: str, peer_pids: list[int]) -> int:
        """Have the scheduler start this job again from the top (its other ranks here are `peer_pids`); returns the
        exit code the rank then leaves with."""

    def keep_off(self, job_id: str, hosts: list[str]) -> None:
        """Keep this job's next start off `hosts`, where the scheduler accepts that for a running job."""

    def requeue_preempted(self, job_id: str) -> None:
        """Queue this job again after it saved on a preemption, where the scheduler would not."""

    def ends(self, job_id: str) -> Ends | None:
        """What will end this running job, asked now (jobs/deadline.py follows it); None where the scheduler cannot
        say (the job then keeps its own clock)."""
