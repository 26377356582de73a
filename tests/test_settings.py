"""Settings that several commands resolve, resolved once in the core: the tracking store, the run store, and
whether a job is alive."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.compat import SUBMITIT_CONTROLLER_MODULE
from orchestrator.core.errors import OrchError
from orchestrator.core.schedulers import alive_jobs
from orchestrator.core.schedulers.base import Job
from orchestrator.core.schedulers.local import Local
from orchestrator.core.settings import runs_root, tracking_uri


def test_tracking_store_is_the_environment_then_the_profile_then_the_embedded_store(orch_home: Path, monkeypatch):
    assert tracking_uri(None) == f"sqlite:///{orch_home.resolve() / 'mlflow.db'}"
    assert tracking_uri("http://tracking:5000") == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking_uri("http://tracking:5000") == "http://elsewhere:5000"


def test_runs_live_under_orch_home(orch_home: Path):
    assert runs_root() == orch_home.resolve() / "runs"


def fake_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str, stderr: str = "", rc: int = 0) -> None:
    """A `squeue` on PATH that answers as Slurm would."""
    script = tmp_path / "squeue"
    script.write_text(f"#!/bin/sh\nprintf '{stdout}'\nprintf '{stderr}' >&2\nexit {rc}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


FOLDER = Path("/runs/RUN/submitit")  # the folder the jobs below were queued with: their run's


def squeue_lines(*jobs: tuple[str, str], folder: Path = FOLDER) -> str:
    """What squeue prints of jobs (id, state) that submitit queued with `folder` (`%%` is printf's `%`)."""
    return "".join(f"{job_id}|{state}|{folder}/%%j/%%j_0_log.out\\n" for job_id, state in jobs)


def alive(jobs: list[Job]) -> dict[str, bool]:
    """By job id, whether each job is alive as its run's."""
    return {job.job_id: is_alive for job, is_alive in alive_jobs(jobs).items()}


def slurm_jobs(*ids: str) -> list[Job]:
    return [Job("slurm", job_id, time.time(), FOLDER) for job_id in ids]


def test_a_slurm_job_is_alive_only_in_a_queued_or_running_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    states = ("RUNNING", "COMPLETED", "PENDING", "REQUEUED", "PREEMPTED")
    fake_squeue(tmp_path, monkeypatch, squeue_lines(*((str(i), state) for i, state in enumerate(states, 1))))
    expected = {"1": True, "2": False, "3": True, "4": True, "5": False, "6": False}
    assert alive(slurm_jobs(*expected)) == expected


def test_a_job_slurm_has_forgotten_is_gone_and_a_failing_squeue_is_an_error(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Invalid job id specified", rc=1)
    assert alive(slurm_jobs("7")) == {"7": False}
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", rc=1)
    with pytest.raises(OrchError, match="Cannot ask Slurm about jobs 7: .*Unable to contact"):
        alive(slurm_jobs("7"))


def fake_controller(folder: Path = FOLDER) -> subprocess.Popen:
    """A process whose command line is that of submitit's local job controller for jobs queued with `folder`."""
    sleep = "import time; time.sleep(60)"
    controller = subprocess.Popen([sys.executable, "-c", sleep, SUBMITIT_CONTROLLER_MODULE, str(folder / "%j")])
    command = Path(f"/proc/{controller.pid}/cmdline")
    deadline = time.monotonic() + 30  # until the process table shows the new command line, however busy the machine
    while SUBMITIT_CONTROLLER_MODULE.encode() not in command.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    return controller


def local_job(pid: int, submitted: float | None = None, folder: Path = FOLDER) -> Job:
    return Job("local", str(pid), time.time() if submitted is None else submitted, folder)


def test_a_local_job_is_alive_while_its_controller_runs_and_not_as_a_zombie():
    controller = fake_controller()
    try:
        assert alive([local_job(controller.pid)]) == {str(controller.pid): True}
        controller.kill()
        os.waitid(os.P_PID, controller.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet collected: a zombie
        assert alive([local_job(controller.pid)]) == {str(controller.pid): False}
    finally:
        controller.kill()
        controller.wait()
    assert alive([local_job(controller.pid)]) == {str(controller.pid): False}


def test_a_reused_pid_is_not_the_job_and_gets_no_signal():
    started_before_the_record = fake_controller()
    other_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        recorded_an_hour_ago = local_job(started_before_the_record.pid, time.time() - 3600)
        assert alive([recorded_an_hour_ago]) == {str(started_before_the_record.pid): False}
        assert alive([local_job(other_process.pid)]) == {str(other_process.pid): False}
        Local().cancel(recorded_an_hour_ago)
        Local().cancel(local_job(other_process.pid))
        time.sleep(0.2)
        assert started_before_the_record.poll() is None and other_process.poll() is None
    finally:
        for process in (started_before_the_record, other_process):
            process.kill()
            process.wait()


def test_liveness_of_many_jobs_asks_each_scheduler_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_squeue(tmp_path, monkeypatch, squeue_lines(("11", "RUNNING")))
    controller = fake_controller()
    try:
        jobs = [*slurm_jobs("11", "12"), local_job(controller.pid)]
        assert alive(jobs) == {"11": True, "12": False, str(controller.pid): True}
    finally:
        controller.kill()
        controller.wait()
