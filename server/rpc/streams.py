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
``idle_seconds``, or, on a paced stream, an answer read more slowly than the same pace, ends the call (the
handler is cancelled as when its caller leaves), which frees its memory and its big-call slot. (A caller
that never read held them for as long as it kept the connection.) The message gRPC was writing (up to a
chunk, 4 MiB) stays in gRPC until the caller reads it: the call keeps its open stream counted meanwhile,
and a caller that has not read it when as long again has passed is hung up on (``hangup``), which frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from ..counts import count_down
from ..errors import LimitExceededError, ServerBusyError, StreamIdleError
from .calls import fail
from .hangup import hang_up_unread

log = logging.getLogger("losswire.server")


class StreamGuardInterceptor(grpc.aio.ServerInterceptor):
    """Bounds the request-streaming calls open at once and the time their callers may stay silent."""

    def __init__(
        self,
        max_open: int,
        idle_seconds: float | None,
        min_rate: float | None = None,
        paced: frozenset[str] = frozenset(),
        per_caller: tuple[int, Callable[[grpc.aio.ServicerContext], str]] | None = None,
        largest: Mapping[str, int] | None = None,
    ) -> None:
        """``paced``: the methods whose streams must keep ``min_rate`` bytes per second (None: no pace;
        nor without ``idle_seconds``, the allowance it starts from). ``per_caller``: how many streams one
        caller may have open, and who a call's caller is (a token: None without tokens, where callers are
        not told apart). ``largest``: methods whose request messages are small by nature (reflection's
        symbol names), and their largest message in bytes; a bigger one ends the call."""
        self.max_open = max_open
        self.idle_seconds = idle_seconds
        self.min_rate = min_rate if idle_seconds is not None else None
        self.paced = paced
        self.per_caller = per_caller
        self.largest = dict(largest or {})
        self.open = 0  # only touched on the event loop
        self._by_caller: dict[str, int] = {}

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

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> str | None:
        """The call's caller ("" unknown) once it may open its stream; None once it is refused (busy)."""
        if self.open >= self.max_open:
            busy = ServerBusyError(
                f"the server has {self.open} request streams open, its maximum (losswire serve --max-open-streams); "
                "retry later"
            )
            fail(context, busy, method)
            return None
        caller = ""
        if self.per_caller is not None:
            most, caller_of = self.per_caller
            caller = caller_of(context)
            held = self._by_caller.get(caller, 0)
            if held >= most:
                busy = ServerBusyError(
                    f"this token has {held} request streams open, its most (all but a quarter of losswire serve "
                    "--max-open-streams, which leaves other tokens room); retry later"
                )
                fail(context, busy, method)
                return None
            self._by_caller[caller] = held + 1
        self.open += 1
        return caller

    def _leave(self, caller: str) -> None:
        self.open -= 1
        if self.per_caller is not None:
            count_down(self._by_caller, caller)

    async def _streaming(
        self,
        method: str,
        behaviour: Callable,
        paced: bool,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Any]:
        caller = self._admit(method, context)
        if caller is None:
            return
        unread = UnreadAnswer(method, self.idle_seconds, self._pace(paced), context)
        try:
            async for message in behaviour(self._watched(requests, paced, self.largest.get(method)), context):
                with unread.bounded(message):
                    yield message  # returns once gRPC has written it: the caller took it
        except (StreamIdleError, LimitExceededError) as error:
            fail(context, error, method)
        finally:
            # a call ended for an unread answer keeps its stream counted while gRPC still holds the message
            # (until its caller takes it, or is hung up on), so a caller cannot leave such messages behind
            # stream after stream
            if unread.ending is not None and not unread.ending.done():
                unread.ending.add_done_callback(lambda _ending: self._leave(caller))
            else:
                self._leave(caller)

    async def _unary(
        self,
        method: str,
        behaviour: Callable,
        paced: bool,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> Any:
        caller = self._admit(method, context)
        if caller is None:
            return None
        try:
            return await behaviour(self._watched(requests, paced, self.largest.get(method)), context)
        except (StreamIdleError, LimitExceededError) as error:
            fail(context, error, method)
            return None
        finally:
            self._leave(caller)

    async def _watched(
        self, requests: AsyncIterator[Any], paced: bool, largest: int | None = None
    ) -> AsyncIterator[Any]:
        """The caller's messages; a StreamIdleError once it sends nothing for ``idle_seconds``, or when
        ``paced`` and it falls behind its :class:`Pace` (counted from its second message); a
        LimitExceededError for a message over ``largest`` bytes."""
        source = aiter(requests)
        pace = self._pace(paced)
        loop = asyncio.get_running_loop()
        first = True
        while True:
            limit, behind = (self.idle_seconds, False) if pace is None or first else pace.limit(self.idle_seconds)
            waiting_since = loop.time()
            try:
                message = await within(anext(source), limit)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if behind:
                    pace.moved(loop.time() - waiting_since, 0)
                    raise StreamIdleError(f"the caller sent {pace.said('in')}") from None
                raise StreamIdleError(
                    f"the caller sent nothing for {self.idle_seconds:g} s; this server ends request streams idle "
                    "that long (losswire serve --stream-idle-timeout)"
                ) from None
            if pace is not None and not first:
                pace.moved(loop.time() - waiting_since, message_bytes(message))
            if largest is not None and (size := message_bytes(message)) > largest:
                raise LimitExceededError(
                    f"a request message of this method is at most {largest} bytes, this one is {size}",
                    field="request",
                )
            first = False
            yield message

    def _pace(self, paced: bool) -> Pace | None:
        return Pace(self.idle_seconds, self.min_rate) if paced and self.min_rate is not None else None


class Pace:
    """The least pace of a stream that holds a big call, each way: it may spend ``grace`` seconds waiting
    for its caller (to send, or to read), plus one second for every ``min_rate`` bytes moved. A slow link
    passes as long as it moves ``min_rate``; a caller moving a few bytes now and then, to hold a big-call
    slot and its memory, does not."""

    def __init__(self, grace: float, min_rate: float) -> None:
        self.grace, self.min_rate = grace, min_rate
        self.waited = 0.0  # seconds spent waiting for the caller
        self.bytes = 0  # bytes it moved meanwhile

    def limit(self, idle: float) -> tuple[float, bool]:
        """How long the next wait may last, and whether that is the pace's limit rather than ``idle``'s
        (a tie is the idle timeout's: a silent caller is told it was silent)."""
        room = self.grace + self.bytes / self.min_rate - self.waited
        return (max(room, 0.0), True) if room < idle else (idle, False)

    def moved(self, waited: float, nbytes: int) -> None:
        self.waited += waited
        self.bytes += nbytes

    def said(self, direction: str) -> str:
        """The end of the refusal's sentence, "the caller sent" / "the caller read" coming before it."""
        return (
            f"{self.bytes} bytes {direction} {self.waited:.1f} s of waiting for it, slower than this server "
            f"requires of a streamed call: {self.min_rate:.0f} bytes per second once it has waited {self.grace:g} s "
            "(losswire serve --stream-min-rate, --stream-idle-timeout)"
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
    """Ends a streaming call whose caller leaves an answer message unread for ``seconds``, or, with a
    ``pace``, reads its answer more slowly than that pace: the handler's task is cancelled, as gRPC
    cancels it when a caller goes away, so its cleanup runs and its call's memory and slot are released,
    and DEADLINE_EXCEEDED saying why is sent behind the message being written (given ``context``).
    A yield cannot be given a time limit of its own: gRPC's write of the yielded message waits on the
    caller's flow control for as long as the caller does not read."""

    def __init__(
        self,
        method: str,
        seconds: float | None,
        pace: Pace | None = None,
        context: grpc.aio.ServicerContext | None = None,
    ) -> None:
        self.method, self.seconds, self.pace, self.context = method, seconds, pace, context
        self.task = asyncio.current_task()
        self.writing = 0  # bytes of the message being written
        self.ending: asyncio.Future | None = None  # the ended call's status, sent once its caller reads

    @contextlib.contextmanager
    def bounded(self, message: Any) -> Any:
        """Around the yield of ``message``."""
        if self.seconds is None or self.task is None:
            yield
            return
        limit, behind = (self.seconds, False) if self.pace is None else self.pace.limit(self.seconds)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(limit, self._expired, behind)
        writing_since, self.writing = loop.time(), message_bytes(message)
        try:
            yield
        finally:
            timer.cancel()
            if self.pace is not None:
                self.pace.moved(loop.time() - writing_since, message_bytes(message))

    def _expired(self, behind: bool) -> None:
        if behind:
            why = f"the caller read {self.pace.said('of its answer in')}"
        else:
            why = f"the caller read nothing of its answer for {self.seconds:g} s (losswire serve --stream-idle-timeout)"
        log.info("%s: %s; the call ends", self.method, why)
        if self.context is not None:
            # The status goes after the message gRPC is still writing (the caller's flow control holds
            # both), so a caller that reads at last is told why its answer stops short; cancelling the
            # handler alone sent no status at all, and such a caller waited for ever.
            ending = self.ending = asyncio.ensure_future(_end(self.context, why))
            _ENDING.add(ending)  # held until it is done: the event loop keeps only a weak reference
            ending.add_done_callback(_ENDING.discard)
            self._hang_up_unless_taken(ending)
        self.task.cancel()

    def _hang_up_unless_taken(self, ending: asyncio.Future) -> None:
        """The message being written, and the status behind it, stay in gRPC until the caller reads (ending
        the handler freed nothing of it): a caller given as long again as it was, plus a second per
        ``--stream-min-rate`` bytes of the message, and still not reading, has its connection closed."""
        rate = self.pace.min_rate if self.pace is not None else None
        seconds = self.seconds + (self.writing / rate if rate else 0.0)
        peer = self.context.peer()
        timer = asyncio.get_running_loop().call_later(
            seconds, hang_up_unread, self.method, peer, seconds, "its call was ended"
        )
        ending.add_done_callback(lambda _ending: timer.cancel())


_ENDING: set[asyncio.Task] = set()  # calls ended by UnreadAnswer whose status waits for their caller


async def _end(context: grpc.aio.ServicerContext, why: str) -> None:
    """End ``context``'s call with DEADLINE_EXCEEDED saying ``why``, whenever the caller lets it through."""
    with contextlib.suppress(Exception):  # abort raises once sent; a call already ended raises too
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{why}; the call ended")


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
