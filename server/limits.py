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

import grpc

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec, protocol

from .status import RequestError


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one ``Evaluate`` request may hold; None is unbounded."""

    max_elements: int | None = None  # per tensor
    max_request_elements: int | None = None  # summed over every tensor of the request
    max_terms: int | None = None
    max_dims: int = protocol.DEFAULT_MAX_DIMS


def check_request(request: pb.EvaluateRequest, limits: RequestLimits) -> list[tuple[str, pb.Tensor]]:
    """Refuse a request over a limit before it is decoded; returns its tensors as walked (field
    path, Tensor: ``codec.tensors_of``), so that the caller need not walk the request again."""
    terms = len(request.terms)
    if limits.max_terms is not None and terms > limits.max_terms:
        raise RequestError(
            f"the request has {terms} terms; this server accepts at most {limits.max_terms} per request "
            "(losswire serve --max-terms): split it into several calls",
            field="terms",
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    total, largest = 0, ("", 0)
    tensors = list(codec.tensors_of(request))
    for path, tensor in tensors:
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
    return tensors
