#!/usr/bin/env bash
# Install, then run the embedded default: train (or reuse) the MNIST-1D CNN teacher, distill the MLP
# student, compare with the same student trained from scratch, print the summary.
# Extra arguments are Hydra overrides, e.g.: bash scripts/run_default.sh seed=1 loss.temperature=2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/kd-distill "$@"
