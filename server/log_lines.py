"""The server's own log lines, bounded however often callers cause them.

Some lines are written once per thing a caller does (a session reset, an answer left unread, an out of
memory, an internal error with its traceback), so one caller looping over that thing wrote a line a call:
ResetSession of fresh sessions wrote ~27 KB a second (up to 290 bytes a line, 2.3 GB a day) from a
single caller on two cores. Here each line of the code writes at most ``BURST`` lines in ``QUIET_SECONDS``;
the rest are counted, and the first line written after them says how many were left out; where no such
line comes (the flood stopped), a line of its own says so once the window has ended, so that no count is
lost. Debug lines (one per request under ``--log-level debug``, asked for) pass untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

SERVER_LOGGER = "losswire.server"
QUIET_SECONDS = 60.0
BURST = 10


COUNTED = "losswire_counted"  # a record attribute: the count line itself, which the filter lets through

Schedule = Callable[[float, Callable[[], None]], None]


def _timer(seconds: float, work: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, work)
    timer.daemon = True  # a count still due at exit is not worth holding the process for
    timer.start()


@dataclasses.dataclass
class _Window:
    start: float
    written: int = 0
    left_out: int = 0
    sample: logging.LogRecord | None = None  # the first line left out: its logger, level and format string


class RepeatedLines(logging.Filter):
    """At most ``burst`` lines of INFO and above per line of the code in each ``interval`` seconds; the
    next line after some were left out carries their count. Its keys are the code's lines, never what a
    caller sent: it holds one small entry per line of the code that ever logged."""

    def __init__(
        self,
        burst: int = BURST,
        interval: float = QUIET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _timer,
    ) -> None:
        """``schedule(seconds, work)`` runs ``work`` that many seconds later (a daemon timer thread)."""
        super().__init__()
        self.burst, self.interval, self.clock, self.schedule = burst, interval, clock, schedule
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, int], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or getattr(record, COUNTED, False):
            return True
        kind = (record.pathname, record.lineno)
        with self._lock:
            now, left_out = self.clock(), 0
            window = self._windows.get(kind)
            if window is None or now >= window.start + self.interval:
                left_out = 0 if window is None else window.left_out
                window = self._windows[kind] = _Window(now)
            if window.written >= self.burst:
                window.left_out += 1
                if window.sample is None:  # the first left out: its count is due when the window ends
                    window.sample = record
                    self.schedule(window.start + self.interval - now, lambda: self._count(kind, window))
                return False
            window.written += 1
        if left_out:
            record.msg, record.args = f"{record.getMessage()}; {left_out} more such lines left out before it", None
        return True

    def _count(self, kind: tuple[str, int], window: _Window) -> None:
        """The window has ended: write the count of its lines left out, unless a line of the next window has
        carried it already."""
        with self._lock:
            if self._windows.get(kind) is not window or not window.left_out:
                return
            left_out, sample, window.left_out = window.left_out, window.sample, 0
        logging.getLogger(sample.name).log(
            sample.levelno,
            '%d lines like "%s" left out in %g s (at most %d a line of the code are written)',
            left_out,
            sample.msg,
            self.interval,
            self.burst,
            extra={COUNTED: True},
        )


def bound_repeated_lines() -> None:
    """Install the filter on the server's logger, once per process."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, RepeatedLines) for f in logger.filters):
        logger.addFilter(RepeatedLines())
