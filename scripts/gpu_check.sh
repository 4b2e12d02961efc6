#!/usr/bin/env bash
# GPU checks (issues 4 and 5), for a machine with one CUDA GPU and kd_lightning importable:
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh
# 1. kd-distill end to end on CUDA: trainer=gpu at 32-true / 16-mixed / bf16-mixed, strategy ddp and fsdp
#    (one device each), and bf16-mixed with the teacher-output cache; a table of their metrics.
# 2. The KD step harness on CUDA (fp32; bf16 autocast + channels_last) and the epoch harness.
# 3. Throughput of the CIFAR-100 pair and of the SmolLM2 LM-distillation demo (live vs cached teacher).
# Writes $OUT/gpu_runs.md, $OUT/performance.md (docs/performance.md with the GPU sections) and $OUT/log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory for the results}
mkdir -p "$OUT"
export KD_LIGHTNING_HOME=${KD_LIGHTNING_HOME:-$(mktemp -d)} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"

TINY=(trainer.max_epochs=3 teacher.fit.max_epochs=3 data.transfer_samples=5000 compare_scratch=false
  logger=csv +trainer.enable_progress_bar=false)
declare -A RUNS=(
  [gpu_32-true]="trainer=gpu trainer.precision=32-true"
  [gpu_16-mixed]="trainer=gpu trainer.precision=16-mixed"
  [gpu_bf16-mixed]="trainer=gpu trainer.precision=bf16-mixed"
  [gpu_bf16_teacher_cache]="trainer=gpu trainer.precision=bf16-mixed teacher_cache=disk"
  [ddp_1gpu_bf16]="trainer=ddp trainer.devices=1"
  [fsdp_1gpu_bf16]="trainer=fsdp trainer.devices=1"
)
for name in gpu_32-true gpu_16-mixed gpu_bf16-mixed gpu_bf16_teacher_cache ddp_1gpu_bf16 fsdp_1gpu_bf16; do
  echo "=== kd-distill $name"
  # shellcheck disable=SC2086
  timeout 120 $PY -m kd_lightning.cli.distill "${TINY[@]}" ${RUNS[$name]} "hydra.run.dir=$KD_LIGHTNING_HOME/gpu/$name" \
    >"$KD_LIGHTNING_HOME/$name.log" 2>&1 && echo "ok" || { echo "FAILED"; tail -20 "$KD_LIGHTNING_HOME/$name.log"; }
done
$PY - "$KD_LIGHTNING_HOME/gpu" >"$OUT/gpu_runs.md" <<'EOF'
import json, sys
from pathlib import Path
rows = ["| run | test acc | val acc (best) | teacher test acc | agreement | KL(t||s) | train loss | distill s |",
        "|---|---|---|---|---|---|---|---|"]
for run in sorted(Path(sys.argv[1]).iterdir()):
    path = run / "summary.json"
    if not path.is_file():
        rows.append(f"| {run.name} | failed | | | | | | |")
        continue
    s = json.loads(path.read_text()); m = s["metrics"]
    rows.append(f"| {run.name} | {m['test/acc']:.4f} | {m['val/acc_best']:.4f} | {m['teacher/test_acc']:.4f} | "
                f"{m['val/agreement']:.4f} | {m['val/kl_to_teacher']:.4f} | {m['train/loss']:.4f} | {s['seconds']['distill']:.1f} |")
print("\n".join(rows))
EOF
cat "$OUT/gpu_runs.md"

cp docs/performance.md "$OUT/performance.md"
echo "=== KD step harness"
$PY scripts/bench/kd_step.py --device cuda --section kd-step-gpu-fp32 --out "$OUT/performance.md"
$PY scripts/bench/kd_step.py --device cuda --precision bf16 --channels-last --section kd-step-gpu-bf16 \
  --out "$OUT/performance.md"
echo "=== epoch harness"
$PY scripts/bench/epochs.py --device cuda --epochs 3 --sizes 0 40000 --batches 1024 --section kd-epochs-gpu \
  --out "$OUT/performance.md"
echo "=== CIFAR-100 pair throughput (resnet32x4 -> resnet8x4, synthetic 32x32)"
cp docs/gpu.md "$OUT/gpu.md"
$PY scripts/bench/cifar_throughput.py --device cuda --out "$OUT/gpu.md"
echo "=== LM distillation throughput (SmolLM2 -> 8 layers, live vs cached teacher; needs the llm extra)"
$PY scripts/bench/llm_throughput.py --device cuda --out "$OUT/gpu.md"
