"""Which weights are "the pruned weights", and how many of them are exactly zero.

The pruned weights are the decoder layers' ``nn.Linear`` weights (attention and MLP
projections); embeddings and ``lm_head`` are never pruned, as in Wanda.
"""

import copy
import math
import re

import torch
from torch import nn

from .errors import UserError

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


def matrices_outside_linears(model: nn.Module) -> dict[str, nn.Parameter]:
    """The decoder layers' weight matrices that no ``nn.Linear`` holds (fused MoE experts, routers), by name."""
    linear_weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Linear)}
    return {name: param for name, param in model.named_parameters()
            if param.ndim >= 2 and _DECODER_LINEAR.search(name) and id(param) not in linear_weights}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (the local shard of a DTensor)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def is_4bit(weight: torch.Tensor) -> bool:
    """Whether a weight is a bitsandbytes 4-bit one (QLoRA's frozen base): packed codes, never trained."""
    return getattr(weight, "quant_state", None) is not None


def weight_values(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight's values as a matrix: this process's shard, or a 4-bit weight dequantized (its codes keep
    exact zeros: a pruned block of the loaded model reads back as zeros)."""
    if is_4bit(weight):
        return _dequantized_4bit(weight)
    return local_tensor(weight.detach())


def _dequantized_4bit(weight: torch.Tensor) -> torch.Tensor:
    from bitsandbytes import functional as bnb

    return bnb.dequantize_4bit(*_standard_4bit_layout(weight.data, weight.quant_state))


def _standard_4bit_layout(codes: torch.Tensor, state):
    """A 4-bit weight's codes and state in bitsandbytes' standard layout: new ones if it was repacked for the CPU.

    An inference forward on a CPU with AVX512-BF16 repacks the codes in place, and the scales as a (blocks of a
    row, rows) bf16 grid. bitsandbytes 0.50's own inverse leaves the scales of an unnested state in that grid.
    """
    if not getattr(state, "packing_format_for_cpu", False):
        return codes, state
    from bitsandbytes import functional as bnb

    codes, state = bnb._convert_weight_packed_for_cpu_inverse(codes, copy.copy(state))
    if not state.nested:
        state.absmax = state.absmax.T.reshape(-1).float()
    return codes, state


def pin_standard_4bit_layout(model: nn.Module) -> None:
    """Keep every 4-bit weight of ``model`` in the standard layout, restoring any that was repacked for the CPU.

    Once repacked (an inference forward on a CPU with AVX512-BF16), bitsandbytes 0.50 unpacks a weight in place at
    its next ``state_dict()`` (every checkpoint save) with its scales in the wrong order, and from then on the
    model computes with scrambled weights.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and is_4bit(weight):
            module.support_avx512bf16_for_cpu = False
            weight.data, weight.quant_state = _standard_4bit_layout(weight.data, weight.quant_state)


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
    zeros = {name: int((weight_values(m.weight) == 0).sum()) for name, m in linears.items()}
    zeros = sum_over_shards(zeros, any(is_sharded(m.weight) for m in linears.values()))
    return {name: (zeros[name], m.out_features * m.in_features) for name, m in linears.items()}


@torch.no_grad()
def check_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the decoder layers' linear weights."""
    counts = layer_sparsity(model).values()
    total = sum(numel for _, numel in counts)
    return sum(zeros for zeros, _ in counts) / total if total else 0.0


def sparsity_pattern(config) -> dict | None:
    """The pruning pattern a model's config records, if any."""
    return getattr(config, PATTERN_KEY, None)


# The ``sparsity_pattern`` schema, version 1 (README: "The sparsity_pattern schema").
PATTERN_VERSION = 1
_PATTERN_FIELDS = {"version": int, "method": str, "structure": str, "block_size": int, "sparsity_ratio": (int, float),
                   "modules": list, "calibration": (dict, type(None))}


def pruned_block_count(ratio: float, blocks: int) -> int:
    """How many of a weight's ``blocks`` a ``ratio`` prunes: Wanda prunes exactly this many in every weight."""
    return math.floor(round(ratio * blocks, 6))


def block_pattern(model: nn.Module, method: str, block_size: int, ratio: float,
                  calibration: dict | None = None) -> dict:
    """The pattern to record in the config of a model pruned in ``block_size`` blocks."""
    modules = sorted({name.split(".", 3)[-1] for name in prunable_linears(model)})  # e.g. "self_attn.q_proj"
    return {"version": PATTERN_VERSION, "method": method, "structure": "block", "block_size": block_size,
            "sparsity_ratio": ratio, "modules": modules, "calibration": calibration}


def validate_pattern(pattern, source: str) -> None:
    """Refuse, in one line, a ``sparsity_pattern`` that is not the schema (version 1, or the unversioned first one)."""
    if not isinstance(pattern, dict) or not isinstance(pattern.get("block_size"), int) or pattern["block_size"] < 1:
        raise UserError(f"{source}: {PATTERN_KEY} needs a positive integer block_size, got {pattern!r}")
    if "version" not in pattern:
        return  # written before the schema was versioned: method, structure, block_size, sparsity_ratio
    if pattern["version"] != PATTERN_VERSION:
        raise UserError(f"{source}: {PATTERN_KEY} version {pattern['version']} is not supported "
                        f"(this version reads {PATTERN_VERSION})")
    wrong = [name for name, kind in _PATTERN_FIELDS.items() if not isinstance(pattern.get(name), kind)]
    if wrong or pattern["structure"] != "block" or not 0 <= pattern["sparsity_ratio"] < 1:
        raise UserError(f"{source}: {PATTERN_KEY} does not follow schema version {PATTERN_VERSION} "
                        f"(check {', '.join(wrong) or 'structure, sparsity_ratio'})")
