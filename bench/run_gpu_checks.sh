#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go: the GPU-only tests, one masking pass against
# its floor, pruning with and without layer offload, then the single-GPU recipes benchmark.
# Logs go to LOG_DIR (default bench_logs/).
#   bench/run_gpu_checks.sh [LOG_DIR [bench_gpu_recipes.py arguments...]]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
log_dir=${1:-bench_logs}
shift || true
python=${PYTHON:-python}
mkdir -p "$log_dir"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c 'import torch, transformers, accelerate, datasets, torchao
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate",
      accelerate.__version__, "datasets", datasets.__version__, "torchao", torchao.__version__)' 2>&1 | tail -n 1
"$python" -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs 2>&1 | tee "$log_dir/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
"$python" bench/bench_masking.py 2>&1 | tee "$log_dir/masking.jsonl"
"$python" bench/bench_offload_pruning.py 2>&1 | tee "$log_dir/offload_pruning.jsonl"
"$python" bench/bench_gpu_recipes.py "$@" 2>&1 | tee "$log_dir/gpu_recipes.jsonl"
exit "$tests_status"
