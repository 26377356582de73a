#!/usr/bin/env bash
# A second virtual environment, .venv-lowest, with every direct dependency of orch (and of its test extra) at the
# lower bound that pyproject.toml declares, so the bounds stay true: tests/run.sh runs a subset of the suite in it.
# envs/requirements-lowest.txt is written from pyproject.toml's bounds each run (commit it when it changes).
# Usage: bash envs/lowest.sh          (idempotent; re-run after a bound changes)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" - <<'PY'
"""Pin each `name>=X` of [project].dependencies and the test extra to `name==X`."""
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = []
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
    if match is None:
        raise SystemExit(f"envs/lowest.sh: no plain lower bound in {requirement!r}")
    name, version = match.groups()
    # torch: the CPU build of 2.13.0 (the lowest that is installable on this machine).
    pins.append("torch==2.13.0" if name == "torch" else f"{name}=={version}")
header = "# The lower bounds of pyproject.toml, pinned; written by envs/lowest.sh.\n"
open("envs/requirements-lowest.txt", "w").write(header + "\n".join(pins) + "\n")
PY
bash envs/venv-install.sh .venv-lowest -r envs/requirements-lowest.txt -e .  # the pins satisfy orch's own bounds
echo "lowest-versions environment ready: $(pwd)/.venv-lowest"
