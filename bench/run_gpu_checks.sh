#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call that ends within BUDGET_SECONDS (default 450: a
# 10-minute device call then has room for the machine's start and for a rerun), or 15 s after it
# when a stage must be killed. The stages run most wanted first, each under `timeout` with what
# is left of the budget; one that would start with less than MIN_STAGE_SECONDS (default 30) left
# is skipped:
#   masking   one masking pass against its floor, and replayed from a CUDA graph (7B shape)
#   recipes   SparseTrainer against the plain Trainer in the order A B B A, the dense teacher's
#             cost (bf16) and peak memory (8-bit AdamW), then their ratios against the goals
#   offload   Wanda pruning with and without layer offload (7B shape, 128 x 4096)
#   tests     the GPU-only tests (tests/test_gpu.py), four at a time
#   lora      sparse LoRA against plain LoRA, and sparse QLoRA's peak memory (7B shape)
# STAGES (comma-separated, default all) runs some of them, e.g. STAGES=tests,lora after a first call.
# Each stage's output goes to LOG_DIR/STAGE.log (default bench_logs/), and a line with its outcome
# and seconds to LOG_DIR/stages.log. CONFIG and DEVICE (default llama2-7b and cuda) are the
# benchmarks' --config and --device; MASKING_ARGS, RECIPE_ARGS and OFFLOAD_ARGS add arguments to
# bench_masking.py, bench_gpu_recipes.py and bench_offload_pruning.py (e.g. RECIPE_ARGS="--steps 3").
# With CONFIG=tiny DEVICE=cpu and small sizes the whole script runs on a CPU (tests/test_gpu_checks.py).
# Exit status: 0 when every stage ran and passed, 1 when one did not, 2 when a package is missing.
#   bench/run_gpu_checks.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
log_dir=${1:-bench_logs}
deadline=$((SECONDS + ${BUDGET_SECONDS:-450}))
min_stage_seconds=${MIN_STAGE_SECONDS:-30}
config=${CONFIG:-llama2-7b}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
# The package and scripts/ from this checkout, whether or not the device's Python has it installed.
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$log_dir"
: > "$log_dir/stages.log"
status=0

stages=",${STAGES:-masking,recipes,offload,tests,lora},"

stage() {  # stage NAME COMMAND...
    local name=$1 left=$((deadline - SECONDS)) started=$SECONDS code outcome
    shift
    [[ $stages == *",$name,"* ]] || return 0
    if (( left < min_stage_seconds )); then
        outcome="skipped: ${left} s of the budget left"
    else
        timeout --kill-after=15 "$left" "$@" 2>&1 | tee "$log_dir/$name.log"
        code=${PIPESTATUS[0]}
        case $code in
            0) outcome=passed ;;
            124 | 137) outcome="timed out: the budget ran out" ;;
            *) outcome="failed: exit $code" ;;
        esac
    fi
    [[ $outcome == passed ]] || status=1
    printf '%-8s %5d s  %s\n' "$name" $((SECONDS - started)) "$outcome" | tee -a "$log_dir/stages.log"
}

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$python" bench/preflight.py || exit 2
read -r -a masking_args <<< "--config $config --device $device ${MASKING_ARGS:-}"
read -r -a recipe_args <<< "--config $config --device $device ${RECIPE_ARGS:-}"
read -r -a offload_args <<< "--config $config --device $device ${OFFLOAD_ARGS:-}"
stage masking "$python" bench/bench_masking.py "${masking_args[@]}"
stage recipes "$python" bench/bench_gpu_recipes.py "${recipe_args[@]}" \
    --recipes bf16,bf16-unmasked,bf16-unmasked,bf16,bf16-distill,8bit-sr-distill
stage offload "$python" bench/bench_offload_pruning.py "${offload_args[@]}"
# Several tests at once (each a tiny model, most a launcher run in a process of its own): minutes less.
stage tests "$python" -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs -n auto --maxprocesses 4
stage lora "$python" bench/bench_gpu_recipes.py "${recipe_args[@]}" --recipes lora-sparse,lora-plain,qlora-sparse
exit "$status"
