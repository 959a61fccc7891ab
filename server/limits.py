"""Limits that protect the server, checked on a request's declared shapes before anything is decoded.

A request names its tensors' shapes in a few bytes, so the checks here read only ``shape`` fields
(never ``data``, which protobuf copies on every read) and refuse a request before the codec wraps,
copies or moves a single tensor: a tensor's rank (``--max-dims``, INVALID_ARGUMENT: a malformed
tensor more than a big one), its element count (``--max-elements``), the element count summed over
every tensor of the request (``--max-request-elements``) and the number of terms (``--max-terms``).

The size limits answer RESOURCE_EXHAUSTED, like the message-size limit gRPC itself enforces: the
request may be fine for another server, it is too big for this one. It will be too big on every
retry too, so ``status.to_status`` marks these answers as not to be retried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
from google.protobuf.message import Message

from losswire.client import codec
from losswire.v1 import loss_service_pb2 as pb

from .status import RequestError

PACKAGE = pb.DESCRIPTOR.package  # "losswire.v1": the only messages that can hold tensors


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one ``Evaluate`` request may hold; None is unbounded."""

    max_elements: int | None = None  # per tensor
    max_request_elements: int | None = None  # summed over every tensor of the request
    max_terms: int | None = None
    max_dims: int = codec.MAX_DIMS


def tensors_of(message: Message, path: str = "") -> Iterator[tuple[str, pb.Tensor]]:
    """Every ``losswire.v1.Tensor`` inside ``message``, with the field path the codec names it by.

    Walks the message by its descriptor, so a tensor field added to the contract later is counted
    without touching this code. A ``Value``'s ``tensor`` is named by the Value's own path
    (``terms[0].target``), as the codec's messages name it.
    """
    if isinstance(message, pb.Tensor):
        yield path, message
        return
    for field, value in message.ListFields():
        kind = field.message_type
        if kind is None or not kind.full_name.startswith(PACKAGE + "."):
            continue  # scalars, and google.protobuf's Struct/Value (configs, JSON inputs): no tensors
        if isinstance(message, pb.Value) and field.name == "tensor":
            child = path
        else:
            child = f"{path}.{field.name}" if path else field.name
        if kind.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    yield from tensors_of(item, f"{child}[{key}]")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from tensors_of(item, f"{child}[{index}]")
        else:
            yield from tensors_of(value, child)


def check_request(request: pb.EvaluateRequest, limits: RequestLimits) -> int:
    """Refuse a request over a limit before it is decoded; returns its element count."""
    terms = len(request.terms)
    if limits.max_terms is not None and terms > limits.max_terms:
        raise RequestError(
            f"the request has {terms} terms; this server accepts at most {limits.max_terms} per request "
            "(losswire serve --max-terms): split it into several calls",
            field="terms",
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    total, largest = 0, ("", 0)
    for path, tensor in tensors_of(request):
        numel = codec.check_shape(list(tensor.shape), path, limits.max_dims, limits.max_elements)
        total += numel
        if numel > largest[1]:
            largest = (path, numel)
    limit = limits.max_request_elements
    if limit is not None and total > limit:
        path, numel = largest
        raise RequestError(
            f"the request's tensors hold {total} elements in total (the largest, {path}, {numel}); this server "
            f"accepts at most {limit} per request (losswire serve --max-request-elements)",
            field=f"{path}.shape",
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return total
