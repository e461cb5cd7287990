"""How far a teacher loaded in 4-bit is from the dense one, against how far the pruned student is.

On the embedded default: the dense model (the teacher), the same loaded in 4-bit as
``finetune.py --teacher_model_init_kwargs '{"quantization_config": {"load_in_4bit": true, ...}}'``
loads it, and the model Wanda pruned to 20% of its 16x16 blocks (as ``make demo`` prunes it).
Over the first ``--windows`` windows of 256 tokens of the validation split: each model's
perplexity, and the mean per-token KL(dense || model) of the next-token distributions, what
distillation with ``kl`` drives the student's towards. A 4-bit teacher whose KL to the dense
one is small against the pruned student's is nearly as good a target. One JSON line per model.

    PYTHONPATH=scripts .venv/bin/python bench/bench_teacher_in_4bit.py [--quant_types nf4,fp4]
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from bench_lora_recovery import PERPLEXITY, run
from prepare_embedded import corpus_dir, model_dir
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

SEQLEN = 256


def validation_windows(count: int) -> torch.Tensor:
    text = (corpus_dir() / "wiki.valid.raw").read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(model_dir())(text, return_tensors="pt").input_ids[0]
    return ids[:count * SEQLEN].view(count, SEQLEN)


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
    work = Path(tempfile.mkdtemp(prefix="teacher_in_4bit_"))
    pruned = work / "pruned_model"
    run([sys.executable, "main_block.py", "--model", model_dir(), "--calib_dataset", corpus_dir(), *PERPLEXITY,
         "--sparsity_ratio", "0.2", "--nsamples", "16", "--save", work / "pruned", "--save_model", pruned])
    dense = AutoModelForCausalLM.from_pretrained(model_dir()).eval()
    others = {f"teacher in {kind}": AutoModelForCausalLM.from_pretrained(model_dir(), quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind))).eval()
        for kind in args.quant_types.split(",")}
    others["pruned student"] = AutoModelForCausalLM.from_pretrained(pruned).eval()
    for name, figures in compare(dense, others, validation_windows(args.windows)).items():
        print(json.dumps({"model": name, **figures, "windows": args.windows, "seqlen": SEQLEN}), flush=True)


if __name__ == "__main__":
    main()
