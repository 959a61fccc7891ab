"""Where a request enters: the thin LossService servicer.

validate -> decode (``losswire.client.codec``) -> evaluate (``evaluate.Evaluator``, no gRPC) ->
encode. Every failure leaves through ``status.to_status``; no exception escapes as UNKNOWN.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire.buffers import BufferPool

from . import __version__
from .evaluate import (
    CallCancelledError,
    Evaluator,
    TermOutcome,
    TermRequest,
    as_memory_error,
    check_cancelled,
    is_out_of_memory,
    split_sampler,
)
from .limits import RequestLimits, check_request
from .losses import LOSSES, LossDescription, Registry, output_kind_of
from .losses import fused as fused_kernels
from .losses.provenance import implementation_digest
from .losses.schema import keeps_state
from .malformed import MalformedRequest, malformed_error, stream_deserializer
from .sampling import build_sampler, sampler_config
from .sessions import Session, SessionStore
from .shared_memory import SharedMemoryRegistry
from .status import RequestError, to_status

log = logging.getLogger("losswire.server")
STAGES = ("decode", "compute", "encode")
SERVICE = pb.DESCRIPTOR.services_by_name["LossService"].full_name
# A caller whose deadline passes cancels the call itself (RST_STREAM), a little before the server's own
# copy of the deadline (it started counting when the request arrived): a call that ends this close to
# its deadline is counted DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_SECONDS = 0.25
# an answer's tensors of at least this many bytes go into the caller's output_shm range; smaller ones
# cost less inline than a reference does
SHARED_MEMORY_MIN_OUTPUT_BYTES = 4096


# frees big calls' tensors after their answers have left (see release_after): one thread, in order
_RELEASER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="losswire-release")


def release_after(context: grpc.ServicerContext, objects: list[Any]) -> None:
    """Free ``objects`` (a call's big tensors) once its answer has been sent, in another thread.

    Freeing hundreds of MiB of tensors returns their pages to the system (munmap), which takes
    milliseconds per 100 MiB: done before the handler returns, the caller would wait for it.
    """
    if objects and not context.add_callback(lambda: _RELEASER.submit(objects.clear)):
        objects.clear()  # the call is over already


class _Position:
    """Where a call is: the term being decoded or evaluated, for the error's message and field."""

    __slots__ = ("term_path", "where")

    def __init__(self) -> None:
        self.where, self.term_path = "", ""


def _term_label(index: int, name: str) -> str:
    return f"terms[{index}]" + (f" ({name})" if name else "")


class CallWatch:
    """Turns true once the caller is gone: it cancelled, its deadline passed, or the connection dropped.

    gRPC runs ``add_callback`` callbacks when a call ends; one that ends while its handler still works
    was ended by the caller's side, and the work left is wasted. The handler asks this flag between
    stages (a plain callable, so the evaluator stays free of gRPC) and stops at the next one.
    """

    def __init__(self, context: grpc.ServicerContext, method: str) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.handled = False  # set once the handler has its answer (or error): the call then ends normally
        self._gone = threading.Event()
        if not context.add_callback(self._ended):
            self._gone.set()  # over before the handler even started (cancelled while queued)

    def _ended(self) -> None:
        if not self.handled:
            elapsed_ms = (time.perf_counter() - self.started) * 1e3
            log.debug(
                "%s: the caller cancelled or its deadline passed after %.1f ms; the call stops at its next stage",
                self.method,
                elapsed_ms,
            )
        self._gone.set()

    def __call__(self) -> bool:
        return self._gone.is_set()


def _attempt(context: grpc.ServicerContext) -> int:
    """Which attempt of the caller's call this is: a gRPC retry (after UNAVAILABLE or an overload
    answer) carries ``grpc-previous-rpc-attempts``, the number of attempts before it."""
    previous = dict(context.invocation_metadata() or ()).get("grpc-previous-rpc-attempts", "0")
    return 1 + int(previous) if str(previous).isdigit() else 1


def _release_memory(error: BaseException, where: str) -> None:
    """After an out-of-memory: free the failed call's intermediates (the traceback's frames hold the
    autograd graph) and, on CUDA, hand the allocator's cached blocks back to the driver, so the next
    call, or another process on the GPU, starts from the memory really in use."""
    error.__traceback__ = None
    error.__context__ = error.__cause__ = None
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    log.warning("%s: out of memory, answered RESOURCE_EXHAUSTED: %s", where or "call", str(error).splitlines()[0])


def _gradient_writer(
    reserve: chunks.Reserve, written: dict[int, tuple[str, int]]
) -> Callable[[torch.Size, torch.dtype], torch.Tensor | None]:
    """A ``TermRequest.gradient_out`` that gives fused kernels room in the caller's output range, so
    their gradient is the answer as it lies (``written`` maps its address to region and offset)."""

    def writer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = math.prod(shape) * dtype.itemsize
        spot = reserve(nbytes) if nbytes else None
        if spot is None:
            return None
        region, offset, destination = spot
        written[destination.data_ptr()] = (region, offset)
        return destination.view(dtype).reshape(shape)

    return writer


def _pooled(buffers: BufferPool) -> Callable[[torch.Size, torch.dtype], torch.Tensor | None]:
    """A ``TermRequest.gradient_out`` that gives fused kernels a buffer from ``buffers``."""

    def writer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return buffers.take(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)

    return writer


def add_to_server(service: LossService, server: grpc.Server) -> None:
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
    server.add_registered_method_handlers(SERVICE, {"EvaluateStream": stream})


class LossService(pb_grpc.LossServiceServicer):
    """Evaluates loss terms on ``device`` with the losses of ``registry``.

    ``limits`` bound what one request may hold (its ``max_elements`` overrides ``max_elements``);
    ``max_stream_calls`` bounds the big calls (EvaluateStream, or Evaluate with tensors in shared
    memory) served at once (keep it below the server's worker threads, so that small calls always
    find one).
    """

    def __init__(
        self,
        device: torch.device,
        registry: Registry = LOSSES,
        max_elements: int | None = None,
        sessions: SessionStore | None = None,
        limits: RequestLimits | None = None,
        max_stream_calls: int = 2,
        fused: bool = True,
        shared_memory: SharedMemoryRegistry | None = None,
        buffers: BufferPool | None = None,
    ) -> None:
        self.device = device
        self.registry = registry
        self.limits = limits if limits is not None else RequestLimits(max_elements=max_elements)
        self.max_elements = self.limits.max_elements
        self.sessions = sessions if sessions is not None else SessionStore(registry, device)
        self.evaluator = Evaluator(registry, self.sessions, fused)
        self.shared_memory = shared_memory if shared_memory is not None else SharedMemoryRegistry(enabled=False)
        # streamed tensors are reassembled into, and fused kernels write streamed answers into,
        # buffers reused call after call: fresh memory costs a page fault per 4 KiB on first write
        self.buffers = buffers if buffers is not None else BufferPool(0)
        # Big calls (streamed, or with tensors in shared memory) admitted at once, receiving, evaluating
        # or sending. One beyond is refused at once (RESOURCE_EXHAUSTED, retryable) rather than queued:
        # a queued one would hold a worker thread, and with max_stream_calls below the server's worker
        # count, small unary calls always find a worker however many big ones arrive. It also bounds
        # the memory big calls hold.
        self.max_stream_calls = max_stream_calls
        self._stream_slots = threading.BoundedSemaphore(max_stream_calls)
        self._stream_count, self._stream_count_lock = 0, threading.Lock()
        self._implementations: dict[str, str] = {}  # loss name -> provenance digest

    # -- Evaluate --------------------------------------------------------------------------------

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:  # noqa: N802
        started = time.perf_counter()
        caller_gone = CallWatch(context, "Evaluate")
        at = _Position()
        try:
            check_cancelled(caller_gone, "the whole call")  # it waited in the queue while its caller gave up
            tensors = check_request(request, self.limits)  # sizes from the declared shapes, before decoding
            shared = self.shared_memory.inputs(tensors, self.max_elements)  # views of the caller's pages
            # a call with tensors in shared memory is a big call: it takes one of the streams' slots
            admitted = bool(shared) or request.HasField("output_shm")
            if admitted and not self._admit_stream():
                admitted = False
                raise self._busy()
            big: list[Any] = []
            try:
                response = self._evaluate(request, caller_gone, started, at, shared or None, keep=big)
            finally:
                if admitted:
                    self._release_stream()
        except Exception as error:
            caller_gone.handled = True
            self._abort(context, error, at.where, at.term_path)
        caller_gone.handled = True
        self._log_call("Evaluate", request, response, context)
        release_after(context, big)
        return response

    def EvaluateStream(  # noqa: N802
        self, request_iterator: Iterator[pb.EvaluateChunk], context: grpc.ServicerContext
    ) -> Iterator[pb.EvaluateChunk]:
        """Evaluate with big tensors in chunks (see the .proto): the request, then its tensors' chunks,
        in; the response, then its tensors' chunks, out. Admitted ``max_stream_calls`` at a time."""
        started = time.perf_counter()
        caller_gone = CallWatch(context, "EvaluateStream")
        at = _Position()
        admitted = False
        try:
            try:
                check_cancelled(caller_gone, "the whole call")
                request = self._stream_header(request_iterator)
                tensors = check_request(request, self.limits)  # declared shapes, before the assembler allocates
                admitted = self._admit_stream()
                if not admitted:
                    raise self._busy()
                shared = self.shared_memory.inputs(tensors, self.max_elements)  # a header may name some too
                assembler = chunks.StreamAssembler(request, self.max_elements, self.buffers.take)
                for message in request_iterator:
                    if isinstance(message, MalformedRequest):
                        raise malformed_error(message, f"message {assembler.chunks + 2} of the stream", "chunk")
                    kind = message.WhichOneof("kind")
                    if kind != "chunk":
                        raise RequestError(
                            f"message {assembler.chunks + 2} of the stream carries {kind or 'nothing'}; only the first "
                            "carries the request, every later one a chunk",
                            field="chunk",
                        )
                    assembler.add(message.chunk)
                check_cancelled(caller_gone, "receiving the stream")
                streamed = {**assembler.finish(), **shared}
                del assembler, shared
                sink = chunks.StreamSink()
                response = self._evaluate(request, caller_gone, started, at, streamed, sink)
                del streamed  # the request's tensors go before the response is sent
            except Exception as error:
                caller_gone.handled = True
                if caller_gone() and not isinstance(error, CallCancelledError):
                    # reading a cancelled call's stream fails with gRPC's own error: the caller is gone
                    error = CallCancelledError(f"the caller went away while streaming ({type(error).__name__})")
                self._abort(context, error, at.where, at.term_path)
            caller_gone.handled = True
            self._log_call("EvaluateStream", request, response, context)
            yield from chunks.stream_chunks(response, sink)  # chunks as serialized bytes (STREAM_HANDLER)
        finally:
            if admitted:
                self._release_stream()

    def _busy(self) -> RequestError:
        return RequestError(
            f"the server is serving its maximum of {self.max_stream_calls} big calls (streamed, or with tensors in "
            "shared memory) (losswire serve --max-stream-calls); retry later",
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            retryable=True,
        )

    def stream_calls_in_flight(self) -> int:
        """EvaluateStream calls admitted now (receiving, evaluating or sending)."""
        with self._stream_count_lock:
            return self._stream_count

    def _admit_stream(self) -> bool:
        if not self._stream_slots.acquire(blocking=False):
            return False
        with self._stream_count_lock:
            self._stream_count += 1
        return True

    def _release_stream(self) -> None:
        with self._stream_count_lock:
            self._stream_count -= 1
        self._stream_slots.release()

    @staticmethod
    def _stream_header(request_iterator: Iterator[pb.EvaluateChunk]) -> pb.EvaluateRequest:
        first = next(request_iterator, None)
        if isinstance(first, MalformedRequest):
            raise malformed_error(first, "the stream's first message", "request")
        kind = None if first is None else first.WhichOneof("kind")
        if kind != "request":
            got = "the stream ended without a message" if first is None else f"it carries {kind or 'nothing'}"
            raise RequestError(
                f"the stream's first message must carry the request (EvaluateChunk.request); {got}", field="request"
            )
        return first.request

    def _evaluate(
        self,
        request: pb.EvaluateRequest,
        caller_gone: CallWatch,
        started: float,
        at: _Position,
        streamed: Mapping[str, torch.Tensor] | None = None,
        sink: chunks.StreamSink | None = None,
        keep: list[Any] | None = None,
    ) -> pb.EvaluateResponse:
        """decode -> evaluate -> encode, for Evaluate and EvaluateStream alike; raises on failure
        (``at`` says which term). ``streamed``: tensors that arrived in chunks, by field path;
        ``streamed`` holds those in shared memory too (views of the caller's pages).
        ``sink``: where the response's big tensors go to be streamed (None: inline). ``keep``: a call
        whose tensors are big (streamed or in shared memory) appends its tensors there, for the
        caller to free after the answer has left (see ``release_after``)."""
        transfer = request.transfer_dtype
        if transfer not in (pb.DTYPE_UNSPECIFIED, *codec.TRANSFER_DTYPES.values()):
            got = pb.DType.Name(transfer) if transfer in pb.DType.values() else str(transfer)
            raise RequestError(f"transfer_dtype must be unset, FLOAT16 or BFLOAT16, got {got}", field="transfer_dtype")
        names = self._check_terms(request.terms)
        output_range, own_sink = None, False
        if request.HasField("output_shm"):
            output_range = self.shared_memory.output_range(request.output_shm)  # checked before computing
            if sink is None:  # a unary answer: what does not go to shared memory goes inline
                sink, own_sink = chunks.StreamSink(SHARED_MEMORY_MIN_OUTPUT_BYTES), True
        terms = []
        for index, (message, name) in enumerate(zip(request.terms, names, strict=True)):
            at.where, at.term_path = _term_label(index, message.name), f"terms[{index}]."
            terms.append(self._decode_term(message, name, f"terms[{index}]", streamed))
        in_place: dict[int, tuple[str, int]] = {}  # gradients a kernel wrote into the output range
        writer = None  # where fused kernels write pred's gradient (None: memory of their own)
        if output_range is not None and not transfer and self.device.type == "cpu":
            writer = _gradient_writer(output_range, in_place)
        elif sink is not None and self.device.type == "cpu":  # streamed back: into a reused buffer
            writer = _pooled(self.buffers)
        if writer is not None:
            terms = [dataclasses.replace(term, gradient_out=writer) for term in terms]
        decoded = time.perf_counter()
        outcomes = []
        for index, term in enumerate(terms):
            at.where, at.term_path = _term_label(index, term.name), f"terms[{index}]."
            outcomes.append(self.evaluator.evaluate(term, caller_gone))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        computed = time.perf_counter()
        at.where, at.term_path = "", ""
        check_cancelled(caller_gone, "encoding the answer")
        response = pb.EvaluateResponse(device=str(self.device), server_version=__version__)
        for term, outcome in zip(terms, outcomes, strict=True):
            result = response.results.add(implementation=self.implementation(term.config["type"]))
            self._encode_outcome(outcome, result, transfer, sink, in_place)
        if output_range is not None:
            sink.place(output_range)  # the big answers into the caller's output range: one copy each
            if own_sink:
                sink.inline(placed=False)  # those that did not fit
        encoded = time.perf_counter()
        if keep is not None and (streamed or output_range is not None):
            keep.extend((terms, outcomes, streamed))
        timings = response.timings
        timings.decode_ms = (decoded - started) * 1e3
        timings.compute_ms = (computed - decoded) * 1e3
        timings.encode_ms = (encoded - computed) * 1e3
        return response

    @staticmethod
    def _log_call(
        method: str, request: pb.EvaluateRequest, response: pb.EvaluateResponse, context: grpc.ServicerContext
    ) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        timings = response.timings
        losses = [t.config.fields["type"].string_value if "type" in t.config.fields else "?" for t in request.terms]
        attempt = _attempt(context)
        log.debug(
            "%s %s: decode %.2f ms, compute %.2f ms, encode %.2f ms%s",
            method,
            ",".join(losses),
            timings.decode_ms,
            timings.compute_ms,
            timings.encode_ms,
            f", attempt {attempt}" if attempt > 1 else "",
            # fields of their own in --log-format json
            extra={
                "rpc": method,
                "losses": losses,
                "attempt": attempt,
                **{f"{k}_ms": getattr(timings, f"{k}_ms") for k in STAGES},
            },
        )

    @staticmethod
    def _check_terms(terms: Iterable[pb.LossTerm]) -> list[str]:
        names = [t.name for t in terms]
        if not names:
            raise RequestError("the request has no terms; send at least one LossTerm", field="terms")
        if len(names) > 1:
            for index, name in enumerate(names):
                if not name:
                    raise RequestError(
                        f"terms[{index}].name is empty; name every term of a multi-term request",
                        field=f"terms[{index}].name",
                    )
                if names.index(name) != index:
                    raise RequestError(
                        f"terms[{index}].name {name!r} repeats terms[{names.index(name)}]", field=f"terms[{index}].name"
                    )
        return names

    def _decode_term(
        self, message: pb.LossTerm, name: str, field: str, streamed: Mapping[str, torch.Tensor] | None = None
    ) -> TermRequest:
        device, limit = self.device, self.max_elements
        config = codec.decode_config(message.config)
        if not config:
            raise RequestError(f'{field}.config is empty; send {{"type": "<loss name>", ...}}', field=f"{field}.config")
        if not message.HasField("pred"):
            raise RequestError(
                f"{field}.pred is missing; every term needs its prediction tensor", field=f"{field}.pred"
            )

        def optional(name: str, decode: Callable[..., Any] | None = None) -> Any:
            """The decoded field, or None when the caller did not send it."""
            if not message.HasField(name):
                return None
            value = getattr(message, name)
            return value if decode is None else decode(value, f"{field}.{name}", device, limit, streamed)

        return TermRequest(
            name=name,
            config=config,
            pred=codec.decode_tensor(message.pred, f"{field}.pred", device, limit, streamed),
            target=optional("target", codec.decode_value),
            weight=optional("weight", codec.decode_tensor),
            avg_factor=optional("avg_factor"),
            reduction_override=optional("reduction_override"),
            inputs={
                k: codec.decode_value(v, f"{field}.inputs[{k}]", device, limit, streamed)
                for k, v in message.inputs.items()
            },
            gradients=list(message.gradients) or ["pred"],
            grad_output=optional("grad_output", codec.decode_tensor),
            grad_outputs={
                k: codec.decode_tensor(v, f"{field}.grad_outputs[{k}]", device, limit, streamed)
                for k, v in message.grad_outputs.items()
            },
            session=message.session,
            replay_step=optional("replay_step"),
            forward_id=message.forward_id,
            seed=optional("seed"),
            sample_labels=optional("sample_labels", codec.decode_tensor),
            sample_groups=optional("sample_groups", codec.decode_tensor),
        )

    @staticmethod
    def _encode_outcome(
        outcome: TermOutcome,
        out: pb.TermResult,
        transfer: int = 0,
        sink: chunks.StreamSink | None = None,
        in_place: Mapping[int, tuple[str, int]] | None = None,
    ) -> None:
        def encode(tensor: torch.Tensor, message: pb.Tensor) -> None:
            spot = in_place.get(tensor.data_ptr()) if in_place else None
            if spot is not None and tensor.is_contiguous():
                codec.encode_shared(tensor, message, *spot)  # written where the caller reads it: no copy
            else:
                codec.encode_tensor(tensor, message, transfer_dtype=transfer, sink=sink)

        out.name = outcome.name
        out.structure = outcome.structure
        if outcome.structure == "tensor":
            (part,) = outcome.parts
            encode(part.loss, out.loss)
            for key, grad in {**part.gradients, **outcome.gradients}.items():
                encode(grad, out.gradients[key])
        else:
            for part in outcome.parts:
                encoded = out.parts.add(key=part.key, output=part.output.value)
                encode(part.loss, encoded.loss)
                for key, grad in part.gradients.items():
                    encode(grad, encoded.gradients[key])
            for key, grad in outcome.gradients.items():
                encode(grad, out.gradients[key])
        out.output = outcome.parts[0].output.value
        out.separable = outcome.separable
        out.sample_axis = outcome.sample_axis
        out.session_step = outcome.session_step
        if outcome.sampled is not None:
            out.sampled.positives = outcome.sampled.positives.numel()
            out.sampled.negatives = outcome.sampled.negatives.numel()

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: Exception, where: str, term_path: str) -> None:
        if isinstance(error, CallCancelledError):
            # nobody reads this answer; the status is for the server's metrics and logs
            expired = context.time_remaining() <= DEADLINE_SLACK_SECONDS
            gone = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            message = f"{where}: {error}" if where else str(error)
            log.debug("Evaluate stopped (%s): %s", gone.name, message)
            context.abort(gone, message)
        error = as_memory_error(error)
        if is_out_of_memory(error):
            _release_memory(error, where)
        status = to_status(error, where, term_path)
        if status.code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", where or "Evaluate")
        else:
            log.debug("refused: %s", status.details)
        context.abort_with_status(status)

    # -- Describe / ListLosses -------------------------------------------------------------------

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:  # noqa: N802
        try:
            config, sampler = split_sampler(codec.decode_config(request.config))
            config = self.registry.normalise(config)
            module = self.registry.build(config)
            description = self.registry.describe(config["type"])
            response = pb.DescribeResponse(
                output=output_kind_of(module, description).value,
                stateful=keeps_state(module),
                server_version=__version__,
            )
            describe(description, response.loss, self.implementation(description.name))
            if sampler is not None:
                config["sampler"] = sampler_config(build_sampler(sampler))
            codec.encode_config(config, response.config)
        except Exception as error:
            self._abort(context, error, "config", "")
        return response

    # -- sessions ---------------------------------------------------------------------------------

    def GetSession(self, request: pb.SessionRequest, context: grpc.ServicerContext) -> pb.SessionInfo:  # noqa: N802
        try:
            session = self.sessions.get(request.session)
            with session.lock:  # a consistent state, between two forwards
                return self._session_info(session, with_state=True)
        except Exception as error:
            self._abort(context, error, "session", "")

    def ResetSession(self, request: pb.SessionRequest, context: grpc.ServicerContext) -> pb.SessionInfo:  # noqa: N802
        try:
            session = self.sessions.reset(request.session)
            log.info("session %s reset after %d steps", session.name, session.steps)
            return self._session_info(session, with_state=True)
        except Exception as error:
            self._abort(context, error, "session", "")

    def ListSessions(  # noqa: N802
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        response = pb.ListSessionsResponse()
        for session in self.sessions.sessions():
            response.sessions.append(self._session_info(session, with_state=False))
        return response

    # -- shared memory -----------------------------------------------------------------------------

    def RegisterSharedMemory(  # noqa: N802
        self, request: pb.RegisterSharedMemoryRequest, context: grpc.ServicerContext
    ) -> pb.RegisterSharedMemoryResponse:
        try:
            region = self.shared_memory.register(request.name, request.byte_size, request.nonce)
        except Exception as error:
            self._abort(context, error, "shared memory", "")
        return pb.RegisterSharedMemoryResponse(region=region)

    def UnregisterSharedMemory(  # noqa: N802
        self, request: pb.UnregisterSharedMemoryRequest, context: grpc.ServicerContext
    ) -> pb.UnregisterSharedMemoryResponse:
        try:
            self.shared_memory.unregister(request.region)
        except Exception as error:
            self._abort(context, error, "shared memory", "")
        return pb.UnregisterSharedMemoryResponse()

    def _session_info(self, session: Session, with_state: bool) -> pb.SessionInfo:
        info = pb.SessionInfo(
            session=session.name,
            steps=session.steps,
            idle_seconds=self.sessions.idle(session),
            expires_in_seconds=self.sessions.expires_in(session),
        )
        codec.encode_config(session.config, info.config)
        if with_state:
            for key, value in session.state().items():
                codec.encode_tensor(value, info.state[key])
        return info

    def ListLosses(self, request: pb.ListLossesRequest, context: grpc.ServicerContext) -> pb.ListLossesResponse:  # noqa: N802
        response = pb.ListLossesResponse(server_version=__version__, device=str(self.device))
        for description in self.registry.descriptions():
            describe(description, response.losses.add(), self.implementation(description.name))
        return response

    def implementation(self, name: str) -> str:
        """The provenance digest of loss ``name`` on this server (``losses.provenance``), computed once."""
        digest = self._implementations.get(name)
        if digest is None:
            fused_file = fused_kernels.kernel_source(self.registry.get(name)) if self.evaluator.fused else None
            digest = implementation_digest(self.registry, name, fused_file=fused_file, device_type=self.device.type)
            self._implementations[name] = digest
        return digest


def describe(description: LossDescription, out: pb.LossInfo, implementation: str = "") -> None:
    """Engine description -> ``losswire.v1.LossInfo``."""
    out.name = description.name
    out.implementation = implementation
    out.stateful = description.stateful
    out.extra_inputs = description.extra_inputs
    out.summary = description.summary
    for spec in description.params:
        param = out.params.add(name=spec.name, type=spec.type, nullable=spec.nullable)
        param.default.CopyFrom(codec.json_value(spec.default))
        param.choices.extend(codec.json_value(c) for c in spec.choices or ())
    for spec in description.inputs:
        item = out.inputs.add(name=spec.name, kind=spec.kind, optional=spec.optional)
        item.default.CopyFrom(codec.json_value(spec.default))
        item.choices.extend(codec.json_value(c) for c in spec.choices or ())
    out.output = description.output.value
    out.output_variants.update({k: v.value for k, v in description.output_variants.items()})
    out.differentiable.extend(description.differentiable)
    out.separable = description.separable
    out.sample_axis = description.sample_axis
    out.stochastic = description.stochastic
