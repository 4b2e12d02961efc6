#!/usr/bin/env bash
# Re-run every script that writes a number into README.md or docs/, with the command each table states, so that
# every table describes the commit it was measured at (each Command line records its commit and date; "+
# uncommitted changes" means: commit, then re-run). Run on an idle machine: the tables hold wall times.
#   bash scripts/refresh_results.sh            # the CPU tables of the default path (about 1 h on 2 cores)
#   bash scripts/refresh_results.sh all        # also every method / scheme table and the text demo (hours)
#   bash scripts/refresh_results.sh vision     # the digits demo and its deploy rows, in .venv-vision (torchvision)
# Not here: the GPU tables (scripts/gpu_check.sh and the --device cuda commands in docs/performance.md, on a GPU
# machine), the CIFAR-100 protocol (needs the CIFAR-100 files: python scripts/cifar100_protocol.py), the LM
# studies (experiments/README.md names each command; they need the SmolLM2 GGUF of the llm extra).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
what="${1:-default}"

if [ "$what" = "vision" ]; then
  .venv-vision/bin/python scripts/kd_gain.py --preset digits_resnet18_mobilenetv2 --seeds 0 1 2 3 4 --out docs/results/digits.md
  # its section of docs/results/deploy.md (the vision env with the deploy extra: install.sh dev,vision,text,deploy)
  .venv-vision/bin/python scripts/deploy_table.py --preset digits_resnet18_mobilenetv2 --seeds 0 1 2
  exit 0
fi

# README's result block and docs/results/default.md
$PY scripts/kd_vs_scratch.py --seeds 0 1 2
# docs/results/deploy.md (float vs int8 PTQ vs QAT-with-KD then int8; needs the deploy extra)
$PY scripts/deploy_table.py --seeds 0 1 2
# docs/performance.md
$PY scripts/bench/e2e.py --epochs 20 60 --threads 1 2 --repeats 3
$PY scripts/bench/kd_step.py --pairs mnist1d --batch 256 --steps 30 --warmup 5 --repeats 3
$PY scripts/bench/kd_step.py --pairs cifar_resnet32x4_to_8x4 --batch 256 --steps 6 --warmup 2 --repeats 1 \
  --section kd-step-cifar
$PY scripts/bench/epochs.py --epochs 4 --sizes 0 10000 40000 --batches 64 1024
$PY scripts/bench/epochs.py --epochs 4 --sizes --batches 1024 --augment --views 8 --section kd-epochs-augment
$PY scripts/bench/step_overhead.py
# docs/install-sizes.md (the vision environment as scripts/test_vision.sh makes it)
KD_VENV=.venv-vision bash scripts/install.sh dev,vision,text
$PY scripts/install_sizes.py .venv .venv-vision

if [ "$what" = "all" ]; then
  # RKD, CRD and ReviewKD keep rows of an earlier 3-seed table (docs/results/methods.md says so): add them to --methods
  # to re-run them too (about 1.5 h more at 5 seeds).
  $PY scripts/methods_table.py --methods kd kd_ls dkd dist sp pkt cc fitnet at vid ctkd nkd wttm mlkd wkd_l ofd ickd \
    nst srd catkd ft wkd_f --seeds 0 1 2 3 4 --epochs 40
  $PY scripts/schemes_table.py --schemes kd multi_teacher multi_teacher_confidence mutual born_again \
    assistant_chain kd_bn_teacher data_free function_matching --seeds 0 1 2 3 4 --epochs 40
  $PY scripts/make_sentiment_data.py /tmp/kd_sentiment
  $PY scripts/kd_gain.py --preset text_sentiment_bert --seeds 0 1 2 3 4 --out docs/results/text.md \
    --long-scratch-factor 6 -- sentiment_dir=/tmp/kd_sentiment
fi
