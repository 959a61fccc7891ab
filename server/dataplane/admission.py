"""Admission of big calls: a bounded number served at once, the rest told to come back.

A big call (tensors streamed in chunks, or lying in a caller's shared memory) holds hundreds of MiB
and seconds of compute. At most ``slots`` are admitted at once; one beyond is refused at once with
``ServerBusyError`` (RESOURCE_EXHAUSTED without the no-retry pushback: the client waits it out) rather
than queued, which bounds the memory big calls hold and keeps compute for small calls.

With tokens on, one token holds at most ``per_token`` of the slots (the server's default: all but one),
so that a token streaming huge calls back to back, or trickling them (see ``rpc/streams.py``'s pace),
cannot take every caller's room. Without tokens callers cannot be told apart: ``slots`` alone bounds them.
"""

from __future__ import annotations

import collections
import threading

from ..counts import count_down
from ..errors import ServerBusyError


class BigCallSlots:
    """``slots`` big calls at once, at most ``per_token`` of them one token's (None: no bound per token);
    thread-safe."""

    def __init__(self, slots: int, per_token: int | None = None) -> None:
        self.slots, self.per_token = slots, per_token
        self._taken = 0
        self._by_token: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def take(self, token: str = "") -> None:
        """Take a slot for a call of ``token`` (a token's digest; "" without tokens), or raise
        ServerBusyError when every slot, or every slot that token may hold, is taken."""
        with self._lock:
            if self._taken >= self.slots:
                raise ServerBusyError(
                    f"the server is serving its maximum of {self.slots} big calls (streamed, or with tensors in "
                    "shared memory) (losswire serve --max-stream-calls); retry later"
                )
            if self.per_token is not None and token and self._by_token[token] >= self.per_token:
                raise ServerBusyError(
                    f"this token's calls hold {self._by_token[token]} of the server's {self.slots} big-call slots, "
                    f"the most one token may hold (losswire serve --max-stream-calls-per-token); retry once one "
                    "of them has ended"
                )
            self._taken += 1
            if token:
                self._by_token[token] += 1

    def give_back(self, token: str = "") -> None:
        with self._lock:
            self._taken -= 1
            if token:
                count_down(self._by_token, token)

    @property
    def in_use(self) -> int:
        """Big calls admitted now (receiving, evaluating or sending)."""
        with self._lock:
            return self._taken
