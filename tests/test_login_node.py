"""The login-node side stays light: the CLI answers without importing the training stack."""

import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "accelerate", "mlflow", "lion_pytorch")


def test_orchestrator_never_imports_the_training_stack():
    code = (
        "import sys, orchestrator.cli, orchestrator.submit, orchestrator.follow, orchestrator.runs, orchestrator.show,"
        " orchestrator.logs, orchestrator.commands.bench, jobs.entry;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
