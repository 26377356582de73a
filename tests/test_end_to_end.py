"""The whole local path, for real: CLI → submitit LocalExecutor (2 processes, gloo) → FSDP2 training → MLflow."""

from pathlib import Path

import mlflow
import pytest

from tests.conftest import orch, status_json

pytestmark = pytest.mark.slow


def test_local_submit_trains_checkpoints_and_tracks(orch_home: Path):
    result = orch("submit", "--profile", "local", "--recipe", "tiny", "--steps", "20", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr

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
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert len(client.get_metric_history(run["mlflow_run_id"], key)) == 20
