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
bash envs/lowest.sh
# The fast tests, and beside them the same code on every direct dependency's lower bound (pyproject.toml): the fast
# tests (not the run-directory fuzzing of test_damage.py, which exercises orch's own reading rather than a library)
# and one training run. Each pytest is mostly one process and there are two cores. Then the end-to-end tests alone:
# they start jobs and wait on Slurm's timing, which a busier machine would stretch.
lowest_log=$(mktemp)
{
  .venv-lowest/bin/python -m pytest -q -p no:cacheprovider -m "not slow" --ignore=tests/test_damage.py tests/ \
    && .venv-lowest/bin/python -m pytest -q -p no:cacheprovider tests/test_end_to_end.py
} >"$lowest_log" 2>&1 &
lowest_pid=$!
# A background job ignores the Ctrl-C that stops this script. (The trap runs under `set -e`: nothing in it may fail.)
trap 'pkill -P "$lowest_pid" 2>/dev/null || true; kill "$lowest_pid" 2>/dev/null || true' EXIT
set +e
.venv/bin/python -m pytest -m "not slow" "$@"
fast=$?
wait "$lowest_pid"
lowest=$?
echo "== the lowest supported versions (.venv-lowest, envs/lowest.sh): the fast tests and test_end_to_end.py"
cat "$lowest_log"
rm -f "$lowest_log"
.venv/bin/python -m pytest -m slow "$@"
slow=$?
set -e
# 5: no test collected. Arguments that select only fast or only slow tests leave the other run empty.
if [ "$fast" -eq 5 ] && [ "$slow" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
[ "$fast" -eq 5 ] && fast=0
[ "$slow" -eq 5 ] && slow=0
if [ "$lowest" -ne 0 ]; then
  echo "error: the tests failed on the lowest supported versions (.venv-lowest, envs/lowest.sh)" >&2
fi
[ "$fast" -eq 0 ] && [ "$slow" -eq 0 ] && [ "$lowest" -eq 0 ]
