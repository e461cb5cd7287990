"""Zeroing pruned blocks on the CPU at the speed of memory: a small C kernel, built on first use.

PyTorch's indexed write of 16x16 slices costs about a microsecond per block on the CPU, over
10x the time of zeroing the same bytes contiguously. ``block_zero.c`` writes the rows of every
pruned block of every matrix in one call, with streaming stores, on ``torch.get_num_threads()``
threads. It is compiled with the system C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/dense_ft`` (``~/.cache/dense_ft``) the first time a mask pass meets a CPU
tensor. Without a compiler, or with ``DENSE_FT_NATIVE_MASKING=0``, the masks use PyTorch's
indexing: the same zeros, slower. GPU tensors always do.
"""

import array
import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("block_zero.c")
ALIGNMENT = 16  # bytes of one streaming store; a power of two, so matrix_row can test several sizes in one OR
# The orders the kernel can write the blocks in (ORDER_* in block_zero.c): "cpu" lets the CPU's vendor choose.
ORDERS = ("cpu", "blocks", "rows")


def matrix_row(tensor: torch.Tensor, block_starts: torch.Tensor, block_size: int) -> tuple | None:
    """The kernel's row (``matrix_t`` in block_zero.c) to zero these blocks of ``tensor``, or None when the
    kernel cannot take them.

    It takes a contiguous 2-D CPU tensor whose rows and blocks are aligned for its 16-byte stores, and
    ``block_starts`` as one contiguous int64 CPU tensor (the flat index of each block's top-left
    element), naming blocks inside the tensor: the caller's to check, as the kernel cannot.
    """
    if not (tensor.is_cpu and tensor.dim() == 2 and tensor.is_contiguous() and block_starts.dtype == torch.int64
            and block_starts.is_cpu and block_starts.is_contiguous()):
        return None
    address, element = tensor.data_ptr(), tensor.element_size()
    row_bytes = tensor.shape[1] * element
    if (address | row_bytes | block_size * element) % ALIGNMENT:  # 0 only when all three are multiples of it
        return None
    return address, row_bytes, element, block_size, block_starts.data_ptr(), block_starts.numel()


def zero_blocks_(tensors: list[torch.Tensor], rows: list[tuple], order: str = "cpu", wide_stores: bool = True) -> bool:
    """Zero blocks of CPU tensors in one call, ``rows[i]`` (from ``matrix_row``) those of ``tensors[i]``, in one of
    the ``ORDERS``, with 32-byte stores where the CPU has them (``wide_stores``; else 16-byte ones); False (nothing
    done) when the kernel is unavailable."""
    kernel = _kernel()
    if kernel is None:
        return False
    if rows:
        table = array.array("q", itertools.chain.from_iterable(rows))
        kernel(table.buffer_info()[0], len(rows), torch.get_num_threads(), ORDERS.index(order), wide_stores)
        torch.autograd.graph.increment_version(tensors)  # written behind PyTorch's back
    return True


@functools.cache
def _kernel():
    if os.environ.get("DENSE_FT_NATIVE_MASKING", "1") == "0":
        return None
    try:
        kernel = ctypes.CDLL(str(_build())).zero_blocks
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("Masks on the CPU use PyTorch indexing (slower): the block-zeroing kernel could not "
                       "be built: %s", error)
        return None
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    kernel.restype = None
    return kernel


def _build() -> Path:
    """The compiled kernel, built once per source and machine into the cache (atomically: ranks may race)."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dense_ft"
    library = cache / f"block_zero-{tag}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or "cc"
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            first_line = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise subprocess.SubprocessError(f"{compiler} failed: {first_line}")
        os.replace(built, library)
    return library
