#!/usr/bin/env bash
# Sparse fine-tuning of a Wanda-pruned model (16x16 blocks, 20% sparsity): every weight
# trains with SparseTrainer (--method full), or sparse LoRA adapters do (--method lora, or
# qlora on the model loaded in 4-bit); either way the pruned weights stay exactly zero. See --help.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=$(basename "$0")

# The settings a user may give in the environment; those given are repeated in the LoRA advice.
USER_SETTINGS=()
for name in PRUNED_MODEL DATASET DATASET_CONFIG DATASET_DIR NUM_EPOCHS LEARNING_RATE BATCH_SIZE BLOCK_SIZE \
            MAX_TRAIN_SAMPLES EFFECTIVE_BATCH_SIZE LOGGING_STEPS SAVE_STEPS OPTIM OPTIM_ARGS REPORT_TO \
            TEACHER_MODEL; do
    [[ -z ${!name+set} ]] || USER_SETTINGS+=("$name=${!name}")
done
OUTPUT_DIR_GIVEN=${OUTPUT_DIR:+1}
LEARNING_RATE_GIVEN=${LEARNING_RATE:+1}

# Training parameters: the guide's values, each overridable from the environment.
PRUNED_MODEL=${PRUNED_MODEL:-out/llama2_7b/block_16x16_20sparsity/wanda/pruned_model}
OUTPUT_DIR=${OUTPUT_DIR:-out/llama2_7b/block_16x16_20sparsity/wanda/dense_finetuned_model}
DATASET=${DATASET:-wikitext}
DATASET_CONFIG=${DATASET_CONFIG:-wikitext-2-raw-v1}
DATASET_DIR=${DATASET_DIR:-}
NUM_EPOCHS=${NUM_EPOCHS:-3}
LEARNING_RATE=${LEARNING_RATE:-5e-5}
# --method lora and qlora: their own output directories, and the learning rate LoRA recipes use.
LORA_OUTPUT_DIR=out/llama2_7b/block_16x16_20sparsity/wanda/lora_finetuned_model
QLORA_OUTPUT_DIR=out/llama2_7b/block_16x16_20sparsity/wanda/qlora_finetuned_model
LORA_LEARNING_RATE=2e-4
# A teacher's share of the low-memory threshold: the guide's dense 7B in bf16 (12.6 GiB), with its activations.
TEACHER_MEMORY_GB=14
BATCH_SIZE=${BATCH_SIZE:-1}
BLOCK_SIZE=${BLOCK_SIZE:-1024}
MAX_TRAIN_SAMPLES=${MAX_TRAIN_SAMPLES:-30000}
EFFECTIVE_BATCH_SIZE=${EFFECTIVE_BATCH_SIZE:-8}
LOGGING_STEPS=${LOGGING_STEPS:-10}
SAVE_STEPS=${SAVE_STEPS:-200}
OPTIM=${OPTIM:-}
OPTIM_ARGS=${OPTIM_ARGS:-}
REPORT_TO=${REPORT_TO:-none}
TEACHER_MODEL=${TEACHER_MODEL:-}
METHOD=${METHOD:-full}
MIN_GPU_MEMORY_GB=${MIN_GPU_MEMORY_GB:-}
ASSUME_YES=${ASSUME_YES:-0}
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
# Seconds torchrun gives the workers to save their checkpoint after Ctrl+C (its default is 30).
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-900}

NUM_GPUS=1
GPU_IDS="2"
ENGINE=ddp
NNODES=1
NODE_RANK=0
MASTER_ADDR=""
MASTER_PORT=29500
DRY_RUN=0
EXTRA_ARGS=()
ORIGINAL_ARGS=()

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [OPTIONS] [-- FINETUNE_ARGS...]

Options:
  --num_gpus N        Number of GPUs to use (default: 1)
  --gpu_ids "X,Y"     Comma-separated GPU IDs (default: "2")
  -h, --help          Show this help message
  --yes               Continue without asking when GPU memory looks insufficient
  --dry_run           Print the configuration and the command, then exit
  --method M          full (default: every weight trains), lora (sparse LoRA: rank-8
                      adapters masked by the pruned blocks, merged at the end; far less memory)
                      or qlora (sparse LoRA on the pruned model loaded in 4-bit, merged into
                      it unquantized at the end; the least memory)
  --engine E          ddp (default: a full replica per GPU) or fsdp (FSDP2: weights,
                      gradients and optimizer states sharded across GPUs)
  --nnodes N          Number of nodes, for multi-node torchrun (default: 1)
  --node_rank R       Rank of this node (default: 0)
  --master_addr ADDR  Address of the rank-0 node (required when --nnodes > 1)
  --master_port PORT  Port of the rank-0 node (default: 29500)
  -- ARGS             Passed unchanged to dense_ft/finetune.py (any HF TrainingArguments flag)

Examples:
  Single GPU (default):     ./$SCRIPT_NAME
  Single GPU (GPU 3):       ./$SCRIPT_NAME --num_gpus 1 --gpu_ids "3"
  Dual GPU (GPU 2,3):       ./$SCRIPT_NAME --num_gpus 2 --gpu_ids "2,3"
  Quad GPU (GPU 0-3):       ./$SCRIPT_NAME --num_gpus 4 --gpu_ids "0,1,2,3"

Performance:
  1 GPU: ~24-36 hours
  2 GPUs: ~14-20 hours (1.7x speedup)
  4 GPUs: ~8-12 hours (2.5-3x speedup)

Environment variables (defaults in brackets):
  PRUNED_MODEL          pruned model directory [$PRUNED_MODEL]
  OUTPUT_DIR            output directory [$OUTPUT_DIR;
                        lora: $LORA_OUTPUT_DIR;
                        qlora: $QLORA_OUTPUT_DIR]
  DATASET               Hub data set [$DATASET]
  DATASET_CONFIG        its configuration [$DATASET_CONFIG]
  DATASET_DIR           local corpus with wiki.{train,valid}.raw (replaces DATASET) [${DATASET_DIR:-unset}]
  NUM_EPOCHS            epochs [$NUM_EPOCHS]
  LEARNING_RATE         learning rate [$LEARNING_RATE; lora and qlora: $LORA_LEARNING_RATE]
  BATCH_SIZE            per-device batch size [$BATCH_SIZE]
  BLOCK_SIZE            tokens per sequence [$BLOCK_SIZE]
  MAX_TRAIN_SAMPLES     cap on training sequences [$MAX_TRAIN_SAMPLES]
  EFFECTIVE_BATCH_SIZE  batch x GPUs x accumulation [$EFFECTIVE_BATCH_SIZE]
  METHOD                full, lora or qlora, as --method [$METHOD]
  LOGGING_STEPS         steps between loss lines [$LOGGING_STEPS]
  SAVE_STEPS            steps between checkpoints [$SAVE_STEPS]
  OPTIM, OPTIM_ARGS     the Trainer's --optim and --optim_args [${OPTIM:-adamw_torch_fused}, ${OPTIM_ARGS:-unset}];
                        OPTIM=adamw_torch_8bit OPTIM_ARGS=bf16_stochastic_round=True keeps the
                        small updates that bf16 AdamW drops, in less memory (see the README)
  REPORT_TO             the Trainer's --report_to: none, tensorboard, wandb, ... [$REPORT_TO]
  TEACHER_MODEL         dense model to distill from (finetune.py --teacher_model; pass
                        -- --distill_loss kl|kl+ce|squarehead to choose the loss, and
                        -- --teacher_model_init_kwargs JSON to load it in 4-bit, say) [${TEACHER_MODEL:-unset}]
  MIN_GPU_MEMORY_GB     free memory under which to warn [40 for full, 24 for lora, 12 for qlora;
                        $TEACHER_MEMORY_GB more with TEACHER_MODEL, a bf16 teacher's]
  ASSUME_YES=1          same as --yes
  PYTHON, TORCHRUN      the interpreters to run [$PYTHON, $TORCHRUN]

A rerun with the same OUTPUT_DIR resumes from its last checkpoint; Ctrl+C saves one first.
EOF
}

die() {  # a one-line error, exit status 2 (bad input)
    echo "Error: $*" >&2
    exit 2
}

is_positive_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
# A positive decimal number that is finite as a double (1e400 is not).
is_positive_number() {
    [[ $1 =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && [[ ! $1 =~ ^[0.]+([eE].*)?$ ]] \
        && awk -v x="$1" 'BEGIN { x += 0; exit !(x > 0 && x <= 1.7976931348623157e308) }'
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        local flag=$1 value
        case $flag in
            -h|--help) usage; exit 0 ;;
            --yes) ASSUME_YES=1; shift; continue ;;
            --dry_run) DRY_RUN=1; shift; continue ;;
            --) shift; EXTRA_ARGS=("$@"); return ;;
            --*=*) value=${flag#*=}; flag=${flag%%=*}; shift ;;
            --num_gpus|--gpu_ids|--engine|--method|--nnodes|--node_rank|--master_addr|--master_port)
                [[ $# -ge 2 && $2 != --* ]] || die "$flag needs a value (see --help)"
                value=$2; shift 2 ;;
            *) die "unknown option '$flag' (see --help)" ;;
        esac
        case $flag in
            --num_gpus) NUM_GPUS=$value ;;
            --gpu_ids) GPU_IDS=$value ;;
            --engine) ENGINE=$value ;;
            --method) METHOD=$value ;;
            --nnodes) NNODES=$value ;;
            --node_rank) NODE_RANK=$value ;;
            --master_addr) MASTER_ADDR=$value ;;
            --master_port) MASTER_PORT=$value ;;
            *) die "unknown option '$flag' (see --help)" ;;
        esac
    done
}

apply_method_defaults() {
    local min_gb teacher_gb=0
    [[ -z $TEACHER_MODEL ]] || teacher_gb=$TEACHER_MEMORY_GB
    case $METHOD in
        full)
            METHOD_DESCRIPTION="Full fine-tuning with SparseTrainer"
            min_gb=40 ;;
        lora)
            ADAPTERS=LoRA
            METHOD_DESCRIPTION="Sparse LoRA (adapters masked by the pruned blocks, merged at the end)"
            min_gb=24
            [[ -n $OUTPUT_DIR_GIVEN ]] || OUTPUT_DIR=$LORA_OUTPUT_DIR ;;
        qlora)
            ADAPTERS=QLoRA
            METHOD_DESCRIPTION="Sparse QLoRA (adapters masked by the pruned blocks on the model in 4-bit, merged into it unquantized at the end)"
            min_gb=12
            [[ -n $OUTPUT_DIR_GIVEN ]] || OUTPUT_DIR=$QLORA_OUTPUT_DIR ;;
        *) die "--method must be full, lora or qlora, got '$METHOD'" ;;
    esac
    MIN_GPU_MEMORY_GB=${MIN_GPU_MEMORY_GB:-$((min_gb + teacher_gb))}
    [[ $METHOD == full || -n $LEARNING_RATE_GIVEN ]] || LEARNING_RATE=$LORA_LEARNING_RATE
}

validate_settings() {
    is_positive_int "$NUM_GPUS" || die "--num_gpus must be a positive integer, got '$NUM_GPUS'"
    [[ $ENGINE == ddp || $ENGINE == fsdp ]] || die "--engine must be ddp or fsdp, got '$ENGINE'"
    [[ $METHOD == full || $ENGINE == ddp ]] || die "--method $METHOD trains with DDP; --engine fsdp is for --method full"
    is_positive_int "$NNODES" || die "--nnodes must be a positive integer, got '$NNODES'"
    if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
        die "--node_rank must be an integer from 0 to $((NNODES - 1)), got '$NODE_RANK'"
    fi
    is_positive_int "$MASTER_PORT" || die "--master_port must be a port number, got '$MASTER_PORT'"
    (( NNODES == 1 )) || [[ -n $MASTER_ADDR ]] || die "--nnodes $NNODES needs --master_addr"
    local name
    for name in BATCH_SIZE BLOCK_SIZE MAX_TRAIN_SAMPLES EFFECTIVE_BATCH_SIZE LOGGING_STEPS SAVE_STEPS; do
        is_positive_int "${!name}" || die "$name must be a positive integer, got '${!name}'"
    done
    for name in NUM_EPOCHS LEARNING_RATE MIN_GPU_MEMORY_GB; do
        is_positive_number "${!name}" || die "$name must be a positive finite number, got '${!name}'"
    done
    [[ -z $DATASET_DIR || -d $DATASET_DIR ]] || die "DATASET_DIR not found: $DATASET_DIR"
    if [[ -n $TEACHER_MODEL ]]; then
        [[ -d $TEACHER_MODEL ]] || ! looks_like_local_path "$TEACHER_MODEL" \
            || die "TEACHER_MODEL not found: $TEACHER_MODEL"
        [[ $ENGINE == ddp ]] || die "TEACHER_MODEL trains with DDP (one teacher per GPU), not --engine fsdp"
    fi
}

validate_gpu_ids() {
    [[ $GPU_IDS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpu_ids must be comma-separated integers, got '$GPU_IDS'"
    IFS=, read -r -a GPU_LIST <<< "$GPU_IDS"
    (( ${#GPU_LIST[@]} == NUM_GPUS )) \
        || die "--num_gpus $NUM_GPUS needs $NUM_GPUS GPU ids, got ${#GPU_LIST[@]} ('$GPU_IDS')"
    local duplicate
    duplicate=$(printf '%s\n' "${GPU_LIST[@]}" | sort | uniq -d | head -n 1)
    [[ -z $duplicate ]] || die "--gpu_ids lists GPU $duplicate twice"
}

# Fills GPU_FREE_MB (index -> free MB) from nvidia-smi; returns 1 when there is no usable GPU.
query_gpus() {
    declare -gA GPU_FREE_MB=()
    command -v nvidia-smi > /dev/null 2>&1 || return 1
    local output index free
    output=$(nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits 2> /dev/null) || return 1
    while IFS=', ' read -r index free; do
        [[ $index =~ ^[0-9]+$ && $free =~ ^[0-9]+$ ]] && GPU_FREE_MB[$index]=$free
    done <<< "$output"
    (( ${#GPU_FREE_MB[@]} > 0 ))
}

check_gpus_exist() {
    local id available
    available=$(printf '%s\n' "${!GPU_FREE_MB[@]}" | sort -n | paste -sd, -)
    for id in "${GPU_LIST[@]}"; do
        [[ -v "GPU_FREE_MB[$id]" ]] || die "GPU $id not found; nvidia-smi lists GPU(s) $available"
    done
}

derive_accumulation() {
    local processes=$1 n working=""
    local per_step=$((BATCH_SIZE * processes))
    if (( EFFECTIVE_BATCH_SIZE % per_step != 0 )); then
        for (( n = 1; n <= EFFECTIVE_BATCH_SIZE / BATCH_SIZE; n++ )); do
            (( EFFECTIVE_BATCH_SIZE % (BATCH_SIZE * n * NNODES) == 0 )) && working+="${working:+, }$n"
        done
        die "effective batch $EFFECTIVE_BATCH_SIZE is not a multiple of per-device batch $BATCH_SIZE x" \
            "$processes GPU(s); GPU counts per node that work: ${working:-none}"
    fi
    GRAD_ACCUM=$((EFFECTIVE_BATCH_SIZE / per_step))
}

# A data source passed on to finetune.py replaces DATASET and DATASET_DIR (finetune.py takes one).
extra_args_give_data() {
    local arg
    for arg in "${EXTRA_ARGS[@]}"; do
        [[ $arg =~ ^--(dataset_name|dataset_dir|train_file)(=|$) ]] && return 0
    done
    return 1
}

# Sets DATA_ARGS, finetune.py's data flags, and DATASET_DESCRIPTION.
choose_data() {
    if extra_args_give_data; then
        DATA_ARGS=()
        DATASET_DESCRIPTION="as passed on to finetune.py (below)"
    elif [[ -n $DATASET_DIR ]]; then
        DATA_ARGS=(--dataset_dir "$DATASET_DIR")
        DATASET_DESCRIPTION="$DATASET_DIR (local)"
    else
        DATA_ARGS=(--dataset_name "$DATASET" --dataset_config_name "$DATASET_CONFIG")
        DATASET_DESCRIPTION="$DATASET ($DATASET_CONFIG)"
    fi
}

looks_like_local_path() { [[ $1 == /* || $1 == .* || $1 == \~* || $1 == */*/* ]]; }

check_pruned_model() {
    if [[ ! -d $PRUNED_MODEL ]] && looks_like_local_path "$PRUNED_MODEL"; then
        echo "Error: Pruned model not found at $PRUNED_MODEL" >&2
        echo "Please run pruning first:" >&2
        echo "  python $SCRIPT_DIR/main_block.py --model meta-llama/Llama-2-7b-hf --sparsity_ratio 0.2" \
             "--block_size 16 --save $(dirname "$PRUNED_MODEL") --save_model $PRUNED_MODEL" >&2
        exit 1
    fi
}

# The arguments quoted for a shell, each token's value (--token, --hub_token or --hub-token) shown
# as '<hidden>': what is printed goes to terminals and logs.
quoted_hiding_tokens() {
    local arg hide=0
    for arg in "$@"; do
        if (( hide )); then
            printf "'<hidden>' "
            hide=0
        elif [[ $arg =~ ^--(hub[_-])?token= ]]; then
            printf "%s='<hidden>' " "${arg%%=*}"
        else
            [[ ! $arg =~ ^--(hub[_-])?token$ ]] || hide=1
            printf '%q ' "$arg"
        fi
    done
}

print_banner() {
    local extra=""  # the line only when there are some: they come last, so they override the settings above
    (( ${#EXTRA_ARGS[@]} == 0 )) || extra=$'\n'"  Passed on to finetune.py: $(quoted_hiding_tokens "${EXTRA_ARGS[@]}")"
    cat <<EOF
==========================================
Dense Fine-tuning Configuration
==========================================
Method: $METHOD_DESCRIPTION
Pruned model: $PRUNED_MODEL${TEACHER_MODEL:+
Teacher model: $TEACHER_MODEL (distillation)}
Output directory: $OUTPUT_DIR
Dataset: $DATASET_DESCRIPTION

GPU Configuration:
  Number of GPUs: $NUM_GPUS
  GPU IDs: $GPU_IDS
  Training mode: $TRAINING_MODE

Training Parameters:
  Number of epochs: $NUM_EPOCHS
  Learning rate: $LEARNING_RATE
  Per-device batch size: $BATCH_SIZE
  Gradient accumulation: $GRAD_ACCUM
  Effective batch size: $EFFECTIVE_BATCH_SIZE
  Block size: $BLOCK_SIZE
  Max train samples: $MAX_TRAIN_SAMPLES${extra% }
==========================================

EOF
}

# The same run with --method $1 (lora or qlora), as one command line: the user's settings and
# arguments but their --method, and an output directory of its own.
method_command() {
    local method=$1 output_dir=$LORA_OUTPUT_DIR args=()
    [[ $method == lora ]] || output_dir=$QLORA_OUTPUT_DIR
    [[ -z $OUTPUT_DIR_GIVEN ]] || output_dir=${OUTPUT_DIR%/}_$method
    set -- "${ORIGINAL_ARGS[@]}"
    while (( $# )); do
        case $1 in
            --) args+=("$@"); break ;;
            --method) shift 2 ;;
            --method=*) shift ;;
            *) args+=("$1"); shift ;;
        esac
    done
    quoted_hiding_tokens "${USER_SETTINGS[@]}" "OUTPUT_DIR=$output_dir" bash "$0" --method "$method" "${args[@]}"
}

# Prints free memory of every chosen GPU; asks (or, without a terminal, stops) when any is low.
check_gpu_memory() {
    local id free low=0
    for id in "${GPU_LIST[@]}"; do
        free=${GPU_FREE_MB[$id]}
        echo "GPU $id: Available GPU memory: $free MB (~$((free / 1024)) GB)"
        awk -v free="$free" -v min="$MIN_GPU_MEMORY_GB" 'BEGIN { exit !(free < min * 1024) }' && low=1
    done
    (( low )) || return 0
    echo "⚠️  Warning: GPU memory may be insufficient!"
    [[ -z $TEACHER_MODEL ]] || echo "The teacher (TEACHER_MODEL) needs about $TEACHER_MEMORY_GB GB of it for a dense 7B in bf16."
    if [[ $METHOD == full ]]; then
        echo "Consider using LoRA fine-tuning instead. Sparse LoRA keeps the pruned blocks at zero; same settings:"
        echo "  $(method_command lora)"
    elif [[ $METHOD == lora ]]; then
        echo "Consider sparse QLoRA (the pruned model in 4-bit, merged unquantized at the end); same settings:"
        echo "  $(method_command qlora)"
    fi
    if [[ $ASSUME_YES == 1 ]]; then
        echo "Continue anyway? (y/n) y (--yes)"
    elif [[ -t 0 ]]; then
        local answer
        read -r -p "Continue anyway? (y/n) " answer
        [[ $answer == [yY]* ]] || { echo "Aborted."; exit 1; }
    else
        echo "Continue anyway? (y/n)"
        echo "Error: no terminal to answer on; rerun with --yes (or ASSUME_YES=1) to continue" >&2
        exit 1
    fi
}

build_command() {
    local finetune_args=(
        "$SCRIPT_DIR/dense_ft/finetune.py"
        --model_name_or_path "$PRUNED_MODEL"
        --output_dir "$OUTPUT_DIR"
        --num_train_epochs "$NUM_EPOCHS"
        --learning_rate "$LEARNING_RATE"
        --per_device_train_batch_size "$BATCH_SIZE"
        --per_device_eval_batch_size "$BATCH_SIZE"
        --effective_batch_size "$EFFECTIVE_BATCH_SIZE"
        --block_size "$BLOCK_SIZE"
        --max_train_samples "$MAX_TRAIN_SAMPLES"
        --logging_steps "$LOGGING_STEPS"
        --save_steps "$SAVE_STEPS"
        --save_total_limit 2
        --report_to "$REPORT_TO"
    )
    [[ -z $OPTIM ]] || finetune_args+=(--optim "$OPTIM")
    [[ -z $OPTIM_ARGS ]] || finetune_args+=(--optim_args "$OPTIM_ARGS")
    finetune_args+=("${DATA_ARGS[@]}")
    [[ $METHOD == full ]] || finetune_args+=(--lora)
    [[ $METHOD != qlora ]] || finetune_args+=(--load_in_4bit)
    [[ -z $TEACHER_MODEL ]] || finetune_args+=(--teacher_model "$TEACHER_MODEL")
    if (( USE_GPU )); then
        # The guide's recipe: bf16 weights and training, activations recomputed in backward.
        finetune_args+=(--torch_dtype bfloat16 --bf16 true)
        if [[ $ENGINE == fsdp ]]; then
            finetune_args+=(--fsdp full_shard --fsdp_config "$SCRIPT_DIR/configs/fsdp2.json")
        else
            finetune_args+=(--activation_checkpointing true)
        fi
    fi
    finetune_args+=("${EXTRA_ARGS[@]}")

    if (( USE_TORCHRUN )); then
        COMMAND=("$TORCHRUN" --nproc_per_node="$NUM_GPUS" --shutdown_timeout="$SHUTDOWN_TIMEOUT")
        if (( NNODES > 1 )); then
            COMMAND+=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
                      --master_port="$MASTER_PORT")
        else
            COMMAND+=(--standalone)
        fi
        COMMAND+=("${finetune_args[@]}")
    else
        COMMAND=("$PYTHON" "${finetune_args[@]}")
    fi
}

# Sets USE_GPU, USE_TORCHRUN, TRAINING_MODE and the gradient accumulation for this machine.
choose_mode() {
    USE_GPU=0
    USE_TORCHRUN=0
    if ! query_gpus; then
        NUM_GPUS=0
        GPU_IDS="none"
        TRAINING_MODE="CPU (no GPU found)"
        derive_accumulation 1
        return
    fi
    check_gpus_exist
    USE_GPU=1
    TRAINING_MODE="Single GPU"
    if (( NUM_GPUS > 1 || NNODES > 1 )); then
        USE_TORCHRUN=1
        TRAINING_MODE="Multi-GPU (torchrun)"
        [[ $ENGINE == ddp ]] || TRAINING_MODE="Multi-GPU (torchrun, FSDP2)"
    elif [[ $ENGINE == fsdp ]]; then
        die "--engine fsdp shards across processes: it needs --num_gpus 2 or more (or several nodes)"
    fi
    derive_accumulation $((NUM_GPUS * NNODES))
}

print_start() {
    if [[ $METHOD == full ]]; then
        echo "🚀 Starting dense fine-tuning with SparseTrainer..."
    else
        echo "🚀 Starting sparse $ADAPTERS fine-tuning..."
    fi
    if (( USE_GPU )); then
        echo "Training mode: $NUM_GPUS GPU(s) on device(s): $GPU_IDS"
    else
        echo "Training mode: CPU"
    fi
    echo "Effective batch size: $EFFECTIVE_BATCH_SIZE"
    echo "=========================================="
}

print_outcome() {
    local status=$1 finished="✅ Dense fine-tuning finished. Model saved to $OUTPUT_DIR"
    [[ $METHOD == full ]] || finished="✅ Sparse $ADAPTERS fine-tuning finished. Merged model saved to $OUTPUT_DIR (adapter: $OUTPUT_DIR/adapter)"
    if (( status == 0 )); then
        cat <<EOF
==========================================
$finished

Next steps:
1. Evaluate:
   python $(printf '%q' "$SCRIPT_DIR/main_block.py") --model $(printf '%q' "$OUTPUT_DIR") --eval_zero_shot
2. Verify sparsity is preserved:
   PYTHONPATH=$(printf '%q' "$SCRIPT_DIR") python -m dense_ft.check_sparsity $(printf '%q' "$OUTPUT_DIR") \\
       --reference $(printf '%q' "$PRUNED_MODEL")
==========================================
EOF
    elif (( status == 130 )); then
        echo "Training interrupted; run the same command again to resume from the last checkpoint." >&2
    else
        echo "Error: training failed with exit status $status" >&2
    fi
}

# Runs the training in its own process group and passes SIGINT and SIGTERM on to it (a scheduler
# signals this script's PID only; a terminal's Ctrl+C reaches the script, and through it the
# training, once), then waits for it to save its checkpoint and exit. Sets STATUS; a run stopped
# by a signal ends with 130 whatever torchrun itself returns.
run_training() {
    local forwarded=""
    CHILD_PID=""
    trap 'forwarded=INT; [[ -z $CHILD_PID ]] || kill -INT "$CHILD_PID" 2> /dev/null || true' INT
    trap 'forwarded=TERM; [[ -z $CHILD_PID ]] || kill -TERM "$CHILD_PID" 2> /dev/null || true' TERM
    set -m
    "${COMMAND[@]}" &
    CHILD_PID=$!
    set +m
    [[ -z $forwarded ]] || kill -"$forwarded" "$CHILD_PID" 2> /dev/null || true  # one that came before the start
    while :; do
        STATUS=0
        wait "$CHILD_PID" || STATUS=$?
        kill -0 "$CHILD_PID" 2> /dev/null || break
    done
    trap - INT TERM
    [[ -z $forwarded ]] || (( STATUS == 0 )) || STATUS=130
}

main() {
    ORIGINAL_ARGS=("$@")
    parse_args "$@"
    apply_method_defaults
    validate_settings
    validate_gpu_ids
    choose_mode
    check_pruned_model
    choose_data

    print_banner
    if (( USE_GPU )); then
        check_gpu_memory
    else
        echo "No NVIDIA GPU found (nvidia-smi is missing or lists none): training on the CPU in one process."
    fi
    build_command
    print_start
    if (( DRY_RUN )); then
        echo "Command:$(printf ' %q' "${COMMAND[@]}")"
        exit 0
    fi

    if (( USE_TORCHRUN )); then
        echo "Using multi-GPU training with torchrun ($NUM_GPUS GPUs)..."
    elif (( USE_GPU )); then
        echo "Using single-GPU training..."
    fi
    if (( USE_GPU )); then
        export CUDA_VISIBLE_DEVICES=$GPU_IDS
    fi
    "$PYTHON" -c "import dense_ft" 2> /dev/null \
        || die "the dense_ft package is not installed for $PYTHON: pip install -e $(printf '%q' "$SCRIPT_DIR")"
    run_training
    print_outcome "$STATUS"
    exit "$STATUS"
}

main "$@"
