"""MLflow tracking against a real `mlflow server`: outages lose nothing, and nothing is sent twice."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from orchestrator.tools.sync import follow
from tests.conftest import (
    ROOT,
    free_port,
    kill_job_tree,
    orch,
    run_dir_of,
    spooled_losses,
    status_json,
    submitted_run_id,
    wait_for_step,
)

pytestmark = pytest.mark.slow


class MlflowServer:
    """A real tracking server on localhost that a test can stop and start again on the same store."""

    def __init__(self, store: Path) -> None:
        self.store, self.port, self.process = store, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.store}",
            "--default-artifact-root",
            (self.store.parent / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        until = time.time() + 120
        while time.time() < until:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def server(tmp_path: Path):
    server = MlflowServer(tmp_path / "tracking.db")
    yield server
    if server.process and server.process.poll() is None:
        server.stop()


def test_outages_at_start_and_mid_run_lose_nothing_and_send_nothing_twice(orch_home, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    steps = 150
    run_id = submitted_run_id(orch("submit", "--steps", str(steps)))  # the server is down at the start
    run_dir = run_dir_of(orch_home, run_id)
    wait_for_step(run_dir, 40)
    server.start()  # comes up mid-run
    wait_for_step(run_dir, 100)
    server.stop()  # and goes down again until after the run
    assert orch("resume", run_id, "--wait").returncode == 2  # still running: refused
    until = time.time() + 300
    while status_json(run_id)["state"] != "completed" and time.time() < until:
        time.sleep(1)
    assert status_json(run_id)["state"] == "completed"

    server.start()
    result = orch("sync", run_id)
    assert result.returncode == 0, result.stderr
    assert f"through step {steps}" in result.stdout
    assert orch("sync", run_id).returncode == 0  # a second sync sends nothing again

    client = mlflow.MlflowClient(server.uri)
    mlflow_run = client.get_run(status_json(run_id)["mlflow_run_id"])
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # every step, exactly once
    assert {m.step: m.value for m in history} == spooled_losses(run_dir)
    assert mlflow_run.data.tags["orch.run_id"] == run_id


def test_after_a_crash_and_resume_mlflow_shows_only_the_surviving_steps(orch_home):
    run_id = submitted_run_id(orch("submit", "--steps", "30"))
    run_dir = run_dir_of(orch_home, run_id)
    wait_for_step(run_dir, 17)  # checkpoint at 10; steps 11..17 will be rolled back
    kill_job_tree(status_json(run_id)["job_ids"][-1])
    client = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}")
    committed = json.loads((run_dir / "checkpoints/latest.json").read_text())["step"]
    if mlflow_run_id := status_json(run_id)["mlflow_run_id"]:
        assert all(m.step <= committed for m in client.get_metric_history(mlflow_run_id, "loss"))  # held back

    assert orch("resume", run_id, "--wait").returncode == 0
    mlflow_run_id = status_json(run_id)["mlflow_run_id"]
    history = client.get_metric_history(mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))
    assert {m.step: m.value for m in history} == spooled_losses(run_dir)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run_id, "orch")}
    assert {"orch/recipe.yaml", "orch/profile.yaml", "orch/logs"} <= artifacts


def test_spooling_jobs_leave_the_store_to_orch_sync_as_its_single_writer(orch_home):
    """`job_tracking: spool` (SQLite on a parallel filesystem): the job writes only metrics.jsonl; `orch sync` sends
    it, and the follower (`orch sync --follow`, started by `orch ui`) marks the MLflow run's end."""
    run_id = submitted_run_id(orch("submit", "--steps", "20", "--set", "job_tracking=spool", "--wait"))
    run_dir = run_dir_of(orch_home, run_id)
    assert not (orch_home / "mlflow.db").exists() and not (run_dir / "mlflow.json").exists()

    result = orch("sync")
    assert result.returncode == 0 and f"run {run_id} through step 20" in result.stdout, result.stdout + result.stderr
    mlflow_run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}")
    assert {m.step: m.value for m in client.get_metric_history(mlflow_run_id, "loss")} == spooled_losses(run_dir)
    assert client.get_run(mlflow_run_id).data.params["run.steps"] == "20"

    follow(interval_s=0.1, rounds=1)
    assert client.get_run(mlflow_run_id).info.status == "FINISHED"
    assert {"orch/recipe.yaml", "orch/logs"} <= {a.path for a in client.list_artifacts(mlflow_run_id, "orch")}
    assert len(client.get_metric_history(mlflow_run_id, "loss")) == 20  # nothing sent twice


def test_jobs_opening_a_fresh_sqlite_store_at_once_all_get_its_tables(tmp_path: Path):
    """A sweep's jobs start together on a new ORCH_HOME: each creating the store's schema at once, some failed."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opener = f"from jobs.tracking import client_for; print(len(client_for({store!r}).search_experiments()))"
    jobs = [
        subprocess.Popen([sys.executable, "-c", opener], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    results = [(job.wait(timeout=300), *job.communicate()) for job in jobs]
    assert [(code, out.strip()) for code, out, _ in results] == [(0, b"1")] * 3, [err[-500:] for *_, err in results]
