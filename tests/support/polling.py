"""Waiting for a condition the test cannot be told about (a server's counter, a log line's effect): polled,
as a bound on how long it may take, never as a timing."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_SECONDS = 0.01


def eventually(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    """Whether ``condition()`` holds within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """``condition()`` holds within ``seconds``, else AssertionError naming ``what``."""
    if not eventually(condition, seconds):
        raise AssertionError(f"{what}: not within {seconds:g} s")
