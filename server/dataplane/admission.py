"""Admission of big calls: a bounded number served at once, the rest told to come back.

A big call (tensors streamed in chunks, or lying in a caller's shared memory) holds hundreds of MiB
and seconds of compute. At most ``slots`` are admitted at once; one beyond is refused at once with
``ServerBusyError`` (RESOURCE_EXHAUSTED without the no-retry pushback: the client waits it out) rather
than queued, which bounds the memory big calls hold and keeps compute for small calls.
"""

from __future__ import annotations

import threading

from ..errors import ServerBusyError


class BigCallSlots:
    """``slots`` big calls at once; thread-safe."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._taken = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        """Take a slot, or raise ServerBusyError when every slot is taken."""
        with self._lock:
            if self._taken >= self.slots:
                raise ServerBusyError(
                    f"the server is serving its maximum of {self.slots} big calls (streamed, or with tensors in "
                    "shared memory) (losswire serve --max-stream-calls); retry later"
                )
            self._taken += 1

    def give_back(self) -> None:
        with self._lock:
            self._taken -= 1

    @property
    def in_use(self) -> int:
        """Big calls admitted now (receiving, evaluating or sending)."""
        with self._lock:
            return self._taken
