#!/usr/bin/env bash
# Install everything the test suite needs, then run it: lint, unit, and end-to-end tests.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash envs/local.sh
.venv/bin/ruff check orchestrator jobs tests
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
