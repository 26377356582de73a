"""Slurm: the one module that runs Slurm's commands (sbatch through submitit's SlurmExecutor, squeue, scancel,
scontrol, sinfo) and reads what they print. Job ids were validated when jobs.json was read (`job_id_problem`) and go
after `--` where a command takes options.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.compat import sbatch_script
from orchestrator.core.errors import OrchError
from orchestrator.core.project import PROJECT_ROOT
from orchestrator.core.schedulers.base import Ends, Job, PartitionFacts, StartHint, Usage
from orchestrator.core.settings import fill_path

if TYPE_CHECKING:  # the schemas are built where a profile is read, not by `orch status`
    from orchestrator.core.config import Profile

log = logging.getLogger("orch.slurm")
SLURM_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")
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
# id, state and the StdOut path submitit gave the job (FOLDER/%j/%j_%t_log.out), which says whose job it is
SQUEUE_FORMAT = "--Format=JobID:|,State:|,STDOUT:"
TIMEOUT_S = 60
# what `sbatch --test-only` says: "sbatch: Job 82 to start at 2026-12-06T17:15:25 using 2 processors on nodes n[1-2]
# in partition qgpu"
TEST_ONLY = re.compile(
    r"to start at (?P<start>\S+) using \d+ processors on nodes (?P<nodes>\S+) in partition (?P<partition>\S+)"
)


class Slurm:
    name = "slurm"
    sizes_signal_delay = True
    signal_check_s = 30  # slurmctld checks time limits this often: its signal may come this much early
    excludes_hosts = True
    dependencies = True
    one_machine = False

    def job_id_problem(self, job_id: str) -> str | None:
        return None if SLURM_JOB_ID.match(job_id) else f"Slurm job id {job_id[:40]!r} is not a number (NNN or NNN_N)"

    def executor(self, profile: Profile, folder: Path, max_requeues: int, signal_delay_s: int) -> Any:
        """An sbatch script with one task per GPU (or per the profile's launch layout)."""
        import submitit

        slurm = profile.slurm
        executor = submitit.SlurmExecutor(
            folder=folder / "%j", max_num_timeout=max_requeues, python=profile.python or None
        )
        parameters: dict[str, Any] = {
            "job_name": f"orch-{folder.parent.name}",
            "nodes": profile.nodes,
            "ntasks_per_node": profile.launch.tasks_per_node,
            "cpus_per_task": slurm.cpus_per_task,
            "time": int(profile.time_limit_min),
            "partition": slurm.partition,
            "signal_delay_s": signal_delay_s,
            "setup": setup_lines(profile),
            "wckey": slurm.wckey,  # None leaves it out (submitit's default, "submitit", is refused where enforced)
            # srun does not take --cpus-per-task from sbatch on Slurm 22.05-23.02; one crashed rank ends the step
            # instead of leaving the others blocked in a collective until the timeout.
            "srun_args": [f"--cpus-per-task={slurm.cpus_per_task}", "--kill-on-bad-exit=1"],
            # requeue after a timeout or preemption, whatever the site's default
            "additional_parameters": {"requeue": True, **slurm.extra_sbatch, **ranges(profile)},
        }
        if profile.node.gpus:
            parameters["gpus_per_node"] = profile.node.gpus
        if slurm.account:
            parameters["account"] = slurm.account
        if slurm.qos:
            parameters["qos"] = slurm.qos
        executor.update_parameters(**parameters)
        return executor

    @contextmanager
    def submission(self, profile: Profile, log: Path, max_requeues: int) -> Iterator[None]:
        """sbatch runs the setup lines on the node: nothing to change here."""
        yield

    def script(self, profile: Profile, folder: Path, max_requeues: int, signal_delay_s: int) -> str | None:
        """The exact script `sbatch` would receive."""
        return sbatch_script(self.executor(profile, folder, max_requeues, signal_delay_s))

    def partitions(self) -> dict[str, PartitionFacts] | None:
        """Every partition of the cluster the Slurm commands reach; None where `scontrol` cannot say."""
        shown = scontrol("show", "partition", "--oneliner")
        if shown is None:
            return None
        facts = [partition_facts(line) for line in shown.splitlines() if line.startswith("PartitionName=")]
        return {f.name: f for f in facts}

    def array_executor(self, profile: Profile, folder: Path, signal_delay_s: int, parallelism: int) -> Any:
        executor = self.executor(profile, folder, 0, signal_delay_s)
        executor.update_parameters(array_parallelism=parallelism)
        return executor

    def any_task_alive(self, jobs: Sequence[Job]) -> bool:
        """Slurm lists the pending tasks of an array as one line (`ID_[0-2]`), so each array is asked about by its
        id."""
        for array in sorted({job.job_id.split("_")[0] for job in jobs}):
            shown = scontrol("show", "job", "--oneliner", array) or ""
            if any(scontrol_fields(line).get("JobState") in LIVE_SLURM_STATES for line in shown.splitlines()):
                return True
        return False

    def start_hint(self, script: str | None) -> StartHint:
        """`sbatch --test-only`: Slurm's own guess of the start, from its queue and reservations now."""
        try:
            out = subprocess.run(["sbatch", "--test-only"], input=script or "", capture_output=True, text=True,
                                 timeout=TIMEOUT_S)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            return StartHint(None, f"no Slurm answered here (sbatch: {err})")
        said = " ".join(f"{out.stderr} {out.stdout}".split())
        found = TEST_ONLY.search(said)
        if out.returncode != 0 or found is None:
            return StartHint(None, f"sbatch --test-only: {said[:300] or f'exit status {out.returncode}'}")
        start = datetime.fromisoformat(found["start"]).timestamp()  # the controller's local time, as this machine's
        return StartHint(start, f"on {found['nodes']} in partition {found['partition']}")

    def usage(self, account: str, since: float) -> Usage:
        """sacct's allocations of every user of the account that ran since `since`: nodes × elapsed time."""
        start = datetime.fromtimestamp(since).strftime("%Y-%m-%dT%H:%M:%S")
        asked = ["sacct", "--allusers", "--allocations", "--noheader", "--parsable2", f"--accounts={account}",
                 f"--starttime={start}", "--endtime=now", "--format=JobIDRaw,AllocNodes,ElapsedRaw"]  # fmt: skip
        try:
            out = subprocess.run(asked, capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            return Usage(None, 0, f"sacct cannot be run here ({err})")
        if out.returncode != 0:
            said = " ".join(out.stderr.split())[:300] or f"exit status {out.returncode}"
            return Usage(None, 0, f"Slurm accounting does not answer here (sacct: {said})")
        rows = [line.split("|") for line in out.stdout.splitlines()]
        charged = [int(row[1]) * int(row[2]) for row in rows if len(row) == 3 and row[1].isdigit() and row[2].isdigit()]
        return Usage(sum(charged) / 3600, len(charged), f"sacct: every job of account {account} since {start}")

    def accounts(self) -> set[str] | None:
        try:
            out = subprocess.run(["sacctmgr", "--noheader", "--parsable2", "show", "account", "format=Account"],
                                 capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        return {line.strip().lower() for line in out.stdout.splitlines() if line.strip()}

    def excluding(self, profile: Profile, hosts: list[str]) -> Profile:
        return excluding(profile, hosts)

    def excluded(self, profile: Profile) -> list[str]:
        return excluded(profile)

    def folders(self, jobs: Sequence[Job]) -> dict[str, Path | None]:
        if not jobs:
            return {}
        ids = [job.job_id for job in jobs]
        out = run(["squeue", "--noheader", SQUEUE_FORMAT, "--jobs", ",".join(ids)], ids)
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            raise OrchError(f"Cannot ask Slurm about jobs {', '.join(ids)}: {out.stderr.strip()}")
        live = {}
        for line in out.stdout.splitlines():
            job_id, state, stdout = [*line.split("|", 2), "", ""][:3]
            if state.strip() in LIVE_SLURM_STATES:
                live[job_id.strip()] = Path(stdout.strip()).parent.parent
        return {job_id: live.get(job_id) for job_id in ids}

    def cancel(self, job: Job) -> None:
        out = run(["scancel", "--", job.job_id], [job.job_id])
        if out.returncode != 0:
            raise OrchError(f"scancel {job.job_id} failed: {out.stderr.strip()}")

    def rank_started(self) -> None:
        """slurmstepd ends a job's tasks with the job: nothing to tie."""

    def requeue(self, job_id: str, peer_pids: list[int]) -> int:
        """`scontrol requeue` (what submitit's own requeue runs): Slurm ends every task on every node and queues the
        job again."""
        try:
            subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True,
                           timeout=TIMEOUT_S)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as err:
            log.error("scontrol requeue %s failed (%s): the job ends without a requeue", job_id, err)
        return 1

    def keep_off(self, job_id: str, hosts: list[str]) -> None:
        """Slurm 22.05 refuses this for a job that is still running, so it comes after the requeue, while Slurm ends
        the job's tasks with SIGTERM: scontrol runs with SIGTERM ignored (inherited through exec), or it would die
        before its request reached slurmctld. Its answer is logged."""
        excluded = ",".join(hosts)
        done = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={excluded}"],
                              capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=ignore_sigterm)  # fmt: skip
        answer = "accepted" if done.returncode == 0 else done.stderr.strip() or f"scontrol exited {done.returncode}"
        log.warning("excluding %s from the next try: %s", excluded, answer)

    def requeue_preempted(self, job_id: str) -> None:
        """Slurm requeues a preempted job (PreemptMode=REQUEUE) only when its grace time runs out: one that saved
        and left within it ends as completed, so it is queued again here. scancel sends SIGTERM too, but marks the
        job CANCELLED first: a job that is no longer RUNNING in Slurm's eyes was cancelled (or already requeued),
        and stays so."""
        try:
            shown = scontrol("show", "job", "--oneliner", job_id) or ""
            state = scontrol_fields(shown).get("JobState", "unknown")
            if state != "RUNNING":
                log.info("SIGTERM, and job %s is %s: not requeued", job_id, state)
                return
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            log.error("scontrol requeue %s failed (%s): `orch resume` continues the run", job_id, err)
            return
        log.info("preempted: requeued job %s (%s)", job_id, done.stderr.strip() or "accepted")

    def ends(self, job_id: str) -> Ends | None:
        """The job's end time (`squeue %e`: it follows `scontrol update` of its limit) and the earliest reservation on
        its nodes that it does not run in (`scontrol show reservation`, node lists through `scontrol show
        hostnames`); None where squeue does not answer for the job."""
        out = run(["squeue", "--noheader", "--jobs", job_id, "--format", "%e|%N|%v"], [job_id])
        end_text, nodelist, own = [*out.stdout.strip().split("|"), "", "", ""][:3]
        if out.returncode != 0 or not end_text:
            return None
        hosts = hostnames(nodelist)
        shown = scontrol("show", "reservation", "--oneliner") or ""
        starts = [
            (fields["ReservationName"], start)
            for fields in map(scontrol_fields, shown.splitlines())
            if "ReservationName" in fields and fields["ReservationName"] != own
            if (start := slurm_time(fields.get("StartTime", ""))) is not None
            if hosts & hostnames(fields.get("Nodes", ""))
        ]
        return Ends(slurm_time(end_text), min(starts, key=lambda found: found[1], default=None))


def run(command: list[str], job_ids: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OrchError(f"Cannot reach Slurm ({command[0]}) about jobs {', '.join(job_ids)}: {err}") from None


def scontrol(*arguments: str) -> str | None:
    """What an scontrol command prints; None where it cannot be run or fails."""
    try:
        shown = subprocess.run(["scontrol", *arguments], capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shown.stdout if shown.returncode == 0 else None


def slurm_time(text: str) -> float | None:
    """Slurm's `YYYY-MM-DDTHH:MM:SS` (the controller's local time, as this machine's) in seconds since the epoch; None
    for N/A, Unknown, NONE and the like."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def hostnames(nodelist: str) -> set[str]:
    """A Slurm node list (`acn[01-04],acn07`) as host names, through `scontrol show hostnames`; empty for none."""
    if not nodelist.strip() or nodelist.strip() in ("(null)", "n/a"):
        return set()
    return set((scontrol("show", "hostnames", nodelist.strip()) or "").split())


def scontrol_fields(text: str) -> dict[str, str]:
    """The `Key=Value` words scontrol shows a job or a partition with (one line or several)."""
    return dict(word.split("=", 1) for word in text.split() if "=" in word)


def scontrol_settings(text: str) -> dict[str, str]:
    """The `Key = Value` lines of `scontrol show config`."""
    return {key: value.strip() for key, value in re.findall(r"^(\S+)\s+=\s+(.*)$", text, flags=re.MULTILINE)}


def site_settings() -> tuple[dict[str, str], dict[str, str]] | None:
    """Inside a Slurm job: the site's settings (`scontrol show config`) and its partition's fields; None outside
    one, or where scontrol cannot be run here."""
    partition = os.environ.get("SLURM_JOB_PARTITION")
    if "SLURM_JOB_ID" not in os.environ or shutil.which("scontrol") is None:
        return None
    shown = scontrol("show", "partition", partition) if partition else None
    return scontrol_settings(scontrol("show", "config") or ""), scontrol_fields(shown or "")


def partition_facts(line: str) -> PartitionFacts:
    """One line of `scontrol show partition --oneliner`."""
    fields = scontrol_fields(line)
    return PartitionFacts(
        name=fields["PartitionName"],
        max_time_min=slurm_minutes(fields.get("MaxTime", "UNLIMITED")),
        min_nodes=int(fields.get("MinNodes", "0")),
        max_nodes=None if fields.get("MaxNodes", "UNLIMITED") == "UNLIMITED" else int(fields["MaxNodes"]),
        grace_time_s=int(fields.get("GraceTime", "0")),
        preempt_mode=fields.get("PreemptMode", "OFF"),
        state=fields.get("State", "UP"),
        cpus=int(fields.get("TotalCPUs", "0")),
        nodes=int(fields.get("TotalNodes", "0")),
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


def partition_nodes(partition: str) -> list[str] | None:
    """The nodes of a Slurm partition, whatever their state; None where `sinfo` cannot say."""
    try:
        listed = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N"], capture_output=True, text=True,
                                timeout=TIMEOUT_S)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sorted(set(listed.stdout.split())) if listed.returncode == 0 and listed.stdout.strip() else None


def ignore_sigterm() -> None:
    """In a child before it execs: SIGTERM ignored (an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def excluding(
    profile: Profile, hosts: list[str], nodes_of: Callable[[str], list[str] | None] = partition_nodes
) -> Profile:
    """The profile with `hosts` kept out of the job (sbatch --exclude, besides any the profile names), unless that
    would leave the partition (its nodes as `nodes_of` lists them) fewer nodes than the job needs: such a job would
    wait for good, so it goes where it may and the suspects stay recorded (a warning says so)."""
    if not hosts or profile.slurm is None:
        return profile
    kept_off = sorted({*excluded(profile), *hosts})
    nodes = nodes_of(profile.slurm.partition)
    if nodes is not None and len(set(nodes) - set(kept_off)) < profile.nodes:
        log.warning(
            "not excluding the suspect hosts %s: partition %s has %d nodes (%s), and the job needs %d",
            ",".join(hosts), profile.slurm.partition, len(nodes), ",".join(nodes), profile.nodes,
        )  # fmt: skip
        return profile
    extra = {**profile.slurm.extra_sbatch, "exclude": ",".join(kept_off)}
    return profile.model_copy(update={"slurm": profile.slurm.model_copy(update={"extra_sbatch": extra})})


def excluded(profile: Profile) -> list[str]:
    """The hosts sbatch's `--exclude` keeps the profile's jobs off."""
    return [h for h in profile.slurm.extra_sbatch.get("exclude", "").split(",") if h] if profile.slurm else []


def ranges(profile: Profile) -> dict[str, str | int]:
    """sbatch's `--nodes=MIN-MAX` (in place of submitit's `--nodes=MAX`, which still sizes its list of tasks) and
    `--time-min`, where the profile asks for a range: Slurm may then start the job earlier on fewer nodes or with a
    shorter limit (docs/goodput.md#backfill-shaped-jobs)."""
    slurm = profile.slurm
    asked: dict[str, str | int] = {}
    if slurm and slurm.nodes_min is not None and slurm.nodes_min < profile.nodes:
        asked["nodes"] = f"{slurm.nodes_min}-{profile.nodes}"
    if slurm and slurm.time_min_min is not None and slurm.time_min_min < profile.time_limit_min:
        asked["time-min"] = int(slurm.time_min_min)
    return asked


def setup_lines(profile: Profile) -> list[str]:
    """Shell lines run before the job starts: the environment script and variables, all quoted."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in profile.env_vars.items()]
    if profile.env_script:
        if profile.paths.venv:
            lines.append(f"export ORCH_VENV={shlex.quote(fill_path(profile.paths.venv, profile))}")
        lines.append(f"source {shlex.quote(str(PROJECT_ROOT / profile.env_script))}")
    return lines
