"""Whether a run's jobs are alive, and how to stop one: the one answer every command uses, per scheduler.

A job record in jobs.json names its executor; `scheduler_of` gives the adapter that knows how to ask about it.
Only the standard library is used here (a process table, `squeue`, `scancel`), so `orch status` stays fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Protocol

from orchestrator.core.errors import OrchError

# Slurm states of a job that is queued, running or about to run again; any other state (or none) is gone.
LIVE_SLURM_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "COMPLETING",
        "CONFIGURING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)


class Scheduler(Protocol):
    sizes_signal_delay: bool  # whether the plan sizes the warning signal's lead time (else the profile's is used)
    signal_check_s: int  # how much earlier than asked the warning signal may come

    def alive(self, job_ids: list[str]) -> dict[str, bool]:
        """Liveness of many jobs with one query."""

    def cancel(self, job_id: str) -> None:
        """Stop a job (its checkpoints stay)."""


class LocalProcesses:
    """submitit's LocalExecutor: the job id is the PID of the controller process on this machine."""

    sizes_signal_delay = False  # its controller signals exactly when the profile says
    signal_check_s = 0

    def alive(self, job_ids: list[str]) -> dict[str, bool]:
        return {job_id: self._alive(int(job_id)) for job_id in job_ids}

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie has exited; only its parent has not collected it yet
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    def cancel(self, job_id: str) -> None:
        """An interrupt to the controller, which stops its tasks."""
        try:
            os.kill(int(job_id), signal.SIGINT)
        except ProcessLookupError:
            pass


class Slurm:
    sizes_signal_delay = True
    signal_check_s = 30  # slurmctld checks time limits this often: its signal may come this much early

    def alive(self, job_ids: list[str]) -> dict[str, bool]:
        if not job_ids:
            return {}
        out = self._run(["squeue", "--noheader", "--format=%i %T", "--jobs", ",".join(job_ids)], job_ids)
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            raise OrchError(f"Cannot ask Slurm about jobs {', '.join(job_ids)}: {out.stderr.strip()}")
        states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
        return {job_id: states.get(job_id, "") in LIVE_SLURM_STATES for job_id in job_ids}

    def cancel(self, job_id: str) -> None:
        out = self._run(["scancel", job_id], [job_id])
        if out.returncode != 0:
            raise OrchError(f"scancel {job_id} failed: {out.stderr.strip()}")

    @staticmethod
    def _run(command: list[str], job_ids: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise OrchError(f"Cannot reach Slurm ({command[0]}) about jobs {', '.join(job_ids)}: {err}") from None


SCHEDULERS: dict[str, Scheduler] = {"local": LocalProcesses(), "slurm": Slurm()}


def scheduler_of(job: dict[str, Any]) -> Scheduler:
    return SCHEDULERS[job["executor"]]


def alive_jobs(jobs: list[dict[str, Any]]) -> dict[str, bool]:
    """Liveness of many jobs with one query per scheduler (`orch status` over hundreds of runs stays fast)."""
    alive: dict[str, bool] = {}
    for name, scheduler in SCHEDULERS.items():
        alive.update(scheduler.alive([j["job_id"] for j in jobs if j["executor"] == name]))
    return alive


def job_alive(job: dict[str, Any]) -> bool:
    """Whether the scheduler (or the OS, for local jobs) still has the job queued or running."""
    return scheduler_of(job).alive([job["job_id"]])[job["job_id"]]


def cancel_job(job: dict[str, Any]) -> None:
    scheduler_of(job).cancel(job["job_id"])
