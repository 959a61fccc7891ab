"""Calls that stream their requests (EvaluateStream, reflection) are bounded in number, idle time and pace.

A caller that opens a stream and sends nothing costs a suspended coroutine, not a thread; still, it holds
one of the server's concurrent calls (``--max-concurrent-rpcs``) for as long as it likes. So at most
``max_open`` request streams are open at once (beyond, RESOURCE_EXHAUSTED at once, which a client may wait
out), always fewer than the concurrent calls, so small calls and health checks keep room; and a stream
whose caller sends nothing for ``idle_seconds`` is ended (DEADLINE_EXCEEDED naming the setting).

Sending a byte now and then is not enough where a stream holds more than a coroutine: a streamed call
holds a big-call slot and its tensors' memory from its first chunk until its answer has gone, so a
caller trickling its upload would hold them for as long as it trickles. Such streams (``paced``) must
also keep a pace (:class:`Pace`, as Apache's mod_reqtimeout ``MinRate``): after their first message they
may spend ``idle_seconds`` waiting for their caller, plus one second for every ``min_rate`` bytes it has
sent; beyond, they are ended (DEADLINE_EXCEEDED naming ``--stream-min-rate``). Only time spent waiting
for the caller counts, never time the server spends on what arrived.

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
from google.protobuf.message import Message

from ..errors import ServerBusyError, StreamIdleError
from .calls import fail

log = logging.getLogger("losswire.server")


class StreamGuardInterceptor(grpc.aio.ServerInterceptor):
    """Bounds the request-streaming calls open at once and the time their callers may stay silent."""

    def __init__(
        self,
        max_open: int,
        idle_seconds: float | None,
        min_rate: float | None = None,
        paced: frozenset[str] = frozenset(),
    ) -> None:
        """``paced``: the methods whose streams must keep ``min_rate`` bytes per second (None: no pace;
        nor without ``idle_seconds``, the allowance it starts from)."""
        self.max_open = max_open
        self.idle_seconds = idle_seconds
        self.min_rate = min_rate if idle_seconds is not None else None
        self.paced = paced
        self.open = 0  # only touched on the event loop

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.request_streaming:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        behaviour = handler.stream_stream or handler.stream_unary
        paced = self.min_rate is not None and method in self.paced
        if handler.response_streaming:
            guarded = functools.partial(self._streaming, method, behaviour, paced)
            return grpc.stream_stream_rpc_method_handler(
                guarded, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(
            functools.partial(self._unary, method, behaviour, paced),
            handler.request_deserializer,
            handler.response_serializer,
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
        self,
        method: str,
        behaviour: Callable,
        paced: bool,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Any]:
        if not self._admit(method, context):
            return
        unread = UnreadAnswer(method, self.idle_seconds)
        try:
            async for message in behaviour(self._watched(requests, paced), context):
                with unread.bounded():
                    yield message  # returns once gRPC has written it: the caller took it
        except StreamIdleError as error:
            fail(context, error, method)
        finally:
            self.open -= 1

    async def _unary(
        self,
        method: str,
        behaviour: Callable,
        paced: bool,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> Any:
        if not self._admit(method, context):
            return None
        try:
            return await behaviour(self._watched(requests, paced), context)
        except StreamIdleError as error:
            fail(context, error, method)
            return None
        finally:
            self.open -= 1

    async def _watched(self, requests: AsyncIterator[Any], paced: bool) -> AsyncIterator[Any]:
        """The caller's messages; a StreamIdleError once it sends nothing for ``idle_seconds``, or when
        ``paced`` and it falls behind its :class:`Pace` (counted from its second message)."""
        source = aiter(requests)
        pace = Pace(self.idle_seconds, self.min_rate) if paced else None
        loop = asyncio.get_running_loop()
        first = True
        while True:
            limit, behind = self.idle_seconds, False
            if pace is not None and not first:
                room = pace.room()
                behind = room < limit  # a tie is silence: the idle timeout's own, clearer, message
                limit = max(room, 0.0) if behind else limit
            waiting_since = loop.time()
            try:
                message = await within(anext(source), limit)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if behind:
                    pace.waited += loop.time() - waiting_since
                    raise pace.too_slow() from None
                raise StreamIdleError(
                    f"the caller sent nothing for {self.idle_seconds:g} s; this server ends request streams idle "
                    "that long (losswire serve --stream-idle-timeout)"
                ) from None
            if pace is not None and not first:
                pace.waited += loop.time() - waiting_since
                pace.received += message_bytes(message)
            first = False
            yield message


class Pace:
    """The least pace of a request stream that holds a big call: it may spend ``grace`` seconds waiting
    for its caller, plus one second for every ``min_rate`` bytes received. A slow link passes as long as
    it delivers ``min_rate``; a caller sending a byte now and then, to hold a big-call slot and its
    memory, does not."""

    def __init__(self, grace: float, min_rate: float) -> None:
        self.grace, self.min_rate = grace, min_rate
        self.waited = 0.0  # seconds spent waiting for the caller's next message
        self.received = 0  # bytes of its messages

    def room(self) -> float:
        """Seconds the stream may still wait for its caller."""
        return self.grace + self.received / self.min_rate - self.waited

    def too_slow(self) -> StreamIdleError:
        return StreamIdleError(
            f"the caller sent {self.received} bytes in {self.waited:.1f} s of waiting for them, slower than this "
            f"server requires of a streamed call: {self.min_rate:g} bytes per second after its first "
            f"{self.grace:g} s (losswire serve --stream-min-rate, --stream-idle-timeout)"
        )


def message_bytes(message: Any) -> int:
    """Bytes of a stream message: a serialized chunk, a chunk read in place (its data; its small header
    not counted), a message, or an unparsable one (its size)."""
    if isinstance(message, (bytes, bytearray)):
        return len(message)
    if isinstance(message, Message):
        return message.ByteSize()
    data = getattr(message, "data", None)  # chunks.RawChunk
    return memoryview(data).nbytes if data is not None else getattr(message, "size", 0)


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
