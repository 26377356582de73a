"""Settings that several commands resolve, resolved once in the core: the tracking store, the run store, and
whether a job is alive."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.errors import OrchError
from orchestrator.core.runfiles import JobRecord
from orchestrator.core.scheduler import LocalProcesses, Slurm, alive_jobs
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


def slurm_jobs(*ids: str) -> list[JobRecord]:
    return [JobRecord(job_id=job_id, executor="slurm", submitted=time.time()) for job_id in ids]


def test_a_slurm_job_is_alive_only_in_a_queued_or_running_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_squeue(tmp_path, monkeypatch, "1 RUNNING\\n2 COMPLETED\\n3 PENDING\\n4 REQUEUED\\n5 PREEMPTED\\n")
    alive = Slurm().alive(slurm_jobs("1", "2", "3", "4", "5", "6"))
    assert alive == {"1": True, "2": False, "3": True, "4": True, "5": False, "6": False}


def test_a_job_slurm_has_forgotten_is_gone_and_a_failing_squeue_is_an_error(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Invalid job id specified", rc=1)
    assert Slurm().alive(slurm_jobs("7")) == {"7": False}
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", rc=1)
    with pytest.raises(OrchError, match="Cannot ask Slurm about jobs 7: .*Unable to contact"):
        Slurm().alive(slurm_jobs("7"))


def fake_controller() -> subprocess.Popen:
    """A process whose command line is that of submitit's local job controller."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local._local"])


def local_job(pid: int, submitted: float | None = None) -> JobRecord:
    return JobRecord(job_id=str(pid), executor="local", submitted=time.time() if submitted is None else submitted)


def test_a_local_job_is_alive_while_its_controller_runs_and_not_as_a_zombie():
    controller = fake_controller()
    try:
        assert LocalProcesses().alive([local_job(controller.pid)]) == {str(controller.pid): True}
        controller.kill()
        os.waitid(os.P_PID, controller.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet collected: a zombie
        assert LocalProcesses().alive([local_job(controller.pid)]) == {str(controller.pid): False}
    finally:
        controller.kill()
        controller.wait()
    assert LocalProcesses().alive([local_job(controller.pid)]) == {str(controller.pid): False}


def test_a_reused_pid_is_not_the_job_and_gets_no_signal():
    started_before_the_record = fake_controller()
    other_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        recorded_an_hour_ago = local_job(started_before_the_record.pid, time.time() - 3600)
        assert LocalProcesses().alive([recorded_an_hour_ago]) == {str(started_before_the_record.pid): False}
        assert LocalProcesses().alive([local_job(other_process.pid)]) == {str(other_process.pid): False}
        LocalProcesses().cancel(recorded_an_hour_ago)
        LocalProcesses().cancel(local_job(other_process.pid))
        time.sleep(0.2)
        assert started_before_the_record.poll() is None and other_process.poll() is None
    finally:
        for process in (started_before_the_record, other_process):
            process.kill()
            process.wait()


def test_liveness_of_many_jobs_asks_each_scheduler_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_squeue(tmp_path, monkeypatch, "11 RUNNING\\n")
    controller = fake_controller()
    try:
        jobs = [*slurm_jobs("11", "12"), local_job(controller.pid)]
        assert alive_jobs(jobs) == {"11": True, "12": False, str(controller.pid): True}
    finally:
        controller.kill()
        controller.wait()
