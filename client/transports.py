"""How one Evaluate travels: a unary call, an EvaluateStream of chunks, or shared memory; chosen by size.

* **unary** (the usual call): the request and answer are one message each;
* **EvaluateStream**: a request whose tensors hold ``stream_threshold`` bytes or more (8 MiB by default)
  sends its big tensors in chunks cut straight from their memory, and the answer comes back the same
  way, reassembled into reused buffers (``BufferPool``). The client retries a stream itself on
  UNAVAILABLE and on a busy server, with ``RETRY_POLICY``'s backoff, while no answer has arrived;
* **shared memory**: a server on this machine reads big tensors (1 MiB or more) from a segment both
  processes map (a sealed memfd handed over on a Unix socket) and writes the answer's big tensors into
  it; only handles cross gRPC. A server that cannot share memory with this process is noticed on the
  first try, and gRPC carries tensors from then on.

Every transport routes a session's terms to the session's replica (:class:`SessionRouter`) and checks
the answered session steps (:class:`SessionSteps`).
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import torch
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as wire_memory
from losswire.wire.buffers import BufferPool
from losswire.wire.protocol import SESSION_HEADER

from . import shared_memory as shm
from .answers import check_answer, check_shared_answer, malformed
from .channels import RETRY_POLICY, Connection, Patience, passing
from .errors import RemoteLossError
from .lanes import LaneCalls, lanes_for, lanes_refused
from .loss_shapes import Descriptions
from .offload import off_main_thread
from .replicas import SessionRouter
from .sessions import SessionSteps, sessions_of

log = logging.getLogger("losswire.client")

# A request whose tensors hold at least this many bytes goes by EvaluateStream, its big tensors in
# chunks (``LossClient(stream_threshold=...)``; None: never). On a 2-core loopback a unary call moves
# ~0.2-0.4 GB/s and a stream ~1-2 GB/s; below a few MiB the stream's extra messages cost more than
# they save (see the report in tests/service/test_streaming.py's module docstring).
STREAM_THRESHOLD_BYTES = 8 << 20
# A request whose held-back (big) tensors hold at least this many bytes goes through shared memory
# when the client uses it (LossClient(shared_memory=...)): below, one unary call costs less than the
# registration bookkeeping saves.
SHARED_MEMORY_THRESHOLD_BYTES = 1 << 20

Answer = tuple[pb.EvaluateResponse, dict[str, Tensor]]  # the response, and its tensors that came apart


class Transports:
    """Evaluate over ``connection`` (the target's channel), choosing the transport per request."""

    def __init__(
        self,
        connection: Connection,
        router: SessionRouter,
        steps: SessionSteps,
        *,
        stream_threshold: int | None,
        shared_memory: bool,
        buffers: BufferPool,
        timeout: float | None,
        overlap: bool = True,
        lanes: int = 0,
        descriptions: Descriptions | None = None,
    ) -> None:
        self.connection, self.router, self.steps = connection, router, steps
        # the losses' descriptions this client has seen: what the shapes of their answers' losses are checked against
        self.descriptions = descriptions if descriptions is not None else Descriptions()
        self.overlap = overlap  # streams ask for early gradients (EvaluateRequest.early_gradients)
        self.lanes = lanes  # more streams per big call (EvaluateRequest.lanes); 0 once the server refused them
        self.timeout = timeout  # of the calls that register and unregister shared memory
        self.stream_threshold = stream_threshold
        self.buffers = buffers
        self.shared_memory_usable = shared_memory  # False once shared memory turned out not to work here
        self.pool: shm.SharedMemoryPool | None = None  # made on the first big call
        self._pool_lock = threading.Lock()
        self._told_no_room = False  # "no room for shared memory now" logged once
        self._unregistering: set[Any] = set()  # UnregisterSharedMemory calls of retired segments in flight

    @property
    def shared_memory_threshold(self) -> int | None:
        """Bytes of big tensors from which a call goes through shared memory; None: it does not."""
        return SHARED_MEMORY_THRESHOLD_BYTES if self.shared_memory_usable else None

    def evaluate(self, request: pb.EvaluateRequest, deadline: float | None, sink: chunks.StreamSink | None) -> Answer:
        """One Evaluate by the transport its size calls for (see ``LossClient.evaluate_tensors``).

        Shared memory and streams run off the main thread (:mod:`~losswire.client.offload`): their calls
        lean on the channel's polling thread, which a signal's exception in grpcio's code on the main
        thread could block for good. A blocking unary call is polled by its own caller and stays here (a
        thread handoff would cost a small call ~0.3-0.5 ms)."""
        threshold, shared = self.stream_threshold, self.shared_memory_threshold
        held_back = [t for t in (threshold, shared) if t is not None]
        taken = False
        if sink is None and held_back and request.ByteSize() >= min(held_back):
            sink, taken = chunks.StreamSink.take(request), True
        try:
            if sink is not None and sink.entries and shared is not None and sink.nbytes >= shared:
                answer = off_main_thread(lambda: self._shared(request, sink, deadline))
                if answer is not None:
                    return answer
            if sink is not None and (threshold is None or sink.nbytes < threshold):
                sink.inline()  # small after all: one unary call
            if sink is None or not sink.entries:
                return self.unary(request, deadline), {}
            return off_main_thread(lambda: self._stream(request, sink, deadline))
        finally:
            if taken:
                sink.inline()  # the caller's request as it was

    # -- unary -----------------------------------------------------------------------------------------

    def unary(self, request: pb.EvaluateRequest, deadline: float | None) -> pb.EvaluateResponse:
        sessions = sessions_of(request)
        baselines = self.steps.baselines(sessions)
        if not sessions:
            response = self.connection.call("Evaluate", request, deadline)
        elif len(sessions) == 1 or self.router.replicas is None:
            # the header lets a proxy route by session (consistent hashing on x-losswire-session)
            metadata = [(SESSION_HEADER, ",".join(sorted(sessions)))]
            response = self.router.call(sessions[0], lambda c: c.call("Evaluate", request, deadline, metadata))
        else:
            response = self._per_session(request, sessions, deadline)
        check_answer(request, response, self.descriptions)
        if sessions:  # only session terms can have restarted
            self.steps.check(request, response, baselines)
        return response

    def _per_session(
        self, request: pb.EvaluateRequest, sessions: list[str], deadline: float | None
    ) -> pb.EvaluateResponse:
        """Terms of several sessions, which may live on different replicas: one request per session
        (stateless terms ride with the first), answered in the original order."""
        groups: dict[str, list[int]] = {session: [] for session in sessions}
        for index, term in enumerate(request.terms):
            groups[term.session or sessions[0]].append(index)
        merged = pb.EvaluateResponse()
        results: dict[int, pb.TermResult] = {}
        for session, indices in groups.items():
            part = pb.EvaluateRequest(terms=[request.terms[i] for i in indices])
            metadata = [(SESSION_HEADER, session)]
            try:
                answer = self.router.call(session, lambda c, p=part, m=metadata: c.call("Evaluate", p, deadline, m))
                check_answer(part, answer, self.descriptions)
            except RemoteLossError as error:
                raise _renumbered(error, indices) from None
            results.update(zip(indices, answer.results, strict=True))
            merged.device = merged.device or answer.device
            merged.server_version = merged.server_version or answer.server_version
            merged.timings.decode_ms += answer.timings.decode_ms
            merged.timings.compute_ms += answer.timings.compute_ms
            merged.timings.encode_ms += answer.timings.encode_ms
        merged.results.extend(results[i] for i in range(len(request.terms)))
        return merged

    # -- EvaluateStream --------------------------------------------------------------------------------

    def _stream(self, request: pb.EvaluateRequest, sink: chunks.StreamSink, deadline: float | None) -> Answer:
        sessions = sessions_of(request)
        if len(sessions) > 1 and self.router.replicas is not None:
            # terms of several sessions may live on several replicas: split, as unary calls
            sink.inline()
            return self.unary(request, deadline), {}
        baselines = self.steps.baselines(sessions)
        if not sessions:
            answer = self._stream_call(self.connection, request, sink, deadline, None)
        else:
            metadata = [(SESSION_HEADER, ",".join(sorted(sessions)))]
            answer = self.router.call(sessions[0], lambda c: self._stream_call(c, request, sink, deadline, metadata))
        self.steps.check(request, answer[0], baselines)
        return answer

    def _stream_call(
        self,
        connection: Connection,
        request: pb.EvaluateRequest,
        sink: chunks.StreamSink,
        deadline: float | None,
        metadata: Any,
    ) -> Answer:
        """One EvaluateStream, sent again (fresh chunks from the same tensors) after UNAVAILABLE or a
        passing RESOURCE_EXHAUSTED, with RETRY_POLICY's backoff, while no answer has arrived."""
        method = connection.evaluate_stream()
        connection.ensure_connected(deadline)
        patience = Patience(deadline)
        failures = 0  # UNAVAILABLE answers: RETRY_POLICY's attempts; a busy server is waited out instead
        busy = None  # the last busy refusal, told with a deadline that then passes
        while True:
            answered = False
            lanes = lanes_for(self.lanes, sink.nbytes) if connection.has_lanes else None
            lane_calls = None if lanes is None else LaneCalls(connection)
            try:
                # early_gradients: the server may compute while the chunks arrive (they go row by row) and
                # send pred's gradient as its rows are done, before the response
                if lanes is None:
                    sent = chunks.stream_chunks(request, sink, early_gradients=self.overlap)
                    responses = method(sent, timeout=patience.remaining(), metadata=metadata)
                else:
                    remaining = patience.remaining()
                    responses = lane_calls.start(request, sink, lanes, remaining, metadata, self.overlap)
                first = next(responses, None)
                answered = True
                return _receive_stream(request, first, responses, self.buffers, self.descriptions)
            except grpc.RpcError as raised:
                error = raised
                lane_failure = lane_calls.failed if lane_calls is not None else None
                if raised.code() == grpc.StatusCode.CANCELLED and lane_failure is not None:
                    error = lane_failure  # a lane failed and cancelled the call: its error is the one to tell
                if lanes is not None and lanes_refused(RemoteLossError.from_rpc_error(error)):
                    log.warning("lanes fail with %s (%s): one stream per call", connection.label, error.details())
                    self.lanes = 0
                    continue
                failures += error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                retry = not answered and passing(error) and failures < RETRY_POLICY["maxAttempts"]
                pause = patience.next_pause() if retry else None
                if pause is None:
                    raise after_busy(connection.failure(error, deadline), busy) from None
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    busy = RemoteLossError.from_rpc_error(error)
                log.debug("EvaluateStream: %s; again in %.2f s", error.code().name, pause)
                time.sleep(pause)
            finally:
                if lane_calls is not None:
                    lane_calls.close()

    # -- shared memory ---------------------------------------------------------------------------------

    def _shared_memory_pool(self) -> shm.SharedMemoryPool:
        connection, timeout = self.connection, self.timeout

        def endpoint() -> tuple[str, int]:
            answer = connection.call("SharedMemoryEndpoint", pb.SharedMemoryEndpointRequest(), timeout)
            return answer.address, answer.connection_key

        def register(claim: str, byte_size: int) -> str:
            request = pb.RegisterSharedMemoryRequest(claim=claim, byte_size=byte_size)
            return connection.call("RegisterSharedMemory", request, timeout).region

        def unregister(region: str, wait: bool) -> None:
            request = pb.UnregisterSharedMemoryRequest(region=region)
            if wait:
                connection.call("UnregisterSharedMemory", request, 5.0)
            else:  # a retired segment: sent, not waited for (the server may be busy with the late call)
                future = connection.stub.UnregisterSharedMemory.future(request, timeout=5.0)
                self._unregistering.add(future)  # a future dropped before it is done cancels its call
                future.add_done_callback(self._unregistering.discard)

        with self._pool_lock:
            if self.pool is None:
                self.pool = shm.SharedMemoryPool(endpoint, register, unregister)
            return self.pool

    def _shared(self, request: pb.EvaluateRequest, sink: chunks.StreamSink, deadline: float | None) -> Answer | None:
        """Evaluate with the sink's tensors in a shared segment; None when shared memory does not work
        with this server (then it is off for this client, and the caller sends them over gRPC) or has no
        room now (this call goes over gRPC).

        The segment holds the inputs, then an output range as large as them (gradients have their
        inputs' sizes); answers that do not fit come inline. The answer's tensors are views of the
        segment, which returns to the pool once they are all freed. A call that ends without an answer
        (deadline, cancellation, any error) retires its segment: never lent again."""
        inputs = sum(wire_memory.align(chunks.byte_count(data)) for _, data in sink.entries)
        for attempt in (1, 2):
            try:
                lease = self._shared_memory_pool().lease(2 * inputs)
            except (RemoteLossError, OSError, wire_memory.HandoffRefusedError) as error:
                self._shared_memory_failed(error)
                return None
            answered = False
            try:
                sink.place(lease.reserve)
                offset, size = lease.reserve_outputs()
                output = request.output_shm
                output.region, output.offset, output.byte_size = lease.region, offset, size
                response = self._waiting_out_busy(lambda remaining: self.unary(request, remaining), deadline)
                check_shared_answer(response)
                try:
                    views = wire_memory.shared_memory_tensors(codec.tensors_of(response), lease.output_bytes)
                except (codec.CodecError, ValueError) as error:
                    raise malformed(str(error), kind="shared-memory ") from None
                answered = True
                return response, views
            except RemoteLossError as error:
                if not _region_forgotten(error) or attempt == 2:
                    raise
                # the server no longer knows our segments (it restarted, or this channel reconnected: a region
                # answers only the connection that registered it): hand over new ones, once
                log.info("losswire server forgot this client's shared memory (%s); registering again", error.details)
                self.pool.reset()
                sink.entries[:0] = sink.placed
                sink.placed.clear()
            finally:
                request.ClearField("output_shm")
                if answered:
                    lease.done()
                else:
                    lease.retire()  # the server may still write there: nobody reads it again
        return None  # unreachable: the second attempt returns or raises

    def _waiting_out_busy(self, call: Callable[[float | None], Any], deadline: float | None) -> Any:
        """``call(timeout)``, again after a busy answer (a RESOURCE_EXHAUSTED that passes: the server's
        big-call slots are taken) with RETRY_POLICY's backoff, until the deadline (or
        ``BUSY_PATIENCE_SECONDS`` without one): big calls wait their turn here, not in server threads."""
        patience = Patience(deadline)
        busy = None  # the last busy refusal, told with a deadline that then passes
        while True:
            try:
                return call(patience.remaining())
            except RemoteLossError as error:
                pause = patience.next_pause() if error.busy else None
                if pause is None:
                    raise after_busy(error, busy) from None
                busy = error
                log.debug("busy server (%s); again in %.2f s", error.details, pause)
                time.sleep(pause)

    def _shared_memory_failed(self, error: BaseException) -> None:
        """Shared memory did not work for a call: off for good (another host or network namespace, another
        user, an older server or one with it off), or, when the server or this host has no room now, for
        this call only. Logged once either way."""
        if isinstance(error, RemoteLossError):
            detail, room = error.details, error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(error, wire_memory.HandoffRefusedError):
            detail, room = error.message, error.status == wire_memory.RESOURCE_EXHAUSTED
        else:
            detail, room = f"{type(error).__name__}: {error}", error.errno in (errno.ENOSPC, errno.ENOMEM)
        if not room:
            self.shared_memory_usable = False
        if room and self._told_no_room:
            return
        self._told_no_room = self._told_no_room or room
        then = "this call's tensors go over gRPC" if room else "tensors go over gRPC"
        log.info("losswire: shared memory with %s does not work (%s); %s", self.connection.label, detail, then)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()  # unregister while the channel is open


def after_busy(failure: RemoteLossError, busy: RemoteLossError | None) -> RemoteLossError:
    """``failure``, and when it is the call's deadline passing during an attempt made after ``busy`` (the
    server's last busy refusal), that refusal too: what kept the call from an answer."""
    if busy is None or failure.code != grpc.StatusCode.DEADLINE_EXCEEDED:
        return failure
    details = f"{failure.details}; the attempt before was refused: {busy.code.name}: {busy.details}"
    return RemoteLossError(failure.code, details, failure.field)


def _region_forgotten(error: RemoteLossError) -> bool:
    """The server answered that a shared-memory region it was given is not registered there."""
    return error.code == grpc.StatusCode.NOT_FOUND and (error.field or "").endswith("shm.region")


def _receive_stream(
    request: pb.EvaluateRequest, first: Any, responses: Any, buffers: BufferPool, descriptions: Descriptions
) -> Answer:
    """The response of an EvaluateStream: its first message (after the early chunks of pred's gradients,
    with ``early_gradients``), then the chunks of its big tensors."""
    try:
        early = None  # made at the first chunk that comes before the response (EvaluateResponse.early)
        while first is not None and first.WhichOneof("kind") == "chunk":
            early = early or chunks.StreamAssembler(_early_gradients(request), allocate=buffers.take)
            early.add(first.chunk)
            first = next(responses, None)
        if first is None:
            raise codec.CodecError("the stream ended without a response")
        if first.WhichOneof("kind") != "response":
            raise codec.CodecError(f"the first message carries {first.WhichOneof('kind')}, not the response")
        check_answer(request, first.response, descriptions)  # before its tensors' buffers are allocated
        done = {path: early and early.tensors.get(path) for path in first.response.early}
        if None in done.values():
            missing = [path for path, tensor in done.items() if tensor is None]
            raise codec.CodecError(f"the response lists {missing} as sent early, but not all of their bytes came")
        flat = {path: tensor.reshape(-1).view(torch.uint8) for path, tensor in done.items()}
        assembler = chunks.StreamAssembler(first.response, allocate=buffers.take, early=flat)
        for message in responses:
            if message.WhichOneof("kind") != "chunk":
                raise codec.CodecError(f"a later message carries {message.WhichOneof('kind')}, not a chunk")
            assembler.add(message.chunk)
        return first.response, assembler.finish()
    except codec.CodecError as error:
        responses.cancel()
        raise malformed(str(error), kind="EvaluateStream ") from None
    except RemoteLossError:
        responses.cancel()
        raise


def _early_gradients(request: pb.EvaluateRequest) -> pb.EvaluateResponse:
    """What may come before the response of an EvaluateStream sent with ``early_gradients``: the gradient of
    each term's pred alone, in pred's dtype and shape (``results[i].gradients[pred]``)."""
    expected = pb.EvaluateResponse()
    for term in request.terms:
        result = expected.results.add()
        if list(term.gradients) in ([], ["pred"]) and term.HasField("pred"):
            result.gradients["pred"].CopyFrom(pb.Tensor(dtype=term.pred.dtype, shape=term.pred.shape))
    return expected


def _renumbered(error: RemoteLossError, indices: Sequence[int]) -> RemoteLossError:
    """An error about ``terms[i]`` of a per-session request, or about ``results[i]`` of its answer, about
    the caller's ``terms[indices[i]]`` / ``results[indices[i]]`` (in the field path and in the message)."""

    def renumber(text: str) -> str:
        return re.sub(
            r"\b(terms|results)\[(\d+)\]",
            lambda m: f"{m[1]}[{indices[int(m[2])]}]" if int(m[2]) < len(indices) else m[0],
            text,
        )

    field = None if error.field is None else renumber(error.field)
    return RemoteLossError(error.code, renumber(error.details), field)
