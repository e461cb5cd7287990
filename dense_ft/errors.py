"""One-line errors for the command-line tools."""

import sys
from contextlib import contextmanager


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
