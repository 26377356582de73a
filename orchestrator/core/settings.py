"""Settings that more than one command resolves: resolved here once, so that `orch submit`, the job, `orch ui`,
`orch sync` and `orch compare` always agree."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `orch --help` builds no schema: the profile arrives already built
    from orchestrator.core.config import Profile

EXPERIMENT = "orch"  # the MLflow experiment every run reports to


def orch_home() -> Path:
    """ORCH_HOME, else ~/.orch: the run store and the embedded MLflow store."""
    return Path(os.environ.get("ORCH_HOME") or Path.home() / ".orch").expanduser().resolve()


def runs_root() -> Path:
    return orch_home() / "runs"


def named_tracking_uri(profile_uri: str | None = None) -> str | None:
    """MLFLOW_TRACKING_URI, else the profile's `tracking_uri`; None when neither names a store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or profile_uri


def embedded_store(home: Path) -> str:
    """The SQLite store beside the runs of an ORCH_HOME."""
    return f"sqlite:///{home / 'mlflow.db'}"


def tracking_uri(profile_uri: str | None = None) -> str:
    """The named store, else the embedded SQLite store in ORCH_HOME."""
    return named_tracking_uri(profile_uri) or embedded_store(orch_home())


def fill_path(template: str, profile: Profile) -> str:
    """A profile path with its placeholders ({account_lower}, {user}) filled in."""
    account = (profile.slurm.account if profile.slurm else None) or ""
    return template.format(account_lower=account.lower(), user=getpass.getuser())


def runs_location(profile: Profile) -> Path:
    """The folder that holds the profile's run directories (the profile's `paths.runs`, else ORCH_HOME's)."""
    return Path(fill_path(profile.paths.runs, profile)) if profile.paths.runs else runs_root()


UI_PORT = 5000  # where `orch ui` serves the MLflow UI unless told otherwise
# MLflow 3's UI opens in its GenAI view (traces, latency) unless the address asks for the "Model training" one
TRAINING_VIEW = "workflowType=machine_learning"


def experiment_page(experiment_id: str) -> str:
    """The UI address (after the server's) of the experiment's table of runs, in the training view."""
    return f"#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def run_page(experiment_id: str, mlflow_run_id: str) -> str:
    """The UI address (after the server's) of a run's charts: its page's "Model metrics" tab, in the training view."""
    return f"#/experiments/{experiment_id}/runs/{mlflow_run_id}/model-metrics?{TRAINING_VIEW}"
