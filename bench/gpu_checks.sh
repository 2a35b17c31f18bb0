#!/usr/bin/env bash
# Everything that needs a GPU, in one go (about 8 minutes on one H100-class GPU): the GPU smoke
# suite, then the GPU benchmarks. Each writes its JSON under bench/results/; the log goes to
# ${OUT:-bench/results}/gpu_checks.log. The numbers belong in the README with the GPU's name.
#   bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -m maskllm_megatron.cli info
    python -m pytest -m gpu -q -p no:cacheprovider --durations=10
    python bench/bench_sampler_gpu.py --out "$OUT/sampler_gpu.json"
    python bench/bench_train_step.py --device cuda --layers 8 --hidden 2048 --seq 2048 \
        --batch 2 --vocab 32000 --repeats 10 --out "$OUT/train_step_gpu.json"
} 2>&1 | tee "$OUT/gpu_checks.log"
