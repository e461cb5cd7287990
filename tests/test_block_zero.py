"""The CPU kernel that zeroes pruned blocks writes exactly what PyTorch's indexed write does."""

import logging
import shutil

import pytest
import torch
from tiny_models import BLOCK, tiny_llama, zero_random_blocks

from dense_ft import block_zero
from dense_ft.masks import BlockMask, SparsityMasks, apply_masks_

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def pruned_pairs(shapes, dtype, ratio=0.2, seed=0):
    """(tensor, mask) pairs with random values (NaN and inf among them) and random pruned blocks."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for rows, cols in shapes:
        tensor = torch.randn(rows, cols, generator=generator).to(dtype)
        tensor[0, 0], tensor[-1, -1] = float("nan"), float("inf")
        grid = torch.rand(rows // BLOCK, cols // BLOCK, generator=generator) < ratio
        pairs.append((tensor, BlockMask(grid, BLOCK)))
    return pairs


def sixteen_bytes_off(tensor):
    """A copy of ``tensor`` whose first element lies 16 bytes past a 32-byte boundary (the kernel's 32-byte stores
    begin with one of 16 bytes)."""
    elements = 16 // tensor.element_size()
    storage = torch.empty(tensor.numel() + elements, dtype=tensor.dtype)
    copy = storage[elements:].view(tensor.shape)
    copy.copy_(tensor)
    assert copy.data_ptr() % 32 == 16
    return copy


def expected_after_indexed_write(pairs):
    expected = []
    for tensor, mask in pairs:
        copy = tensor.clone()
        mask.apply_indexed_(copy)
        expected.append(copy)
    return expected


def same_bits(pairs, expected) -> bool:
    """Whether every tensor equals its expected value bit for bit (NaN and inf included)."""
    return all(torch.equal(tensor.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
               for (tensor, _), want in zip(pairs, expected, strict=True))


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The kernel loaded anew, with its cache in ``tmp_path``; the shared one again afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    block_zero._kernel.cache_clear()
    yield
    block_zero._kernel.cache_clear()


@needs_compiler
@pytest.mark.parametrize("wide_stores", [True, False], ids=["avx2-if-any", "16-byte"])
@pytest.mark.parametrize("order", block_zero.ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_kernel_zeroes_the_same_positions_as_the_indexed_write(dtype, order, wide_stores):
    # 1024 x 1024 alone has ~820 pruned blocks, many side by side: enough for several threads, whose shares cross
    # matrices, and for runs of neighbours.
    pairs = pruned_pairs([(64, 96), (1024, 1024), (32, 16), (16, 2048), (96, 64), (64, 96)], dtype)
    pairs[-1] = (sixteen_bytes_off(pairs[-1][0]), pairs[-1][1])
    expected = expected_after_indexed_write(pairs)
    one_by_one = [(tensor.clone(), mask) for tensor, mask in pairs]
    versions = [tensor._version for tensor, _ in pairs]
    assert block_zero._kernel() is not None
    if order == "cpu" and wide_stores:
        apply_masks_(pairs)  # what a pass does: the order this CPU's vendor gets, its widest stores
    else:
        assert block_zero.zero_blocks_([tensor for tensor, _ in pairs],
                                       [mask.native_row(tensor) for tensor, mask in pairs], order, wide_stores)
    for tensor, mask in one_by_one:
        mask.apply_(tensor)
    assert same_bits(pairs, expected) and same_bits(one_by_one, expected)
    assert all(mask.count_nonzero(tensor) == 0 for tensor, mask in pairs)
    assert all(tensor._version > version for (tensor, _), version in zip(pairs, versions, strict=True))


@needs_compiler
def test_tensors_the_kernel_cannot_take_are_masked_by_indexing_in_the_same_pass():
    storage = torch.randn(64 * 96 + 1)
    misaligned = storage[1:].view(64, 96)  # 4 bytes off the 16-byte alignment of streaming stores
    transposed = torch.randn(96, 64).t()  # not contiguous
    grid = torch.rand(64 // BLOCK, 96 // BLOCK, generator=torch.Generator().manual_seed(1)) < 0.4
    pairs = [(misaligned, BlockMask(grid, BLOCK)), (transposed, BlockMask(grid, BLOCK)),
             *pruned_pairs([(64, 96)], torch.float32)]
    assert all(mask.native_row(tensor) is None for tensor, mask in pairs[:2])
    expected = expected_after_indexed_write(pairs)
    apply_masks_(pairs)
    assert same_bits(pairs, expected)


def test_without_a_compiler_the_masks_fall_back_to_indexing_with_one_warning(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    pairs = pruned_pairs([(64, 96), (32, 32)], torch.float32)
    expected = expected_after_indexed_write(pairs)
    with caplog.at_level(logging.WARNING, logger=block_zero.__name__):
        apply_masks_(pairs)
        apply_masks_(pairs)
    assert [record.getMessage() for record in caplog.records if "PyTorch indexing" in record.getMessage()] == [
        caplog.records[0].getMessage()]
    assert "/nonexistent/cc" in caplog.records[0].getMessage()
    assert same_bits(pairs, expected)


def test_a_pass_with_nothing_for_the_kernel_neither_builds_it_nor_warns(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    transposed = torch.randn(96, 64).t()  # as a GPU tensor, only indexing can take it
    mask = BlockMask(torch.ones(64 // BLOCK, 96 // BLOCK, dtype=torch.bool), BLOCK)
    with caplog.at_level(logging.WARNING, logger=block_zero.__name__):
        apply_masks_([(transposed, mask)])
    assert not caplog.records and block_zero._kernel.cache_info().currsize == 0
    assert not transposed.any()


@pytest.mark.parametrize("native", [pytest.param("1", marks=needs_compiler), "0"])
def test_the_weight_pass_zeroes_the_trainable_parameters_themselves(fresh_kernel, monkeypatch, native):
    monkeypatch.setenv("DENSE_FT_NATIVE_MASKING", native)
    model = tiny_llama()
    zero_random_blocks(model)
    masks = SparsityMasks(model)
    weights = [linear.weight for linear in masks.linears.values()]
    with torch.no_grad():
        for weight in weights:
            weight.add_(1.0)
    versions = [weight._version for weight in weights]
    masks.apply_to_weights()
    assert (block_zero._kernel() is not None) == (native == "1")
    assert masks.violations() == {} and all(weight.requires_grad for weight in weights)
    # Written in place, as an optimizer's step is: autograd sees each parameter change.
    assert all(weight._version > version for weight, version in zip(weights, versions, strict=True))


def test_the_kernel_can_be_switched_off(fresh_kernel, monkeypatch):
    monkeypatch.setenv("DENSE_FT_NATIVE_MASKING", "0")
    assert block_zero._kernel() is None
    assert block_zero.zero_blocks_([], []) is False


@needs_compiler
def test_the_kernel_is_built_once_into_the_cache(fresh_kernel, tmp_path):
    assert block_zero._kernel() is not None
    assert [path.name.startswith("block_zero-") for path in (tmp_path / "dense_ft").iterdir()] == [True]


def test_indices_the_kernel_would_misread_are_not_given_to_it():
    tensor = torch.randn(32, 32)
    starts = torch.tensor([0, 16, 512, 528])
    assert block_zero.matrix_row(tensor, starts, BLOCK) is not None
    assert block_zero.matrix_row(tensor, starts.int(), BLOCK) is None
    assert block_zero.matrix_row(tensor, starts[::2], BLOCK) is None
