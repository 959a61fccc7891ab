"""Where a call's outputs go, and the engine's ``TermOutcome``s encoded into ``TermResult``s.

An answer's tensors leave one of three ways: inline in the response message; held back in a
``chunks.StreamSink`` to follow the response in chunks (a streamed call); or written into the caller's
shared-memory output range (``EvaluateRequest.output_shm``). A fused kernel may write pred's gradient
straight where it will be read (:func:`gradient_writer`): into the caller's output range, so the
answer names it where it lies and nothing is copied, or into a reused buffer for a streamed answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec
from losswire.wire.buffers import BufferPool

from ..evaluation import TermOutcome
from ..evaluation.errors import check_cancelled

# (shape, dtype) -> a tensor to write pred's gradient into, or None (the kernel allocates)
GradientOut = Callable[[torch.Size, torch.dtype], "torch.Tensor | None"]
# a gradient's data address -> (region, offset) where a kernel wrote it in the caller's output range
InPlace = dict[int, tuple[str, int]]


def while_alive(reserve: chunks.Reserve, cancelled: Callable[[], bool]) -> chunks.Reserve:
    """``reserve`` (room in the caller's output range) that refuses once the call has ended: nothing is
    placed into a caller's memory after its call (CallCancelledError, as the call's next stage would)."""

    def alive(nbytes: int) -> tuple[str, int, torch.Tensor] | None:
        check_cancelled(cancelled, "writing the answer into the caller's shared memory")
        return reserve(nbytes)

    return alive


def into_output_range(reserve: chunks.Reserve, written: InPlace, cancelled: Callable[[], bool]) -> GradientOut:
    """Room in the caller's output range for fused kernels' gradients (``written`` records where), given
    only while the call is alive: a kernel asked after its caller went away writes into memory of its own."""

    def writer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        if cancelled():
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        spot = reserve(nbytes) if nbytes else None
        if spot is None:
            return None
        region, offset, destination = spot
        written[destination.data_ptr()] = (region, offset)
        return destination.view(dtype).reshape(shape)

    return writer


def into_pooled_buffers(buffers: BufferPool) -> GradientOut:
    """Reused buffers for fused kernels' gradients that will be streamed back."""

    def writer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return buffers.take(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)

    return writer


def encode_outcome(
    outcome: TermOutcome,
    out: pb.TermResult,
    transfer: int = 0,
    sink: chunks.StreamSink | None = None,
    in_place: Mapping[int, tuple[str, int]] | None = None,
    allocate: codec.Allocate | None = None,
    stage: codec.Stage | None = None,
) -> None:
    """One evaluated term -> ``out``; big tensors into ``sink`` when given, gradients a kernel wrote
    into the caller's output range named where they lie; tensors narrowed to ``transfer`` into
    ``allocate``'s memory; a device's tensors brought to the host by ``stage``."""

    def encode(tensor: torch.Tensor, message: pb.Tensor) -> None:
        spot = in_place.get(tensor.data_ptr()) if in_place else None
        if spot is not None and tensor.is_contiguous():
            codec.encode_shared(tensor, message, *spot)  # written where the caller reads it: no copy
        else:
            codec.encode_tensor(tensor, message, transfer_dtype=transfer, sink=sink, allocate=allocate, stage=stage)

    out.name = outcome.name
    out.structure = outcome.structure
    if outcome.structure == "tensor":
        (part,) = outcome.parts
        encode(part.loss, out.loss)
        for key, grad in {**part.gradients, **outcome.gradients}.items():
            encode(grad, out.gradients[key])
        out.constant.extend(sorted(part.constant | outcome.constant))
    else:
        for part in outcome.parts:
            encoded = out.parts.add(key=part.key, output=part.output.value)
            encode(part.loss, encoded.loss)
            for key, grad in part.gradients.items():
                encode(grad, encoded.gradients[key])
            encoded.constant.extend(sorted(part.constant))
        for key, grad in outcome.gradients.items():
            encode(grad, out.gradients[key])
        out.constant.extend(sorted(outcome.constant))
    out.output = outcome.parts[0].output.value
    out.separable = outcome.separable
    out.sample_axis = outcome.sample_axis
    out.session_step = outcome.session_step
    if outcome.sampled is not None:
        out.sampled.positives = outcome.sampled.positives.numel()
        out.sampled.negatives = outcome.sampled.negatives.numel()
