#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, most wanted first: the GPU-only tests; one
# masking pass against its floor (and replayed from a CUDA graph); SparseTrainer against the
# plain Trainer in the order A B B A, the dense teacher's cost (bf16, and 8-bit AdamW's peak
# memory), sparse LoRA against plain LoRA (7B shape); pruning with and without layer offload
# (7B shape, 128 x 4096). Logs go to LOG_DIR (default bench_logs/); arguments after it replace
# the recipes benchmark's.
#   bench/run_gpu_checks.sh [LOG_DIR [bench_gpu_recipes.py arguments...]]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
log_dir=${1:-bench_logs}
shift || true
recipes_args=("$@")
(( ${#recipes_args[@]} )) || recipes_args=(--recipes "bf16,bf16-unmasked,bf16-unmasked,bf16,bf16-distill,8bit-sr-distill,lora-sparse,lora-plain")
python=${PYTHON:-python}
# The package and scripts/ from this checkout, whether or not the device's Python has it installed.
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$log_dir"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c 'import torch, transformers, accelerate, datasets, peft, torchao
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate",
      accelerate.__version__, "datasets", datasets.__version__, "peft", peft.__version__,
      "torchao", torchao.__version__)' 2>&1 | tail -n 1
"$python" -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs 2>&1 | tee "$log_dir/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
"$python" bench/bench_masking.py 2>&1 | tee "$log_dir/masking.jsonl"
"$python" bench/bench_gpu_recipes.py "${recipes_args[@]}" 2>&1 | tee "$log_dir/gpu_recipes.jsonl"
"$python" bench/bench_offload_pruning.py 2>&1 | tee "$log_dir/offload_pruning.jsonl"
exit "$tests_status"
