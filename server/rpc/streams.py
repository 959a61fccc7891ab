"""Calls that stream their requests (EvaluateStream, reflection) are bounded in number and in idle time.

A caller that opens a stream and sends nothing costs a suspended coroutine, not a thread; still, it holds
one of the server's concurrent calls (``--max-concurrent-rpcs``) for as long as it likes. So at most
``max_open`` request streams are open at once (beyond, RESOURCE_EXHAUSTED at once, which a client may wait
out), always fewer than the concurrent calls, so small calls and health checks keep room; and a stream
whose caller sends nothing for ``idle_seconds`` is ended (DEADLINE_EXCEEDED naming the setting).

A caller that stops reading its answer is bounded too: an answer message its caller has not taken for
``idle_seconds`` ends the call (the handler is cancelled as when its caller leaves), which frees its
memory and its big-call slot. (A caller that never read held them for as long as it kept the connection.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ..errors import ServerBusyError, StreamIdleError
from .calls import fail

log = logging.getLogger("losswire.server")


class StreamGuardInterceptor(grpc.aio.ServerInterceptor):
    """Bounds the request-streaming calls open at once and the time their callers may stay silent."""

    def __init__(self, max_open: int, idle_seconds: float | None) -> None:
        self.max_open = max_open
        self.idle_seconds = idle_seconds
        self.open = 0  # only touched on the event loop

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.request_streaming:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        behaviour = handler.stream_stream or handler.stream_unary
        if handler.response_streaming:
            guarded = functools.partial(self._streaming, method, behaviour)
            return grpc.stream_stream_rpc_method_handler(
                guarded, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(
            functools.partial(self._unary, method, behaviour), handler.request_deserializer, handler.response_serializer
        )

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> bool:
        if self.open >= self.max_open:
            busy = ServerBusyError(
                f"the server has {self.open} request streams open, its maximum (losswire serve --max-open-streams); "
                "retry later"
            )
            fail(context, busy, method)
            return False
        self.open += 1
        return True

    async def _streaming(
        self, method: str, behaviour: Callable, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        if not self._admit(method, context):
            return
        unread = UnreadAnswer(method, self.idle_seconds)
        try:
            async for message in behaviour(self._watched(requests), context):
                with unread.bounded():
                    yield message  # returns once gRPC has written it: the caller took it
        except StreamIdleError as error:
            fail(context, error, method)
        finally:
            self.open -= 1

    async def _unary(
        self, method: str, behaviour: Callable, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> Any:
        if not self._admit(method, context):
            return None
        try:
            return await behaviour(self._watched(requests), context)
        except StreamIdleError as error:
            fail(context, error, method)
            return None
        finally:
            self.open -= 1

    async def _watched(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The caller's messages; a StreamIdleError once it sends nothing for ``idle_seconds``."""
        source = aiter(requests)
        while True:
            try:
                message = await within(anext(source), self.idle_seconds)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise StreamIdleError(
                    f"the caller sent nothing for {self.idle_seconds:g} s; this server ends request streams idle "
                    "that long (losswire serve --stream-idle-timeout)"
                ) from None
            yield message


class UnreadAnswer:
    """Ends a streaming call whose caller leaves an answer message unread for ``seconds``: the handler's
    task is cancelled, as gRPC cancels it when a caller goes away, so its cleanup runs and its call's
    memory and slot are released. A yield cannot be given a time limit of its own: gRPC's write of the
    yielded message waits on the caller's flow control for as long as the caller does not read."""

    def __init__(self, method: str, seconds: float | None) -> None:
        self.method, self.seconds = method, seconds
        self.task = asyncio.current_task()

    @contextlib.contextmanager
    def bounded(self) -> Any:
        if self.seconds is None or self.task is None:
            yield
            return
        timer = asyncio.get_running_loop().call_later(self.seconds, self._expired)
        try:
            yield
        finally:
            timer.cancel()

    def _expired(self) -> None:
        log.info(
            "%s: the caller read nothing of its answer for %g s (losswire serve --stream-idle-timeout); the call ends",
            self.method,
            self.seconds,
        )
        self.task.cancel()


async def within(awaitable: Awaitable[Any], seconds: float | None) -> Any:
    """``awaitable``'s result, or TimeoutError after ``seconds`` (None: no limit). Every wait of a
    handler that has a time limit goes through this.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the result when the awaited read completes at
    the moment the handler is cancelled, and the cancellation is lost. gRPC cancels a handler once, when
    its caller goes away, and that same moment ends the pending read (as the end of the stream): the
    handler then went on as if the caller had half-closed, and a call waiting for its lanes waited for
    them instead of ending."""
    if seconds is None:
        return await awaitable
    pending = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({pending}, timeout=seconds)
    except asyncio.CancelledError:
        pending.cancel()
        raise
    if not done:
        pending.cancel()
        raise TimeoutError
    return pending.result()
