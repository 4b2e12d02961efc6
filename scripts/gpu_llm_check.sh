#!/usr/bin/env bash
# LM distillation GPU check (issue 29), for a machine with one CUDA GPU and kd_lightning[llm] importable; under
# 8 minutes on one H100 / H200:
#   OUT=/tmp/gpu_llm bash scripts/gpu_llm_check.sh
# Writes $OUT/llm_gpu.md (scripts/bench/llm_gpu.py: tokens/s and peak memory with the SmolLM2 teacher live,
# from the top-32 cache and on packed rows; the chunked token loss vs the naive one at V = 49k and 152k) and
# $OUT/log. Copy llm_gpu.md to docs/results/ and commit it with the commit it ran at.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory for the results}
mkdir -p "$OUT"
export KD_LIGHTNING_HOME=${KD_LIGHTNING_HOME:-$(mktemp -d)} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
{
  nvidia-smi -L
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  echo "=== commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  timeout 450 $PY scripts/bench/llm_gpu.py --device cuda --out "$OUT/llm_gpu.md" || echo "llm_gpu.py FAILED (exit $?)"
} 2>&1 | tee "$OUT/log"
