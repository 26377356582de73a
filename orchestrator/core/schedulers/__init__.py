"""The schedulers a profile's `executor` names, one module each (`local.py`, `slurm.py`, the protocol in `base.py`),
and the answers every command gets through them: whether a job is alive as the job of the run that asks, and
stopping it. A job that a run names but that keeps its files elsewhere (the run directory is a copy) is not that
run's: it counts as gone for it and is never signalled on its behalf (`ForeignJob`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator.core.schedulers.base import ForeignJob, Job, Scheduler, same_folder
from orchestrator.core.schedulers.local import Local
from orchestrator.core.schedulers.slurm import Slurm

SCHEDULERS: dict[str, Scheduler] = {scheduler.name: scheduler for scheduler in (Local(), Slurm())}  # by `executor`


def scheduler_of(executor: str) -> Scheduler:
    return SCHEDULERS[executor]


def owners(jobs: list[Job]) -> dict[Job, Path | None]:
    """The folder each live job keeps its files in, with one query per scheduler (`orch status` over hundreds of
    runs stays fast); None for a job that is gone."""
    found: dict[Job, Path | None] = {}
    for name, scheduler in SCHEDULERS.items():
        ours = [job for job in jobs if job.executor == name]
        folders = scheduler.folders(ours)
        found.update({job: folders[job.job_id] for job in ours})
    return found


def alive_jobs(jobs: list[Job]) -> dict[Job, bool]:
    """Whether each job is queued or running as the job of its folder's run."""
    return {job: owner is not None and same_folder(owner, job.folder) for job, owner in owners(jobs).items()}


def job_alive(job: Job) -> bool:
    return alive_jobs([job])[job]


def foreign_owner(job: Job) -> Path | None:
    """Where the job writes, when it is alive but another folder's (another run's job)."""
    owner = owners([job])[job]
    return owner if owner is not None and not same_folder(owner, job.folder) else None


def cancel_job(job: Job) -> bool:
    """Stop the job; False where it is gone already. A job alive for another folder is refused (`ForeignJob`)."""
    owner = owners([job])[job]
    if owner is None:
        return False
    if not same_folder(owner, job.folder):
        raise ForeignJob(job, owner)
    scheduler_of(job.executor).cancel(job)
    return True


def wait_until_gone(job: Job, timeout_s: float, poll_s: float = 2) -> bool:
    """Whether the scheduler stopped listing the job within `timeout_s`."""
    deadline = time.time() + timeout_s
    while job_alive(job):
        if time.time() > deadline:
            return False
        time.sleep(poll_s)
    return True


def rank_started() -> None:
    """First thing in every rank of a job: its scheduler ties the rank's life to the job's (submitit names the
    scheduler in every task's environment; nothing outside a job)."""
    scheduler = SCHEDULERS.get(os.environ.get("SUBMITIT_EXECUTOR", ""))
    if scheduler is not None:
        scheduler.rank_started()
