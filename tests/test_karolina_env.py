"""envs/karolina.sh in a new login shell under Lmod, with modules of Karolina's names (envs/karolina-modules.sh):
what each new shell and each job gets, and what a module that does not load says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

ENV_SCRIPT = ROOT / "envs" / "karolina.sh"
VENV = Path(sys.prefix)  # this test's own environment stands in for the one `bash envs/karolina.sh` builds


def lmod_ready() -> bool:
    """Lmod with the stand-in modules; CI (root) installs them, elsewhere their absence skips these tests."""
    ready = Path("/etc/profile.d/lmod.sh").is_file() and Path("/etc/lmod/modules/Python").is_dir()
    if not ready and os.environ.get("CI") == "true":
        pytest.fail("Lmod or the Karolina modules are missing: run envs/karolina-modules.sh (tests/run.sh does)")
    return ready


pytestmark = pytest.mark.skipif("not __import__('tests.test_karolina_env').test_karolina_env.lmod_ready()")


def login_shell(commands: str, home: Path, script: Path = ENV_SCRIPT) -> subprocess.CompletedProcess[str]:
    """A new login shell as SSH gives one: a clean environment, /etc/profile (which sets up Lmod), then `commands`
    after the README's line for every new shell."""
    home.mkdir(exist_ok=True)
    line = f"export ORCH_VENV={VENV} ORCH_HOME={home / 'orch'} && source {script}"
    return subprocess.run(
        ["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", "USER=orch", "bash", "-l", "-c", f"{line}\n{commands}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_a_new_login_shell_gets_python_s_module_and_the_environment_but_no_cuda_toolkit(tmp_path: Path):
    shown = login_shell('echo "modules=$LOADEDMODULES"; command -v python; echo "ld=$LD_LIBRARY_PATH"', tmp_path)
    assert shown.returncode == 0, shown.stderr
    modules, python, ld = shown.stdout.splitlines()[-3:]
    assert modules == "modules=Python/3.11.5-GCCcore-13.2.0"  # no CUDA module ahead of torch's own libraries
    assert python == str(VENV / "bin" / "python") and "CUDA" not in ld


def test_orch_answers_in_that_shell(tmp_path: Path):
    shown = login_shell("orch --help >/dev/null && echo orch-ok && python -c 'import torch; print(torch.__version__)'",
                        tmp_path)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "orch-ok" in shown.stdout


def test_a_module_that_does_not_load_is_named_and_the_shell_goes_on(tmp_path: Path):
    script = tmp_path / "envs" / "karolina.sh"
    script.parent.mkdir()
    text = ENV_SCRIPT.read_text().replace("Python/3.11.5-GCCcore-13.2.0", "Python/3.99.0-GCCcore-99")
    script.write_text(text)
    shutil.copy(ROOT / "envs" / "requirements.lock", script.parent)
    shown = login_shell("echo still-here", tmp_path / "home", script)
    assert "could not load the modules Python/3.99.0-GCCcore-99" in shown.stderr
    assert "still-here" in shown.stdout  # sourced: the login shell is not closed
    run = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"ORCH_VENV={VENV}", "bash", "-l", str(script)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1 and "could not load the modules" in run.stderr  # run: it stops there


def test_a_shell_without_the_built_environment_is_told_how_to_build_it(tmp_path: Path):
    missing = tmp_path / "no-venv"
    shown = login_shell(f"export ORCH_VENV={missing} && source {ENV_SCRIPT}; echo rc=$?", tmp_path)
    assert f"no virtual environment in {missing}" in shown.stderr and "bash envs/karolina.sh" in shown.stderr
    assert "rc=1" in shown.stdout
