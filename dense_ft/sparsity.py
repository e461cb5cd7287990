"""Which weights are "the pruned weights", and how many of them are exactly zero.

The pruned weights are the decoder layers' ``nn.Linear`` weights (attention and MLP
projections); embeddings and ``lm_head`` are never pruned, as in Wanda.
"""

import re

import torch
from torch import nn

_DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")

# A pruned model records its pattern in its config under this key, so that later tools know
# which zeros are pruned blocks and which are ordinary weights that happen to be zero.
PATTERN_KEY = "sparsity_pattern"


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' linear layers, by qualified module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _DECODER_LINEAR.search(name)
    }


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (the local shard of a DTensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def layer_sparsity(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(zeros, total) of every prunable weight, by module name."""
    counts = {}
    for name, linear in prunable_linears(model).items():
        weight = local_tensor(linear.weight.detach())
        counts[name] = (int((weight == 0).sum()), weight.numel())
    return counts


@torch.no_grad()
def check_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the decoder layers' linear weights."""
    counts = layer_sparsity(model).values()
    total = sum(numel for _, numel in counts)
    return sum(zeros for zeros, _ in counts) / total if total else 0.0


def sparsity_pattern(config) -> dict | None:
    """The pruning pattern a model's config records, if any."""
    return getattr(config, PATTERN_KEY, None)
