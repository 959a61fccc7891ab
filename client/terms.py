"""One call of a RemoteLoss as a ``LossTerm``: which field each argument travels in, and which gradients.

* the loss's first two inputs go in ``pred`` and ``target`` whatever they are named, ``weight`` in its
  own field, a number ``avg_factor`` in its own field and a tensor one as the ``avg_factor`` input (so
  the server adds eps in the tensor's dtype, as mmdet does), the rest in ``inputs`` by name;
* every floating-point tensor input that requires grad asks for its gradient: ``"pred"`` and
  ``"target"`` for the first two, the input's forward name for the others (``"weight"``,
  ``"label_weights"``), as autograd would give it locally;
* a session (named, or the module's private one), the seed of a sampler or stochastic loss, and the
  sampler's labels and groups.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec

from .arguments import SAMPLE_GROUPS, SAMPLE_LABELS, TENSOR_KINDS, CallShape
from .errors import ArgumentError

if TYPE_CHECKING:
    from .client import LossClient

ALIASES = ("pred", "target")  # the wire's names of a loss's first two inputs


class TermLoss(Protocol):
    """What a term and its round trip ask of the module that made it (``module.RemoteLoss``): named
    here so that the module depends on terms and round trips, never the other way round."""

    cfg: dict[str, Any]
    client: LossClient
    seed: int | None
    transfer_dtype: str | None

    @property
    def info(self) -> pb.LossInfo: ...

    def call_shape(self) -> CallShape: ...

    def encoded_config(self) -> bytes: ...

    def term_session(self) -> str: ...

    def bind(self, *args: Any, **kwargs: Any) -> BoundTerm: ...

    def accept_answer(self, response: pb.EvaluateResponse, result: pb.TermResult, forward: bool = True) -> None: ...


@dataclasses.dataclass
class BoundTerm:
    """A RemoteLoss with the arguments of one call."""

    loss: TermLoss
    arguments: dict[str, Any]


@dataclasses.dataclass
class Leaf:
    """A tensor whose gradient comes back: of term ``term``, under ``key`` in the answer's gradients."""

    term: int
    key: str  # "pred", "target", "target[1]", "weight", "label_weights"...
    tensor: Tensor


def encode_term(
    bound: BoundTerm,
    message: pb.LossTerm,
    index: int,
    *,
    grad_enabled: bool,
    transfer: int,
    sink: chunks.StreamSink | None,
    allocate: codec.Allocate | None = None,
) -> list[Leaf]:
    """Fill ``message`` with ``bound``'s call; returns the tensors whose gradients it asks for. Tensors
    narrowed to ``transfer`` are cast into ``allocate``'s memory."""
    module = bound.loss
    shape = module.call_shape()
    message.config.MergeFromString(module.encoded_config())  # the Struct, encoded once per cfg
    options = {"transfer_dtype": transfer, "sink": sink, "allocate": allocate}
    for name, value in bound.arguments.items():
        if value is not None:
            _encode_argument(shape, name, value, message, options)
    _encode_extras(module, bound.arguments, message)
    leaves = _leaves(shape, bound.arguments, index) if grad_enabled else []
    message.gradients.extend(dict.fromkeys(leaf.key.partition("[")[0] for leaf in leaves) or ["none"])
    return leaves


def _encode_argument(shape: CallShape, name: str, value: Any, message: pb.LossTerm, options: dict[str, Any]) -> None:
    position = shape.names.index(name) if name in shape.names else None
    value = dense(value)
    try:
        if position == 0:
            codec.encode_tensor(value, message.pred, **options)
        elif position == 1:
            codec.encode_value(tuple(value) if _is_tensor_list(value) else value, message.target, **options)
        elif name in (SAMPLE_LABELS, SAMPLE_GROUPS):
            return  # sampler inputs travel with the extras
        elif name == "weight" and isinstance(value, Tensor):
            codec.encode_tensor(value, message.weight, **options)
        elif name == "avg_factor" and not isinstance(value, Tensor):
            message.avg_factor = float(value)
        elif name == "reduction_override":
            message.reduction_override = value
        else:  # a tensor avg_factor too: the server binds it as the input, in its own dtype
            codec.encode_value(value, message.inputs[name], **options)
    except (codec.CodecError, TypeError, ValueError) as error:
        raise ArgumentError(shape.loss, name, f"cannot be sent: {error}") from None


def dense(value: Any) -> Any:
    """A sparse tensor (or tuple / list member) as the dense tensor of the same values: the wire carries
    strided tensors only, and the local module computes the same numbers from either. A sparse tensor
    that requires grad never gets here (``arguments.check_argument`` refuses it)."""
    if isinstance(value, Tensor):
        return value if value.layout == torch.strided else value.to_dense()
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) and v.layout != torch.strided for v in value):
        return type(value)(dense(v) for v in value)
    return value


def _encode_extras(module: TermLoss, arguments: Mapping[str, Any], message: pb.LossTerm) -> None:
    """Session, sampler seed and labels: what the term needs beyond mmdet's forward arguments."""
    session = module.term_session()
    if session:
        message.session = session
        message.forward_id = uuid.uuid4().hex  # a retried call is recognised, not applied twice
    if "sampler" in module.cfg or module.info.stochastic:
        seed = module.seed
        if seed is None:  # from the caller's global generator: torch.manual_seed reproduces a run
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        message.seed = seed
        if arguments.get(SAMPLE_LABELS) is not None:
            codec.encode_tensor(arguments[SAMPLE_LABELS], message.sample_labels)
        if arguments.get(SAMPLE_GROUPS) is not None:
            codec.encode_tensor(arguments[SAMPLE_GROUPS], message.sample_groups)


def _leaves(shape: CallShape, arguments: Mapping[str, Any], term: int) -> list[Leaf]:
    """Every floating-point tensor input that requires grad (tensor inputs the loss describes)."""
    leaves = []
    for position, name in enumerate(shape.names):
        if shape.specs[name].kind not in TENSOR_KINDS:
            continue
        key = ALIASES[position] if position < len(ALIASES) else name
        leaves += [Leaf(term, k, t) for k, t in _requiring_grad(key, arguments.get(name))]
    return leaves


def _requiring_grad(key: str, value: Any) -> list[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        return [(key, value)] if value.requires_grad else []
    if isinstance(value, (tuple, list)):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, Tensor) and v.requires_grad]
    return []


def _is_tensor_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Tensor) for v in value)
