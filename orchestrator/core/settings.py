"""Settings that more than one command resolves: resolved here once, so that `orch submit`, the job, `orch ui`,
`orch sync` and `orch compare` always agree."""

from __future__ import annotations

import os
from pathlib import Path

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
