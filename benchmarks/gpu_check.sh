#!/usr/bin/env bash
# The GPU check of issues 14 and 30 (<= 5 minutes on one GPU): step times FP / GDNSQ / torch.ao, eager and compiled (ResNet-18, 224 px,
# batch 256, bf16 + channels_last), end-to-end images/s with the teacher and the FFCV GPU pipeline, peak memory,
# host syncs per Engine step, one Ray Train step (NCCL), the projected GPU-hours of jobs/imagenet_resnet18_w2a2.yaml
# on 8 GPUs; JSON written after each part; last line: QAT/FP step time on <device>: X.XXx (compiled Y.YYx).
# Without CUDA it says so and runs the same code at a tiny size on the CPU.
#   bash benchmarks/gpu_check.sh [--out out/gpu_check.json] [--skip-ray]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
echo "gpu_check: $(date -u '+%F %T UTC'), $(uptime)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || echo "gpu_check: no nvidia-smi"
export RAY_COLOR_PREFIX=0 PYTHONUNBUFFERED=1
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "$PY" benchmarks/gpu_check.py "$@"
