"""What an answer may hold, checked against its request before anything of it is allocated or used.

An answer is bytes from the wire like any other: a faulty or hostile server must not make the client
allocate what it declares, hand autograd a gradient of another shape (autograd would sum it down to
the input's shape without a word), or index parts that are not there. :func:`check_answer` reads only
what the answer declares (counts, keys, shapes, dtypes), so it runs before a streamed answer's buffers
are allocated; a broken answer is ``RemoteLossError`` DATA_LOSS naming the response field.

* one result per term, its structure one of tensor / tuple / dict, the parts' keys distinct;
* a gradient only for an input the term asked for, of that input's shape and dtype exactly;
* losses of a floating-point dtype, together at most the bytes the request declared plus
  ``LOSS_SLACK_BYTES`` (a built-in loss's output is never larger than its pred);
* each loss of the shape its term implies, where the client knows it (:mod:`.loss_shapes`: shape []
  under reduction 'mean' or 'sum', pred's shape for an element-wise loss under 'none', one value per
  sample for a per-sample one), from the term and the loss's description (``descriptions``);
* and, for an answer through shared memory (:func:`check_shared_answer`), ``shm`` references that do
  not overlap: two gradients never share memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NoReturn

import grpc
import torch

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from .errors import RemoteLossError
from .loss_shapes import Descriptions, expected_shape

STRUCTURES = ("", "tensor", "tuple", "dict")
LOSS_SLACK_BYTES = 64 << 20  # what losses may declare beyond the request's own bytes (a plugin's [N, N] loss)


def check_answer(
    request: pb.EvaluateRequest, response: pb.EvaluateResponse, descriptions: Descriptions | None = None
) -> None:
    """Refuse (DATA_LOSS) an answer that ``request`` cannot have (see the module docstring); the losses'
    shapes are checked for the terms whose loss ``descriptions`` describes."""
    if len(response.results) != len(request.terms):
        _refuse(f"the answer holds {len(response.results)} results for {len(request.terms)} terms", "results")
    losses, allowed = 0, None  # the request's bytes are added up only once the losses pass the slack
    for index, (term, result) in enumerate(zip(request.terms, response.results, strict=True)):
        expected = expected_shape(term, descriptions)
        several = result.structure in ("tuple", "dict")
        for path, loss, gradients in _outputs(result, f"results[{index}]"):
            losses += _loss_bytes(loss, f"{path}.loss")
            problem = expected.problem(loss.shape, several) if expected is not None else None
            if problem is not None:
                _refuse(f"{path}.loss must have {problem}, got {list(loss.shape)}", f"{path}.loss")
            if losses > LOSS_SLACK_BYTES:
                allowed = allowed if allowed is not None else _declared_bytes(request) + LOSS_SLACK_BYTES
                if losses > allowed:
                    _refuse(
                        f"the answer's losses declare more bytes than the request sent plus {LOSS_SLACK_BYTES} "
                        f"(at {path}.loss, shape {list(loss.shape)})",
                        f"{path}.loss",
                    )
            for key, gradient in gradients.items():
                _check_gradient(term, key, gradient, f"{path}.gradients[{key}]")


def _outputs(result: pb.TermResult, path: str) -> Iterator[tuple[str, pb.Tensor, dict[str, pb.Tensor]]]:
    """(path, loss, gradients) of each output tensor of ``result``: itself, or each of its parts."""
    if result.structure not in STRUCTURES:
        _refuse(f"{path}.structure must be one of tensor, tuple or dict, got {result.structure!r}", f"{path}.structure")
    if result.structure in ("", "tensor"):
        if result.parts:
            _refuse(f"{path} is a single tensor but holds {len(result.parts)} parts", f"{path}.parts")
        yield path, result.loss, dict(result.gradients)
        return
    keys = [part.key for part in result.parts]
    if not keys or len(set(keys)) != len(keys):
        _refuse(f"{path} is a {result.structure} whose parts' keys must be distinct and present, got {keys}", path)
    for j, part in enumerate(result.parts):
        yield f"{path}.parts[{j}]", part.loss, dict(part.gradients)


def _loss_bytes(loss: pb.Tensor, field: str) -> int:
    dtype = _dtype(loss, field)
    if not dtype.is_floating_point:
        _refuse(f"{field} must be a floating-point tensor, got {pb.DType.Name(loss.dtype)}", field)
    return _numel(loss, field) * dtype.itemsize


def _check_gradient(term: pb.LossTerm, key: str, gradient: pb.Tensor, field: str) -> None:
    """``gradient`` must be that of an input ``term`` sent and asked the gradient of, shaped and typed as
    it. An input asked for by the loss's own name of its first or second input (``cls_score``) rather
    than the wire's (``pred``) is not known here: its gradient must match one of the term's tensors."""
    asked = list(term.gradients) or ["pred"]
    if key.partition("[")[0] not in asked:
        _refuse(f"{field}: the request asked for no gradient of {key!r} (it asked for {asked})", field)
    sent = _input(term, key)
    candidates = [sent] if sent is not None else [tensor for _, tensor in codec.tensors_of(term)]
    if not any(list(gradient.shape) == list(c.shape) and gradient.dtype == c.dtype for c in candidates):
        got = pb.DType.Name(gradient.dtype) if gradient.dtype in pb.DType.values() else str(gradient.dtype)
        expected = (
            f"its input's shape {list(sent.shape)} and dtype {pb.DType.Name(sent.dtype)}"
            if sent is not None
            else "the shape and dtype of one of the term's tensors"
        )
        _refuse(f"{field} must have {expected}, got {list(gradient.shape)} and {got}", field)


def _input(term: pb.LossTerm, key: str) -> pb.Tensor | None:
    """The tensor ``term`` sent under a gradient key: pred, target, weight, an input by name, or the
    ``i``-th tensor of a tuple (``target[1]``)."""
    name, _, rest = key.partition("[")
    if name == "pred":
        return term.pred if term.HasField("pred") and not rest else None
    if name == "weight" and term.HasField("weight"):
        return None if rest else term.weight
    if name == "target":
        value = term.target if term.HasField("target") else None
    else:
        value = term.inputs.get(name)
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if not rest:
        return value.tensor if kind == "tensor" else None
    index = rest.removesuffix("]")
    items = value.tensors.items if kind == "tensors" else ()
    return items[int(index)] if index.isdigit() and int(index) < len(items) else None


def _declared_bytes(request: pb.EvaluateRequest) -> int:
    """The bytes of every tensor ``request`` declares, in their declared dtypes (sent inline or not)."""
    return sum(
        _numel(tensor, path) * _dtype(tensor, path).itemsize
        for path, tensor in codec.tensors_of(request)
        if tensor.dtype in codec.DTYPE_TO_TORCH
    )


def check_shared_answer(response: pb.EvaluateResponse) -> None:
    """Refuse (DATA_LOSS) a shared-memory answer whose tensors share bytes (each range is checked against
    the caller's output range where it is viewed); after :func:`check_answer`."""
    spans = sorted(
        (tensor.shm.region, tensor.shm.offset, tensor.shm.offset + tensor.shm.byte_size, path)
        for path, tensor in codec.tensors_of(response)
        if tensor.HasField("shm") and tensor.shm.byte_size
    )
    for (region, _, end, path), (next_region, start, _, next_path) in itertools.pairwise(spans):
        if region == next_region and start < end:
            _refuse(f"{next_path} overlaps {path} in shared memory: two answers cannot share bytes", next_path)


def _dtype(tensor: pb.Tensor, field: str) -> torch.dtype:
    try:
        return codec.wire_dtypes(tensor, field)[0]
    except codec.CodecError as error:
        _refuse(str(error), field)


def _numel(tensor: pb.Tensor, field: str) -> int:
    try:
        return codec.check_shape(list(tensor.shape), field)
    except codec.CodecError as error:
        _refuse(str(error), field)


def malformed(detail: str, field: str | None = None, kind: str = "") -> RemoteLossError:
    """The error of an answer that is the server's fault (DATA_LOSS): "a malformed {kind}answer: {detail}"."""
    return RemoteLossError(grpc.StatusCode.DATA_LOSS, f"a malformed {kind}answer: {detail}", field)


def _refuse(message: str, field: str) -> NoReturn:
    raise malformed(message, field)
