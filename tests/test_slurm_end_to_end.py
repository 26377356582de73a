"""The Slurm path against a real slurmctld/slurmd on localhost: sbatch, srun, 2 tasks, gloo, MLflow."""

import json
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from orchestrator.core.config import load_profile, load_recipe
from orchestrator.core.plan import make_plan
from tests.conftest import (
    measure_pace,
    needs_slurm,
    orch,
    spooled_losses,
    status_json,
    steps_for_allocations,
    submitted_run_id,
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


def test_slurm_timeouts_requeue_until_done_with_the_uninterrupted_losses(orch_home: Path):
    """A 2-minute limit: the job's own deadline (set before Slurm's coarse signal can come) stops all ranks at a
    step boundary, they save, rank 0 requeues through submitit and Slurm starts the job again, until done. The steps
    are sized from this machine's measured pace to take about 2.5 allocations: at least 2 even if the machine gets
    much quieter meanwhile."""
    pace = measure_pace()
    _, profile = load_profile("local-slurm", [{"time_limit_min": 2}])
    stop_before_end_s = make_plan(profile, load_recipe("tiny")[1], 1).stop_before_end_s
    steps = steps_for_allocations(pace, 2.5, limit_s=120, stop_before_end_s=stop_before_end_s)
    run_id = submitted_run_id(orch("submit", "--profile", "local-slurm", "--steps", str(steps), "--time", "2"))
    run_dir = Path(status_json(run_id)["run_dir"])
    until = time.time() + 2400
    while status_json(run_id)["state"] not in ("completed", "failed") and time.time() < until:
        time.sleep(5)
    assert status_json(run_id)["state"] == "completed", (run_dir / "progress.json").read_text()
    attempts = json.loads((run_dir / "attempts.json").read_text())
    starts = [a["start_step"] for a in attempts]
    assert len(starts) >= 2 and starts == sorted(set(starts)), (pace, steps, starts)  # requeued, each progressed
    assert {a["job_id"] for a in attempts} == set(status_json(run_id)["job_ids"])  # one Slurm job, requeued

    # the uninterrupted reference; steps past the tiny schedule's end train at its floor, as in the submitted run
    assert orch("resume", pace.run_id, "--steps", str(steps), "--beyond-schedule", "floor", "--wait").returncode == 0
    assert spooled_losses(run_dir) == spooled_losses(Path(status_json(pace.run_id)["run_dir"]))
