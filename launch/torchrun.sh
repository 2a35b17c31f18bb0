#!/usr/bin/env bash
# One node: run a maskllm command on every GPU of this machine with a recipe.
#   launch/torchrun.sh train examples/llama2-7b.yaml [--more-flags ...]
#   launch/torchrun.sh prune examples/llama2-7b.yaml --method sparsegpt --save pruned/
#   launch/torchrun.sh eval-ppl examples/llama2-7b.yaml --load runs/llama2-7b-2of4 --text test.txt
# GPUS_PER_NODE overrides the GPU count; logs go to logs/<command>-<time>.log as well.
set -euo pipefail
COMMAND=${1:?usage: torchrun.sh train|prune|eval-ppl RECIPE [flags]}
RECIPE=${2:?usage: torchrun.sh train|prune|eval-ppl RECIPE [flags]}
shift 2
case "$COMMAND" in train|prune|eval-ppl) ;; *) echo "unknown command $COMMAND" >&2; exit 2 ;; esac
GPUS=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$GPUS" -ge 1 ] || GPUS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron: keep TP communication ahead of compute
mkdir -p logs
LOG="logs/${COMMAND}-$(date +%Y%m%d-%H%M%S).log"
torchrun --standalone --nproc-per-node "$GPUS" -m maskllm_megatron.cli \
    "$COMMAND" --config "$RECIPE" "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
