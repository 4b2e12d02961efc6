#!/usr/bin/env bash
# Install with test tools, lint, and run the default test suite (slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
# One torch thread per process unless told otherwise: on 2 shared cores, two threads spin-wait on each other
# and many tests run subprocesses side by side.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
bash scripts/install.sh dev,wandb,sweep,llm
.venv/bin/ruff check kd_lightning tests scripts
.venv/bin/ruff format --check kd_lightning tests scripts
exec .venv/bin/python -m pytest "$@"
