#!/usr/bin/env bash
# The software environment for jobs on this machine (the `local` and `local-slurm` profiles):
# a virtual environment in .venv with orch, its test tools, lm-evaluation-harness and the CPU build of PyTorch.
# Usage: bash envs/local.sh          (idempotent; re-run after pulling)
set -euo pipefail
cd "$(dirname "$0")/.."
# torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
# envs/requirements.lock holds every package at the version the tests last passed with.
bash envs/venv-install.sh .venv -c envs/requirements.lock torch==2.13.0 -e '.[test,eval]'
echo "orch environment ready: $(pwd)/.venv (activate with: source .venv/bin/activate)"
