#!/usr/bin/env bash
# Install with test tools, lint, and run the default test suite (slow tests: add `-m slow`; the LM studies' tests:
# `-m experiments experiments/tests`). Without arguments it then runs the tests that need the vision extra
# (torchvision, timm) in their own environment, .venv-vision (scripts/test_vision.sh): torchvision needs another
# torch build than the default CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
# One torch thread per process unless told otherwise: on 2 shared cores, two threads spin-wait on each other
# and many tests run subprocesses side by side.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
bash scripts/install.sh dev,wandb,sweep,llm,text,docs,deploy
.venv/bin/ruff check kd_lightning tests scripts experiments
.venv/bin/ruff format --check kd_lightning tests scripts experiments
status=0
# One pytest worker per core (pytest-xdist; KD_TEST_WORKERS=0 runs in this process), each test file in one worker so
# its module fixtures (e.g. the bad-input table's runs) run once.
.venv/bin/python -m pytest -n "${KD_TEST_WORKERS:-auto}" --dist loadfile "$@" || status=$?
if [ "$#" -eq 0 ]; then
  bash scripts/test_vision.sh || status=$((status ? status : $?))
fi
exit "$status"
