"""Whether a run's jobs are alive, and how to stop one: the one answer every command uses, per scheduler.

A job record in jobs.json names its executor; `scheduler_of` gives the adapter that knows how to ask about it.
Only the standard library is used here (the process table, `squeue`, `scancel`), so `orch status` stays fast.
Job ids were validated when jobs.json was read (`orchestrator.core.runfiles.JobRecord`); a local id is also checked
to still be the job's process before anything is sent to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from orchestrator.core.errors import OrchError
from orchestrator.core.runfiles import JobRecord

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
LOCAL_CONTROLLER = b"submitit.local._local"  # the module submitit's LocalExecutor runs as a job's controller
START_SLACK_S = 5.0  # a controller starts just before its job is recorded; a later start is another process


class Scheduler(Protocol):
    sizes_signal_delay: bool  # whether the plan sizes the warning signal's lead time (else the profile's is used)
    signal_check_s: int  # how much earlier than asked the warning signal may come

    def alive(self, jobs: list[JobRecord]) -> dict[str, bool]:
        """Liveness of many jobs with one query."""

    def cancel(self, job: JobRecord) -> None:
        """Stop a job (its checkpoints stay)."""


class LocalProcesses:
    """submitit's LocalExecutor: the job id is the PID of the controller process on this machine."""

    sizes_signal_delay = False  # its controller signals exactly when the profile says
    signal_check_s = 0

    def alive(self, jobs: list[JobRecord]) -> dict[str, bool]:
        return {job.job_id: self.is_job(job) for job in jobs}

    @staticmethod
    def is_job(job: JobRecord) -> bool:
        """The PID is a live (not zombie) submitit controller that started before the job was recorded: a PID
        reused by another process since then is not the job."""
        proc = Path(f"/proc/{int(job.job_id)}")
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            command = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
        if stat[0] == "Z" or LOCAL_CONTROLLER not in command:
            return False
        return process_start_time(int(stat[19])) <= job.submitted + START_SLACK_S

    def cancel(self, job: JobRecord) -> None:
        """Kill the job's tasks (and what they started); the controller then ends by itself. Only when the PID is
        still the job's. The tasks ignore SIGINT, so that Ctrl-C in the terminal that submitted them stops only the
        following (`orch submit --wait`), not the training."""
        if not self.is_job(job):
            return
        for pid in descendants(int(job.job_id)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc, parents before their children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_start_time(start_ticks: int) -> float:
    """A process's start (field 22 of /proc/PID/stat, in clock ticks after boot) as a Unix time."""
    with open("/proc/stat") as stat:
        boot = next(int(line.split()[1]) for line in stat if line.startswith("btime"))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


class Slurm:
    sizes_signal_delay = True
    signal_check_s = 30  # slurmctld checks time limits this often: its signal may come this much early

    def alive(self, jobs: list[JobRecord]) -> dict[str, bool]:
        if not jobs:
            return {}
        ids = [job.job_id for job in jobs]
        out = self._run(["squeue", "--noheader", "--format=%i %T", "--jobs", ",".join(ids)], ids)
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            raise OrchError(f"Cannot ask Slurm about jobs {', '.join(ids)}: {out.stderr.strip()}")
        states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
        return {job_id: states.get(job_id, "") in LIVE_SLURM_STATES for job_id in ids}

    def cancel(self, job: JobRecord) -> None:
        out = self._run(["scancel", "--", job.job_id], [job.job_id])
        if out.returncode != 0:
            raise OrchError(f"scancel {job.job_id} failed: {out.stderr.strip()}")

    @staticmethod
    def _run(command: list[str], job_ids: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise OrchError(f"Cannot reach Slurm ({command[0]}) about jobs {', '.join(job_ids)}: {err}") from None


SCHEDULERS: dict[str, Scheduler] = {"local": LocalProcesses(), "slurm": Slurm()}


def alive_jobs(jobs: list[JobRecord]) -> dict[str, bool]:
    """Liveness of many jobs with one query per scheduler (`orch status` over hundreds of runs stays fast)."""
    alive: dict[str, bool] = {}
    for name, scheduler in SCHEDULERS.items():
        alive.update(scheduler.alive([job for job in jobs if job.executor == name]))
    return alive


def job_alive(job: JobRecord) -> bool:
    """Whether the scheduler (or the OS, for local jobs) still has the job queued or running."""
    return SCHEDULERS[job.executor].alive([job])[job.job_id]


def cancel_job(job: JobRecord) -> None:
    SCHEDULERS[job.executor].cancel(job)


def partition_nodes(partition: str) -> list[str] | None:
    """The nodes of a Slurm partition, whatever their state; None where `sinfo` cannot say."""
    try:
        listed = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N"], capture_output=True, text=True,
                                timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sorted(set(listed.stdout.split())) if listed.returncode == 0 and listed.stdout.strip() else None


def wait_until_gone(job: JobRecord, timeout_s: float, poll_s: float = 2) -> bool:
    """Whether the scheduler stopped listing the job within `timeout_s`."""
    deadline = time.time() + timeout_s
    while job_alive(job):
        if time.time() > deadline:
            return False
        time.sleep(poll_s)
    return True


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


def slurm_partitions() -> dict[str, PartitionFacts] | None:
    """Every partition of the cluster the Slurm commands reach; None where `scontrol` cannot say."""
    try:
        shown = subprocess.run(["scontrol", "show", "partition", "--oneliner"], capture_output=True, text=True,
                               timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0:
        return None
    facts = [partition_facts(line) for line in shown.stdout.splitlines() if line.startswith("PartitionName=")]
    return {f.name: f for f in facts}


def partition_facts(line: str) -> PartitionFacts:
    """One line of `scontrol show partition --oneliner`."""
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    return PartitionFacts(
        name=fields["PartitionName"],
        max_time_min=slurm_minutes(fields.get("MaxTime", "UNLIMITED")),
        min_nodes=int(fields.get("MinNodes", "0")),
        max_nodes=None if fields.get("MaxNodes", "UNLIMITED") == "UNLIMITED" else int(fields["MaxNodes"]),
        grace_time_s=int(fields.get("GraceTime", "0")),
        preempt_mode=fields.get("PreemptMode", "OFF"),
        state=fields.get("State", "UP"),
    )


def slurm_minutes(value: str) -> float | None:
    """Slurm's `[D-]HH:MM:SS` (or `MM`, `MM:SS`, `HH:MM:SS`) in minutes; None for UNLIMITED or INFINITE."""
    if value in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:  # MM, MM:SS, HH:MM:SS
        hours, minutes, seconds = [0, *parts, 0][:3] if len(parts) < 3 else parts
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60
