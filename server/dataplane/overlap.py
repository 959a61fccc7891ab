"""A streamed call computed while it arrives (``EvaluateRequest.early_gradients``).

A big FocalLoss call (or QualityFocalLoss: any loss whose fused kernel is a ``RowKernel``) spends about
as long on the wire as in the kernel; done one after the other, its round trip is upload + compute +
download. Here the term starts as soon as its first chunk is in: its tensors
are allocated whole at once, the fused kernel works through the blocks of rows every input already
holds (``Evaluator.start_rows``), and the rows of pred's gradient it has finished go back to the caller
while the rest is still arriving, so the round trip approaches the longest of the three instead.

The answer is the one the whole-call path gives, bit for bit: the kernel's blocks and arithmetic are
the same, only their time differs. A block whose values the kernel does not cover (a non-finite input, a
label out of range) ends the overlap: the term is then evaluated whole once every row is in, as any
call, and the early gradient bytes are void (the response does not list them in ``early``).

Transport-free, like the rest of the dataplane: the front door reads chunks into the intake, asks
``ready()`` which rows every input holds, runs ``step(rows)`` on a compute thread (one at a time per
call), and sends ``early_chunks()`` as they come; the intake's ``evaluate`` finishes the call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec
from losswire.wire.buffers import BufferPool
from losswire.wire.protocol import STREAM_CHUNK_BYTES

from ..evaluation import Evaluator, TermOutcome, TermRequest, TermRows
from ..evaluation.errors import check_cancelled
from ..losses import LossError, Registry
from ..losses import fused as fused_kernels
from ..losses.cost import Estimate
from .answer import Answer, AtTerm
from .budget import MemoryBudget
from .costs import TermCosts
from .decode import decode_term
from .encode import InPlace, into_pooled_buffers
from .limits import RequestLimits

PRED_PATH = "terms[0].pred"
STEP_MIN_BYTES = 1 << 20  # a step waits for this much of pred's new rows (or an eighth of pred; or the last)
GRADIENT_PATH = "results[0].gradients[pred]"


class Plane(Protocol):
    """What an overlap uses of the dataplane that runs it (``calls.Dataplane``), named here so that this
    module depends on nothing of ``calls``, which builds overlaps."""

    overlap: bool
    device: torch.device
    registry: Registry
    evaluator: Evaluator
    limits: RequestLimits
    buffers: BufferPool
    budget: MemoryBudget
    costs: TermCosts

    def term_memory(self, index: int, term: TermRequest, estimate: Estimate, field: str) -> tuple[int, str, str]: ...

    def respond(
        self,
        terms: list[TermRequest],
        outcomes: list[TermOutcome],
        transfer: int,
        sink: chunks.StreamSink | None,
        in_place: InPlace | None,
    ) -> pb.EvaluateResponse: ...


def _has_row_kernel(dataplane: Plane, term: pb.LossTerm) -> bool:
    """Whether the term's loss (the config's ``type`` as sent; its config is checked at the first step)
    has a fused kernel that works row by row, and fused kernels are on."""
    fields = term.config.fields
    name = fields["type"].string_value if "type" in fields else ""
    try:
        loss_class = dataplane.registry.get(name)
    except LossError:
        return False  # the whole-call path names what is wrong with it
    kernel = fused_kernels.FUSED_KERNELS.get(loss_class)
    return dataplane.evaluator.fused and kernel is not None and kernel.rows is not None


class Overlap:
    """The overlapped evaluation of a one-term streamed call (see the module docstring)."""

    def __init__(
        self, dataplane: Plane, header: pb.EvaluateRequest, assembler: chunks.StreamAssembler, buffers: Any = None
    ) -> None:
        """``buffers``: the call's (``CallBuffers``), whose budget its term's reservation adds to."""
        self.dataplane, self.header, self.assembler = dataplane, header, assembler
        self.buffers = buffers
        self.rows = header.terms[0].pred.shape[0]
        self.views: dict[str, torch.Tensor] = {}  # every streamed tensor, whole-sized (see begin)
        self.term_rows: TermRows | None = None
        self.off = False  # no overlap after all (not covered, or a block fell back): the whole-call path
        self.asked = 0  # rows the last step was given
        self.final = 0  # leading rows of the gradient that are final
        self.sent = 0  # gradient bytes handed out as early chunks
        self.reserved = 0  # the term's working memory, held in the budget from its start to close()
        self.started: float | None = None

    @classmethod
    def of(
        cls, dataplane: Plane, header: pb.EvaluateRequest, assembler: chunks.StreamAssembler, buffers: Any = None
    ) -> Overlap | None:
        """The overlap of a call that asks for it and may have it: one term, pred streamed with rows to
        count (at least 1-D, no dimension 0), on the CPU (blocks of rows are a CPU kernel's), no narrowed
        transfer, no shared memory. Any other call goes the whole-call path, which refuses what is wrong
        with it."""
        if not (dataplane.overlap and header.early_gradients) or len(header.terms) != 1:
            return None
        shape = header.terms[0].pred.shape
        if len(shape) == 0 or any(size <= 0 for size in shape):
            return None  # a 0-d pred has no rows, an empty one nothing to stream
        if dataplane.device.type != "cpu":
            return None
        if header.transfer_dtype or header.HasField("output_shm") or PRED_PATH not in assembler.streamed:
            return None
        if any(tensor.data_dtype for _, tensor in codec.tensors_of(header)):
            return None  # a narrowed tensor is widened whole when decoded: it would be read before it came
        if not _has_row_kernel(dataplane, header.terms[0]):
            return None  # allocated, decoded and computed as any streamed call
        return cls(dataplane, header, assembler, buffers)

    def begin(self) -> None:
        """Before the first chunk is copied in (on the event loop): every streamed tensor allocated."""
        if not self.views:
            self.views = self.assembler.allocate_all()

    def ready(self) -> int:
        """The leading rows that every streamed input holds (a tensor not indexed by pred's rows counts
        only once complete). On the event loop, between chunks."""
        if not self.views:
            return 0
        rows = self.rows
        for path, view in self.views.items():
            nbytes = view.numel() * view.element_size()
            got = self.assembler.received(path)
            if got == nbytes:
                continue
            if view.dim() == 0 or view.shape[0] != self.rows:
                return 0
            rows = min(rows, got // (nbytes // self.rows))
        return rows

    def wants_step(self) -> int | None:
        """Rows a new step would compute up to, or None when it has too little new to do: a step per
        chunk would cost a thread hand-off each for rows that fill no block yet."""
        if self.off or not self.views:
            return None
        rows = self.ready()
        if self.term_rows is None and self.asked == 0:
            return rows  # the first step starts the term (and refuses a bad one) without waiting for rows
        pred_bytes = self.views[PRED_PATH].nbytes
        worth = min(STEP_MIN_BYTES, pred_bytes // 8)
        if rows == self.rows or (rows - self.asked) * (pred_bytes // self.rows) >= worth:
            return rows if rows > self.asked else None
        return None

    def step(self, rows: int, cancelled: Callable[[], bool]) -> None:
        """Compute what ``rows`` leading rows allow (on a compute thread; the first step starts the term)."""
        self.asked = max(self.asked, rows)
        if self.off:
            return
        check_cancelled(cancelled, "the rows that arrived")
        if self.term_rows is None and not self._start():
            self.off = True
            return
        self.final = self.term_rows.advance(rows)
        self.off = self.term_rows.fell_back

    def _start(self) -> bool:
        self.started = time.perf_counter()
        plane, message = self.dataplane, self.header.terms[0]
        with AtTerm(0, message.name):
            term = decode_term(message, "terms[0]", plane.device, plane.limits.max_elements, self.views)
            pooled = into_pooled_buffers(plane.buffers)
            term = dataclasses.replace(term, gradient_out=pooled, scratch=pooled)
            estimate, field = plane.costs.check(term, "terms[0].")
            held = self.buffers.taken if self.buffers is not None else 0
            self.reserved = plane.budget.take(*plane.term_memory(0, term, estimate, field), term=True, own=held)
            self.term_rows = plane.evaluator.start_rows(term)
        return self.term_rows is not None

    def early_chunks(self) -> Iterator[bytes]:
        """The serialized chunks of the gradient's rows final since the last call (none once off), made
        one at a time as they are sent: a big last step holds one chunk's copy, not the gradient's."""
        if self.off or self.term_rows is None:
            return
        flat = self.term_rows.gradient.reshape(-1).view(torch.uint8)
        end = self.final * (flat.numel() // self.rows)
        while self.sent < end and not self.off:
            start, self.sent = self.sent, min(self.sent + STREAM_CHUNK_BYTES, end)
            yield chunks.chunk_wire_bytes(GRADIENT_PATH, start, flat[start : self.sent].numpy())

    @property
    def answers(self) -> bool:
        """Whether ``finish`` answers the call (else the whole-call path does)."""
        return not self.off and self.term_rows is not None

    def finish(
        self, arrived: dict[str, torch.Tensor], sink: chunks.StreamSink, cancelled: Callable[[], bool]
    ) -> Answer:
        """Every row is in: the rest of the blocks, the loss, and the answer whose gradient went (or goes,
        by ``early_chunks``) ahead of it; only when ``answers``."""
        plane, term_rows = self.dataplane, self.term_rows
        with AtTerm(0, self.header.terms[0].name):
            outcome = term_rows.finish(cancelled)
        computed = time.perf_counter()
        check_cancelled(cancelled, "encoding the answer")
        response = plane.respond([term_rows.term], [outcome], 0, sink, None)
        result = response.results[0]
        if not term_rows.fell_back:  # its gradient is the one written row by row: early, all of it
            self.final = self.rows
            gradient = result.gradients["pred"]
            sink.withdraw(gradient)
            gradient.ClearField("data")  # declared without data: a small one was encoded inline, its bytes went early
            response.early.append(GRADIENT_PATH)
        else:
            self.off = True
        timings = response.timings
        timings.compute_ms = (computed - self.started) * 1e3
        timings.encode_ms = (time.perf_counter() - computed) * 1e3
        return Answer(response, sink, [term_rows, outcome, arrived])

    def close(self) -> None:
        """The call is over: its reservation back, and its tensors let go (the answer's keep list frees
        them once sent), so their buffers return to the pool for the next call instead of waiting for a
        garbage collection."""
        if self.reserved:
            self.dataplane.budget.give_back(self.reserved)
            self.reserved = 0
        self.off = True
        self.views, self.term_rows, self.assembler = {}, None, None
