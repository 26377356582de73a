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
from typing import Any, Protocol

from orchestrator.core.config import Profile
from orchestrator.core.errors import OrchError


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

    def submission(self, profile: Profile, log: Path) -> AbstractContextManager[None]:
        """The context in which the executor's `submit` is called."""

    def script(self, profile: Profile, folder: Path, max_requeues: int, signal_delay_s: int) -> str | None:
        """The job script the scheduler would receive, where there is one."""

    def partitions(self) -> dict[str, PartitionFacts] | None:
        """Every partition the scheduler reaches; None where it has none or cannot say."""

    def excluding(self, profile: Profile, hosts: list[str]) -> Profile:
        """The profile whose jobs keep off `hosts`, where the scheduler can do that."""

    # Asking about jobs and stopping them.
    def folders(self, jobs: Sequence[Job]) -> dict[str, Path | None]:
        """One query for many jobs: by job id, the folder each live job keeps its files in, as the scheduler knows
        it; None for a job that is gone."""

    def cancel(self, job: Job) -> None:
        """Stop a job of `job.folder` (its checkpoints stay); nothing is signalled that is not that folder's."""

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
