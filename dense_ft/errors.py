"""One-line errors for the command-line tools."""

import sys
from collections.abc import Callable
from contextlib import contextmanager

import torch
from safetensors import SafetensorError

# What the CPU allocator's failure says (a plain RuntimeError; a device's is torch.OutOfMemoryError).
CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"
# What a failed save raises: the OS, torch.save, safetensors.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


class UserError(Exception):
    """A problem with the user's input: reported as one line, never as a traceback."""


def first_line(error: BaseException) -> str:
    """What a one-line report keeps of another library's error: its first line, or its class when it has no text."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextmanager
def exit_on_user_error(exit_code: int = 2):
    try:
        yield
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(exit_code)


@contextmanager
def out_of_memory_as_user_error(remedies: Callable[[], list[str]]):
    """Running out of memory, on a device or the CPU, as one line: the ``remedies()`` (what to lower or add, asked
    then: the run may have chosen some settings itself), then what ran out."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:  # MemoryError: Python's own objects
        if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and CPU_ALLOCATOR_FAILURE not in str(error):
            raise
        options = remedies()
        advice = ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]
        raise UserError(f"out of memory: {advice} ({first_line(error)})") from error
