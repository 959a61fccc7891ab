"""``losswire.v1.LossService`` on gRPC: each RPC converts, hands the call to the dataplane, converts back.

The contract's messages are the dataplane's own, so conversion here is about transport: reading a
stream's first message and chunks, sending an answer's chunks, noticing a caller that went away, and
freeing a big call's memory after its answer has left. Failures leave through ``calls.unary`` /
``calls.fail``, the one error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks
from losswire.wire.protocol import SERVICE_NAME

from ..dataplane import Answer, Caller, Dataplane, StreamIntake
from ..errors import RequestError, StreamIdleError
from ..evaluation import CallCancelledError
from .authentication import caller_of
from .calls import CallWatch, attempt, fail, release_after, unary
from .compute import Compute, sessions_named
from .lanes import CallLanes, Lanes
from .malformed import MalformedRequest, malformed_error, stream_deserializer

log = logging.getLogger("losswire.server")
STAGES = ("decode", "compute", "encode")


class LossService(pb_grpc.LossServiceServicer):
    """Serves ``dataplane`` over gRPC; losses run on ``compute``'s threads; ``owners`` says whose
    sessions a call may use (``authentication.SessionOwners``; by default everybody's); ``callers`` who a
    call comes from, whose shared-memory regions it may name (``authentication.caller_of``)."""

    def __init__(
        self,
        dataplane: Dataplane,
        compute: Compute,
        owners: Callable[[grpc.aio.ServicerContext], str] = lambda _: "",
        callers: Callable[[grpc.aio.ServicerContext], Caller] = caller_of,
        lanes: Lanes | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.compute = compute
        self.owners = owners
        self.callers = callers
        self.lanes = Lanes() if lanes is None else lanes  # streamed calls' chunks on several streams

    # -- evaluation ---------------------------------------------------------------------------------

    @unary("Evaluate")
    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        watch = CallWatch(context, "Evaluate")
        with watch.handling():
            owner, caller = self.owners(context), self.callers(context)
            evaluate, size, sessions = self.dataplane.evaluate, request.ByteSize(), sessions_named(owner, request.terms)
            answer = await self.compute.evaluate(
                watch, evaluate, size, request, watch, None, owner, caller, sessions=sessions
            )
        _log_call("Evaluate", request, answer, context)
        release_after(context, answer.keep)
        return answer.response

    async def EvaluateStream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes | pb.EvaluateChunk]:
        """The request, then its tensors' chunks, in; the response, then its tensors' chunks, out (see the
        .proto). Or a lane of such a call: its chunks in, nothing out. Waiting for the caller's chunks
        holds no thread."""
        watch = CallWatch(context, "EvaluateStream")
        intake: StreamIntake | None = None
        lanes: CallLanes | None = None
        answer: Answer | None = None
        sent = False
        caller = self.callers(context)
        token = caller.token
        try:
            try:
                with watch.handling():
                    first = await _first_message(requests)
                    if first.WhichOneof("kind") == "lane":
                        await self._lane(first.lane, token, requests)
                        return
                    header, owner = first.request, self.owners(context)
                    intake = self.dataplane.open_stream(header, watch, owner, caller)
                    if header.HasField("lanes"):
                        lanes = self.lanes.open(token, header.lanes, intake)
                    if intake.overlap is None:
                        await _read_chunks(requests, intake, lanes)
                    else:
                        async for early in self._overlapped(intake, lanes, requests, watch):
                            yield early
                    sessions = sessions_named(owner, header.terms)
                    answer = await self.compute.for_call(watch, intake.evaluate, watch, sessions=sessions)
            except Exception as error:
                if watch() and not isinstance(error, CallCancelledError):
                    # reading a cancelled call's stream fails with gRPC's own error: the caller is gone
                    error = CallCancelledError(f"the caller went away while streaming ({type(error).__name__})")
                fail(context, error, "EvaluateStream")
                return
            _log_call("EvaluateStream", header, answer, context)
            release_after(context, answer.keep)
            for early in intake.overlap.early_chunks() if intake.overlap is not None else ():
                yield early  # the gradient's last rows: every early chunk comes before the response
            for message in chunks.stream_chunks(answer.response, answer.sink):
                yield message  # chunks as serialized bytes (see add_to_server)
            sent = True
        finally:
            if answer is not None and not sent:  # ended mid-answer (its caller stopped reading, or left)
                answer.keep.clear()  # its tensors go now, not when the caller's connection does
            if lanes is not None:
                self.lanes.close(token, header.lanes)  # its lanes' next chunks are refused: the intake is closed
            if intake is not None:
                intake.close()

    async def _lane(self, lane: pb.StreamLane, token: str, requests: AsyncIterator[Any]) -> None:
        """A lane of another stream's call (see ``lanes``): its chunks into that call's intake. A lane whose
        stream ends while it still owes stripes of the call fails (INVALID_ARGUMENT naming it), and so does
        its call, whether its caller half-closed it or cancelled it (the two race: gRPC ends a cancelled
        call's pending read as the stream's end); a lane cancelled once it had sent everything fails
        nothing."""
        call = await self.lanes.join(token, lane)
        error: BaseException | None = None
        ended = False  # still False in ``finally``: the handler was cancelled (its caller went away)
        number = 1
        try:
            async for message in requests:
                number += 1
                call.add(lane.lane, _chunk_of(message, number, f"lane {lane.lane}'s stream"))
            ended = True
            owing = call.owing(lane.lane)  # its stream has ended: stripes it still owes would never come
            if owing is not None:
                raise owing  # to the lane's caller, and (finally) to its call's
        except Exception as failure:
            ended, error = True, failure
            raise
        finally:
            if not ended:
                error = call.owing(lane.lane)
            call.end(lane.lane, _as_its_call_tells(lane.lane, error))
            log.debug("EvaluateStream lane %d: %d chunks, %s", lane.lane, number - 1, "in" if error is None else error)

    async def _overlapped(
        self, intake: StreamIntake, lanes: CallLanes | None, requests: AsyncIterator[Any], watch: CallWatch
    ) -> AsyncIterator[bytes]:
        """Reads the stream's chunks (and its lanes') into ``intake`` while its overlap computes the rows
        they complete (one step at a time on a compute thread) and yields the gradient's chunks that are
        final meanwhile. Ends when the caller has sent everything, once no step is running: a step never
        outlives the call."""
        overlap = intake.overlap
        arrived = asyncio.Event()
        if lanes is not None:
            lanes.on_chunk = arrived.set
        reader = asyncio.ensure_future(_read_chunks(requests, intake, lanes, arrived.set))
        step: asyncio.Future | None = None
        try:
            while True:
                arrived.clear()  # chunks from here on wake the wait below
                rows = overlap.wants_step() if step is None else None
                if rows is not None:
                    step = asyncio.ensure_future(self.compute.for_call(watch, overlap.step, rows, watch))
                if step is None and reader.done():
                    reader.result()  # the caller's stream ended, or its error
                    return
                woken = asyncio.ensure_future(arrived.wait())
                try:
                    # a step that ended meanwhile (while early chunks went out) is in: the wait returns at once
                    waiting = [woken, *([] if reader.done() else [reader]), *([] if step is None else [step])]
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()  # however the wait ends (the call cancelled too): no task left pending
                if reader.done() and reader.exception() is not None:
                    reader.result()
                if step is not None and step.done():
                    step, finished = None, step
                    finished.result()
                    rows = overlap.wants_step()
                    if rows is not None:  # the next rows compute while these go out
                        step = asyncio.ensure_future(self.compute.for_call(watch, overlap.step, rows, watch))
                    for early in overlap.early_chunks():
                        yield early
        finally:
            # the reader ends before the intake closes. Cancelled again until it is: a cancellation must
            # never be lost (see streams.within), and a reader that outlived the call would add to it
            while not reader.done():
                reader.cancel()
                await asyncio.wait({reader}, timeout=1)
            if not reader.cancelled():
                reader.exception()  # retrieved: its error (if any) was the call's, or came after its end
            if step is not None:  # its thread writes into the call's buffers: they stay until it is done
                with contextlib.suppress(BaseException):
                    await step

    # -- descriptions ---------------------------------------------------------------------------------

    @unary("Describe")
    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        return await self.compute(context, self.dataplane.describe, request.config)

    @unary("ListLosses")
    async def ListLosses(
        self, request: pb.ListLossesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLossesResponse:
        return await self.compute(context, self.dataplane.list_losses)

    # -- sessions -------------------------------------------------------------------------------------

    @unary("GetSession")
    async def GetSession(self, request: pb.SessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        return await self._on_session(self.dataplane.get_session, request, context, "GetSession")

    @unary("ResetSession")
    async def ResetSession(self, request: pb.SessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        info = await self._on_session(self.dataplane.reset_session, request, context, "ResetSession")
        log.info("session %s reset after %d steps", info.session, info.steps)
        return info

    async def _on_session(
        self, work: Callable[..., pb.SessionInfo], request: pb.SessionRequest, context: Any, method: str
    ) -> pb.SessionInfo:
        """``work`` on a session, which may wait for a call using it: watched, so that a caller who leaves
        (or whose deadline passes) meanwhile frees its compute thread."""
        watch, owner = CallWatch(context, method), self.owners(context)
        sessions = ((owner, request.session),) if request.session else ()
        with watch.handling():
            return await self.compute.for_call(watch, work, request.session, owner, watch, sessions=sessions)

    @unary("ListSessions")
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        return await self.compute(context, self.dataplane.list_sessions, self.owners(context))

    # -- shared memory (bookkeeping under a lock: answered on the event loop, never queued behind losses) ---

    @unary("SharedMemoryEndpoint")
    async def SharedMemoryEndpoint(
        self, request: pb.SharedMemoryEndpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.SharedMemoryEndpointResponse:
        return self.dataplane.shared_memory_endpoint(self.callers(context))

    @unary("RegisterSharedMemory")
    async def RegisterSharedMemory(
        self, request: pb.RegisterSharedMemoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterSharedMemoryResponse:
        return self.dataplane.register_shared_memory(request, self.callers(context))

    @unary("UnregisterSharedMemory")
    async def UnregisterSharedMemory(
        self, request: pb.UnregisterSharedMemoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnregisterSharedMemoryResponse:
        self.dataplane.unregister_shared_memory(request, self.callers(context))
        return pb.UnregisterSharedMemoryResponse()


def _as_its_call_tells(lane: int, error: BaseException | None) -> BaseException | None:
    """A lane's failure as its call's caller is told it: the idle guard's words ("the caller sent nothing
    for ...") are the lane's, so the call's say which lane, and name ``lanes``."""
    if isinstance(error, StreamIdleError) and error.field is None:
        return StreamIdleError(f"lane {lane}'s stream: {error}", field="lanes")
    return error


async def _first_message(requests: AsyncIterator[Any]) -> pb.EvaluateChunk:
    """The stream's first message, which must carry the request (or, on a lane, its StreamLane)."""
    first = await anext(aiter(requests), None)
    if isinstance(first, MalformedRequest):
        raise malformed_error(first, "the stream's first message", "request")
    kind = None if first is None else first.WhichOneof("kind")
    if kind not in ("request", "lane"):
        got = "the stream ended without a message" if first is None else f"it carries {kind or 'nothing'}"
        raise RequestError(
            f"the stream's first message must carry the request (EvaluateChunk.request), or on a lane its "
            f"EvaluateChunk.lane; {got}",
            field="request",
        )
    return first


async def _read_chunks(
    requests: AsyncIterator[Any],
    intake: StreamIntake,
    lanes: CallLanes | None,
    arrived: Callable[[], None] = lambda: None,
) -> None:
    """Every chunk of the request's stream into ``intake`` (``arrived()`` after each), then waits for its
    lanes to end."""
    number = 1
    async for message in requests:
        number += 1
        intake.add(_chunk_of(message, number))
        arrived()
    if lanes is not None:
        await lanes.all_ended()


def _chunk_of(message: Any, number: int, stream: str = "the stream") -> Any:
    """The ``TensorChunk`` of the ``number``-th message of ``stream`` (every message after the first is one;
    a lane names itself, so that its call's error says which stream broke)."""
    if isinstance(message, MalformedRequest):
        raise malformed_error(message, f"message {number} of {stream}", "chunk")
    kind = message.WhichOneof("kind")
    if kind != "chunk":
        raise RequestError(
            f"message {number} of {stream} carries {kind or 'nothing'}; only the first carries the request "
            "(or on a lane its StreamLane), every later one a chunk",
            field="chunk",
        )
    return message.chunk


def _log_call(method: str, request: pb.EvaluateRequest, answer: Answer, context: grpc.aio.ServicerContext) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    timings = answer.response.timings
    losses = [t.config.fields["type"].string_value if "type" in t.config.fields else "?" for t in request.terms]
    tries = attempt(context)
    log.debug(
        "%s %s: decode %.2f ms, compute %.2f ms, encode %.2f ms%s",
        method,
        ",".join(losses),
        timings.decode_ms,
        timings.compute_ms,
        timings.encode_ms,
        f", attempt {tries}" if tries > 1 else "",
        # fields of their own in --log-format json
        extra={
            "rpc": method,
            "losses": losses,
            "attempt": tries,
            **{f"{k}_ms": getattr(timings, f"{k}_ms") for k in STAGES},
        },
    )


def add_to_server(service: LossService, server: grpc.aio.Server) -> None:
    """Register ``service``: the generated handlers, with EvaluateStream's messages read and written
    without protobuf copies of their chunks' bytes (``chunks.parse_chunk``, ``chunks.serialize_chunk``:
    a chunk the servicer yields is already serialized) and unparsable ones handed to it to refuse."""
    pb_grpc.add_LossServiceServicer_to_server(service, server)
    stream = grpc.stream_stream_rpc_method_handler(
        service.EvaluateStream,
        request_deserializer=stream_deserializer(chunks.parse_chunk, pb.EvaluateChunk.DESCRIPTOR.full_name),
        response_serializer=chunks.serialize_chunk,
    )
    # registered methods are looked up before generic handlers: this one replaces the generated one
    server.add_registered_method_handlers(SERVICE_NAME, {"EvaluateStream": stream})
