#!/usr/bin/env bash
# The GPU path end to end: a real `orch submit` on the local-gpu profile (one rank per visible GPU, NCCL, the
# LocalExecutor), a 2-layer cut of the cstinyllama-1.2b recipe with async checkpoints of CUDA tensors, killed with
# SIGKILL mid-run, `orch resume`d, and compared step by step with an uninterrupted run: the losses must be bitwise
# equal. Then bench/gpu.sh (throughput of the full recipe's variants) unless SKIP_BENCH=1.
#
# Usage: bash bench/gpu_e2e.sh            (about 5 minutes on one H100/H200 with SKIP_BENCH=1)
# Settings (environment): PROFILE (default local-gpu), RECIPE (a recipe file or name; default: the 2-layer cut
# written here), STEPS (default 40), KILL_AT (default 23), PYTHON (default python), SKIP_BENCH.
#
# Nothing is installed. Beyond torch, transformers, accelerate, numpy, tokenizers, pyyaml, rich and typer it needs
# submitit, lion-pytorch, pydantic (with pydantic-core, annotated-types, typing-inspection, typing_extensions >= 4.16),
# zstandard, psutil and pyarrow to import: carry their wheels and put them on PYTHONPATH. mlflow is not needed: the
# profile spools (`job_tracking: spool`), and `orch sync` would send the metrics later. On a machine without a GPU,
# `PROFILE=local RECIPE=tiny STEPS=20 KILL_AT=13 SKIP_BENCH=1 bash bench/gpu_e2e.sh` checks the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
PROFILE=${PROFILE:-local-gpu}
STEPS=${STEPS:-40}
KILL_AT=${KILL_AT:-23}
export ORCH_HOME=${ORCH_HOME:-$(mktemp -d)/orch}
WORK=$(dirname "$ORCH_HOME")
orch() { "$PYTHON" -m orchestrator "$@"; }

if [ -z "${RECIPE:-}" ]; then
  RECIPE=$WORK/cstinyllama-2-layers.yaml
  cat > "$RECIPE" <<YAML
extends: $PWD/recipes/cstinyllama-1.2b.yaml
description: cstinyllama-1.2b cut to 2 layers, for the GPU end-to-end check
model: {num_layers: 2}
train: {global_batch_size: 16, micro_batch_size: 8, compile: false, activation_checkpointing: false}
checkpoint: {every_steps: 10, keep_last: 2, keep_every: 1000, async_save: true}
eval: {every_steps: 1000, blocks: 8}
schedule: {total_steps: 1000}
YAML
fi
GPUS=0
if command -v nvidia-smi >/dev/null; then GPUS=$(nvidia-smi -L | wc -l); fi
SET=()
if [ "$PROFILE" = local-gpu ]; then SET=(--set "launch.tasks_per_node=$GPUS" --set "node.gpus=$GPUS"); fi

run_id() { sed -n 's/.*Submitted run \([^ ]*\).*/\1/p' | head -n 1; }
state() { orch status "$1" --json | "$PYTHON" -c 'import json,sys; s=json.load(sys.stdin); print(s["state"], s["step"])'; }
losses() { "$PYTHON" -c 'import json,sys; print(json.dumps({e["step"]: e["metrics"]["loss"] for e in map(json.loads, open(sys.argv[1]))}))' "$ORCH_HOME/runs/$1/metrics.jsonl"; }

echo "== uninterrupted run ($STEPS steps) on $PROFILE, $GPUS GPU(s)"
REFERENCE=$(orch submit --profile "$PROFILE" --recipe "$RECIPE" --steps "$STEPS" "${SET[@]}" --wait | tee /dev/stderr | run_id)

echo "== the same run, killed with SIGKILL at step $KILL_AT, then resumed"
KILLED=$(orch submit --profile "$PROFILE" --recipe "$RECIPE" --steps "$STEPS" "${SET[@]}" | tee /dev/stderr | run_id)
SPOOL=$ORCH_HOME/runs/$KILLED/metrics.jsonl  # one line per step, written as the step ends: faster to poll than status
until [ -f "$SPOOL" ] && [ "$(wc -l < "$SPOOL")" -ge "$KILL_AT" ]; do
  sleep 0.05
done
JOB=$(orch status "$KILLED" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["job_ids"][-1])')
"$PYTHON" - "$JOB" <<'PY'
import os, signal, sys
from orchestrator.core.schedulers.local import descendants
job = int(sys.argv[1])
for pid in [job, *descendants(job)]:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
PY
echo "killed job $JOB at: $(state "$KILLED")"
orch resume "$KILLED" --wait

"$PYTHON" - "$(losses "$REFERENCE")" "$(losses "$KILLED")" <<'PY'
import json, sys
reference, resumed = (json.loads(a) for a in sys.argv[1:3])
differ = [s for s in reference if reference[s] != resumed.get(s)]
print(f"{len(reference)} steps compared; {len(differ)} differ" + (f": steps {differ[:10]}" if differ else " (bitwise equal)"))
sys.exit(1 if differ or reference.keys() != resumed.keys() else 0)
PY

if [ -z "${SKIP_BENCH:-}" ]; then bash bench/gpu.sh; fi
