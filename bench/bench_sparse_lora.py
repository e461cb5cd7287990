"""Sparse LoRA against PEFT's plain LoRA: activation memory kept for backward, and time per step.

On the embedded default (SmolLM2-135M, float32, 20% of its 16x16 blocks zeroed at random; the
values do not matter here), rank 8 on q, k, v, o, gate, up, down:

- activation memory: the bytes of every tensor autograd saves for backward during one forward
  of ``--batch x --seqlen`` tokens (each storage counted once, parameters not counted);
- time: forward + backward + AdamW step, median of ``--steps`` per run after one warm-up step, of
  three kinds alternated A B C C B A: sparse LoRA, sparse LoRA trained ``folded`` as before
  2026-12-06 (the update folded into the weight, as evaluation computes it), PEFT's plain LoRA.

With ``--layers`` it times one adapted linear layer of each Llama-2-7B shape instead (float32,
20% of its blocks pruned at random, rank ``--rank``, ``--tokens`` tokens): forward + backward by the
three ways to compute the LoRA update, alternated A B C C B A: ``blocks`` (sparse LoRA in
training up to rank 85), ``folded`` (``MaskedLoraFunction``: sparse LoRA in evaluation, in
training from rank 86, and before 2026-12-06 in training) and ``plain`` (PEFT's unmasked
``B(A(x))``).

With ``--pruned DIR --adapter DIR`` (a pruned model and a LoRA adapter trained on it, e.g. by
``bench_lora_recovery.py``) it reports the merge instead: the largest logit difference between
the merged model and the unmerged masked adapter on 256 tokens of the embedded test text, and
the pruned weights made non-zero by the sparse merge and by PEFT's plain merge of the same adapter.

    PYTHONPATH=scripts .venv/bin/python bench/bench_sparse_lora.py [--batch 2 --seqlen 256 --steps 5]
    PYTHONPATH=scripts .venv/bin/python bench/bench_sparse_lora.py --layers [--rank 8 --tokens 512 --steps 3]
    PYTHONPATH=scripts .venv/bin/python bench/bench_sparse_lora.py --pruned PRUNED_DIR --adapter ADAPTER_DIR
"""

import argparse
import copy
import json

import torch
from peft import get_peft_model
from prepare_embedded import corpus_dir, model_dir
from step_timer import median_seconds
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dense_ft.masks import BlockMask, SparsityMasks, prune_random_blocks
from dense_ft.modeling import load_weights
from dense_ft.sparse_lora import (
    LLAMA_TARGET_MODULES,
    MaskedLoraFunction,
    MaskedLoraLinear,
    add_sparse_lora,
    block_masked_update,
    load_sparse_lora,
    lora_config,
)

LLAMA_7B_LINEAR_SHAPES = {"q_proj, k_proj, v_proj, o_proj": (4096, 4096), "gate_proj, up_proj": (11008, 4096),
                          "down_proj": (4096, 11008)}


def with_lora(base, kind: str):
    """``sparse`` LoRA, ``folded`` (sparse LoRA training as before 2026-12-06: the update folded into the weight,
    as evaluation still computes it) or PEFT's ``plain`` LoRA on a copy of ``base``."""
    config = lora_config(8, 16, 0.0, LLAMA_TARGET_MODULES)
    model = copy.deepcopy(base)
    if kind == "plain":
        return get_peft_model(model, config)
    model = add_sparse_lora(model, config)
    if kind == "folded":
        for layer in model.modules():
            if isinstance(layer, MaskedLoraLinear):
                layer._forward_by_blocks = layer._forward_folded
    return model


def saved_activation_bytes(model, ids) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def step_seconds(model, ids, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, steps)


def layer_seconds(out_features: int, in_features: int, rank: int, tokens: int, steps: int) -> dict:
    """Forward + backward of one adapted layer by each way to compute the update: two runs each, the median
    seconds of each."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    mask = BlockMask(torch.rand(out_features // 16, in_features // 16, generator=generator) < 0.2, 16)
    mask.apply_(weight)
    lora_A = (torch.randn(rank, in_features, generator=generator) * 0.02).requires_grad_()
    lora_B = (torch.randn(out_features, rank, generator=generator) * 0.02).requires_grad_()
    x = torch.randn(tokens, in_features, generator=generator).requires_grad_()
    grad = torch.randn(tokens, out_features, generator=generator)
    updates = {"blocks": lambda: F.linear(x, weight) + block_masked_update(x, lora_A, lora_B, 2.0, mask),
               "folded": lambda: MaskedLoraFunction.apply(x, weight, lora_A, lora_B, 2.0, mask),
               "plain": lambda: F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * 2.0}
    times = {path: [] for path in updates}
    for path in ("blocks", "folded", "plain", "plain", "folded", "blocks"):
        times[path].append(median_seconds(lambda update=updates[path]: update().backward(grad), steps))
    return {path: [round(t, 4) for t in ts] for path, ts in times.items()}


def layer_figures(rank: int, tokens: int, steps: int) -> dict:
    figures = {name: layer_seconds(*shape, rank, tokens, steps) for name, shape in LLAMA_7B_LINEAR_SHAPES.items()}
    decoder_layer = {path: sum(len(name.split(", ")) * sum(figures[name][path]) / 2 for name in figures)
                     for path in ("blocks", "folded", "plain")}
    return {"rank": rank, "tokens": tokens, "seconds": figures,
            "decoder_layer_seconds": {path: round(t, 3) for path, t in decoder_layer.items()},
            "blocks_over_plain": round(decoder_layer["blocks"] / decoder_layer["plain"], 3),
            "folded_over_plain": round(decoder_layer["folded"] / decoder_layer["plain"], 3)}


@torch.no_grad()
def merge_figures(pruned: str, adapter: str) -> dict:
    from peft import PeftModel

    text = (corpus_dir() / "wiki.test.raw").read_text(encoding="utf-8")[:20_000]
    ids = AutoTokenizer.from_pretrained(pruned)(text, return_tensors="pt").input_ids[:, :256]
    masks = SparsityMasks(AutoModelForCausalLM.from_pretrained(pruned))
    sparse = load_sparse_lora(AutoModelForCausalLM.from_pretrained(pruned), adapter).eval()
    unmerged = sparse(input_ids=ids).logits
    merged = sparse.merge_and_unload()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned), adapter).merge_and_unload()
    return {"max_abs_logit_difference_merged_vs_unmerged": (merged(input_ids=ids).logits - unmerged).abs().max().item(),
            "pruned_weights": masks.num_pruned,
            "nonzero_pruned_after_sparse_merge": sum(masks.violations(merged).values()),
            "nonzero_pruned_after_plain_peft_merge": sum(masks.violations(plain).values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", action="store_true", help="time one layer of each 7B shape instead")
    parser.add_argument("--tokens", type=int, default=512, help="with --layers: tokens per forward")
    parser.add_argument("--rank", type=int, default=8, help="with --layers: the LoRA rank")
    parser.add_argument("--pruned", help="a pruned model directory (with --adapter: the merge figures)")
    parser.add_argument("--adapter", help="a LoRA adapter trained on --pruned")
    args = parser.parse_args()
    if args.pruned:
        print(json.dumps(merge_figures(args.pruned, args.adapter)))
        return
    if args.layers:
        print(json.dumps(layer_figures(args.rank, args.tokens, args.steps)))
        return
    base = load_weights(str(model_dir()))
    prune_random_blocks(base, 0.2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seqlen), generator=generator)
    models = {kind: with_lora(base, kind).train() for kind in ("sparse", "folded", "plain")}
    memory = {kind: saved_activation_bytes(model, ids) for kind, model in models.items()}
    times = {kind: [] for kind in models}
    for kind in ("sparse", "folded", "plain", "plain", "folded", "sparse"):
        times[kind].append(step_seconds(models[kind], ids, args.steps))
    print(json.dumps({
        "tokens_per_step": args.batch * args.seqlen,
        "saved_activations_mib": {kind: round(b / 2**20, 1) for kind, b in memory.items()},
        "activation_ratio": round(memory["sparse"] / memory["plain"], 4),
        "step_seconds": {kind: [round(t, 3) for t in ts] for kind, ts in times.items()},
        "time_ratio": round(sum(times["sparse"]) / sum(times["plain"]), 3),
        "folded_time_ratio": round(sum(times["folded"]) / sum(times["plain"]), 3),
    }))


if __name__ == "__main__":
    main()
