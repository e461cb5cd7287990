"""How far a teacher loaded in 4-bit is from the dense one, against how far the pruned student is.

On the embedded default: the dense model (the teacher), the same loaded in 4-bit by the loader
``finetune.py --teacher_model_init_kwargs '{"quantization_config": {"load_in_4bit": true, ...}}'``
loads it with, and the model Wanda pruned to 20% of its 16x16 blocks (as ``make demo`` prunes it),
all in float32. Over the first ``--windows`` windows of 256 tokens of the validation split, read as
``main_block.py`` reads its text: each model's perplexity, and the mean per-token KL(dense || model)
of the next-token distributions, what distillation with ``kl`` drives the student's towards. A
4-bit teacher whose KL to the dense one is small against the pruned student's is nearly as good a
target. One JSON line per model.

    PYTHONPATH=scripts .venv/bin/python bench/bench_teacher_in_4bit.py [--quant_types nf4,fp4]
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from bench_lora_recovery import prune_embedded
from prepare_embedded import corpus_dir, model_dir
from torch.nn import functional as F

from dense_ft.modeling import load_model, load_weights
from dense_ft.prune import token_ids
from dense_ft.text import joined_text, load_wikitext_dir

SEQLEN = 256


def validation_windows(tokenizer, count: int) -> torch.Tensor:
    text = joined_text(load_wikitext_dir(str(corpus_dir()), ["validation"]), "validation", "\n\n")
    return token_ids(tokenizer, text)[:count * SEQLEN].view(count, SEQLEN)


@torch.no_grad()
def next_token_log_probs(model, window: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=window[None]).logits[0, :-1].float(), dim=-1)


def compare(dense, others: dict, windows: torch.Tensor) -> dict[str, dict[str, float]]:
    """Perplexity of each model, and each other model's mean per-token KL(dense || model)."""
    totals = {name: {"nll": 0.0, "kl": 0.0} for name in ("dense", *others)}
    for window in windows:
        targets = window[1:, None]
        reference = next_token_log_probs(dense, window)
        totals["dense"]["nll"] -= reference.gather(1, targets).sum().item()
        for name, model in others.items():
            log_probs = next_token_log_probs(model, window)
            totals[name]["nll"] -= log_probs.gather(1, targets).sum().item()
            totals[name]["kl"] += (reference.exp() * (reference - log_probs)).sum().item()
    tokens = windows.shape[0] * (SEQLEN - 1)
    return {name: {"perplexity": math.exp(total["nll"] / tokens), "kl_to_dense": total["kl"] / tokens}
            for name, total in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant_types", default="nf4,fp4", help="4-bit data types to load the teacher in")
    parser.add_argument("--windows", type=int, default=48, help="validation windows of 256 tokens")
    args = parser.parse_args()
    dense, tokenizer = load_model(str(model_dir()))
    others = {f"teacher in {kind}": load_weights(str(model_dir()), quantization_config={
        "load_in_4bit": True, "bnb_4bit_quant_type": kind}) for kind in args.quant_types.split(",")}
    with tempfile.TemporaryDirectory(prefix="teacher_in_4bit_") as work:
        others["pruned student"] = load_weights(str(prune_embedded(Path(work))))
    windows = validation_windows(tokenizer, args.windows)
    for name, figures in compare(dense.eval(), {name: model.eval() for name, model in others.items()}, windows).items():
        print(json.dumps({"model": name, **figures, "windows": args.windows, "seqlen": SEQLEN}), flush=True)


if __name__ == "__main__":
    main()
