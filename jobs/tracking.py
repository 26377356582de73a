"""MLflow tracking from rank 0: one MLflow run per orch run, continued across jobs."""

from __future__ import annotations

import time
from typing import Any

import mlflow

EXPERIMENT = "orch"


def flatten(prefix: str, data: Any) -> dict[str, str]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flatten(f"{prefix}.{key}", value).items()}
    return {prefix: str(data)}


class Tracker:
    """Starts (or, given an id, continues) the MLflow run and logs per-step metrics."""

    def __init__(self, uri: str, run_id: str | None, orch_run_id: str, params: dict[str, Any]) -> None:
        self.client = mlflow.MlflowClient(uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
            run = self.client.create_run(experiment_id, run_name=orch_run_id, tags={"orch.run_id": orch_run_id})
            run_id = run.info.run_id
            flat = {k: v for section, value in params.items() for k, v in flatten(section, value).items()}
            self.client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flat.items()])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        entries = [mlflow.entities.Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
