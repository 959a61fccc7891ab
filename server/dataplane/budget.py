"""The server's memory budget: every big allocation a call implies is reserved before it happens.

A call reserves what it will hold (a streamed tensor's buffer when its first chunk arrives, a term's
estimated working memory before its forward) and gives it back when it ends. A reservation that can
never fit (more than the whole budget, or than one term may take) is ``LimitExceededError``
(RESOURCE_EXHAUSTED, final); one that does not fit now, because the calls in flight hold the budget, is
``ServerBusyError`` (RESOURCE_EXHAUSTED that passes: the client waits it out).
"""

from __future__ import annotations

import threading

from ..errors import LimitExceededError, ServerBusyError


class MemoryBudget:
    """``total`` bytes shared by every call (None: unbounded); one reservation at most ``per_term``."""

    def __init__(self, total: int | None, per_term: int | None = None) -> None:
        self.total, self.per_term = total, per_term
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def take(self, nbytes: int, what: str, field: str | None = None, term: bool = False, own: int = 0) -> int:
        """Reserve ``nbytes`` for ``what`` (named in a refusal, with ``field``); returns them, for
        :meth:`give_back`. ``term``: a term's working memory, bounded by ``per_term`` too. ``own``: what
        the same call holds already (its buffers): a call whose reservations together exceed the whole
        budget never fits, however long it waits, and is told so (LimitExceededError)."""
        limits = [(self.total, "--memory-budget"), *([(self.per_term, "--max-term-memory")] if term else [])]
        for limit, flag in limits:
            if limit is not None and nbytes > limit:
                raise LimitExceededError(
                    f"{what} needs about {nbytes} bytes; this server allows {limit} (losswire serve {flag})",
                    field=field,
                )
        if self.total is not None and own and own + nbytes > self.total:
            raise LimitExceededError(
                f"{what} needs about {nbytes} bytes besides the {own} this call holds already (its tensors' "
                f"buffers): more than the server's {self.total} together (losswire serve --memory-budget)",
                field=field,
            )
        with self._lock:
            if self.total is not None and self._held + nbytes > self.total:
                held = self._held
                raise ServerBusyError(
                    f"{what} needs about {nbytes} bytes and the calls in flight (this one's earlier reservations "
                    f"included) hold {held} of the server's {self.total} (losswire serve --memory-budget); retry later",
                    field=field,
                )
            self._held += nbytes
        return nbytes

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes

    def reserved(
        self, nbytes: int, what: str, field: str | None = None, term: bool = False, own: int = 0
    ) -> Reservation:
        """``with budget.reserved(...)``: ``nbytes`` taken (see :meth:`take`) as the block is entered, given
        back when it ends."""
        return Reservation(self, (nbytes, what, field, term, own))


class Reservation:
    """A ``MemoryBudget.take`` for the length of a ``with`` block (a class, not a generator: every term of
    every call enters one)."""

    __slots__ = ("asked", "budget", "taken")

    def __init__(self, budget: MemoryBudget, asked: tuple[int, str, str | None, bool, int]) -> None:
        self.budget, self.asked, self.taken = budget, asked, 0

    def __enter__(self) -> None:
        self.taken = self.budget.take(*self.asked)

    def __exit__(self, *exc_info: object) -> bool:
        self.budget.give_back(self.taken)
        return False
