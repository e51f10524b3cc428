"""Child processes of tests: none is left running when a test fails half-way."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T", str, bytes)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[T]) -> Iterator[subprocess.Popen[T]]:
    """``proc``; on the way out, if it still runs (a failed step, a timeout), it is killed and waited for.

    ``with Popen(...)`` alone would wait for it instead, forever if it never ends."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
