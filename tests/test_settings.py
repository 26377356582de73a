"""Settings that several commands resolve, resolved once in the core: the tracking store, the run store, and
whether a job is alive."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.errors import OrchError
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


def test_a_slurm_job_is_alive_only_in_a_queued_or_running_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_squeue(tmp_path, monkeypatch, "1 RUNNING\\n2 COMPLETED\\n3 PENDING\\n4 REQUEUED\\n5 PREEMPTED\\n")
    alive = Slurm().alive(["1", "2", "3", "4", "5", "6"])
    assert alive == {"1": True, "2": False, "3": True, "4": True, "5": False, "6": False}


def test_a_job_slurm_has_forgotten_is_gone_and_a_failing_squeue_is_an_error(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Invalid job id specified", rc=1)
    assert Slurm().alive(["7"]) == {"7": False}
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", rc=1)
    with pytest.raises(OrchError, match="Cannot ask Slurm about jobs 7: .*Unable to contact"):
        Slurm().alive(["7"])


def test_a_local_job_is_alive_while_its_process_runs_and_not_as_a_zombie():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert LocalProcesses().alive([str(child.pid)]) == {str(child.pid): True}
        child.kill()
        child_exited = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet collected
        assert child_exited is not None
        assert LocalProcesses().alive([str(child.pid)]) == {str(child.pid): False}
    finally:
        child.kill()
        child.wait()
    assert LocalProcesses().alive([str(child.pid)]) == {str(child.pid): False}


def test_liveness_of_many_jobs_asks_each_scheduler_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_squeue(tmp_path, monkeypatch, "11 RUNNING\\n")
    jobs = [{"job_id": "11", "executor": "slurm"}, {"job_id": "12", "executor": "slurm"}]
    jobs.append({"job_id": str(os.getpid()), "executor": "local"})
    assert alive_jobs(jobs) == {"11": True, "12": False, str(os.getpid()): True}
