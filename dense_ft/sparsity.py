"""Which weights are "the pruned weights", and how many of them are exactly zero.

The pruned weights are the decoder layers' ``nn.Linear`` weights (attention and MLP
projections); embeddings and ``lm_head`` are never pruned, as in Wanda.
"""

import re

import torch
from torch import nn

_DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")
_LORA_PART = re.compile(r"\.lora_[A-Za-z_]+\.")

# A pruned model records its pattern in its config under this key, so that later tools know
# which zeros are pruned blocks and which are ordinary weights that happen to be zero.
PATTERN_KEY = "sparsity_pattern"


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' linear layers, by qualified module name (not a LoRA adapter's own A and B)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _DECODER_LINEAR.search(name) and not _LORA_PART.search(name)
    }


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (the local shard of a DTensor)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local")


def sum_over_shards(counts: dict[str, int], sharded: bool) -> dict[str, int]:
    """Per-rank counts of sharded weights summed over all ranks (a collective: call it on every rank)."""
    if not sharded or not counts:
        return counts
    import torch.distributed as dist

    totals = torch.tensor(list(counts.values()), dtype=torch.int64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(totals)
    return dict(zip(counts, totals.tolist(), strict=True))


def layer_sparsity(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(zeros, total) of every prunable weight, by module name, over all shards."""
    linears = prunable_linears(model)
    zeros = {name: int((local_tensor(m.weight.detach()) == 0).sum()) for name, m in linears.items()}
    zeros = sum_over_shards(zeros, any(is_sharded(m.weight) for m in linears.values()))
    return {name: (zeros[name], m.weight.numel()) for name, m in linears.items()}


@torch.no_grad()
def check_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the decoder layers' linear weights."""
    counts = layer_sparsity(model).values()
    total = sum(numel for _, numel in counts)
    return sum(zeros for zeros, _ in counts) / total if total else 0.0


def sparsity_pattern(config) -> dict | None:
    """The pruning pattern a model's config records, if any."""
    return getattr(config, PATTERN_KEY, None)
