#!/usr/bin/env bash
# Training throughput of the cstinyllama-1.2b recipe on one GPU: `orch bench` over a few variants, the table last.
#
# Usage: bash bench/gpu.sh [--dry-run] [more `orch bench` options]
#
# Settings (environment):
#   PEAK_TFLOPS  dense bf16 peak of the GPU for MFU: 989 for H100 SXM (and H200), 312 for A100; when unset it is
#                taken from nvidia-smi's GPU name for those cards
#   RECIPE       default cstinyllama-1.2b;  PROFILE default karolina (on a GPU its launch settings are not used)
#   STEPS        timed steps per variant, default 5;  WARMUP untimed steps before them, default 2
#   VARIANTS     space-separated `orch bench --variants` values; default: the recipe as it is (flash-attn 2 where it
#                imports, else SDPA), SDPA when flash-attn imports, compile, activation checkpointing, micro batch 4,
#                micro batch 16
#   PYTHON       default python
#
# Nothing is installed: torch with CUDA, transformers, accelerate, lion-pytorch, submitit, pydantic, typer, rich,
# pyyaml, numpy, tokenizers, zstandard and pyarrow must import (installed, or wheels unpacked on PYTHONPATH); flash-attn is optional.
# One rank, NCCL. The global batch is set to 8 for the benchmark (16 for the micro batch 16 variant): micro batch
# 8 × 2048 tokens × 1 GPU × accumulation 1, so each step is the recipe's per-GPU work without its 64-fold
# accumulation. The data is the demo corpus with its own small tokenizer (ids far below the vocabulary of 64000;
# the table's header line says how far). Well under 8 minutes on an H100.
#
# --dry-run checks the environment and prints the command. Without a GPU, the command runs on the profile's CPU
# ranks: `RECIPE=tiny PROFILE=local VARIANTS=recipe STEPS=2 bash bench/gpu.sh` checks this script on a laptop.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
RECIPE=${RECIPE:-cstinyllama-1.2b}
PROFILE=${PROFILE:-karolina}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi

"$PYTHON" - <<'EOF'
import importlib

for name in ("torch", "transformers", "accelerate", "lion_pytorch", "submitit", "pydantic", "typer", "rich", "yaml",
             "numpy", "tokenizers", "zstandard", "pyarrow"):  # everything `orch bench` imports, the data tools too
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '')}")
import torch

print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (the benchmark runs on CPU)")
EOF

FLASH=0
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
  FLASH=1
fi
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
if [ -z "${PEAK_TFLOPS:-}" ]; then
  case "$GPU_NAME" in
    *H100*|*H200*) PEAK_TFLOPS=989 ;;
    *A100*) PEAK_TFLOPS=312 ;;
    *) PEAK_TFLOPS="" ;;
  esac
fi
if [ -z "${VARIANTS:-}" ]; then
  VARIANTS="recipe"
  if [ "$FLASH" = 1 ]; then VARIANTS="$VARIANTS attention=sdpa"; fi
  VARIANTS="$VARIANTS compile=true activation_checkpointing=true micro_batch_size=4"
  VARIANTS="$VARIANTS micro_batch_size=16,global_batch_size=16"
fi

command=("$PYTHON" -m orchestrator bench --profile "$PROFILE" --recipe "$RECIPE" --steps "$STEPS" --warmup "$WARMUP"
  --ranks 1 --global-batch 8)
if [ -n "$PEAK_TFLOPS" ]; then command+=(--peak-tflops "$PEAK_TFLOPS"); fi
for variant in $VARIANTS; do command+=(--variants "$variant"); done
command+=("$@")

echo "GPU: ${GPU_NAME:-none}; flash-attn: $([ "$FLASH" = 1 ] && echo yes || echo no); peak: ${PEAK_TFLOPS:-unknown} TFLOP/s"
echo "${command[*]}"
if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi
date -u +"%Y-%m-%d %H:%M UTC"
timeout 480 "${command[@]}"
