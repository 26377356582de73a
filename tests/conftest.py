from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def orch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "orch-home"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def orch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `orch` command line in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        cwd=ROOT,
    )


def status_json(run_id: str | None = None) -> dict | list:
    result = orch("status", "--json", *([run_id] if run_id else []))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def slurm_available() -> bool:
    """A local Slurm answering `sinfo` (envs/slurm-local.sh starts one). In CI it is required, never skipped."""
    try:
        ok = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        ok = False
    if not ok and os.environ.get("ORCH_REQUIRE_SLURM") == "1":
        pytest.fail("ORCH_REQUIRE_SLURM=1 but no Slurm answers: run envs/slurm-local.sh")
    return ok


needs_slurm = pytest.mark.skipif(
    "not __import__('tests.conftest').conftest.slurm_available()",
    reason="no local Slurm (run: bash envs/slurm-local.sh)",
)
