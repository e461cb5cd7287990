"""Memory and speed of single-GPU recipes for sparse full fine-tuning of a Llama-2-7B-shaped model.

Builds the model from its config (random weights: no download), zeroes 20% of its 16x16
blocks, trains a few steps of SparseTrainer per recipe (each in its own process, so peak
memory is clean) and reports peak GPU memory, tokens/s, MFU, and the projected wall time of
the guide's job (3 epochs of WikiText-2 train at block size 1024: about 8.5 M tokens).

    python bench/bench_gpu_recipes.py                       # every recipe, Llama-2-7B shape, cuda
    python bench/bench_gpu_recipes.py --config tiny --device cpu --recipes guide   # smoke test

Recipes (weights / optimizer states / what happens to small updates):
  guide     bf16 weights, bf16 AdamW states (the guide's ~55-65 GB): drops updates < ~1/256 of a weight
  8bit-sr   bf16 weights, torchao 8-bit AdamW with bf16 stochastic rounding: keeps them on average
  offload   bf16 weights, torchao CPU-offloaded AdamW with fp32 master copies on the CPU: keeps them
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

GUIDE_JOB_TOKENS = 8.5e6
CONFIGS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def optimizer_for(recipe: str):
    """(optimizer class, kwargs) for the Trainer's ``optimizer_cls_and_kwargs``, or None for --optim."""
    if recipe == "8bit-sr":
        from torchao.optim import AdamW8bit

        return AdamW8bit, {"lr": 5e-5, "bf16_stochastic_round": True}
    if recipe == "offload":
        from torchao.optim import CPUOffloadOptimizer

        return CPUOffloadOptimizer, {"optimizer_class": torch.optim.AdamW, "lr": 5e-5, "fused": True}
    return None


def run_recipe(args) -> dict:
    from datasets import Dataset
    from step_timer import StepTimer
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from dense_ft.masks import prune_random_blocks
    from dense_ft.sparse_trainer import SparseTrainer

    config = LlamaConfig(**CONFIGS[args.config])
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    prune_random_blocks(model, 0.2)
    parameters = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, config.vocab_size, (args.steps * args.batch, args.seqlen)).tolist()
    data = Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=5e-5,
            bf16=True, activation_checkpointing=True, optim="adamw_torch", report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, use_cpu=args.device == "cpu",
        )
        trainer = SparseTrainer(model=model, args=training_args, train_dataset=data, callbacks=[timer],
                                optimizer_cls_and_kwargs=optimizer_for(args.recipe))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        violations = sum(trainer.masks.violations().values())
    step_seconds = statistics.median(timer.durations[2:] or timer.durations)
    tokens_per_second = args.batch * args.seqlen / step_seconds
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    return {
        "recipe": args.recipe, "config": args.config, "device": device_name, "parameters": parameters,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "step_seconds": round(step_seconds, 3), "tokens_per_second": round(tokens_per_second, 1),
        "mfu": round(6 * parameters * tokens_per_second / (peak * 1e12), 3) if peak else None,
        "guide_job_hours": round(GUIDE_JOB_TOKENS / tokens_per_second / 3600, 2), "violations": violations,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--recipes", default="guide,8bit-sr,offload", help="comma-separated")
    parser.add_argument("--recipe", help=argparse.SUPPRESS)  # one recipe, in a child process
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=1024)
    args = parser.parse_args()
    if args.recipe:
        print(json.dumps(run_recipe(args)), flush=True)
        return
    common = ["--config", args.config, "--device", args.device, "--steps", str(args.steps), "--batch",
              str(args.batch), "--seqlen", str(args.seqlen)]
    for recipe in args.recipes.split(","):
        child = subprocess.run([sys.executable, __file__, *common, "--recipe", recipe], capture_output=True,
                               text=True)
        lines = child.stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            print(lines[-1], flush=True)
        else:
            error = (child.stderr.strip().splitlines() or ["no output"])[-1]
            print(json.dumps({"recipe": recipe, "error": error}), flush=True)


if __name__ == "__main__":
    main()
