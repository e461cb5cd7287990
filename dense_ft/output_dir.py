"""Output paths: checked before any work, and one run at a time in each."""

import fcntl
import os
from contextlib import contextmanager

from .errors import UserError


def check_output_path(path: str, flag: str) -> None:
    """Refuse, before any work, a directory that cannot be created or written: a file in the way, no permission."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"cannot be created: {existing} is a file"
        raise UserError(f"{flag} {path} {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not writable (no write permission on {existing})")


def same_directory(first: str, second: str) -> bool:
    """Whether two model sources are one: the same Hub id, or the same local directory however it is written."""
    return first == second or os.path.isdir(first) and os.path.isdir(second) and os.path.samefile(first, second)


def check_not_an_input(path: str, flag: str, inputs: dict[str, str | None]) -> None:
    """Refuse an output directory that is one of the run's input directories (``{flag: path}``): the run would
    overwrite what it reads, a pruned model with what was made of it."""
    for input_flag, input_path in inputs.items():
        if input_path and os.path.isdir(path) and same_directory(input_path, path):
            raise UserError(f"{flag} {path} is the {input_flag} directory, which the run would overwrite: choose "
                            f"another {flag}")


@contextmanager
def locked_output_dir(path: str, flag: str = "--output_dir"):
    """Create ``path`` and hold an exclusive lock on it; refuse, in one line, when another run holds it.

    The lock is on the directory itself (``flock``): it adds no file, and it dies with its
    process however that ends.
    """
    check_output_path(path, flag)
    os.makedirs(path, exist_ok=True)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is writing to {flag} {path}: wait for it to finish, or choose another "
                            f"{flag}") from None
        yield
    finally:
        os.close(descriptor)
