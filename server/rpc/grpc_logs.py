"""gRPC's own log lines, as far as a caller's bytes reach them.

grpcio logs every metadata value it cannot decode as UTF-8 at ERROR, with a traceback and the raw value
(``Invalid encoding on b'...'``, logger ``grpc._cython.cygrpc``), before any interceptor sees the call:
an ``authorization`` header holding a valid token and one stray byte put the token into the server's
log, and a caller without a token could write ~60 KB of log per call with 15 KB of such bytes. Here
such a line says what happened without the bytes, at most once per ``QUIET_SECONDS`` (then with how many
were left out).
"""

from __future__ import annotations

import logging
import threading
import time

GRPC_LOGGER = "grpc._cython.cygrpc"
UNDECODED = "Invalid encoding on "  # the start of grpcio's line
QUIET_SECONDS = 10.0


class UndecodedMetadataLines(logging.Filter):
    """Rewrites grpcio's lines about undecodable metadata: no value, no traceback, one per interval."""

    def __init__(self, interval: float = QUIET_SECONDS, clock=time.monotonic) -> None:
        super().__init__()
        self.interval, self.clock = interval, clock
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(UNDECODED):
            return True
        with self._lock:
            now = self.clock()
            if now < self._next:
                self._left_out += 1
                return False
            left_out, self._left_out, self._next = self._left_out, 0, now + self.interval
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.msg = (
            "a call's metadata held a value that is not UTF-8 (gRPC read it as Latin-1; not quoted: it may "
            "hold a credential)%s"
        )
        record.args = (f"; {left_out} more such lines left out" if left_out else "",)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_undecoded_metadata() -> None:
    """Install the filter on grpcio's logger, once per process."""
    logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, UndecodedMetadataLines) for f in logger.filters):
        logger.addFilter(UndecodedMetadataLines())
