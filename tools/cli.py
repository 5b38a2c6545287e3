"""What every command-line tool does the same way."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")


def reader_may_leave(main: Callable[P, int]) -> Callable[P, int]:
    """A reader that stops early (``| head``) ends the command with status 1, not a traceback.

    Python ignores SIGPIPE, so the write raises instead; stdout is then pointed at /dev/null
    because the interpreter flushes it once more on the way out.
    """

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            try:
                return main(*args, **kwargs)
            finally:
                sys.stdout.flush()  # inside the try: a pipe's buffered output fails here
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 1

    return run
