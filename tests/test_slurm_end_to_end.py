"""The Slurm path against a real slurmctld/slurmd on localhost: sbatch, srun, 2 tasks, gloo, MLflow."""

import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.conftest import (
    needs_slurm,
    orch,
    status_json,
)

pytestmark = [pytest.mark.slow, needs_slurm]


def test_local_slurm_submit_runs_two_tasks_under_slurm_and_tracks(orch_home: Path):
    result = orch("submit", "--profile", "local-slurm", "--recipe", "tiny", "--steps", "20", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr

    [run] = status_json()
    assert (run["state"], run["step"], run["last_checkpoint_step"]) == ("completed", 20, 20)
    [job_id] = run["job_ids"]
    run_dir = Path(run["run_dir"])
    assert (run_dir / "jobs.json").read_text().count('"executor": "slurm"') == 1
    logs = sorted((run_dir / "submitit" / job_id).glob(f"{job_id}_*_log.out"))
    assert [p.name for p in logs] == [f"{job_id}_0_log.out", f"{job_id}_1_log.out"]  # two Slurm tasks
    script = (run_dir / "submitit" / job_id / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --partition=debug" in script
    scontrol = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert f"JobName=orch-{run['run_id']}" in scontrol  # Slurm itself knows the job

    client = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}")
    losses = client.get_metric_history(run["mlflow_run_id"], "loss")
    assert len(losses) == 20 and losses[-1].value < losses[0].value
