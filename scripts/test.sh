#!/usr/bin/env bash
# Install with test tools, lint, and run the default test suite (slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,wandb,sweep,llm
.venv/bin/ruff check kd_lightning tests scripts
.venv/bin/ruff format --check kd_lightning tests scripts
exec .venv/bin/python -m pytest "$@"
