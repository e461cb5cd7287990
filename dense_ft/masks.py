"""Pruning masks: captured once from a model's zeros, applied to weights and gradients.

A weight whose zeros are whole ``b x b`` blocks (what block pruning leaves) gets a
``BlockMask``: the positions of its pruned blocks, kept from capture, so that a pass over
the weight (or its gradient) writes exactly those blocks, with no index to recompute and no
full-size temporary: on the CPU all matrices in one call of a native kernel (``block_zero``),
elsewhere one indexed write per matrix. Any other pattern of zeros gets an ``ElementMask``:
one bool per weight.

Which zeros are pruned: those of the blocks a model's ``sparsity_pattern`` names. A model
without one (pruned by another tool) is read from its zeros: whole zero 16x16 blocks are pruned
blocks, and scattered zeros are unstructured pruning when they are at least
``UNSTRUCTURED_MIN_FRACTION`` of the prunable weights; below that they are the stray zeros of a
dense model (0.03% in the embedded default) and stay trainable. Zeros like pruning in decoder
weights that no ``nn.Linear`` holds (a MoE's fused experts) are refused: no mask covers them.
"""

import re
import warnings

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from . import block_zero
from .errors import UserError
from .sparsity import (
    PATTERN_KEY,
    block_pattern,
    is_4bit,
    is_sharded,
    local_tensor,
    matrices_outside_linears,
    prunable_linears,
    pruned_block_count,
    sparsity_pattern,
    sum_over_shards,
    validate_pattern,
    weight_values,
)

DEFAULT_BLOCK_SIZE = 16
UNSTRUCTURED_MIN_FRACTION = 0.01
_PEFT_COPY = re.compile(r"\.modules_to_save\.[^.]+$")  # X.modules_to_save.<adapter> copies X.original_module


class BlockMask:
    """The pruned blocks of one weight matrix, each by the flat index of its top-left element.

    One int64 per pruned block: 8 bytes per 256 weights of a pruned 16x16 block (about 41 MB
    for a 7B model at 20%), against 1 bit per block for a bitmap that would have to be turned
    into indices again on every pass. int64 is what PyTorch's indexing takes, so no pass converts
    them (int32 coordinates cost two conversions per matrix per pass).
    """

    def __init__(self, pruned_blocks: torch.Tensor, block_size: int):
        self.grid = tuple(pruned_blocks.shape)
        self.block_size = block_size
        self.shape = torch.Size(size * block_size for size in self.grid)
        rows, cols = pruned_blocks.nonzero(as_tuple=True)
        self.block_starts = (rows * self.shape[1] + cols) * block_size
        self._kept_blocks = {}  # by dtype, on the device of block_starts

    @property
    def pruned_blocks(self) -> torch.Tensor:
        b, columns = self.block_size, self.shape[1]
        grid = torch.zeros(self.grid, dtype=torch.bool, device=self.block_starts.device)
        grid[self.block_starts // (b * columns), self.block_starts % columns // b] = True
        return grid

    def kept_blocks(self, dtype: torch.dtype) -> torch.Tensor:
        """The block grid in ``dtype``, 1 where a block is kept and 0 where it is pruned (sparse LoRA's factor):
        made on first use per dtype, as a training step would otherwise remake it in every layer's forward
        (a 7B's grids: 25 M entries, 51 MB in bf16)."""
        if dtype not in self._kept_blocks:
            self._kept_blocks[dtype] = self.pruned_blocks.logical_not().to(dtype)
        return self._kept_blocks[dtype]

    @property
    def nbytes(self) -> int:
        return self.block_starts.nbytes

    @property
    def num_pruned(self) -> int:
        return self.block_starts.numel() * self.block_size**2

    def _windows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every ``b x b`` window of a row-major ``tensor``, by the flat index of its top-left element.

        The windows overlap (a view, no copy); the pruned blocks are disjoint among them, so one
        ``index_fill_`` along the first dimension zeroes them all: a single operation per matrix.
        """
        if tensor.shape != self.shape:  # as_strided would not notice: the write would land outside the matrix
            raise ValueError(f"a mask of shape {tuple(self.shape)} cannot mask a tensor of shape {tuple(tensor.shape)}")
        rows, cols = self.shape
        b = self.block_size
        return tensor.as_strided((rows * cols - (b - 1) * (cols + 1), b, b), (1, cols, 1))

    def native_row(self, tensor: torch.Tensor) -> tuple | None:
        """This mask's row of the CPU kernel's table (``block_zero``), or None when the kernel cannot take it."""
        if tensor.shape != self.shape:  # the kernel would write outside the matrix: the indexed write refuses it
            return None
        return block_zero.matrix_row(tensor, self.block_starts, self.block_size)

    def apply_(self, tensor: torch.Tensor) -> None:
        """Zero the pruned blocks of ``tensor``: with the CPU kernel where it can, else by indexing."""
        apply_masks_([(tensor, self)])

    def _starts_on(self, device: torch.device) -> torch.Tensor:
        """The block starts on ``device``: a mask made on another device than the tensor (a CPU-drawn
        random pattern for a GPU model in ``prune_random_blocks``, a merge on the CPU after GPU
        training) is copied there for that use, as ``index_put_`` did with CPU indices;
        ``index_fill_`` wants both on one device."""
        return self.block_starts if self.block_starts.device == device else self.block_starts.to(device)

    def apply_indexed_(self, tensor: torch.Tensor) -> None:
        """Zero the pruned blocks of ``tensor`` with one indexed write of just those blocks (any device)."""
        row_major = tensor.contiguous()
        self._windows(row_major).index_fill_(0, self._starts_on(tensor.device), 0)
        if row_major is not tensor:
            tensor.copy_(row_major)

    def count_nonzero(self, tensor: torch.Tensor) -> int:
        """How many pruned positions of ``tensor`` are not zero."""
        return int(self._windows(tensor.contiguous())[self._starts_on(tensor.device)].count_nonzero())

    def dense(self) -> torch.Tensor:
        b = self.block_size
        return self.pruned_blocks.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)

    def rows(self, start: int, stop: int) -> "Mask":
        """The mask of rows ``[start, stop)``: a BlockMask when they line up with blocks."""
        b = self.block_size
        if start % b == 0 and stop % b == 0:
            return BlockMask(self.pruned_blocks[start // b:stop // b], b)
        return ElementMask(self.dense()[start:stop])

    def to(self, device: torch.device) -> "BlockMask":
        moved = self.block_starts.to(device)
        if moved is not self.block_starts:
            self.block_starts = moved
            self._kept_blocks.clear()
        return self


class ElementMask:
    """Pruned positions of one weight, one bool per weight."""

    def __init__(self, pruned: torch.Tensor):
        self.pruned = pruned.bool()

    @property
    def nbytes(self) -> int:
        return self.pruned.numel()

    @property
    def num_pruned(self) -> int:
        return int(self.pruned.sum())

    def apply_(self, tensor: torch.Tensor) -> None:
        tensor.masked_fill_(self.pruned.to(tensor.device), 0)

    def count_nonzero(self, tensor: torch.Tensor) -> int:
        return int(tensor.ne(0).logical_and(self.pruned.to(tensor.device)).sum())

    def dense(self) -> torch.Tensor:
        return self.pruned

    @property
    def shape(self) -> torch.Size:
        return self.pruned.shape

    def rows(self, start: int, stop: int) -> "ElementMask":
        return ElementMask(self.pruned[start:stop])

    def to(self, device: torch.device) -> "ElementMask":
        self.pruned = self.pruned.to(device)
        return self


Mask = BlockMask | ElementMask


def apply_masks_(tensors_and_masks) -> None:
    """Zero the pruned positions of each tensor: CPU block masks in one native call, the rest one by one."""
    native = []  # (tensor, mask) for the kernel
    rows = []  # their rows of its table
    for tensor, mask in tensors_and_masks:
        if not isinstance(mask, BlockMask):
            mask.apply_(tensor)
        elif (row := mask.native_row(tensor)) is None:
            mask.apply_indexed_(tensor)
        else:
            native.append((tensor, mask))
            rows.append(row)
    # Only a pass with CPU work loads the kernel: GPU runs never build it nor warn about a compiler.
    if native and not block_zero.zero_blocks_([tensor for tensor, _ in native], rows):
        for tensor, mask in native:
            mask.apply_indexed_(tensor)


def shard_row_offset(name: str, weight: torch.Tensor) -> int:
    """First global row of this rank's shard of a DTensor sharded on dim 0 (FSDP2's layout)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not is_sharded(weight):
        raise UserError(f"{name} is {tuple(weight.shape)}, not the matrix its mask was taken from: the masks support "
                        "FSDP2's row shards, not FSDP1's flattened parameters (set the FSDP config's version to 2)")
    if any(not isinstance(p, Shard) or p.dim != 0 for p in weight.placements):
        raise UserError(f"masks support weights sharded on rows (FSDP2), not {weight.placements}")
    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return offset[0]


def _whole_zero_blocks(zeros: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, cols = zeros.shape
    b = block_size
    return zeros.view(rows // b, b, cols // b, b).all(dim=3).all(dim=1)


def capture_mask(weight: torch.Tensor, block_size: int | None = None) -> Mask | None:
    """The mask of one weight from its exact zeros, or None when nothing is pruned.

    Whole zero blocks are pruned, and a stray zero inside a kept block stays an ordinary,
    trainable weight. With ``block_size`` (the pattern a pruned model records) that is all;
    without it, a weight with no whole zero 16x16 block gets an ``ElementMask`` of its zeros,
    for the caller to judge (``is_unstructured_pruning``).
    """
    zeros = weight.detach() == 0
    if not zeros.any():
        return None
    b = block_size or DEFAULT_BLOCK_SIZE
    divisible = weight.dim() == 2 and weight.shape[0] % b == 0 and weight.shape[1] % b == 0
    if block_size is not None and not divisible:
        raise UserError(f"a weight of shape {tuple(weight.shape)} cannot hold {b}x{b} blocks")
    if divisible:
        blocks = _whole_zero_blocks(zeros, b)
        if blocks.any():
            return BlockMask(blocks, b)
        if block_size is not None:
            return None
    return ElementMask(zeros)


def prunes_exact_counts(pattern: dict) -> bool:
    """Whether the pattern's method pruned exactly ``pruned_block_count`` blocks of every weight (Wanda does; random
    blocks prune the ratio on average)."""
    return pattern.get("method") == "wanda"


def wanda_pruned_blocks(pattern: dict, shape) -> int | None:
    """How many blocks of a weight of ``shape`` the pattern pruned, where ``prunes_exact_counts``; else None."""
    if not prunes_exact_counts(pattern):
        return None
    b = pattern["block_size"]
    return pruned_block_count(pattern["sparsity_ratio"], (shape[0] // b) * (shape[1] // b))


def blocks_lost(pattern: dict, shape, zero_blocks: Mask | None) -> int:
    """Pruned blocks of a weight that are no longer zero blocks (``zero_blocks``: the weight's, as captured)."""
    expected = wanda_pruned_blocks(pattern, shape)
    found = zero_blocks.num_pruned // pattern["block_size"] ** 2 if isinstance(zero_blocks, BlockMask) else 0
    return max(0, expected - found) if expected is not None else 0


def is_unstructured_pruning(element_zeros: int, prunable_weights: int) -> bool:
    """Whether scattered zeros, in a model with no ``sparsity_pattern``, are pruning rather than stray zeros."""
    return element_zeros >= UNSTRUCTURED_MIN_FRACTION * prunable_weights


def check_no_pruning_outside_linears(model: nn.Module) -> None:
    """Refuse, in one line, pruning in decoder weights that no ``nn.Linear`` holds (a MoE's fused experts, pruned
    by another tool): no mask would cover those zeros, and fine-tuning would fill them."""
    for name, matrix in matrices_outside_linears(model).items():
        values = local_tensor(matrix.detach())
        zeros = int((values == 0).sum())
        if is_unstructured_pruning(zeros, values.numel()):
            raise UserError(f"{name} {tuple(matrix.shape)} is {zeros / values.numel():.0%} exact zeros, outside the "
                            "nn.Linear layers the masks cover (fused MoE experts pruned by another tool?): "
                            "fine-tuning would fill them. The masks keep the pruning of nn.Linear weights only")


class SparsityMasks:
    """The masks of a model's prunable weights, captured once from its zeros.

    ``source`` says where the pattern came from: ``"sparsity_pattern"``, ``"zeros"`` (detected:
    blocks or unstructured), or ``"none"`` (not pruned); ``stray_zeros`` counts the scattered
    zeros of a model without a pattern that were judged stray and left trainable.
    """

    def __init__(self, model: nn.Module, block_size: int | None = None):
        pattern = None
        if block_size is None:
            pattern = sparsity_pattern(model.config) if hasattr(model, "config") else None
            if pattern is not None:
                validate_pattern(pattern, "the model's config")
            block_size = pattern["block_size"] if pattern else None
        check_no_pruning_outside_linears(model)
        self.block_size = block_size
        self.linears: dict[str, nn.Linear] = prunable_linears(model)
        self.masks: dict[str, Mask] = {}
        for name, linear in self.linears.items():
            weight = weight_values(linear.weight)
            if not weight.is_floating_point():  # bitsandbytes' 8-bit layers hold integers
                raise UserError(f"{name} holds quantized {weight.dtype} weights, which the masks cannot read: load "
                                "the model unquantized (float32, bfloat16 or float16), or in 4-bit for QLoRA")
            mask = capture_mask(weight, block_size)
            if mask is not None:
                self.masks[name] = mask
        self.stray_zeros = 0
        if block_size is None:
            self._drop_stray_zeros()
        self._share_masks_with_copies()
        if (pattern is not None and prunes_exact_counts(pattern)
                and not any(is_sharded(linear.weight) for linear in self.linears.values())):
            self._check_no_pruned_block_filled(pattern)  # (a shard holds only its rows' blocks)
        self.source = "none" if not self.masks else "sparsity_pattern" if block_size is not None else "zeros"

    def _check_no_pruned_block_filled(self, pattern: dict) -> None:
        """Masking the blocks left of a pattern that training or a merge without the masks has filled would keep a
        pattern that is gone: refused."""
        shapes = {name: (linear.out_features, linear.in_features) for name, linear in self.linears.items()}
        lost = {name: count for name in self.linears
                if (count := blocks_lost(pattern, shapes[name], self.masks.get(name)))}
        if lost:
            name, count = next(iter(lost.items()))
            expected = wanda_pruned_blocks(pattern, shapes[name])
            raise UserError(f"{len(lost)} of {len(self.linears)} prunable weights lost pruned blocks ({name}: {count} "
                            f"of the {expected} Wanda pruned are not zero): the model was trained or merged without "
                            "the masks. Fine-tune the pruned model itself, or prune this one again")

    def _drop_stray_zeros(self) -> None:
        scattered = {name: mask for name, mask in self.masks.items() if isinstance(mask, ElementMask)}
        zeros = sum(mask.num_pruned for mask in scattered.values())
        if not is_unstructured_pruning(zeros, self.num_weights):
            self.stray_zeros = zeros
            for name in scattered:
                del self.masks[name]
        elif any(is_4bit(self.linears[name].weight) for name in scattered):
            raise UserError(f"the model has no {PATTERN_KEY} and {zeros:,} scattered zero weights, which in 4-bit "
                            "cannot be told from the zeros its codes make of small weights (nf4: about 10% of a "
                            "dense model's): load it unquantized, or give it the pattern (main_block.py records it)")

    def _share_masks_with_copies(self) -> None:
        """A PEFT ``modules_to_save`` copy of a pruned weight is that weight trained whole: it takes the mask of
        the weight it copies, whatever zeros it holds (a copy trained without masks holds none)."""
        for name in self.linears:
            original = _PEFT_COPY.sub(".original_module", name)
            if original != name and original in self.masks:
                self.masks[name] = self.masks[original]

    def match_local_shards(self) -> None:
        """After FSDP2 shards the weights by rows, keep only this rank's rows of each mask, on its device.

        A shard whose rows do not start and end on block boundaries keeps an element mask of
        its rows (exact, but one bool per weight): a warning names the layers.
        """
        misaligned = []
        for name, weight, mask in list(self._weights_and_masks()):
            local = local_tensor(weight)
            if local.shape != mask.shape and not is_4bit(weight):  # a 4-bit weight is packed, never sharded
                start = shard_row_offset(name, weight)
                mask = mask.rows(start, start + local.shape[0])
                if isinstance(self.masks[name], BlockMask) and isinstance(mask, ElementMask):
                    misaligned.append(name)
            self.masks[name] = mask.to(local.device)
        if misaligned:
            warnings.warn(f"FSDP row shards of {len(misaligned)} weights (e.g. {misaligned[0]}) do not line up "
                          f"with {self.block_size}-row blocks: their masks use one bool per weight. Choose a GPU "
                          "count whose share of every weight's rows is a multiple of the block size.", stacklevel=2)

    def __len__(self) -> int:
        return len(self.masks)

    def _weights_and_masks(self):
        return ((name, self.linears[name].weight, mask) for name, mask in self.masks.items())

    @torch.no_grad()
    def apply_to_weights(self, trainable_only: bool = False) -> None:
        """Zero the pruned blocks of the weights; with ``trainable_only``, of those that require grad: all that an
        optimizer step can change (a PEFT model's frozen base weights are left as they are)."""
        # The parameters themselves: ``.data`` would make a new tensor per matrix per pass, 0.5-0.9 ms of a 4 ms
        # CPU pass over the embedded default's 210 matrices.
        # A 4-bit weight (QLoRA's base) never trains and holds packed codes: no pass writes it.
        apply_masks_((local_tensor(weight), mask) for _, weight, mask in self._weights_and_masks()
                     if (weight.requires_grad if trainable_only else not is_4bit(weight)))

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        apply_masks_((local_tensor(weight.grad), mask) for _, weight, mask in self._weights_and_masks()
                     if weight.grad is not None)

    def attach_to_optimizer(self, optimizer: torch.optim.Optimizer) -> tuple:
        """Keep the pattern in a training loop of one's own: each ``optimizer.step()`` zeroes the pruned
        gradients first (the optimizer's moments for them stay zero) and re-masks the trainable weights after.

        Returns the two hooks' handles (``.remove()`` detaches them). The optimizer may be the one
        ``accelerator.prepare`` returns (or a Trainer's ``trainer.optimizer``): the hooks go on the torch
        optimizer it wraps, which steps only on real optimizer steps. The trainers also mask the gradients
        before clipping, which keeps them out of the norm: ``apply_to_grads()`` before ``clip_grad_norm_``
        does the same. Under FSDP2, call ``match_local_shards()`` once the model is sharded.
        """
        if isinstance(optimizer, AcceleratedOptimizer):  # a wrapper without step hooks of its own
            optimizer = optimizer.optimizer
        return (optimizer.register_step_pre_hook(lambda *_: self.apply_to_grads()),
                optimizer.register_step_post_hook(lambda *_: self.apply_to_weights(trainable_only=True)))

    @torch.no_grad()
    def violations(self, model: nn.Module | None = None) -> dict[str, int]:
        """Non-zero weights at pruned positions, by layer (only layers that have any).

        ``model`` (default: the model the masks were taken from) must have the same layers; with
        sharded weights every rank must call this, as the counts are summed over ranks.
        """
        linears = self.linears if model is None else prunable_linears(model)
        if linears.keys() != self.linears.keys():
            raise UserError("the model and the reference do not have the same prunable layers")
        counts = {name: self.masks[name].count_nonzero(weight_values(linear.weight)) if name in self.masks else 0
                  for name, linear in linears.items()}
        counts = sum_over_shards(counts, any(is_sharded(linear.weight) for linear in linears.values()))
        return {name: count for name, count in counts.items() if count}

    @property
    def nbytes(self) -> int:
        return sum(mask.nbytes for mask in self.masks.values())

    @property
    def num_pruned(self) -> int:
        return sum(mask.num_pruned for mask in self.masks.values())

    @property
    def num_weights(self) -> int:
        """How many weights the prunable layers hold (a 4-bit one counted unpacked)."""
        return sum(linear.out_features * linear.in_features for linear in self.linears.values())


@torch.no_grad()
def prune_random_blocks(model: nn.Module, ratio: float, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0) -> None:
    """Zero a random ``ratio`` of the blocks of every prunable weight and record the pattern.

    A baseline for Wanda, and a quick way to get a pruned model of any shape for tests and benchmarks.
    """
    generator = torch.Generator().manual_seed(seed)
    for linear in prunable_linears(model).values():
        rows, cols = linear.weight.shape
        pruned = torch.rand(rows // block_size, cols // block_size, generator=generator) < ratio
        BlockMask(pruned, block_size).apply_(linear.weight.data)
    setattr(model.config, PATTERN_KEY, block_pattern(model, "random", block_size, ratio))
