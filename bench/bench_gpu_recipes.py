"""Memory and speed of single-GPU recipes for sparse full fine-tuning of a Llama-2-7B-shaped model.

Builds the model from its config (random weights: no download), zeroes 20% of its 16x16
blocks, trains a few optimizer steps per recipe (each in its own process, so peak memory is
clean) at the guide's settings (batch 1 x 1024 tokens, accumulation 8, bf16, activation
checkpointing) and reports peak GPU memory, tokens/s, MFU, the projected wall time of the
guide's job (3 epochs of WikiText-2 train at block size 1024: about 8.5 M tokens) and the
projected per-GPU memory of the same recipe under FSDP2 on 2 GPUs: a JSON line per recipe, then
one line of the ratios the goals are set on (``goal_ratios``); it exits 1 if a recipe failed.

    python bench/bench_gpu_recipes.py                       # every recipe, Llama-2-7B shape, cuda
    python bench/bench_gpu_recipes.py --config tiny --device cpu --recipes bf16,8bit-sr   # smoke test

Recipes (weights / optimizer states / what happens to small updates):
  bf16           the guide's: bf16 weights and AdamW states; drops updates < ~1/256 of a weight
  bf16-unmasked  the same through the plain Trainer: the cost of SparseTrainer's masking
  8bit-sr        --optim adamw_torch_8bit --optim_args bf16_stochastic_round=True: keeps them on average
  4bit-sr        --optim adamw_torch_4bit --optim_args bf16_stochastic_round=True: keeps them on average
  lora-sparse    sparse LoRA (rank 8 on q, k, v, o, gate, up, down; bf16 base, fp32 adapters): its step
                 time against lora-plain's, its peak memory against the 24 GB goal
  lora-plain     PEFT's plain LoRA with the same settings (not sparse after a merge): the reference
  qlora-sparse   sparse QLoRA: lora-sparse on the pruned model saved and loaded back in 4-bit nf4, as
                 finetune.py --load_in_4bit loads it: its peak memory against the launcher's 12 GB threshold
  bf16-distill   bf16 with a dense bf16 teacher (the default --distill_loss kl+ce): its step time
                 against bf16's (goal <= 1.35x), its peak memory
  8bit-sr-distill  8bit-sr with the teacher: peak memory against one 80 GB GPU
The 8-bit and 4-bit recipes need ``pip install torchao==0.18.0``; qlora-sparse needs bitsandbytes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

import torch
from step_timer import StepTimer, median_seconds

GUIDE_JOB_TOKENS = 8.5e6
CONFIGS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU
STOCHASTIC_ROUNDING = "bf16_stochastic_round=True"
RECIPES = {  # recipe -> TrainingArguments overrides
    "bf16": {},
    "bf16-unmasked": {},
    "8bit-sr": {"optim": "adamw_torch_8bit", "optim_args": STOCHASTIC_ROUNDING},
    "4bit-sr": {"optim": "adamw_torch_4bit", "optim_args": STOCHASTIC_ROUNDING},
    "lora-sparse": {},
    "lora-plain": {},
    "qlora-sparse": {},
    "bf16-distill": {},
    "8bit-sr-distill": {"optim": "adamw_torch_8bit", "optim_args": STOCHASTIC_ROUNDING},
}
ADAPTER_RECIPES = ("lora-sparse", "lora-plain", "qlora-sparse")
# Bytes per parameter that FSDP2 would shard: bf16 weights + bf16 gradients + optimizer states.
SHARDED_BYTES_PER_PARAMETER = {"bf16": 8, "bf16-unmasked": 8, "8bit-sr": 6, "4bit-sr": 5}


def build_model(config_name: str, device: str, dtype: torch.dtype = torch.bfloat16, pruned: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dense_ft.masks import prune_random_blocks

    config = LlamaConfig(**CONFIGS[config_name])
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if pruned:
        prune_random_blocks(model, 0.2)
    return model


def distillation(args) -> dict:
    """The trainer class and its teacher keywords: a dense teacher of the same shape, frozen."""
    from dense_ft.distillation import DistillationArguments, DistillingSparseTrainer

    teacher = build_model(args.config, args.device, pruned=False).requires_grad_(False).eval()
    return DistillingSparseTrainer, {"teacher": teacher, "distillation": DistillationArguments(
        teacher_model="(in memory)")}


def run_recipe(args) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from dense_ft.masks import SparsityMasks
    from dense_ft.sparse_trainer import SparseTrainer

    model = build_model(args.config, args.device)
    parameters = sum(p.numel() for p in model.parameters())
    unsharded = fsdp2_unsharded_parameters(model)
    pruned_masks = SparsityMasks(model)
    samples = args.steps * args.accumulation * args.batch
    tokens = torch.randint(0, model.config.vocab_size, (samples, args.seqlen)).tolist()
    data = Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    timer = StepTimer()
    trainer_class = Trainer if args.recipe == "bf16-unmasked" or args.recipe in ADAPTER_RECIPES else SparseTrainer
    teacher_kwargs = {}
    if args.recipe.endswith("-distill"):
        trainer_class, teacher_kwargs = distillation(args)
    with tempfile.TemporaryDirectory() as work_dir:
        if args.recipe == "qlora-sparse":
            model = loaded_in_4bit(model, args.device, os.path.join(work_dir, "pruned_model"))
        if args.recipe in ADAPTER_RECIPES:
            model = add_lora(model, sparse=args.recipe != "lora-plain")
        training_args = TrainingArguments(
            os.path.join(work_dir, "run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation, learning_rate=5e-5, bf16=True,
            activation_checkpointing=args.activation_checkpointing, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, use_cpu=args.device == "cpu", **RECIPES[args.recipe],
        )
        trainer = trainer_class(model=model, args=training_args, train_dataset=data, callbacks=[timer],
                                **teacher_kwargs)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    sparse = issubclass(trainer_class, SparseTrainer)
    step_seconds = statistics.median(timer.durations[1:] or timer.durations)  # the first step compiles
    tokens_per_second = args.batch * args.accumulation * args.seqlen / step_seconds
    return {"recipe": args.recipe, "config": args.config, "parameters": parameters, "batch": args.batch,
            "accumulation": args.accumulation, "activation_checkpointing": args.activation_checkpointing,
            **speed_figures(parameters, tokens_per_second), **memory_figures(args.recipe, parameters, unsharded),
            "step_seconds": round(step_seconds, 3),
            "masking_seconds": round(masking_seconds(trainer.masks), 4) if sparse else None,
            "violations": violations_after_training(args.recipe, model, pruned_masks)}


def loaded_in_4bit(model, device: str, directory: str):
    """``model`` saved to ``directory`` and loaded back with its linear weights in 4-bit nf4 on ``device``, as
    ``finetune.py --load_in_4bit --torch_dtype bfloat16`` loads a pruned model. ``model`` is moved to the CPU
    first: the masks taken from it hold its layers, which would otherwise count in the peak device memory."""
    from dense_ft.arguments import ModelArguments
    from dense_ft.modeling import load_weights

    model.to("cpu").save_pretrained(directory)
    model_args = ModelArguments(directory, torch_dtype="bfloat16", load_in_4bit=True)
    return load_weights(directory, model_args.torch_dtype, **model_args.loading_kwargs(device))


def violations_after_training(recipe: str, model, pruned_masks) -> int:
    """Pruned weights that are non-zero: in the merged model with adapters (plain LoRA's merge fills them), else in
    the model trained."""
    if recipe == "qlora-sparse":
        return violations_of_a_merge_unquantized(model, pruned_masks)
    if recipe in ADAPTER_RECIPES:
        model = model.merge_and_unload()
    return sum(pruned_masks.violations(model).values())


@torch.no_grad()
def violations_of_a_merge_unquantized(peft_model, pruned_masks) -> int:
    """What merging a QLoRA adapter into the unquantized pruned model would make non-zero on its pruned blocks,
    layer by layer (the merge itself writes a whole model to disk): the 4-bit weights, which read back zero where
    the unquantized ones are, plus the update the merge adds. ``pruned_masks`` are the unquantized model's."""
    from peft.tuners.lora import LoraLayer

    from dense_ft.sparsity import weight_values

    count = 0
    for name, layer in peft_model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and name in pruned_masks.masks:
            merged = weight_values(layer.get_base_layer().weight).float()
            for adapter in layer.active_adapters:
                merged += layer.get_delta_weight(adapter).float()
            count += pruned_masks.masks[name].count_nonzero(merged)
    return count


def add_lora(model, sparse: bool):
    from peft import get_peft_model

    from dense_ft.sparse_lora import LLAMA_TARGET_MODULES, add_sparse_lora, lora_config

    config = lora_config(8, 16, 0.0, LLAMA_TARGET_MODULES)
    return add_sparse_lora(model, config) if sparse else get_peft_model(model, config)


def masking_seconds(masks) -> float:
    """What SparseTrainer adds per optimizer step: one masking pass over the weights, timed, doubled
    for the same pass over the gradients (their shapes and dtype are the weights')."""
    return 2 * median_seconds(masks.apply_to_weights, repeats=10)


def speed_figures(parameters: int, tokens_per_second: float) -> dict:
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    return {"device": device_name, "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(6 * parameters * tokens_per_second / (peak * 1e12), 3) if peak else None,
            "guide_job_hours": round(GUIDE_JOB_TOKENS / tokens_per_second / 3600, 2)}


def fsdp2_unsharded_parameters(model) -> int:
    """Parameters FSDP2 holds whole at once (configs/fsdp2.json): the root unit (embeddings, head, norm)
    and two decoder layers (the one running and the one prefetched)."""
    layers = model.model.layers
    in_layers = sum(p.numel() for p in layers.parameters())
    root = sum(p.numel() for p in model.parameters()) - in_layers
    return root + 2 * in_layers // len(layers)


def memory_figures(recipe: str, parameters: int, unsharded: int) -> dict:
    """Measured peak, and a projection of the per-GPU peak under FSDP2 on 2 GPUs: the sharded state
    halves, activations stay, and the unsharded units add their bf16 weights and gradients."""
    if not torch.cuda.is_available():
        return {"peak_memory_gib": None, "fsdp2_2gpu_projected_gib": None}
    peak = torch.cuda.max_memory_allocated() / 2**30
    if recipe not in SHARDED_BYTES_PER_PARAMETER:
        return {"peak_memory_gib": round(peak, 2), "fsdp2_2gpu_projected_gib": None}
    sharded = SHARDED_BYTES_PER_PARAMETER[recipe] * parameters / 2**30
    projected = peak - sharded / 2 + 4 * unsharded / 2**30
    return {"peak_memory_gib": round(peak, 2), "fsdp2_2gpu_projected_gib": round(projected, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated")
    parser.add_argument("--recipe", choices=RECIPES, help=argparse.SUPPRESS)  # one recipe, in a child process
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is not timed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.recipe:
        print(json.dumps(run_recipe(args)), flush=True)
        return
    common = ["--config", args.config, "--device", args.device, "--steps", str(args.steps), "--batch",
              str(args.batch), "--accumulation", str(args.accumulation), "--seqlen", str(args.seqlen),
              "--activation_checkpointing" if args.activation_checkpointing else "--no-activation_checkpointing"]
    results, failed = [], False
    for recipe in args.recipes.split(","):
        child = subprocess.run([sys.executable, __file__, *common, "--recipe", recipe], capture_output=True,
                               text=True)
        lines = child.stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            print(lines[-1], flush=True)
            results.append(json.loads(lines[-1]))
        else:
            error = (child.stderr.strip().splitlines() or ["no output"])[-1]
            print(json.dumps({"recipe": recipe, "error": error}), flush=True)
            failed = True
    if ratios := goal_ratios(results):
        print(json.dumps({"ratios": ratios}), flush=True)
    sys.exit(1 if failed else 0)


def goal_ratios(results: list[dict]) -> dict:
    """The ratios the goals are set on, from the recipes that ran (a recipe run twice counts by its median):
    SparseTrainer over the plain Trainer (goal <= 1.02), the masking's share of a SparseTrainer step
    (< 0.01), a step with the dense teacher over one without (<= 1.35), sparse over plain LoRA."""
    steps = defaultdict(list)
    for result in results:
        steps[result["recipe"]].append(result["step_seconds"])
    step = {recipe: statistics.median(seconds) for recipe, seconds in steps.items()}
    pairs = {"sparse_over_plain_trainer": ("bf16", "bf16-unmasked"), "distill_over_bf16": ("bf16-distill", "bf16"),
             "sparse_over_plain_lora": ("lora-sparse", "lora-plain")}
    ratios = {name: round(step[a] / step[b], 3) for name, (a, b) in pairs.items() if a in step and b in step}
    masking = [result["masking_seconds"] / result["step_seconds"] for result in results if result["recipe"] == "bf16"]
    if masking:
        ratios["masking_share_of_step"] = round(statistics.median(masking), 4)
    return ratios


if __name__ == "__main__":
    main()
