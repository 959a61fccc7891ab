"""The in-process server's log lines (``losswire.server``, DEBUG up), with a wait for the next match: how a
test knows a server reached a stage it only logs (a call noticed its caller leave)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator

WAIT = 30.0


class LogWatch(logging.Handler):
    """The server's log records, with a wait for the next one matching."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.messages.append(record.getMessage())
            self.changed.notify_all()

    def mark(self) -> int:
        with self.changed:
            return len(self.messages)

    def wait_for(self, pattern: str, since: int, timeout: float = WAIT) -> str:
        """The first line from ``since`` on that matches ``pattern``; AssertionError after ``timeout``."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((m for m in self.messages[since:] if regex.search(m)), None)

        with self.changed:
            if not self.changed.wait_for(found, timeout):
                raise AssertionError(f"no server log line {pattern!r} within {timeout} s: {self.messages[since:]}")
            return found()


@contextlib.contextmanager
def watching_server_log() -> Iterator[LogWatch]:
    """Every ``losswire.server`` record while the block runs (the logger at DEBUG meanwhile)."""
    logger = logging.getLogger("losswire.server")
    watch, level = LogWatch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
