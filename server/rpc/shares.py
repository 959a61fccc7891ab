"""A bounded resource that callers share fairly: bytes of the request room, the compute threads.

``capacity`` units are handed to calls. One caller (a token, or a connection where callers have no
token) holds at most ``per_caller`` of them, and at most ``per_connection`` calls of one connection hold
some at once. A call that finds no room waits its turn as a suspended coroutine, queued by (caller,
connection). While calls wait, units that come back go to the first waiter of the caller that holds
least, the earliest on a tie, not first come first served: one caller's flood of calls then delays
another caller's call by one of its calls, not by the whole flood.

A caller that goes away while it waits gives its place up: a burst of resets leaves nothing held.
Used on the event loop only (no lock).
"""

from __future__ import annotations

import asyncio
import collections
import itertools

from ..counts import count_down


class FairShares:
    """``capacity`` units shared by callers (see the module docstring)."""

    def __init__(self, capacity: int, per_connection: int, per_caller: int | None = None) -> None:
        self.capacity, self.per_connection = capacity, per_connection
        self.per_caller = capacity if per_caller is None else per_caller
        self.held = 0
        self._holding: dict[str, int] = {}  # units held, by caller
        self._receiving: dict[str, int] = {}  # calls holding units, by connection
        # waiters, in arrival order, queued by (caller, connection): admission looks at each queue's first
        self._queues: dict[tuple[str, str], collections.deque[_Waiter]] = {}
        self._arrivals = itertools.count()
        self.waiting = 0  # calls waiting for their turn

    async def take(self, units: int, connection: str = "", caller: str | None = None) -> None:
        """Take ``units`` (at most ``capacity``) for a call of ``connection`` (from ``caller``, the
        connection itself by default), in turn; ``give_back`` them once it is done with them."""
        caller = connection if caller is None else caller
        if not self._queues and self._fits(units, connection, caller):
            self._hand(units, connection, caller)
            return
        waiter = _Waiter(units, next(self._arrivals), asyncio.get_running_loop().create_future())
        key = (caller, connection)
        self._queues.setdefault(key, collections.deque()).append(waiter)
        self.waiting += 1
        if self.held + units <= self.capacity:  # those before it may wait for their caller's or connection's turn
            self._admit()
        if waiter.turn.done():
            return
        try:
            await waiter.turn
        except asyncio.CancelledError:  # its caller left (or reset its stream) while it waited
            if waiter.turn.done() and not waiter.turn.cancelled():
                self.give_back(units, caller, connection)  # the turn came just before the cancellation: pass it on
            else:
                self._leave(key, waiter)
                if self.held < self.capacity:  # (a full room, the case of a reset burst, admits nobody)
                    self._admit()
            raise

    def give_back(self, units: int, caller: str, receiving: str | None = None) -> None:
        """``units`` of ``caller`` back; ``receiving``: the connection whose call stops counting against
        ``per_connection`` with them (None: it stopped earlier, as a request room's call once its request came)."""
        self.held -= units
        left = self._holding.get(caller, 0) - units  # a request of no bytes holds nothing once it came
        if left:
            self._holding[caller] = left
        else:
            self._holding.pop(caller, None)
        if receiving is not None:
            count_down(self._receiving, receiving)
        if self._queues:
            self._admit()

    def holding(self, caller: str) -> int:
        """The units ``caller`` holds."""
        return self._holding.get(caller, 0)

    def _fits(self, units: int, connection: str, caller: str) -> bool:
        return (
            self.held + units <= self.capacity
            and self._receiving.get(connection, 0) < self.per_connection
            and self._holding.get(caller, 0) + units <= self.per_caller
        )

    def _hand(self, units: int, connection: str, caller: str) -> None:
        self.held += units
        self._holding[caller] = self._holding.get(caller, 0) + units
        self._receiving[connection] = self._receiving.get(connection, 0) + 1

    def _leave(self, key: tuple[str, str], waiter: _Waiter) -> None:
        queue = self._queues.get(key)
        if queue is not None and waiter in queue:  # _admit may have dropped it already
            queue.remove(waiter)
            self.waiting -= 1
            if not queue:
                del self._queues[key]

    def _admit(self) -> None:
        """Hand units out while they last: to the first waiter of the caller that holds least (of those
        whose connection and caller may take more), the earliest on a tie. A waiter whose task was
        cancelled (its turn cancelled with it) is dropped, never handed units: nobody would give them back."""
        while self._queues:
            chosen = None
            for key, queue in list(self._queues.items()):
                while queue and queue[0].turn.done():
                    queue.popleft()
                    self.waiting -= 1
                if not queue:
                    del self._queues[key]
                    continue
                caller, connection = key
                waiter = queue[0]
                if self._receiving.get(connection, 0) >= self.per_connection:
                    continue
                if self._holding.get(caller, 0) + waiter.units > self.per_caller:
                    continue
                rank = (self._holding.get(caller, 0), waiter.arrival)
                if chosen is None or rank < chosen[0]:
                    chosen = (rank, key, waiter)
            if chosen is None:
                return
            _, (caller, connection), waiter = chosen
            if self.held + waiter.units > self.capacity:
                return  # full for the one whose turn it is: nobody passes it
            queue = self._queues[(caller, connection)]
            queue.popleft()
            self.waiting -= 1
            if not queue:
                del self._queues[(caller, connection)]
            self._hand(waiter.units, connection, caller)
            waiter.turn.set_result(None)


class _Waiter:
    __slots__ = ("arrival", "turn", "units")

    def __init__(self, units: int, arrival: int, turn: asyncio.Future[None]) -> None:
        self.units, self.arrival, self.turn = units, arrival, turn
