"""What every front door does around the dataplane: notice a caller that went away, and answer failures
through the one error mapping (the work itself runs on ``compute.Compute``'s threads).
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

from .status import Where, refusal

log = logging.getLogger("losswire.server")
Result = TypeVar("Result")

# frees big calls' tensors after their answers have left (see release_after): one thread, in order
_RELEASER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="losswire-release")


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
