"""The server's door: calls are admitted up to a bound, and unary requests received only when there is
room for them, within a time bound.

Every call takes one of ``CallSlots`` (``--max-concurrent-rpcs``; one token's calls at most
``--max-concurrent-rpcs-per-token`` of them) until it ends, but for methods bounded by their own service
(the health service's Watch streams, which would otherwise take every slot); a call beyond is refused
at once with RESOURCE_EXHAUSTED and no headers, which gRPC's retry policies retry. A call whose handler
fails is ended here the same way, its status sent alone (``send_failure_alone``): so are the busy
refusals of the dataplane (memory budget, big-call slots) and of the room below.

gRPC receives a unary call's whole request before its handler runs, and holds it (and its copies:
the transport's buffer, Python bytes, the parsed message) outside every budget of the dataplane: four
callers each sending a 400 MiB Evaluate at once took a server with a 1 GiB memory budget to 6.1 GiB,
however soon each call was refused. But gRPC reads no more of a request's bytes than its flow-control
window until the handler asks for them: waiting before asking keeps them at the caller.

So every method with a unary request is served here as a request stream of one message (the same
bytes on the wire: a client cannot tell): before its request is read, the call takes room for the
largest request a caller may send (``largest``, the server's receive limit) from a
:class:`RequestRoom` of ``capacity`` bytes, waiting its turn as a suspended coroutine while the room is
full; once the request has arrived the call keeps room for its actual size until it ends. The bytes
of unary requests received and held at once are so bounded by ``capacity`` (each request counted once;
the process holds up to about three times that while a request is parsed). The request must arrive
within ``read_seconds`` of being asked for (:func:`unary_read_seconds`: 9 s for 64 MiB), so a caller
that starts a call and sends nothing, or trickles, cannot keep its room; and one connection has at
most ``PER_CONNECTION`` requests being received at once, so a caller's silent calls on one connection
hold at most that much room. Room is held by a caller: its token where tokens are on, else its
connection. With tokens, one token holds at most all of the room but one request's worth (whatever
connections it opens), and room that comes back while calls wait goes to the caller that holds least:
a caller's flood of calls keeps another caller's call waiting for one call to end, not for the flood.

Calls refused by the token check are not read at all: a caller without a token takes no room. With
tokens on, calls without a valid token to the services open to everyone (health) read in a room of
their own, so that callers without a token cannot take the room of those with one. A call without a
request message, or one whose request does not arrive in time, is refused here, before any other
interceptor sees it (``on_refused`` counts it).

A caller that resets its call while it waits for room gives its place up: a burst of such resets
(HTTP/2 "rapid reset") leaves nothing held.

A streamed call's first message is its request too, and may carry tensors inline (``roomed_streams``):
once it has arrived it keeps room for its bytes until the call ends, waiting for room at most
``read_seconds`` (else RESOURCE_EXHAUSTED). It is asked for at once, without room: a stream opened and
left silent holds only its open stream (``--max-open-streams``), as before.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, NoReturn

import grpc

from ..counts import count_down
from ..errors import RequestError, ServerBusyError, StreamIdleError
from .calls import answers_or_failure_alone, fail, send_failure_alone
from .hangup import hang_up_unread
from .shares import FairShares
from .status import gone_code, refusal
from .streams import message_bytes

# A unary request comes right behind its call's headers; one that has not arrived within this grace, plus
# a second per UNARY_MIN_RATE bytes of the largest request, is a caller holding room without sending.
# Slower uploads stream (EvaluateStream, paced by --stream-min-rate).
UNARY_READ_GRACE_SECONDS = 5.0
UNARY_MIN_RATE = 16 << 20  # bytes per second
PER_CONNECTION = 4  # requests of one connection received at once
log = logging.getLogger("losswire.server")


def unary_read_seconds(largest: int) -> float:
    """How long a unary request of up to ``largest`` bytes may take to arrive once asked for."""
    return UNARY_READ_GRACE_SECONDS + largest / UNARY_MIN_RATE


class SmallRequests(NamedTuple):
    """A room whose requests are a few bytes (health checks): what they are, as refusals name them, and how
    long a call may wait for room, and then for its request, at most (below the intake's own bound)."""

    what: str
    seconds: float


class RequestRoom(FairShares):
    """Room for ``capacity`` bytes of unary requests, with at most ``per_connection`` requests of one
    connection being received at once and at most ``per_caller`` bytes held by one caller (a token, or a
    connection where callers have no token), handed out by :class:`~.shares.FairShares`' rule: room that
    comes back while calls wait goes to the waiting caller that holds least, so that one caller's flood of
    calls delays another's by at most a call, not by the whole flood. Used on the event loop only."""

    def __init__(
        self,
        capacity: int,
        per_connection: int = PER_CONNECTION,
        per_caller: int | None = None,
        small: SmallRequests | None = None,
        slots: CallSlots | None = None,
    ) -> None:
        """``small``: set for a room of small requests. ``slots``: the call slots its calls take instead of
        the server's (None: the server's)."""
        super().__init__(capacity, per_connection, per_caller)
        self.small, self.slots = small, slots


Place = tuple[RequestRoom, str | None]  # where a call's request is read, and for whom (None: its connection)


class CallSlots:
    """Calls admitted at once: at most ``limit`` (None: unbounded), and at most ``per_caller`` of one
    caller (a token; calls of no caller count towards ``limit`` only). ``what``: the calls, and the bound,
    as a refusal names them. Used on the event loop only."""

    __slots__ = ("_by_caller", "limit", "open", "per_caller", "what")

    def __init__(
        self,
        limit: int | None,
        per_caller: int | None = None,
        what: tuple[str, str] = ("calls", "losswire serve --max-concurrent-rpcs"),
    ) -> None:
        self.limit, self.per_caller, self.open, self.what = limit, per_caller, 0, what
        self._by_caller: dict[str, int] = {}

    def enter(self, caller: str | None = None) -> str | None:
        """Take a slot for a call of ``caller``; None when taken, else why not (nothing is taken)."""
        if self.limit is not None and self.open >= self.limit:
            calls, bound = self.what
            return f"the server is serving {self.open} {calls}, its most at once ({bound}); retry later"
        if caller is not None and self.per_caller is not None:
            held = self._by_caller.get(caller, 0)
            if held >= self.per_caller:
                return (
                    f"this token has {held} calls in flight, its most at once (losswire serve "
                    "--max-concurrent-rpcs-per-token, which leaves other tokens room); retry later"
                )
            self._by_caller[caller] = held + 1
        self.open += 1
        return None

    def leave(self, caller: str | None = None) -> None:
        """A call of ``caller`` that ``enter`` admitted has ended."""
        self.open -= 1
        if caller is not None and self.per_caller is not None:
            count_down(self._by_caller, caller)

    def held_by(self, caller: str) -> int:
        """Calls of ``caller`` in flight."""
        return self._by_caller.get(caller, 0)


class IntakeInterceptor(grpc.aio.ServerInterceptor):
    """Admits at most ``slots.limit`` calls at once, and serves every unary-request method as a
    one-message request stream whose message is read only with room for it (see the module docstring).
    Install it outermost: the handlers within see unary calls."""

    def __init__(
        self,
        room_of: Callable[[grpc.HandlerCallDetails], Place | None],
        largest: int,
        read_seconds: float | None,
        slots: CallSlots,
        uncounted: frozenset[str] = frozenset(),
        on_refused: Callable[[str, grpc.StatusCode], None] = lambda _method, _code: None,
        answer_seconds: float | None = None,
        answer_min_rate: float | None = None,
        roomed_streams: frozenset[str] = frozenset(),
    ) -> None:
        """``room_of(call)``: the room its request is read in and who it is read for (None: its connection);
        None: the call is refused unread (the token check refuses it). ``largest``: the largest request, at
        most any room's capacity. ``uncounted``: methods (``/service/Method``) whose calls take no slot
        (they are bounded by their own service). ``answer_seconds``, ``answer_min_rate``: how long a caller
        may leave a unary answer untaken, plus a second per that many bytes of it (None: no bound).
        ``roomed_streams``: request-streaming methods whose first message keeps room for its bytes until
        the call ends, as a unary request does (``_first_in_room``)."""
        self.room_of, self.largest, self.read_seconds = room_of, largest, read_seconds
        self.roomed_streams = roomed_streams
        self.answer_seconds, self.answer_min_rate = answer_seconds, answer_min_rate
        self.slots, self.uncounted = slots, uncounted
        self._unbounded = CallSlots(None)  # the slots of uncounted calls: nothing bounds them here
        self.on_refused = on_refused

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        place = self.room_of(handler_call_details)
        if handler_call_details.method in self.uncounted:
            slots = self._unbounded
        else:  # a room with slots of its own (health checks without a token) keeps its calls out of the server's
            slots = self.slots if place is None or place[0].slots is None else place[0].slots
        caller = place[1] if place is not None else None  # a token (None without tokens: callers are not told apart)
        if handler.request_streaming:
            roomed = handler_call_details.method in self.roomed_streams and place is not None
            return self._counted_stream(handler, method, slots, caller, place if roomed else None)
        deserialize = handler.request_deserializer
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        # closures, not partials: gRPC inspects each call's handler, and a partial costs it more

        async def awaited(_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            """A unary answer, or answers written by the handler (``context.write``)."""
            admitted = Admitted(self, slots, caller, method, context)
            async with admitted as held:
                request = await self._read(method, deserialize, place, context, held)
                answer = None if request is _REFUSED else await inner(request, context)
                if answer is None:
                    await send_failure_alone(context)
                elif not handler.response_streaming:
                    admitted.until_sent(self._answer_seconds(answer, place))
                return answer

        async def yielded(_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            """Answers yielded by an async generator."""
            async with Admitted(self, slots, caller, method, context) as held:
                request = await self._read(method, deserialize, place, context, held)
                if request is _REFUSED:
                    await send_failure_alone(context)
                else:
                    async for message in answers_or_failure_alone(inner(request, context), context):
                        yield message

        if not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(awaited, None, handler.response_serializer)
        behaviour = yielded if inspect.isasyncgenfunction(inner) else awaited
        return grpc.stream_stream_rpc_method_handler(behaviour, None, handler.response_serializer)

    def _counted_stream(
        self, handler: grpc.RpcMethodHandler, method: str, slots: CallSlots, caller: str | None, place: Place | None
    ) -> grpc.RpcMethodHandler:
        """A request-streaming ``handler`` whose calls each take a slot of ``caller``'s (their requests are
        read by it); with a ``place``, their first message keeps room there (``_first_in_room``)."""
        inner = handler.stream_stream or handler.stream_unary

        def read(requests: AsyncIterator[Any], held: Held | None) -> AsyncIterator[Any]:
            return requests if held is None else self._first_in_room(requests, place, held)

        async def awaited(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with Admitted(self, slots, caller, method, context, reads=place is not None) as held:
                answer = await inner(read(requests, held), context)
                if answer is None:
                    await send_failure_alone(context)
                return answer

        async def yielded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with Admitted(self, slots, caller, method, context, reads=place is not None) as held:
                async for message in answers_or_failure_alone(inner(read(requests, held), context), context):
                    yield message

        serializers = (handler.request_deserializer, handler.response_serializer)
        if not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(awaited, *serializers)
        return grpc.stream_stream_rpc_method_handler(
            yielded if inspect.isasyncgenfunction(inner) else awaited, *serializers
        )

    async def _first_in_room(self, requests: AsyncIterator[Any], place: Place, held: Held) -> AsyncIterator[Any]:
        """``requests``, the first of which keeps room for its bytes in ``place`` until the call ends.

        A stream's first message is its call's request, which may carry tensors inline, and the call holds it
        as long as it lasts: a silent stream held a 60 MB one for the whole idle timeout, outside every bound
        but the number of open streams. It is asked for at once (a silent stream holds no room, only its
        open stream), and once arrived it waits for room at most ``read_seconds``, else ServerBusyError;
        meanwhile it is one message of an open stream, as any chunk is."""
        source = aiter(requests)
        try:
            first = await anext(source)
        except StopAsyncIteration:
            return
        room, caller = place
        nbytes = message_bytes(first)
        try:
            async with asyncio.timeout(self.read_seconds):
                await held.take(room, nbytes, caller)
        except TimeoutError:
            raise ServerBusyError(
                f"the stream's first message ({nbytes} bytes) found no room among the requests this server holds "
                f"at once in {self.read_seconds:g} s ({room.capacity} bytes: an eighth of losswire serve "
                "--memory-budget, four of the largest message at least); retry later"
            ) from None
        held.keep(nbytes)
        yield first
        async for message in source:
            yield message

    async def _turn_away(self, method: str, context: grpc.aio.ServicerContext, why: str) -> NoReturn:
        """End a call that finds no slot: RESOURCE_EXHAUSTED, sent at once and alone (gRPC's retry policies
        retry only an answer without headers; a status set for the handler's return comes after them). No
        other interceptor has seen the call: it is counted here."""
        busy = ServerBusyError(why)
        status = refusal(busy, None, context.time_remaining(), method)
        self.on_refused(method, status.code)
        await context.abort(status.code, status.details, tuple(status.trailing_metadata))

    async def _read(
        self,
        method: str,
        deserialize: Callable[[bytes], Any] | None,
        place: Place | None,
        context: grpc.aio.ServicerContext,
        held: Held,
    ) -> Any:
        """The call's request, read with room for it in ``place`` (``held``: the room the call holds, given
        back when it ends); ``_REFUSED`` once the call's status is set."""
        if place is None:  # the token check refuses it: its bytes are never read
            return deserialize(b"") if deserialize is not None else b""
        try:
            data = await self._receive(*place, context, held)
        except asyncio.CancelledError:  # its caller left while it waited: counted here, no handler ran
            self.on_refused(method, gone_code(context.time_remaining()))
            raise
        except RequestError as error:
            return self._refuse(method, context, error)
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as error:  # a streaming method's own deserializer (unary ones are tolerant)
            malformed = RequestError(
                f"the request's {len(data)} bytes do not parse as the method's request message "
                f"({type(error).__name__})",
                field="request",
            )
            return self._refuse(method, context, malformed)

    def _answer_seconds(self, answer: Any, place: Place | None) -> float | None:
        """How long a unary ``answer`` may wait for its caller to take it: the idle timeout, plus a second
        per ``answer_min_rate`` bytes of it; a small request's room's own bound for its few bytes."""
        seconds = self.answer_seconds
        if seconds is not None and place is not None and place[0].small is not None:
            return min(seconds, place[0].small.seconds)
        if seconds is not None and self.answer_min_rate is not None:
            seconds += answer.ByteSize() / self.answer_min_rate
        return seconds

    async def _receive(
        self, room: RequestRoom, caller: str | None, context: grpc.aio.ServicerContext, held: Held
    ) -> bytes:
        """The request's bytes, once ``room`` had room for them (waiting at most ``read_seconds``, else
        ServerBusyError) and they arrived (within ``read_seconds`` more, else StreamIdleError); in a room
        of small requests, within its own shorter bound each."""
        seconds = self.read_seconds
        if room.small is not None and seconds is not None:
            seconds = min(seconds, room.small.seconds)
        try:
            async with asyncio.timeout(seconds):
                await held.take(room, self.largest, caller)
        except TimeoutError:
            raise ServerBusyError(self._full(room)) from None
        try:
            async with asyncio.timeout(seconds):
                data = await context.read()  # not the request iterator: its frame would keep the bytes
        except TimeoutError:
            raise StreamIdleError(self._late(room, seconds)) from None
        if data is grpc.aio.EOF:
            raise RequestError("the call carried no request message", field="request")
        held.keep(len(data))  # what arrived stays held until the call ends
        return data

    def _full(self, room: RequestRoom) -> str:
        if room.small is not None:
            return f"the server is receiving its most {room.small.what} requests at once; retry later"
        return (
            f"the server is receiving its most unary requests at once (room for {room.capacity} bytes, "
            f"{self.largest} for each request until it has come); retry later"
        )

    def _late(self, room: RequestRoom, seconds: float) -> str:
        if room.small is not None and seconds == room.small.seconds:
            return (
                f"the request had not arrived {seconds:g} s after the server asked for it; a {room.small.what} "
                f"request is a few bytes, and this server waits {seconds:g} s for one"
            )
        return (
            f"the request had not arrived {seconds:g} s after the server asked for it; this server gives a unary "
            f"request of up to {self.largest} bytes (losswire serve --max-request-message-bytes) "
            f"{UNARY_READ_GRACE_SECONDS:g} s plus a second per {UNARY_MIN_RATE} bytes; send slower or bigger "
            "requests by EvaluateStream"
        )

    def _refuse(self, method: str, context: grpc.aio.ServicerContext, error: Exception) -> object:
        self.on_refused(method, fail(context, error, method))
        return _REFUSED


_REFUSED = object()  # a call whose status is set already: its handler is not run


class Admitted:
    """A call's slot of ``slots`` for its whole life, and the request room it holds (``Held``, entered as):
    a call that finds no slot is turned away on entering; leaving gives both back, or, for a call whose
    unary answer is being returned (``until_sent``), the call's end does, once gRPC has sent the answer.

    Returned from the handler, a unary answer stays in gRPC's buffers until the caller's flow control lets
    it through, with the call's request: a caller sending 32 MB requests and never reading took the
    server's memory 1.6 GB up in 12 calls, all of it given back at once to the server's bounds. Held
    until sent, such answers count against the caller's calls and room like requests still arriving; and
    an answer not taken in time has its caller's connection closed (``hangup``: neither cancelling nor
    aborting the call frees it), which ends the call."""

    __slots__ = ("caller", "context", "held", "intake", "method", "reads", "released", "sending", "slots")

    def __init__(
        self,
        intake: IntakeInterceptor,
        slots: CallSlots,
        caller: str | None,
        method: str,
        context: grpc.aio.ServicerContext,
        reads: bool = True,
    ) -> None:
        """``reads``: the call holds request room (``Held``): for its unary request, or a stream's first message."""
        self.intake, self.slots, self.caller, self.method, self.context = intake, slots, caller, method, context
        self.held: Held | None = None
        self.reads, self.sending, self.released = reads, False, False

    async def __aenter__(self) -> Held | None:
        refusal = self.slots.enter(self.caller)
        if refusal is not None:
            await self.intake._turn_away(self.method, self.context, refusal)
        if self.reads:
            self.held = Held(self.context.peer())
        return self.held

    async def __aexit__(self, error_type: type[BaseException] | None, *_exc: object) -> None:
        if not self.sending or error_type is not None:
            self._release()

    def until_sent(self, seconds: float | None) -> None:
        """The handler returns a unary answer: give back once the call has ended (gRPC has sent the answer,
        or the caller has gone), closing the caller's connection should that take over ``seconds``."""
        self.sending = True
        loop = asyncio.get_running_loop()
        timer = (
            None
            if seconds is None
            else loop.call_later(seconds, hang_up_unread, self.method, self.held.connection, seconds)
        )

        def ended(_context: object) -> None:
            if timer is not None:
                timer.cancel()
            self._release()

        self.context.add_done_callback(ended)
        if self.context.done():  # ended already (its caller left): the callback may never come
            ended(self.context)

    def _release(self) -> None:
        if not self.released:
            self.released = True
            if self.held is not None:
                self.held.give_back()
            self.slots.leave(self.caller)


class Held:
    """The room one call holds: taken for the largest request, kept for the one that came."""

    __slots__ = ("caller", "connection", "nbytes", "receiving", "room")

    def __init__(self, connection: str | None) -> None:
        self.connection = connection or ""
        self.caller = self.connection
        self.room: RequestRoom | None = None
        self.nbytes = 0
        self.receiving = False

    async def take(self, room: RequestRoom, nbytes: int, caller: str | None) -> None:
        """``nbytes`` of ``room`` for ``caller`` (None: the call's connection)."""
        caller = self.connection if caller is None else caller
        await room.take(nbytes, self.connection, caller)
        self.room, self.caller, self.nbytes, self.receiving = room, caller, nbytes, True

    def keep(self, nbytes: int) -> None:
        """The request has arrived: keep only its ``nbytes``."""
        self.room.give_back(self.nbytes - nbytes, self.caller, self.connection)  # no longer being received
        self.nbytes, self.receiving = nbytes, False

    def give_back(self) -> None:
        if self.room is not None:
            self.room.give_back(self.nbytes, self.caller, self.connection if self.receiving else None)
            self.room, self.nbytes, self.receiving = None, 0, False
