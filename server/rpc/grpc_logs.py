"""gRPC's own log lines, as far as a caller can make gRPC write them.

grpcio logs, at ERROR with a traceback, before any interceptor or servicer sees the call:
- every metadata value it cannot decode as UTF-8, with the raw value (``Invalid encoding on b'...'``): an
  ``authorization`` header holding a valid token and one stray byte put the token into the server's log,
  and a caller without a token could write ~60 KB of log per call with 15 KB of such bytes;
- every answer message it could not send because the caller had gone (``ExecuteBatchError raised in core
  by servicer method``): a caller cancelling its calls mid-answer wrote a traceback per call;
- the error that ended its server when a call's ``:path`` was not UTF-8 (the server serves the port again,
  and says so in a line of its own): a caller repeating that frame wrote a line a frame, and asyncio
  another with a traceback (``grpc_task_errors`` below).

Here such a line says what happened without the caller's bytes and without a traceback, at most once per
``QUIET_SECONDS`` for each kind (then with how many were left out).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

GRPC_LOGGER = "grpc._cython.cygrpc"
QUIET_SECONDS = 10.0

# the start of grpcio's line -> (level, what is said instead)
REWRITTEN = {
    "Invalid encoding on ": (
        logging.WARNING,
        "a call's metadata held a value that is not UTF-8 (gRPC read it as Latin-1; not quoted: it may hold a "
        "credential)",
    ),
    "ExecuteBatchError raised in core by servicer method": (
        logging.INFO,
        "a caller went away while its answer was being sent (gRPC's ExecuteBatchError)",
    ),
}
PATH_NOT_UTF8 = "path"  # grpcio logs the UnicodeDecodeError itself as its message
REWRITTEN[PATH_NOT_UTF8] = (
    logging.WARNING,
    "grpcio ended a gRPC server on a call whose :path is not UTF-8 (the server serves its port again)",
)


class CallerLines(logging.Filter):
    """Rewrites the grpcio lines of ``REWRITTEN``: no caller bytes, no traceback, one per interval each."""

    def __init__(self, interval: float = QUIET_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval, self.clock = interval, clock
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if isinstance(record.msg, UnicodeDecodeError):
            kind = PATH_NOT_UTF8
        else:
            kind = next((prefix for prefix in REWRITTEN if text.startswith(prefix)), None)
        if kind is None:
            return True
        with self._lock:
            now = self.clock()
            if now < self._next.get(kind, float("-inf")):
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
                return False
            left_out, self._left_out[kind], self._next[kind] = self._left_out.get(kind, 0), 0, now + self.interval
        level, said = REWRITTEN[kind]
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.msg = "%s%s"
        record.args = (said, f"; {left_out} more such lines left out" if left_out else "")
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return logging.getLogger(GRPC_LOGGER).isEnabledFor(level)  # e.g. not INFO under --log-level warning


def quiet_caller_lines() -> None:
    """Install the filter on grpcio's logger, once per process."""
    logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, CallerLines) for f in logger.filters):
        logger.addFilter(CallerLines())


def grpc_task_errors(
    loop: asyncio.AbstractEventLoop, context: dict[str, Any], default: Callable[[dict[str, Any]], None]
) -> None:
    """The event loop's exception handler: grpcio's own shutdown task, which ends a server whose accept loop
    failed on a path that is not UTF-8, leaves that error unretrieved, and asyncio would log it with a
    traceback each time; the server logs such an end itself (``rpc.ports.PortKeeper``). Everything
    else goes to ``default``."""
    if isinstance(context.get("exception"), UnicodeDecodeError) and "never retrieved" in str(context.get("message")):
        return
    default(context)
