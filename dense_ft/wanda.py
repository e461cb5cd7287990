"""Wanda pruning in whole blocks, one decoder layer at a time.

For each linear layer, the Wanda score of a weight is ``|W_ij| * ||X_j||`` (the norm of its
input column over the calibration tokens); a block's score is the mean over the block; the
lowest-scoring ``floor(ratio * n_blocks)`` blocks of each matrix are zeroed. Each layer sees
the outputs of the already-pruned layers before it.
"""

import random

import torch
from torch import nn

from .errors import UserError
from .layerwise import check_decoder_layout, run_layer, run_layer_by_layer
from .masks import BlockMask
from .sparsity import (
    PATTERN_KEY,
    block_pattern,
    matrices_outside_linears,
    prunable_linears,
    pruned_block_count,
    sparsity_pattern,
    validate_pattern,
)


class InputNormStats:
    """Running mean (over calibration samples) of the squared norms of a layer's input columns."""

    def __init__(self, in_features: int, device):
        self.squared_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        batch = inputs.shape[0] if inputs.dim() == 3 else 1
        columns = inputs.reshape(-1, inputs.shape[-1]).float()
        self.squared_norms *= self.samples / (self.samples + batch)
        self.samples += batch
        self.squared_norms += columns.pow(2).sum(dim=0) / self.samples


def block_scores(weight: torch.Tensor, squared_norms: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean Wanda score of every ``block_size x block_size`` block: a (rows/b, cols/b) grid.

    The mean of ``|W_ij| * sqrt(norm_j)`` over a block is ``sum_j sqrt(norm_j) * sum_i |W_ij| / b^2``.
    Summing ``|W|`` over each block's rows first, one row of blocks' worth at a time into a float32
    accumulator, reads the weight once and needs only a (rows/b, cols) temporary.
    """
    rows, cols = weight.shape
    b = block_size
    block_rows = weight.detach().view(rows // b, b, cols)
    column_sums = block_rows[:, 0, :].float().abs()
    for i in range(1, b):
        column_sums.add_(block_rows[:, i, :].abs())
    return column_sums.mul_(squared_norms.sqrt()).view(rows // b, cols // b, b).sum(dim=-1) / (b * b)


def lowest_blocks(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool grid marking exactly ``floor(ratio * n)`` lowest scores; ties go to the earlier block."""
    count = pruned_block_count(ratio, scores.numel())
    order = torch.argsort(scores.flatten(), stable=True)
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    pruned[order[:count]] = True
    return pruned.view(scores.shape)


def check_prunable(model: nn.Module, block_size: int, ratio: float) -> None:
    """Refuse, in one line, a model that block pruning cannot cover: another layout, weights outside ``nn.Linear``,
    a weight that is not a whole number of blocks, or a pruned model that these blocks and ratio would not prune
    further."""
    check_decoder_layout(model)
    outside = matrices_outside_linears(model)
    if outside:
        name, matrix = max(outside.items(), key=lambda item: item[1].numel())
        raise UserError(f"{name} {tuple(matrix.shape)} and {len(outside) - 1} more weight(s) are not in nn.Linear "
                        "layers (fused MoE experts?): Wanda block pruning covers the decoder's nn.Linear weights only, "
                        "and would leave these dense")
    for name, linear in prunable_linears(model).items():
        rows, cols = linear.weight.shape
        if rows % block_size or cols % block_size:
            raise UserError(f"{name}.weight is {rows}x{cols}, not a whole number of {block_size}x{block_size} blocks")
    check_prunes_further(model, block_size, ratio)


def check_prunes_further(model: nn.Module, block_size: int, ratio: float) -> None:
    """A pruned model may be pruned further in its blocks (its pruned blocks score 0, so they stay pruned), not in
    other blocks or to a lower ratio: its zero blocks would stay, and the pattern recorded would not say so."""
    pattern = sparsity_pattern(model.config)
    if pattern is None:
        return
    validate_pattern(pattern, "the model's config")
    pruned_size, pruned_ratio = pattern["block_size"], pattern.get("sparsity_ratio", 0)
    if block_size != pruned_size:
        raise UserError(f"the model is pruned already, in {pruned_size}x{pruned_size} blocks: prune it further in "
                        f"those (--block_size {pruned_size}), or prune the dense model it came from")
    if ratio < pruned_ratio:
        raise UserError(f"the model is pruned already, {pruned_ratio:.0%} of its blocks: --sparsity_ratio {ratio} "
                        f"would leave those zero and record {ratio:.0%}; give {pruned_ratio} or more, or prune the "
                        "dense model it came from")


def calibration_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from one long token sequence, seeded."""
    if token_ids.numel() <= seqlen:
        raise UserError(f"calibration text has {token_ids.numel()} tokens, fewer than --seqlen {seqlen} + 1")
    rng = random.Random(seed)
    starts = [rng.randint(0, token_ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([token_ids[start:start + seqlen] for start in starts])


def _calibrate_and_prune(layer: nn.Module, hidden_states: list, kwargs: dict, ratio: float, block_size: int) -> None:
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    stats = {name: InputNormStats(m.in_features, m.weight.device) for name, m in linears.items()}
    hooks = [m.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
             for name, m in linears.items()]
    for hidden in hidden_states:
        run_layer(layer, hidden, kwargs)
    for hook in hooks:
        hook.remove()
    for name, linear in linears.items():
        pruned = lowest_blocks(block_scores(linear.weight, stats[name].squared_norms, block_size), ratio)
        BlockMask(pruned, block_size).apply_(linear.weight.data)


@torch.no_grad()
def prune_wanda_blocks(model: nn.Module, windows: torch.Tensor, ratio: float, block_size: int,
                       device, offload: bool = False, progress: bool = True, calibration: dict | None = None) -> None:
    """Zero ``ratio`` of each decoder linear weight in ``block_size`` blocks and record the pattern.

    With ``offload`` the model stays on the CPU and each decoder layer comes to ``device`` in turn.
    ``calibration`` (the data set, the seed) is recorded with the windows' count and length.
    """
    check_prunable(model, block_size, ratio)
    run_layer_by_layer(model, windows, device, offload, desc="Pruning layers", progress=progress,
                       before_layer=lambda layer, hidden, kwargs: _calibrate_and_prune(layer, hidden, kwargs,
                                                                                       ratio, block_size))
    calibration = {"nsamples": windows.shape[0], "seqlen": windows.shape[1], **(calibration or {})}
    setattr(model.config, PATTERN_KEY, block_pattern(model, "wanda", block_size, ratio, calibration))
