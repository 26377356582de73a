"""The whole local path, for real: CLI → submitit LocalExecutor (2 processes, gloo) → FSDP2 training → MLflow; and
what a user follows it with (`orch follow`, `orch logs -f`, `orch ls`)."""

import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from orchestrator.core.rundir import TERMINAL_STATES, Run
from tests.conftest import ROOT, orch, run_dir_of, status_json, submitted_run_id

pytestmark = pytest.mark.slow

JOB_LOG_LINES = (  # rank 0's progress lines (jobs/progress_log.py) for 20 steps of the tiny recipe
    "step 1/20 | loss",
    "step 10/20 | loss",
    "validation at step 10: val_loss",
    "checkpoint saved at step 10 (committed)",
    "step 20/20 | loss",
    "checkpoint saved at step 20 (committed)",
    "training completed: 20 steps",
)


def orch_in_background(*args: str, output: int | object = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args], stdout=output, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )


def first_line(process: subprocess.Popen[str], timeout: float = 120) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"{process.args} printed nothing"
    return process.stdout.readline()


def test_local_submit_trains_checkpoints_and_tracks(orch_home: Path, tmp_path: Path):
    run_id = submitted_run_id(orch("submit", "--profile", "local", "--recipe", "tiny", "--steps", "20"))
    handle = Run(run_dir_of(orch_home, run_id))
    with (tmp_path / "followed.log").open("w") as followed:
        logs = orch_in_background("logs", run_id, "-f", output=followed)
    display, detached = orch_in_background("follow", run_id), orch_in_background("follow", run_id)
    for follower in (display, detached):
        assert first_line(follower).startswith(f"Following run {run_id} to its end")
    assert handle.state() not in TERMINAL_STATES  # they follow a run whose job is going on
    detached.send_signal(signal.SIGINT)
    assert "its job goes on" in detached.communicate(timeout=60)[0] and detached.returncode == 130

    shown = display.communicate(timeout=600)[0]  # each ends by itself once the run has ended
    assert display.returncode == 0 and handle.state() == "completed", shown
    assert f"Run {run_id} completed 20 steps" in shown
    assert logs.wait(timeout=600) == 0 and handle.state() == "completed"
    followed = (tmp_path / "followed.log").read_text()
    assert all(line in followed for line in JOB_LOG_LINES), followed
    finished = orch("logs", run_id, "-f")  # a finished run: its log, and the command returns
    assert finished.returncode == 0 and JOB_LOG_LINES[-1] in finished.stdout, finished.stdout + finished.stderr
    listed = orch("ls").stdout
    assert re.search(rf"^{run_id} +completed +20/20 +local +tiny *$", listed, re.MULTILINE), listed

    [run] = status_json()
    assert run["state"] == "completed"
    assert (run["step"], run["steps"], run["last_checkpoint_step"]) == (20, 20, 20)
    assert len(run["job_ids"]) == 1
    assert (Path(run["run_dir"]) / "checkpoints/step_00000020/.metadata").is_file()
    assert len(list((Path(run["run_dir"]) / "checkpoints/step_00000020").glob("*.distcp"))) == 2  # one shard per rank

    client = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}")
    mlflow_run = client.get_run(run["mlflow_run_id"])
    assert mlflow_run.data.tags["orch.run_id"] == run["run_id"]
    assert mlflow_run.data.params["recipe.train.global_batch_size"] == "16"
    losses = client.get_metric_history(run["mlflow_run_id"], "loss")
    assert [m.step for m in losses] == list(range(1, 21))
    assert losses[-1].value < losses[0].value
    for key in ("lr", "system/grad_norm", "tokens_per_s"):  # the job's figures in MLflow's System metrics tab
        assert len(client.get_metric_history(run["mlflow_run_id"], key)) == 20
