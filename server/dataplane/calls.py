"""One call, whatever door it came through: the dataplane.

Unary ``Evaluate``, ``EvaluateStream``, calls with tensors in shared memory and the Open Inference
Protocol's ``ModelInfer`` all arrive here as a ``losswire.v1.EvaluateRequest`` (the front doors convert
to it), so every limit and safeguard is written once and holds for every door:

    limits on declared shapes -> admission of big calls -> decode into the engine's terms
      -> evaluate (cancellation between stages) -> where outputs go -> encode -> timings

Transport-free: no gRPC here. A caller that went away is a plain ``cancelled()`` flag; errors are typed
(``server/errors.py``, the engine's, the codec's) and wrapped in ``TermError`` when a term raised them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from google.protobuf import struct_pb2

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec
from losswire.wire.buffers import BufferPool
from losswire.wire.protocol import SHARED_MEMORY_MIN_OUTPUT_BYTES

from .. import __version__
from ..errors import LimitExceededError, RequestError, ServerBusyError, TermError
from ..evaluation import CallCancelledError, Evaluator, SessionStore, TermOutcome, TermRequest, split_sampler
from ..evaluation.errors import check_cancelled
from ..evaluation.sampling import build_sampler, sampler_config
from ..evaluation.sessions import EnteringError, Transaction, holding
from ..losses import LOSSES, Registry, output_kind_of
from ..losses import fused as fused_kernels
from ..losses.cost import Estimate
from ..losses.fused.compiled import compiled_source
from ..losses.provenance import implementation_digest
from ..losses.schema import keeps_state
from .admission import BigCallSlots
from .answer import Answer, AtTerm
from .budget import MemoryBudget
from .costs import TermCosts
from .decode import Arrived, check_transfer_dtype, decode_term, term_names
from .descriptions import loss_info, session_info
from .encode import InPlace, encode_outcome, into_output_range, into_pooled_buffers, while_alive
from .limits import RequestLimits, check_json_bytes, check_request
from .memory import released_if_out_of_memory
from .overlap import Overlap
from .shared_memory import Caller, SharedMemoryRegistry, values_read_in_place

Cancelled = Callable[[], bool]
NO_SESSIONS = contextlib.nullcontext(None)  # a call whose terms name no session enters none

# A quick call is evaluated by its front door where it arrived (the event loop) instead of on a compute
# thread: handing a 2 ms call to a thread and back costs it ~0.15 ms of CPU. Quick means a CPU device,
# stateless, by losswire's own losses (whose costs are calibrated; a plugin's are not known), with no
# sampler, no shared memory, and an estimated forward + backward of at most QUICK_MAX_WORK units (~0.5 ns
# each: about a millisecond, the longest the loop then stalls) and QUICK_MAX_BYTES of working memory.
QUICK_MAX_WORK = 2_000_000
QUICK_MAX_BYTES = 8 << 20
# Configs and JSON inputs become Python values in Python, ~5 us a value, before any cost is known: a quick
# call's are at most this big on the wire (read from the message's sizes), or a caller's 950 KB of nested
# junk held the event loop 0.35 s a call while every other call waited
QUICK_MAX_JSON_BYTES = 16 << 10
# each term costs a fixed ~0.6 ms of Python beyond its loss (decode, checks, encode): 256 tiny terms held the
# event loop 140-210 ms
QUICK_MAX_TERMS = 8
JSON_KINDS = {"list_value": "list", "struct_value": "object"}  # protobuf's Value kinds, as a message names them


class NotQuick(Exception):  # noqa: N818 (a signal to the front door, not an error of the caller's)
    """Raised by ``Dataplane.evaluate(quick=True)`` for a call that is not quick, before anything of it
    is held, built or changed: the front door then evaluates it on a compute thread."""


def _small_structures(request: pb.EvaluateRequest) -> bool:
    """Whether ``request`` has at most ``QUICK_MAX_TERMS`` terms, and every config and JSON input of it is at
    most ``QUICK_MAX_JSON_BYTES`` on the wire."""
    if len(request.terms) > QUICK_MAX_TERMS:
        return False
    for term in request.terms:
        if term.config.ByteSize() > QUICK_MAX_JSON_BYTES:
            return False
        for value in (term.target, *term.inputs.values()):
            if value.WhichOneof("kind") == "json" and value.json.ByteSize() > QUICK_MAX_JSON_BYTES:
                return False
    return True


def sessions_of(terms: list[TermRequest], replays: bool = False) -> dict[str, dict[str, Any]]:
    """The sessions a call's new forwards name (``replays``: those its replays name, which only read a
    session), with their loss configs."""
    named = (term for term in terms if term.session and (term.replay_step is not None) == replays)
    return {term.session: split_sampler(term.config)[0] for term in named}


class Dataplane:
    """Evaluates calls on ``device`` with the losses of ``registry``, within ``limits``.

    ``slots`` bounds the big calls (streamed, or with tensors in shared memory) served at once, and
    ``slots_per_token`` those of one token (None: no bound per token);
    ``shared_memory`` holds the callers' registered regions (each answers only the ``caller`` that
    registered it: the front door says who a call comes from); ``buffers`` lends reused memory to
    streamed tensors and their answers; ``fused``: answer terms a fused kernel covers without autograd
    (``gpu_kernels``: compiled into one pass each on a GPU);
    ``overlap``: compute a streamed call that asks for early gradients as its rows arrive;
    ``stage``: how tensors cross between the host and a CUDA device (pinned buffers; None: ``Tensor.to``).
    """

    def __init__(
        self,
        device: torch.device,
        registry: Registry = LOSSES,
        sessions: SessionStore | None = None,
        limits: RequestLimits | None = None,
        slots: int = 2,
        slots_per_token: int | None = None,
        shared_memory: SharedMemoryRegistry | None = None,
        buffers: BufferPool | None = None,
        fused: bool = True,
        gpu_kernels: bool = True,
        budget: MemoryBudget | None = None,
        costs: TermCosts | None = None,
        overlap: bool = True,
        stage: codec.Stage | None = None,
    ) -> None:
        self.device = device
        self.stage = stage
        self.overlap = overlap  # streamed calls that ask may be computed as they arrive (see overlap.py)
        self.registry = registry
        self.limits = limits if limits is not None else RequestLimits()
        self.sessions = sessions if sessions is not None else SessionStore(registry, device)
        self.evaluator = Evaluator(registry, self.sessions, fused, gpu_kernels)
        self.slots = BigCallSlots(slots, slots_per_token)
        self.shared_memory = shared_memory if shared_memory is not None else SharedMemoryRegistry(enabled=False)
        # streamed tensors are reassembled into, and fused kernels write streamed answers into, buffers
        # reused call after call: fresh memory costs a page fault per 4 KiB on first write
        self.buffers = buffers if buffers is not None else BufferPool(0)
        self._implementations: dict[str, str] = {}  # loss name -> provenance digest
        self.budget = budget if budget is not None else MemoryBudget(None)
        self.costs = costs if costs is not None else TermCosts(registry)

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(
        self,
        request: pb.EvaluateRequest,
        cancelled: Cancelled,
        arrived: Callable[[], Arrived] | None = None,
        owner: str = "",
        caller: Caller | None = None,
        quick: bool = False,
    ) -> Answer:
        """A call whose request came whole: tensors inline, in shared memory (then a big call), or
        ``arrived()`` by field path (a front door's converter hands them over once the limits have
        passed). The answer comes inline, or into the caller's shared-memory output range. ``owner``: whose
        sessions the call may use (see ``evaluation.sessions``); ``caller``: whose shared-memory regions it
        may name (None: nobody's). ``quick``: evaluate it only if it is quick (see ``QUICK_MAX_WORK``), else
        raise ``NotQuick``."""
        if quick and self.device.type != "cpu":
            # on a GPU a call copies to the device and waits for it (behind any big call's kernels), and a
            # term's first compiled kernel takes seconds: none of that on the event loop
            raise NotQuick
        started = time.perf_counter()
        try:
            check_cancelled(cancelled, "the whole call")  # it waited in a queue while its caller gave up
            if request.HasField("lanes"):
                raise RequestError("lanes are for EvaluateStream: this call came whole, in one message", field="lanes")
            # sizes from the declared shapes, before decoding
            walked = check_request(request, self.limits)
            if quick and (request.HasField("output_shm") or any(tensor.HasField("shm") for _, tensor in walked)):
                raise NotQuick
            buffers, big = CallBuffers(self), False
            try:
                shared = self.shared_memory.inputs(
                    caller, walked, self.limits.max_elements, buffers.copy_of, self._in_place(request)
                )
                token = caller.token if caller is not None else ""
                if shared or request.HasField("output_shm"):
                    self.slots.take(token)
                    big = True
                tensors = ({**arrived(), **shared} if arrived is not None else shared) or None
                return self.run(
                    request, cancelled, started, tensors, owner=owner, caller=caller, quick=quick, held=buffers.taken
                )
            finally:
                if big:
                    self.slots.give_back(token)
                buffers.release()
        except (TermError, NotQuick):
            raise
        except Exception as error:
            raise released_if_out_of_memory(error, "the call") from None

    def open_stream(
        self, header: pb.EvaluateRequest, cancelled: Cancelled, owner: str = "", caller: Caller | None = None
    ) -> StreamIntake:
        """A streamed call (``EvaluateStream``) once its first message arrived, checked against the limits
        on its declared shapes. It holds nothing until its chunks come: each tensor's buffer is reserved
        in the memory budget and allocated at its first chunk, and the big-call slot is taken then."""
        started = time.perf_counter()
        check_cancelled(cancelled, "the whole call")
        walked = check_request(header, self.limits)
        stripes = chunks.Stripes.of(header)  # its chunks may come on several streams (lanes)
        buffers = CallBuffers(self)  # a header may name shared-memory tensors too: their copies are the call's
        try:
            shared = self.shared_memory.inputs(
                caller, walked, self.limits.max_elements, buffers.copy_of, self._in_place(header)
            )
        except BaseException:
            buffers.release()
            raise
        return StreamIntake(self, header, shared, started, owner, caller, stripes, buffers)

    def run(
        self,
        request: pb.EvaluateRequest,
        cancelled: Cancelled,
        started: float,
        arrived: Arrived | None,
        sink: chunks.StreamSink | None = None,
        owner: str = "",
        caller: Caller | None = None,
        quick: bool = False,
        held: int = 0,
    ) -> Answer:
        """decode -> evaluate -> encode, for every kind of call; ``sink`` holds back a streamed answer's
        big tensors; ``quick``: ``NotQuick`` once the costs show the call is not; ``held``: the memory
        budget the call's buffers hold already.

        Nothing is written into the caller's shared memory once the call has ended (its caller cancelled or
        its deadline passed): the output range hands out room only while ``cancelled()`` is false, to fused
        kernels and to the answer's placement alike."""
        if quick and not _small_structures(request):
            raise NotQuick
        transfer = check_transfer_dtype(request)
        term_names(request.terms)
        output_range, own_sink = None, False
        if request.HasField("output_shm"):
            # checked before computing; a reserve that refuses once the call has ended
            output_range = while_alive(self.shared_memory.output_range(caller, request.output_shm), cancelled)
            if sink is None:  # what does not go to shared memory goes inline
                sink, own_sink = chunks.StreamSink(SHARED_MEMORY_MIN_OUTPUT_BYTES), True
        terms = []
        limit, widen_into = self.limits.max_elements, self.buffers.take
        for index, message in enumerate(request.terms):
            with AtTerm(index, message.name):
                self._check_shallow(message.config)
                terms.append(
                    decode_term(message, f"terms[{index}]", self.device, limit, arrived, widen_into, self.stage)
                )
        in_place: InPlace = {}  # gradients a kernel wrote into the output range
        terms = self._place_gradients(terms, output_range, sink, transfer, in_place, cancelled)
        decoded = time.perf_counter()
        costs = []  # every term's cost within the limits before any session or module is built
        for index, term in enumerate(terms):
            with AtTerm(index, term.name):
                costs.append(self.costs.check(term, f"terms[{index}]."))
        if quick and not self._quick(terms, [estimate for estimate, _ in costs]):
            raise NotQuick
        outcomes, response = [], None
        # the call is atomic: its sessions change only if every term succeeds (evaluation.sessions)
        entered = self._sessions(owner, terms, cancelled) if any(term.session for term in terms) else NO_SESSIONS
        with entered as sessions:
            for index, (term, (estimate, field)) in enumerate(zip(terms, costs, strict=True)):
                reserved = self.budget.reserved(*self.term_memory(index, term, estimate, field), term=True, own=held)
                with AtTerm(index, term.name), reserved:
                    outcomes.append(self.evaluator.evaluate(term, cancelled, sessions))
            if sessions is not None:  # a caller gone by now must not find its sessions moved on
                check_cancelled(cancelled, "keeping the call's session changes")
                # nor find them moved on by a call whose answer could not be sent
                response = self.respond(terms, outcomes, transfer, sink, in_place)
                self._check_answer_size(response)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        computed = time.perf_counter()
        check_cancelled(cancelled, "encoding the answer")
        if response is None:
            response = self.respond(terms, outcomes, transfer, sink, in_place)
        if output_range is not None:
            check_cancelled(cancelled, "writing the answer into the caller's shared memory")
            sink.place(output_range)  # the big answers into the caller's output range: one copy each
            if own_sink:
                sink.inline(placed=False)  # those that did not fit
        encoded = time.perf_counter()
        timings = response.timings
        timings.decode_ms = (decoded - started) * 1e3
        timings.compute_ms = (computed - decoded) * 1e3
        timings.encode_ms = (encoded - computed) * 1e3
        keep = [terms, outcomes, arrived] if arrived or output_range is not None else []
        return Answer(response, None if own_sink else sink, keep)

    def _check_shallow(self, config: struct_pb2.Struct) -> None:
        """A big config's keys, and the kinds of their values, checked against its loss's parameters before any
        value is converted (~5 us a value, in Python): an unknown key or a float parameter with 950 KB of
        nested values under it cost 0.35 s of a compute thread, and of the interpreter lock, to be refused."""
        if config.ByteSize() <= QUICK_MAX_JSON_BYTES:
            return  # a small config costs little to convert: its values are checked as usual
        fields = config.fields
        if "type" in fields and fields["type"].WhichOneof("kind") == "string_value":
            kinds = {key: JSON_KINDS.get(value.WhichOneof("kind"), "value") for key, value in fields.items()}
            kinds.pop("type")
            kinds.pop("sampler", None)
            self.registry.check_shallow(fields["type"].string_value, kinds)

    def _check_answer_size(self, response: pb.EvaluateResponse) -> None:
        """Refuse an answer message over ``--max-message-bytes`` before the call's session changes are kept:
        gRPC would refuse to send it only once they were (and a retry would apply the batch again)."""
        limit = self.limits.max_request_bytes
        if limit is not None and (size := response.ByteSize()) > limit:
            raise LimitExceededError(
                f"the answer would be a {size}-byte message, over this server's {limit} (losswire serve "
                "--max-message-bytes); the call's sessions are left as they were. Ask for fewer outputs "
                "(reduction, gradients) or send the call by EvaluateStream, whose answer comes in chunks",
                field="terms",
            )

    def _in_place(self, request: pb.EvaluateRequest) -> Callable[[], frozenset[str]]:
        """Which of ``request``'s shared-memory inputs are read in place, worked out only if it has any."""
        return functools.partial(values_read_in_place, request.terms, self.registry)

    def term_memory(self, index: int, term: TermRequest, estimate: Estimate, field: str) -> tuple[int, str, str]:
        """(bytes, what, field) of the memory budget's reservation for term ``index``'s working memory."""
        what = f"{term.config.get('type')} on pred {list(term.pred.shape)} ({estimate.parameter})"
        return estimate.total_bytes, what, f"terms[{index}].{field}"

    def respond(
        self,
        terms: list[TermRequest],
        outcomes: list[TermOutcome],
        transfer: int,
        sink: chunks.StreamSink | None,
        in_place: InPlace | None,
    ) -> pb.EvaluateResponse:
        """The response of evaluated ``terms``: each outcome encoded with its loss's implementation digest."""
        response = pb.EvaluateResponse(device=str(self.device), server_version=__version__)
        for term, outcome in zip(terms, outcomes, strict=True):
            result = response.results.add(implementation=self.implementation(term.config["type"]))
            encode_outcome(outcome, result, transfer, sink, in_place, self.buffers.take, self.stage)
        return response

    def _quick(self, terms: list[TermRequest], estimates: list[Estimate]) -> bool:
        """Whether decoded ``terms`` of these cost ``estimates`` make a quick call (see ``QUICK_MAX_WORK``)."""
        plain = all(
            not term.session and "sampler" not in term.config and self.registry.own(term.config["type"])
            for term in terms
        )
        work = sum(estimate.work for estimate in estimates)
        held = sum(estimate.total_bytes for estimate in estimates)
        return plain and work <= QUICK_MAX_WORK and held <= QUICK_MAX_BYTES

    @contextlib.contextmanager
    def _sessions(self, owner: str, terms: list[TermRequest], cancelled: Cancelled) -> Iterator[Transaction]:
        """The sessions of the call's terms, fed or replayed, entered together before its first term (a wait
        for a busy one stops once the caller is gone); a refusal names the first term naming it."""
        stack = contextlib.ExitStack()
        try:
            fed, replayed = sessions_of(terms), sessions_of(terms, replays=True)
            sessions = stack.enter_context(self.sessions.transaction(owner, fed, replayed, cancelled))
        except EnteringError as entering:
            index = next((i for i, term in enumerate(terms) if term.session == entering.session), 0)
            raise TermError(index, terms[index].name, released_if_out_of_memory(entering.error, "")) from None
        with stack:
            yield sessions

    def _place_gradients(
        self,
        terms: list[TermRequest],
        output_range: chunks.Reserve | None,
        sink: chunks.StreamSink | None,
        transfer: int,
        in_place: InPlace,
        cancelled: Cancelled,
    ) -> list[TermRequest]:
        """Where fused kernels write pred's gradient: the caller's output range (read there, no copy) while
        the call is alive, a reused buffer for a streamed answer, else memory of their own; and, for either
        kind of big call, where they take their scratch tensors (reused buffers). CPU only: a GPU's answer is
        copied to the host anyway."""
        if self.device.type != "cpu" or (output_range is None and sink is None):
            return terms
        if output_range is not None and not transfer:
            writer = into_output_range(output_range, in_place, cancelled)
        elif sink is not None and output_range is None:
            writer = into_pooled_buffers(self.buffers)
        else:
            writer = None
        scratch = into_pooled_buffers(self.buffers)
        return [dataclasses.replace(term, gradient_out=writer, scratch=scratch) for term in terms]

    # -- descriptions -----------------------------------------------------------------------------

    def implementation(self, name: str) -> str:
        """The provenance digest of loss ``name`` on this server (``losses.provenance``), computed once."""
        digest = self._implementations.get(name)
        if digest is None:
            cls = self.registry.get(name)
            fused_file = fused_kernels.kernel_source(cls) if self.evaluator.fused else None
            if fused_file is not None and self.device.type == "cuda" and self.evaluator.one_pass is not None:
                fused_file = (*fused_file, *compiled_source(cls))  # its closed form is compiled there
            digest = implementation_digest(self.registry, name, fused_file=fused_file, device_type=self.device.type)
            self._implementations[name] = digest
        return digest

    def describe(self, message: struct_pb2.Struct) -> pb.DescribeResponse:
        """A loss config (``DescribeRequest.config``) checked and described: every parameter filled in, the
        output kind, statefulness. Decoded here, on a compute thread, once its size is checked."""
        check_json_bytes(message, "config")
        self._check_shallow(message)
        config, sampler = split_sampler(codec.decode_config(message))
        config = self.registry.normalise(config)
        estimate = self.registry.estimate(config)
        self.costs.check_module(estimate, config["type"], f"config.{estimate.module_parameter}")
        what = f"building {config['type']} ({estimate.module_parameter})"
        with self.budget.reserved(estimate.module_bytes, what, f"config.{estimate.module_parameter}", term=True):
            module = self.registry.build(config)
        description = self.registry.describe(config["type"])
        response = pb.DescribeResponse(
            output=output_kind_of(module, description).value, stateful=keeps_state(module), server_version=__version__
        )
        loss_info(description, response.loss, self.implementation(description.name))
        if sampler is not None:
            config["sampler"] = sampler_config(build_sampler(sampler))
        codec.encode_config(config, response.config)
        return response

    def list_losses(self) -> pb.ListLossesResponse:
        response = pb.ListLossesResponse(server_version=__version__, device=str(self.device))
        for description in self.registry.descriptions():
            loss_info(description, response.losses.add(), self.implementation(description.name))
        return response

    # -- sessions ---------------------------------------------------------------------------------

    def get_session(self, name: str, owner: str = "", cancelled: Cancelled | None = None) -> pb.SessionInfo:
        """Session ``name``'s state, consistent: read between two forwards (a call using it is waited for
        while ``cancelled()`` is false)."""
        session = self.sessions.get(name, owner)
        with holding(session, cancelled):
            return session_info(self.sessions, session, with_state=True)

    def reset_session(self, name: str, owner: str = "", cancelled: Cancelled | None = None) -> pb.SessionInfo:
        return session_info(self.sessions, self.sessions.reset(name, owner, cancelled), with_state=True)

    def list_sessions(self, owner: str = "") -> pb.ListSessionsResponse:
        infos = [session_info(self.sessions, s, with_state=False) for s in self.sessions.sessions(owner)]
        return pb.ListSessionsResponse(sessions=infos)

    # -- shared memory ----------------------------------------------------------------------------

    def shared_memory_endpoint(self, caller: Caller) -> pb.SharedMemoryEndpointResponse:
        address, key = self.shared_memory.endpoint(), self.shared_memory.connection_key(caller)
        return pb.SharedMemoryEndpointResponse(address=address, connection_key=key)

    def register_shared_memory(
        self, request: pb.RegisterSharedMemoryRequest, caller: Caller
    ) -> pb.RegisterSharedMemoryResponse:
        region = self.shared_memory.register(caller, request.claim, request.byte_size)
        return pb.RegisterSharedMemoryResponse(region=region)

    def unregister_shared_memory(self, request: pb.UnregisterSharedMemoryRequest, caller: Caller) -> None:
        self.shared_memory.unregister(caller, request.region)


class CallBuffers:
    """One call's buffers (a stream's assembled tensors, the copies of its shared-memory inputs): taken
    from the dataplane's reused buffers, their bytes held in the memory budget until ``release()``."""

    __slots__ = ("dataplane", "taken")

    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane, self.taken = dataplane, 0

    def take(self, nbytes: int, what: str, field: str | None = None) -> torch.Tensor:
        """``nbytes`` of memory for ``what`` (the budget's refusal names it, and ``field``)."""
        self.taken += self.dataplane.budget.take(nbytes, what, field=field, own=self.taken)
        return self.dataplane.buffers.take(nbytes)

    def copy_of(self, nbytes: int, field: str) -> torch.Tensor:
        """Room for the copy of the shared-memory input at ``field`` (``SharedMemoryRegistry.inputs``)."""
        return self.take(nbytes, f"the copy of {field}", f"{field}.shm")

    def release(self) -> None:
        if self.taken:
            self.dataplane.budget.give_back(self.taken)
            self.taken = 0


class StreamIntake:
    """A streamed call being received: its chunks copied once into buffers allocated from the declared
    shapes. From its first chunk (or its evaluation) it holds a big-call slot, and its buffers' bytes in
    the memory budget, until ``close()``, after its answer has been sent."""

    def __init__(
        self,
        dataplane: Dataplane,
        header: pb.EvaluateRequest,
        shared: Arrived,
        started: float,
        owner: str = "",
        caller: Caller | None = None,
        stripes: chunks.Stripes = chunks.ONE_STREAM,
        buffers: CallBuffers | None = None,
    ) -> None:
        """``buffers``: the call's, holding its header's copies of shared-memory inputs already; its
        chunks' buffers are taken there too, and all given back at ``close()``."""
        self.dataplane, self.header, self.started, self.owner = dataplane, header, started, owner
        self.caller = caller
        self._token = caller.token if caller is not None else ""  # whose slot it takes
        self.stripes = stripes  # how its bytes are spread over its streams (lanes)
        self._assembler: chunks.StreamAssembler | None = chunks.StreamAssembler(
            header, dataplane.limits.max_elements, self._allocate, stripes=stripes
        )
        self._shared: Arrived | None = shared
        self._slot = False
        self._buffers = buffers if buffers is not None else CallBuffers(dataplane)
        self._closed = False
        # computed while it arrives (EvaluateRequest.early_gradients), where the call allows it
        self.overlap = None if shared else Overlap.of(dataplane, header, self._assembler, self._buffers)

    @property
    def chunks(self) -> int:
        """Chunks received so far."""
        return self._assembler.chunks if self._assembler is not None else 0

    def add(self, chunk: Any, stream: int = 0) -> None:
        """Copy one ``TensorChunk``, which came on ``stream`` (0: the request's; i: lane i), into its tensor
        (a CodecError for one out of place; the budget's refusal for a tensor that does not fit now). After
        ``close()``: CallCancelledError, nothing taken (a reader still running when the call ended must not
        take a slot or memory nobody gives back)."""
        if self._closed:
            raise CallCancelledError("the call is over: a chunk read after its end is dropped")
        self._take_slot()
        try:
            if self.overlap is not None:
                self.overlap.begin()  # every tensor allocated before the first bytes come in
            self._assembler.add(chunk, stream)
        except (LimitExceededError, ServerBusyError) as error:
            error.field = error.field or f"{chunk.tensor}.shape"
            raise

    def owed(self, stream: int) -> list[tuple[str, int, int]]:
        """What ``stream`` (0: the request's, i: lane i) still owes of the call's tensors (see
        ``StreamAssembler.owed``); nothing once the call is being evaluated or is over."""
        return self._assembler.owed(stream) if self._assembler is not None else []

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return self._buffers.take(nbytes, "a streamed tensor")

    def _take_slot(self) -> None:
        if not self._slot:
            self.dataplane.slots.take(self._token)
            self._slot = True

    def evaluate(self, cancelled: Cancelled) -> Answer:
        """The stream has ended: evaluate; the answer's big tensors are held back to be streamed."""
        check_cancelled(cancelled, "receiving the stream")
        self._take_slot()
        arrived = {**self._assembler.finish(), **self._shared}
        self._assembler = self._shared = None  # the request's tensors go with the answer's keep list
        try:
            sink = chunks.StreamSink()
            if self.overlap is not None:
                if self.overlap.answers:
                    return self.overlap.finish(arrived, sink, cancelled)
                self.overlap.close()  # its reservation: the whole-call path reserves its own
            held = self._buffers.taken
            return self.dataplane.run(
                self.header, cancelled, self.started, arrived, sink, self.owner, self.caller, held=held
            )
        except TermError:
            raise
        except Exception as error:
            raise released_if_out_of_memory(error, "the call") from None

    def close(self) -> None:
        """The call is over (answered, refused or abandoned): its slot and its budget are free again."""
        self._closed = True
        self._assembler = self._shared = None
        if self.overlap is not None:
            self.overlap.close()
        if self._slot:
            self._slot = False
            self.dataplane.slots.give_back(self._token)
        self._buffers.release()
