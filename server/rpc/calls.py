"""What every front door does around the dataplane: run it off the event loop, notice a caller that went
away, and answer failures through the one error mapping.

The server is an asyncio gRPC server: a call that waits (for its caller's chunks, or its turn) is a
suspended coroutine, never a thread. Work runs in a bounded pool of compute threads
(:class:`Compute`), so the event loop keeps accepting, reading and answering calls, health checks
included, whatever the losses are doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from losswire.wire.protocol import PREVIOUS_ATTEMPTS_HEADER

from ..dataplane import Answer, NotQuick
from .status import Where, refusal

log = logging.getLogger("losswire.server")
Result = TypeVar("Result")

# a request this big is decoded on a compute thread without asking the dataplane whether it is quick
QUICK_MAX_MESSAGE_BYTES = 1 << 20

# frees big calls' tensors after their answers have left (see release_after): one thread, in order
_RELEASER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="losswire-release")


class Compute:
    """The threads that run losses: at most ``threads`` calls compute at once; the rest wait their turn
    as suspended coroutines (memory, not threads)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="losswire-compute")

    async def __call__(self, work: Callable[..., Result], *args: Any) -> Result:
        return await asyncio.wrap_future(self._pool.submit(work, *args))

    async def for_call(self, watch: CallWatch, work: Callable[..., Result], *args: Any) -> Result:
        """``work(*args)`` for a call watched by ``watch``. When the caller goes away meanwhile, the work
        reads ``watch`` and stops at its next stage; the call ends with it, not before, so that its memory,
        slot and in-flight count are released when the work really is."""
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

    async def by_size(self, watch: CallWatch, size: int, work: Callable[..., Result], *args: Any) -> Result:
        """``work(*args)`` for a call whose request is ``size`` bytes: here, on the event loop, up to
        ``QUICK_MAX_MESSAGE_BYTES`` (no thread hop); a bigger one's on a compute thread (``for_call``), where
        converting megabytes stalls no other call."""
        if size <= QUICK_MAX_MESSAGE_BYTES:
            return work(*args)
        return await self.for_call(watch, work, *args)

    async def evaluate(self, watch: CallWatch, evaluate: Callable[..., Answer], size: int, *args: Any) -> Answer:
        """``evaluate(*args)`` (a ``Dataplane.evaluate``) for a call watched by ``watch`` whose request is
        ``size`` bytes: a quick call is answered here, on the event loop (the dataplane says which are
        quick: ``NotQuick``); any other waits for a compute thread."""
        if size <= QUICK_MAX_MESSAGE_BYTES:
            try:
                return evaluate(*args, quick=True)
            except NotQuick:
                pass
        return await self.for_call(watch, evaluate, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class CallWatch:
    """Turns true once the caller is gone: it cancelled, its deadline passed, or the connection dropped.

    gRPC runs done-callbacks when a call ends; one that ends while its handler still works was ended by
    the caller's side, and the work left is wasted. The dataplane asks this flag between stages (a plain
    callable, read from a compute thread) and stops at the next one.
    """

    def __init__(self, context: grpc.aio.ServicerContext, method: str) -> None:
        self.context = context
        self.method = method
        self.started = time.perf_counter()
        self.handled = False  # set once the handler has its answer (or error): the call then ends normally
        self._gone = threading.Event()
        context.add_done_callback(self.caller_gone)

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """The handler's own work: once it ends with an answer or an error of its own, the call ends
        normally; cancelled (the caller went away), it does not, and the done-callback says so."""
        try:
            yield
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.handled = True
            raise
        self.handled = True

    def caller_gone(self, _context: Any = None) -> None:
        """The call ended (a done-callback) or its handler was cancelled: the caller is gone unless the
        handler had its answer."""
        first = not self._gone.is_set()
        self._gone.set()  # before the log line: whoever reads that line finds the call stopping already
        if not self.handled and first:
            elapsed_ms = (time.perf_counter() - self.started) * 1e3
            log.debug(
                "%s: the caller cancelled or its deadline passed after %.1f ms; the call stops at its next stage",
                self.method,
                elapsed_ms,
            )

    def __call__(self) -> bool:
        return self._gone.is_set()

    def stopped(self, error: BaseException) -> None:
        """The work of a call whose caller went away ended with ``error`` (its stop at the next stage):
        logged with the status the call counts as."""
        refusal(error, None, self.context.time_remaining(), self.method)


def fail(
    context: grpc.aio.ServicerContext, error: BaseException, method: str, where: Where | None = None
) -> grpc.StatusCode:
    """Set the status ``error`` maps to (``status.refusal``) as the call's, and return its code; the handler
    then returns without an answer, and the intake sends the status (``send_failure_alone``). (Not ``abort``
    here: grpc.aio's abort sends the status at once, before the metrics interceptor has counted the call.)"""
    status = refusal(error, where, context.time_remaining(), method)
    end_with(context, status)
    return status.code


def end_with(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """Make ``status`` the call's (code, message, trailing metadata such as the BadRequest details)."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(tuple(status.trailing_metadata))


def code_of(context: grpc.aio.ServicerContext, default: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> grpc.StatusCode:
    """The status the handler set for its call (a failure's: see ``fail``), else ``default``."""
    code = context.code()
    if isinstance(code, int):  # the aio context may hold the code as its number
        code = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return code or default


async def send_failure_alone(context: grpc.aio.ServicerContext) -> None:
    """End a call whose handler returned a failure (``fail``) with that status at once, as its only answer.

    Returned from the handler, the status would follow headers (grpc.aio sends them with every unary
    answer), and gRPC's retry policies retry only an answer without headers: a caller whose policy
    retries RESOURCE_EXHAUSTED would not have the server's busy refusals retried. Done by the outermost
    interceptor, once the inner ones have counted the call (``abort`` sends at once). A call that ended
    well is left as it is."""
    code = code_of(context, default=grpc.StatusCode.OK)
    if code != grpc.StatusCode.OK:
        await context.abort(code, context.details() or "", tuple(context.trailing_metadata() or ()))


async def answers_or_failure_alone(
    messages: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """A streaming handler's ``messages``; when there were none, the failure it set (``fail``) sent alone
    (``send_failure_alone``)."""
    answered = False
    async for message in messages:
        answered = True
        yield message
    if not answered:
        await send_failure_alone(context)


def unary(method: str, where: Where | None = None) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    """A servicer method whose every failure leaves through the one error mapping."""

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await handler(self, request, context)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                fail(context, error, method, where)
                return None

        return guarded

    return decorate


def release_after(context: grpc.aio.ServicerContext, objects: list[Any]) -> None:
    """Free ``objects`` (a call's big tensors) once its answer has been sent, in another thread.

    Freeing hundreds of MiB of tensors returns their pages to the system (munmap), which takes
    milliseconds per 100 MiB: done before the answer leaves, the caller would wait for it.
    """
    if objects:
        context.add_done_callback(lambda _context: _RELEASER.submit(objects.clear))


def attempt(context: grpc.aio.ServicerContext) -> int:
    """Which attempt of the caller's call this is: a gRPC retry carries the number of attempts before it."""
    previous = dict(context.invocation_metadata() or ()).get(PREVIOUS_ATTEMPTS_HEADER, "0")
    return 1 + int(previous) if str(previous).isdigit() else 1
