"""The compute threads, and the turns callers take for them.

The server is an asyncio gRPC server: a call that waits (for its caller's chunks, or its turn) is a
suspended coroutine, never a thread. Losses run in a bounded pool of compute threads (:class:`Compute`),
so the event loop keeps accepting, reading and answering calls, health checks included, whatever the
losses are doing.

A thread is a shared resource, and a caller could hold all of them. So a call takes its turn before it
takes a thread:

* **Its sessions first** (:class:`SessionTurns`). Calls on one session run one after another. A call
  waiting for a session another call holds waits here, as a coroutine, not on a compute thread: eight
  workers feeding one session hold one thread between them, not eight.
* **Then a thread, by a fair share** (``shares.FairShares``: one unit per running call). A thread that
  comes free goes to the waiting caller that runs fewest calls, not to the oldest call: one caller's
  queue of calls delays another caller's call by one call, not by the queue. Callers are told apart by
  their token where tokens are on (one token then runs at most ``per_caller`` calls, all threads but a
  quarter by default, so that other tokens always find one), else by their connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from losswire.v1 import loss_service_pb2 as pb

from ..dataplane import Answer, NotQuick
from ..evaluation import CallCancelledError
from .calls import CallWatch
from .shares import FairShares

Result = TypeVar("Result")
SessionKeys = tuple[tuple[str, str], ...]  # (owner, name) of each session a call uses, in name order
CallerOf = Callable[[grpc.aio.ServicerContext], str]

# a request this big is decoded on a compute thread without asking the dataplane whether it is quick
QUICK_MAX_MESSAGE_BYTES = 1 << 20


def sessions_named(owner: str, terms: Iterable[pb.LossTerm]) -> SessionKeys:
    """The sessions ``owner``'s terms name (to feed or to replay), in the order a call locks them."""
    return tuple(sorted({(owner, term.session) for term in terms if term.session}))


def connection_of(context: grpc.aio.ServicerContext) -> str:
    return context.peer()


def thread_share(threads: int) -> int:
    """The compute threads one token may run calls on at once: all but a quarter (at least one left)."""
    return max(1, threads - max(1, threads // 4))


class SessionTurns:
    """Calls on one session take turns, in arrival order, as suspended coroutines (see the module
    docstring). A session with no call holding or waiting for it has no entry. Event loop only."""

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str], _Turn] = {}
        self.waiting = 0  # calls waiting for a session another call holds

    @contextlib.asynccontextmanager
    async def turn(self, sessions: SessionKeys, watch: CallWatch) -> AsyncIterator[None]:
        """Sessions ``sessions`` (in name order, as the dataplane locks them: no two calls wait for each
        other crosswise) held for the call of ``watch`` while the block runs. A call whose caller leaves
        while it waits stops waiting (its handler is cancelled), logged as any call's stop."""
        entered: list[tuple[str, str]] = []
        try:
            for key in sessions:
                await self._enter(key, watch)
                entered.append(key)
            yield
        finally:
            for key in reversed(entered):
                self._turns[key].lock.release()
                self._drop(key)

    def __len__(self) -> int:
        return len(self._turns)

    async def _enter(self, key: tuple[str, str], watch: CallWatch) -> None:
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        turn.users += 1
        busy = int(turn.lock.locked())
        self.waiting += busy
        try:
            await turn.lock.acquire()  # FIFO; a cancelled waiter never holds it
        except BaseException as error:
            self._drop(key)
            if isinstance(error, asyncio.CancelledError):  # grpc.aio cancels the handler of a caller gone
                watch.caller_gone()
                watch.stopped(CallCancelledError(f"waiting for session {key[1]!r}, which another call holds"))
            raise
        finally:
            self.waiting -= busy

    def _drop(self, key: tuple[str, str]) -> None:
        turn = self._turns[key]
        turn.users -= 1
        if not turn.users:
            del self._turns[key]


class _Turn:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # calls holding or waiting for the session


class Compute:
    """The threads that run losses: at most ``threads`` calls compute at once, handed out fairly between
    callers (``caller_of`` a call's context; at most ``per_caller`` threads each, None: no cap); the rest
    wait their turn as suspended coroutines (memory, not threads)."""

    def __init__(self, threads: int, caller_of: CallerOf = connection_of, per_caller: int | None = None) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="losswire-compute")
        self.shares = FairShares(threads, per_connection=threads, per_caller=per_caller)
        self.sessions = SessionTurns()
        self._caller_of = caller_of

    async def __call__(
        self, context: grpc.aio.ServicerContext | None, work: Callable[..., Result], *args: Any
    ) -> Result:
        """``work(*args)`` for a call of ``context`` (None: the server's own, as a caller of its own), on a
        compute thread in the call's turn. Work that cannot stop halfway (Describe, ListSessions): a caller
        that goes away ends its call once the work has ended, as ``for_call``'s does."""
        caller = "" if context is None else self._caller_of(context)
        await self.shares.take(1, "", caller)
        try:
            running = self._pool.submit(work, *args)
            try:
                return await asyncio.wrap_future(running)
            except asyncio.CancelledError:  # its caller went away: the work runs on, on the caller's thread
                with contextlib.suppress(BaseException):
                    await asyncio.wrap_future(running)  # a new wrapper: the cancelled one cancelled only itself
                raise
        finally:
            # once the work is done: given back earlier, a caller cancelling its Describes would run its
            # abandoned work on more threads than its share, and other callers' calls would queue behind it
            self.shares.give_back(1, caller, "")

    async def for_call(
        self, watch: CallWatch, work: Callable[..., Result], *args: Any, sessions: SessionKeys = ()
    ) -> Result:
        """``work(*args)`` for a call watched by ``watch``, in its turn for ``sessions`` and a thread. When
        the caller goes away meanwhile, the work reads ``watch`` and stops at its next stage; the call ends
        with it, not before, so that its memory, slot and in-flight count are released when the work
        really is."""
        if not sessions:
            return await self._watched(watch, work, args)
        async with self.sessions.turn(sessions, watch):
            return await self._watched(watch, work, args)

    async def _watched(self, watch: CallWatch, work: Callable[..., Result], args: tuple[Any, ...]) -> Result:
        caller = self._caller_of(watch.context)
        await self.shares.take(1, "", caller)
        try:
            running = self._pool.submit(work, *args)
            try:
                return await asyncio.wrap_future(running)
            except asyncio.CancelledError:  # grpc.aio cancels the handler when its caller goes away
                watch.caller_gone()
                with contextlib.suppress(BaseException):
                    await asyncio.wrap_future(running)  # a new wrapper: the cancelled one cancelled only itself
                if running.done() and not running.cancelled() and running.exception() is not None:
                    watch.stopped(running.exception())
                raise
        finally:
            self.shares.give_back(1, caller, "")  # once the work is done: the thread is free

    async def by_size(self, watch: CallWatch, size: int, work: Callable[..., Result], *args: Any) -> Result:
        """``work(*args)`` for a call whose request is ``size`` bytes: here, on the event loop, up to
        ``QUICK_MAX_MESSAGE_BYTES`` (no thread hop); a bigger one's on a compute thread (``for_call``), where
        converting megabytes stalls no other call."""
        if size <= QUICK_MAX_MESSAGE_BYTES:
            return work(*args)
        return await self.for_call(watch, work, *args)

    async def evaluate(
        self,
        watch: CallWatch,
        evaluate: Callable[..., Answer],
        size: int,
        *args: Any,
        sessions: SessionKeys = (),
        quick: bool = True,
    ) -> Answer:
        """``evaluate(*args)`` (a ``Dataplane.evaluate``) for a call watched by ``watch`` whose request is
        ``size`` bytes and which uses ``sessions``: a quick call is answered here, on the event loop (the
        dataplane says which are quick: ``NotQuick``); any other waits for its turn and a compute thread.
        ``quick`` False: the front door knows the call is not worth trying here (it goes to a thread at once)."""
        if quick and size <= QUICK_MAX_MESSAGE_BYTES and not sessions:
            try:
                return evaluate(*args, quick=True)
            except NotQuick:
                pass
        return await self.for_call(watch, evaluate, *args, sessions=sessions)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
