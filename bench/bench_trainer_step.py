"""SparseTrainer vs the plain Trainer: time per optimizer step, and mask memory.

On the embedded default (SmolLM2-135M, float32, CPU) with 20% of its 16x16 blocks zeroed and
256-token sequences, runs of both trainers alternate; the first step of each run is dropped
as warm-up. ``--batch 2 --accumulation 4`` is the demo's 2,048 tokens per optimizer step;
``--batch 1 --accumulation 1`` is the worst case for masking (it runs once per step).

    PYTHONPATH=scripts .venv/bin/python bench/bench_trainer_step.py [--rounds 3 --steps 4 --batch 2 --accumulation 4]
"""

import argparse
import copy
import json
import statistics
import tempfile

import torch
from datasets import Dataset
from prepare_embedded import corpus_dir, model_dir
from step_timer import StepTimer, median_seconds
from transformers import Trainer, TrainingArguments

from dense_ft.masks import SparsityMasks, prune_random_blocks
from dense_ft.modeling import load_model
from dense_ft.sparse_trainer import SparseTrainer

SEQLEN = 256


def training_data(tokenizer, samples: int) -> Dataset:
    text = (corpus_dir() / "wiki.train.raw").read_text(encoding="utf-8")
    ids = tokenizer(text[:200_000]).input_ids
    blocks = [ids[i * SEQLEN:(i + 1) * SEQLEN] for i in range(samples)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def step_times(trainer_class, model, data, settings, output_dir: str) -> list[float]:
    timer = StepTimer()
    args = TrainingArguments(output_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch,
                             gradient_accumulation_steps=settings.accumulation, learning_rate=5e-5,
                             use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer_class(model=copy.deepcopy(model), args=args, train_dataset=data, callbacks=[timer]).train()
    return timer.durations[1:]


def masking_overhead(model, repeats: int = 5) -> float:
    """Seconds to mask every gradient and every weight once (what SparseTrainer adds per step)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    masks = SparsityMasks(model)
    return median_seconds(lambda: (masks.apply_to_grads(), masks.apply_to_weights()), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = load_model(str(model_dir()), "float32", "cpu")
    prune_random_blocks(model, 0.2)
    data = training_data(tokenizer, args.steps * args.batch * args.accumulation)

    times = {"Trainer": [], "SparseTrainer": []}
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(args.rounds):
            order = [Trainer, SparseTrainer] if round_index % 2 == 0 else [SparseTrainer, Trainer]
            for trainer_class in order:
                times[trainer_class.__name__] += step_times(trainer_class, model, data, args, output_dir)

    medians = {name: statistics.median(values) for name, values in times.items()}
    masks = SparsityMasks(model)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = sum(m.weight.numel() for m in masks.linears.values())
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "tokens_per_optimizer_step": SEQLEN * args.batch * args.accumulation,
        "median_step_seconds": {name: round(value, 3) for name, value in medians.items()},
        "steps_timed": {name: len(values) for name, values in times.items()},
        "step_time_ratio": round(medians["SparseTrainer"] / medians["Trainer"], 4),
        "masking_seconds_per_step": round(masking_overhead(model), 4),
        "mask_bytes": masks.nbytes,
        "parameter_bytes": parameter_bytes,
        "mask_over_parameter_bytes": f"{masks.nbytes / parameter_bytes:.5%}",
        "mask_bits_per_prunable_weight": round(8 * masks.nbytes / weights, 5),
    }, indent=2))


if __name__ == "__main__":
    main()
