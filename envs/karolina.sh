#!/usr/bin/env bash
# The software environment on IT4I Karolina (profiles karolina*).
#   bash envs/karolina.sh      once, on a login node (internet): builds the virtual environment in $ORCH_VENV
#   source envs/karolina.sh    in every new login shell, and in every job (no internet): loads the run-time modules,
#                              activates the environment, sets NCCL for InfiniBand
# `orch env setup --profile karolina --account ID` runs the first form with ORCH_VENV from the profile.

# Module versions: the one place to change them (`ml av Python CUDA` on a login node lists the current ones).
# Run time needs only Python: the venv is made from it and uses its shared libraries (libbz2, libffi...). torch's
# wheel brings its own CUDA libraries and needs only the driver; a CUDA module on LD_LIBRARY_PATH ahead of them is
# a known way for `import torch` to fail, so the toolkit is loaded only to compile flash-attn, in torch's version.
ORCH_MODULES=(Python/3.11.5-GCCcore-13.2.0)
ORCH_BUILD_MODULES=(CUDA/12.8.0)        # matches ORCH_TORCH_INDEX's cu128
ORCH_TORCH="torch==2.13.0"             # orch needs torch >= 2.13
# PyPI's default Linux build of torch 2.13 is for CUDA 13, which needs an NVIDIA driver >= 580; a CUDA 12 build
# runs on the driver of any CUDA 12 module. Set ORCH_TORCH_INDEX= (empty) to take the default index instead.
ORCH_TORCH_INDEX=${ORCH_TORCH_INDEX-https://download.pytorch.org/whl/cu128}
: "${ORCH_VENV:?set ORCH_VENV to the virtual environment folder, e.g. /scratch/project/<id>/orch/venv}"
ORCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Stop a sourced script without closing the shell that sourced it; stop a run script with status 1.
orch_env_fail() {
  echo "envs/karolina.sh: $1" >&2
  if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then exit 1; fi
}

ml purge >/dev/null 2>&1 || true
# A module that does not load stops here, with its name, instead of surfacing later as an import error.
if ! ml "${ORCH_MODULES[@]}"; then
  orch_env_fail "could not load the modules ${ORCH_MODULES[*]} (see \`ml av Python\`; the versions are at the top of envs/karolina.sh)"
  return 1 2>/dev/null
fi

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  # envs/venv-install.sh makes the venv from the module's python and installs with uv: it resolves and downloads
  # in parallel (measured on the simulated Karolina: 2 min 59 s with pip, see docs/karolina-sim.md).
  install=(bash "$ORCH_REPO/envs/venv-install.sh" "$ORCH_VENV")
  mkdir -p "$ORCH_VENV"
  # The tested versions of everything but torch (the lock's torch is the CPU build of envs/local.sh).
  grep -v '^torch==' "$ORCH_REPO/envs/requirements.lock" > "$ORCH_VENV/constraints.txt"
  "${install[@]}" "$ORCH_TORCH" ${ORCH_TORCH_INDEX:+--index-url "$ORCH_TORCH_INDEX"}
  # orch with orch eval's harness, and NVML for the GPU system metrics whether or not flash-attn builds.
  "${install[@]}" -c "$ORCH_VENV/constraints.txt" "$ORCH_TORCH" -e "${ORCH_REPO}[eval]" nvidia-ml-py
  # flash-attn 2 is optional (SDPA runs when it is missing); compiling it is the one step that needs the toolkit.
  # A subshell, so that the toolkit stays out of everything after it.
  (set +u && ml "${ORCH_BUILD_MODULES[@]}" &&
    "${install[@]}" -c "$ORCH_VENV/constraints.txt" --no-build-isolation -e "${ORCH_REPO}[gpu]") ||
    echo "flash-attn not installed: jobs will use PyTorch SDPA attention"
  echo "Karolina environment ready in $ORCH_VENV. In each new shell: source envs/karolina.sh"
elif [[ ! -f "$ORCH_VENV/bin/activate" ]]; then
  orch_env_fail "no virtual environment in $ORCH_VENV: build it once with \`bash envs/karolina.sh\`"
  return 1 2>/dev/null
else
  source "$ORCH_VENV/bin/activate"
  # NCCL over the 4 × HDR InfiniBand links of each node.
  export NCCL_IB_DISABLE=0 NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5 NCCL_NET_GDR_LEVEL=PHB
  export OMP_NUM_THREADS=16 TOKENIZERS_PARALLELISM=false
fi
