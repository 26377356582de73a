"""submitit's LocalExecutor: a job is a controller process on this machine, whose PID is the job id, and one process
per rank below it. What a process is (a controller, a rank, of which job and folder) is read through psutil from
its command line and environment; psutil and submitit are imported when a local job is asked about, not before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.compat import (
    LOCAL_CONTROLLER_PROGRAM,
    LOCAL_REQUEUE_RETURN_CODE,
    SUBMITIT_CONTROLLER_MODULE,
    SUBMITIT_TASK_MODULE,
)
from orchestrator.core.schedulers.base import Ends, Job, PartitionFacts, StartHint, Usage, same_folder

if TYPE_CHECKING:  # the schemas are built where a profile is read, not by `orch status`
    from orchestrator.core.config import Profile

if TYPE_CHECKING:
    import psutil

JOB_ID_VARIABLE = "SUBMITIT_LOCAL_JOB_ID"  # the job id (its controller's PID) in every rank's environment
START_SLACK_S = 5.0  # a controller starts just before its job is recorded; a later start is another process
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CONTROLLER_MARKERS = (LOCAL_CONTROLLER_PROGRAM, SUBMITIT_CONTROLLER_MODULE)  # orch's, and earlier versions' jobs'


class Local:
    name = "local"
    sizes_signal_delay = False  # its controller signals exactly when the profile says
    signal_check_s = 0
    excludes_hosts = False
    dependencies = False
    one_machine = True

    def job_id_problem(self, job_id: str) -> str | None:
        if job_id.isdigit() and int(job_id) > 1:
            return None
        return f"local job id {job_id[:40]!r} is not a process id above 1"

    def executor(self, profile: Profile, folder: Path, max_requeues: int, signal_delay_s: int) -> Any:
        import submitit

        executor = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=max_requeues)
        executor.update_parameters(
            tasks_per_node=profile.launch.tasks_per_node,
            timeout_min=profile.time_limit_min,
            signal_delay_s=signal_delay_s,
        )
        return executor

    @contextmanager
    def submission(self, profile: Profile, log: Path, max_requeues: int) -> Iterator[None]:
        """A local job inherits this process's environment, open files and signal dispositions while it starts: give
        it the profile's variables (setup lines would put a shell between the job id and the job, which signals must
        reach) and a log file instead of our stdout and stderr (a pipe reading them would otherwise wait for the
        job). It starts in a session of its own, which neither Ctrl-C nor the terminal's hang-up (SIGHUP: an SSH
        connection that drops) reaches, and with SIGINT ignored: `--wait` stops following, the job trains on
        (`orch cancel` stops it). Its controller starts it once and again for each of the `max_requeues`."""
        saved_env, saved_fds = dict(os.environ), (os.dup(1), os.dup(2))
        saved_interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        saved_popen = subprocess.Popen
        os.environ.update(profile.env_vars)
        log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with log.open("a") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        subprocess.Popen = partial(SessionLeader, max_starts=max_requeues + 1)  # type: ignore[misc]
        try:
            yield
        finally:
            subprocess.Popen = saved_popen  # type: ignore[misc]
            for fd, saved in zip((1, 2), saved_fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            os.environ.clear()
            os.environ.update(saved_env)
            signal.signal(signal.SIGINT, saved_interrupt)

    def script(self, profile: Profile, folder: Path, max_requeues: int, signal_delay_s: int) -> str | None:
        return None

    def array_executor(self, profile: Profile, folder: Path, signal_delay_s: int, parallelism: int) -> Any:
        return self.executor(profile, folder, 0, signal_delay_s)

    def start_hint(self, script: str | None) -> StartHint:
        return StartHint(time.time(), "no queue: the local executor starts a job at once")

    def usage(self, account: str, since: float) -> Usage:
        return Usage(None, 0, "the local executor keeps no accounting")

    def accounts(self) -> set[str] | None:
        return None

    def partitions(self) -> dict[str, PartitionFacts] | None:
        return None

    def excluding(self, profile: Profile, hosts: list[str]) -> Profile:
        """One machine: there is nowhere else to go."""
        return profile

    def excluded(self, profile: Profile) -> list[str]:
        return []

    def folders(self, jobs: Sequence[Job]) -> dict[str, Path | None]:
        """A job lives while its controller does, or while ranks of it do (ranks that outlived a controller killed
        before they were tied to it, `rank_started`): a second job beside them would write the same run."""
        found: dict[str, Path | None] = {}
        for job in jobs:
            controller = controller_of(job)
            found[job.job_id] = controller[1] if controller else None
        for job_id, folder, _ in job_ranks([job for job in jobs if found[job.job_id] is None]):
            found[job_id] = folder
        return found

    def any_task_alive(self, jobs: Sequence[Job]) -> bool:
        found = self.folders(jobs)
        return any(found[job.job_id] is not None and same_folder(found[job.job_id], job.folder) for job in jobs)

    def cancel(self, job: Job) -> None:
        """Kill the job's ranks and what they started; the controller then ends by itself. Only processes of
        `job.folder`: its controller's descendants, or the ranks of it that outlived their controller."""
        controller = controller_of(job)
        if controller is not None:
            kill(children(controller[0]) if same_folder(controller[1], job.folder) else [])
        else:
            kill([rank for _, folder, rank in job_ranks([job]) if same_folder(folder, job.folder)])

    def rank_started(self) -> None:
        """Tie this rank to its controller: when the controller ends, however (kill -9 included), the kernel
        SIGKILLs the rank (prctl PR_SET_PDEATHSIG), so that no rank trains on unseen beside the job a resume starts.
        The kernel's signal arrives whatever the rank is doing, stopped or blocked in a collective, which no thread
        watching the parent can promise; such a thread is the fallback where there is no prctl (not Linux). A rank
        whose controller ended before the tie was made ends here."""
        controller = int(os.environ[JOB_ID_VARIABLE])
        if sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        else:
            threading.Thread(target=end_with_parent, args=(controller,), name="parent-watch", daemon=True).start()
        if os.getppid() != controller:
            os.kill(os.getpid(), signal.SIGKILL)

    def requeue(self, job_id: str, peer_pids: list[int]) -> int:
        """Kill the job's other ranks (SIGKILL ends a stopped one too) with what they started, and leave with
        submitit's requeue code, on which the controller starts every rank again. Only processes that are still
        this rank's siblings (children of its controller) are signalled, never one that took a number since."""
        import psutil

        for pid in peer_pids:
            try:
                peer = psutil.Process(pid)
                if peer.ppid() == os.getppid():
                    kill([peer, *children(peer)])
            except psutil.Error:
                continue
        return LOCAL_REQUEUE_RETURN_CODE

    def keep_off(self, job_id: str, hosts: list[str]) -> None:
        """One machine: there is nowhere else to go."""

    def requeue_preempted(self, job_id: str) -> None:
        """No scheduler preempts a local job: a SIGTERM that stopped it came from someone on this machine, and
        `orch resume` continues the run."""

    def ends(self, job_id: str) -> Ends | None:
        """The controller signals at the profile's time: the job keeps its own clock."""
        return None


class SessionLeader(subprocess.Popen):
    """A job controller in a session of its own (setsid) that starts the job up to `max_starts` times, where
    submitit's stops at six (`LOCAL_CONTROLLER_PROGRAM`). submitit's LocalExecutor starts its controller with
    `subprocess.Popen` and no way to ask for either, so `Local.submission` puts this class in its place while a job is
    submitted."""

    def __init__(self, command: Any, *args: Any, max_starts: int, **kwargs: Any) -> None:
        if isinstance(command, list) and named_folder(command, SUBMITIT_CONTROLLER_MODULE) is not None:
            at = command.index(SUBMITIT_CONTROLLER_MODULE)
            command = [*command[: at - 1], "-c", LOCAL_CONTROLLER_PROGRAM, command[at + 1], str(max_starts)]
        super().__init__(command, *args, **{**kwargs, "start_new_session": True})


def named_folder(command: list[str], *markers: str) -> Path | None:
    """The folder a controller's or a rank's command line names after its module or program (submitit's
    `FOLDER/%j`, whose parent is the folder the job was queued with); None for any other command line."""
    marker = next((word for word in markers if word in command[:-1]), None)
    if marker is None:
        return None
    return Path(command[command.index(marker) + 1]).parent


def controller_of(job: Job) -> tuple[psutil.Process, Path] | None:
    """The job's controller and the folder it names: the job id's process while it is a (not zombie) controller
    that started before the job was recorded (a PID reused since is not the job)."""
    import psutil

    try:
        process = psutil.Process(int(job.job_id))
        with process.oneshot():
            if process.status() == psutil.STATUS_ZOMBIE or process.create_time() > job.submitted + START_SLACK_S:
                return None
            folder = named_folder(process.cmdline(), *CONTROLLER_MARKERS)
    except psutil.Error:
        return None
    return (process, folder) if folder is not None else None


def job_ranks(jobs: Sequence[Job]) -> list[tuple[str, Path, psutil.Process]]:
    """The live rank processes of these local jobs on this machine, each with its job id and folder, from its
    environment and command line (one pass over the process table). A rank started before its job's controller
    could have belongs to an earlier job whose controller had the same PID."""
    if not jobs:
        return []
    import psutil

    recorded = {job.job_id: job.submitted for job in jobs}
    found = []
    for process in psutil.process_iter(["cmdline", "create_time"]):
        folder = named_folder(process.info["cmdline"] or [], SUBMITIT_TASK_MODULE)
        if folder is None:
            continue
        try:
            job_id = process.environ().get(JOB_ID_VARIABLE, "")
            if (
                process.info["create_time"] >= recorded.get(job_id, float("inf")) - START_SLACK_S
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append((job_id, folder, process))
        except psutil.Error:
            continue
    return found


def children(process: psutil.Process) -> list[psutil.Process]:
    """Every process below `process`, parents before their children; none once it is gone."""
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def descendants(pid: int) -> list[int]:
    """The PIDs of every process below `pid`, parents before their children."""
    import psutil

    try:
        return [child.pid for child in children(psutil.Process(pid))]
    except psutil.Error:
        return []


def kill(processes: list[psutil.Process]) -> None:
    """SIGKILL to each process that is still the one found (psutil checks that its PID was not reused)."""
    import psutil

    for process in processes:
        with suppress(psutil.Error):
            process.kill()


def end_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
