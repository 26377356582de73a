#!/usr/bin/env bash
# Create the virtual environment VENV if it is missing, then install into it with uv, which resolves and downloads in
# parallel: seconds where pip takes minutes. Wheels that lie on this machine's disk (PIP_FIND_LINKS, as pip would use
# them: the CPU build of torch here) are offered to uv too. Modules are compiled to bytecode at install, as pip does:
# every job, rank and command imports torch and transformers, and with PYTHONDONTWRITEBYTECODE set nothing would
# cache their compiled code.
# Usage: bash envs/venv-install.sh VENV [uv pip install arguments...]
set -euo pipefail
venv=$1
shift
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check uv
links=()
for dir in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$dir"); done
"$venv/bin/python" -m uv pip install --quiet --compile-bytecode --python "$venv/bin/python" "${links[@]}" "$@"
