#!/usr/bin/env bash
# Install everything the test suite needs, then run it: lint, unit, and end-to-end tests.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash envs/local.sh
# The end-to-end tests need a local Slurm and a browser (root installs them); CI never skips them.
if [ "$(id -u)" -eq 0 ]; then
  bash envs/slurm-local.sh
  # The two-node cluster, with the simulated Karolina around it: scratch, a login host, Lmod (docs/karolina-sim.md).
  bash envs/karolina-sim.sh
  if ! command -v chromium >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
if [ "${CI:-}" = "true" ]; then export ORCH_REQUIRE_SLURM=1; fi
.venv/bin/ruff check orchestrator jobs tests bench
.venv/bin/lint-imports  # the import contract in pyproject.toml
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
# The same code on every direct dependency's lower bound (pyproject.toml): the fast tests and one training run
# (not the run-directory fuzzing of test_damage.py, which exercises orch's own reading rather than a library).
bash envs/lowest.sh
lowest=0
.venv-lowest/bin/python -m pytest -q -m "not slow" --ignore=tests/test_damage.py tests/ \
  && .venv-lowest/bin/python -m pytest -q tests/test_end_to_end.py \
  || lowest=$?
if [ "$rc" -eq 0 ] && [ "$lowest" -ne 0 ]; then
  echo "error: the tests failed on the lowest supported versions (.venv-lowest, envs/lowest.sh)" >&2
  exit 1
fi
exit "$rc"
