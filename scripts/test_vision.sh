#!/usr/bin/env bash
# The tests marked `vision` (image folders, timm and torchvision models), in .venv-vision: torch 2.14.1 +
# torchvision 0.29.1 (scripts/install.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
KD_VENV=.venv-vision bash scripts/install.sh dev,vision,text
exec .venv-vision/bin/python -m pytest -m vision "$@"
