"""Decisions every rank must take together, or the others wait forever in the next collective."""

import torch
import torch.distributed as dist


def max_over_ranks(value: float | torch.Tensor, device: torch.device) -> float:
    """The largest ``value`` of all ranks (its own when not distributed)."""
    value = torch.as_tensor(value, dtype=torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        value = value.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())
