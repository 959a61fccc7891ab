"""Limits that protect the server, checked on a request's declared shapes before anything is decoded.

A request names its tensors' shapes in a few bytes, so the checks here read only ``shape`` and
``dtype`` fields (never ``data``, which protobuf copies on every read) and refuse a request before
the codec wraps, copies, allocates or moves a single tensor:

- a tensor's rank (``--max-dims``): a malformed tensor more than a big one, so INVALID_ARGUMENT;
- a tensor's element count (``--max-elements``);
- the element count summed over every tensor of the request (``--max-request-elements``);
- the bytes its tensors declare, however they travel (inline, in chunks, in shared memory, or handed
  over by the Open Inference Protocol's converter): at most ``--max-message-bytes``, the bound gRPC
  itself puts on one message and so on the tensors inside it, so one request-size limit holds for
  every front door (a declared shape is refused by its size before its bytes are looked at, wherever
  they are);
- the number of terms (``--max-terms``);
- each config and JSON forward input: at most ``protocol.MAX_JSON_BYTES`` encoded (parsed, one takes
  about 50 times its bytes).

The size limits are ``LimitExceededError`` (RESOURCE_EXHAUSTED, marked not to be retried): the request
may be fine for another server, it is too big for this one on every retry.
"""

from __future__ import annotations

import dataclasses

from google.protobuf.message import Message

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec, protocol

from ..errors import LimitExceededError, RequestError


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may hold; None is unbounded."""

    max_elements: int | None = None  # per tensor
    max_request_elements: int | None = None  # summed over every tensor of the request
    max_terms: int | None = None
    max_dims: int = protocol.DEFAULT_MAX_DIMS
    max_request_bytes: int | None = protocol.MAX_MESSAGE_BYTES  # bytes its tensors declare, all together


Walked = list[tuple[str, pb.Tensor]]


def check_request(request: pb.EvaluateRequest, limits: RequestLimits) -> Walked:
    """Refuse a request over a limit before it is decoded; returns its tensors as walked (field
    path, Tensor: ``codec.tensors_of``), so that the caller need not walk the request again."""
    terms = len(request.terms)
    if limits.max_terms is not None and terms > limits.max_terms:
        raise LimitExceededError(
            f"the request has {terms} terms; this server accepts at most {limits.max_terms} per request "
            "(losswire serve --max-terms): split it into several calls",
            field="terms",
        )
    for index, term in enumerate(request.terms):
        _check_entries(term, f"terms[{index}].")
        _check_json_of(term, f"terms[{index}].")
    tensors = list(codec.tensors_of(request))
    _check_distinct_paths(tensors)
    total = nbytes = 0
    largest = ("", 0)
    for path, tensor in tensors:
        numel = codec.check_shape(list(tensor.shape), path, limits.max_dims, limits.max_elements)
        total += numel
        # every tensor's, inline too: a message's own are within gRPC's bound, at most this one, already
        nbytes += numel * codec.wire_itemsize(tensor, path)
        if numel > largest[1]:
            largest = (path, numel)
    path, numel = largest
    limit = limits.max_request_elements
    if limit is not None and total > limit:
        raise LimitExceededError(
            f"the request's tensors hold {total} elements in total (the largest, {path}, {numel}); this server "
            f"accepts at most {limit} per request (losswire serve --max-request-elements)",
            field=f"{path}.shape",
        )
    limit = limits.max_request_bytes
    if limit is not None and nbytes > limit:
        raise LimitExceededError(
            f"the request's tensors declare {nbytes} bytes in total (the largest, {path}, {numel} elements); this "
            f"server accepts at most {limit} bytes per request however they travel (losswire serve "
            "--max-message-bytes)",
            field=f"{path}.shape",
        )
    return tensors


def check_json_bytes(message: Message, field: str) -> None:
    """Refuse a config (``Struct``) or JSON value over ``protocol.MAX_JSON_BYTES`` encoded, before it is
    parsed into Python objects."""
    size = message.ByteSize()
    if size > protocol.MAX_JSON_BYTES:
        raise LimitExceededError(
            f"{field} is {size} bytes encoded; a config or JSON input may be at most {protocol.MAX_JSON_BYTES} "
            "(a real one is a few hundred bytes)",
            field=field,
        )


# Entries of one term's maps and lists (inputs, grad_outputs, gradients, a tuple's tensors): a loss has a
# handful of inputs. Each entry costs Python to walk, check and decode, ~10 us: 25,000 tiny tensors in a
# 600 KB request took 0.5 s of the event loop to refuse, and two callers sending them starved every other call
MAX_TERM_ENTRIES = 64


def _check_entries(term: pb.LossTerm, prefix: str) -> None:
    """Refuse a term with more than ``MAX_TERM_ENTRIES`` entries in a map or list, counted without reading them
    (the maps' own sizes first: the tuples of tensors are found by walking ``inputs``)."""
    _check_count(len(term.inputs), f"{prefix}inputs")
    _check_count(len(term.grad_outputs), f"{prefix}grad_outputs")
    _check_count(len(term.gradients), f"{prefix}gradients")
    values = [("target", term.target), *((f"inputs[{key}]", value) for key, value in term.inputs.items())]
    for name, value in values:
        if value.HasField("tensors"):
            _check_count(len(value.tensors.items), f"{prefix}{name}.tensors")


def _check_count(count: int, field: str) -> None:
    if count > MAX_TERM_ENTRIES:
        raise RequestError(
            f"{field} holds {count} entries; a term takes at most {MAX_TERM_ENTRIES} (a loss has a handful of inputs)",
            field=field,
        )


def _check_json_of(term: pb.LossTerm, prefix: str) -> None:
    """A term's config and its JSON forward inputs (the target, or an input by name)."""
    check_json_bytes(term.config, f"{prefix}config")
    if term.HasField("target") and term.target.WhichOneof("kind") == "json":
        check_json_bytes(term.target.json, f"{prefix}target")
    for name, value in term.inputs.items():
        if value.WhichOneof("kind") == "json":
            check_json_bytes(value.json, f"{prefix}inputs[{name}]")


def _check_distinct_paths(tensors: Walked) -> None:
    """Every tensor of the request has a field path of its own: chunks, shared-memory views and limits find
    tensors by it. A map key holding brackets or dots (``inputs["k].tensors.items[0"]``) can spell another
    tensor's path, and that tensor would be given bytes of another shape and dtype than it declares."""
    seen: set[str] = set()
    for path, _ in tensors:
        if path in seen:
            raise RequestError(
                f"two tensors of the request have the field path {path}: a map key (inputs, grad_outputs) may "
                "not spell another tensor's path; name inputs as the loss's forward does",
                field=path,
            )
        seen.add(path)
