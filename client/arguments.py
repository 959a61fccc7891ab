"""A loss's forward arguments on the client: the signature its description defines, binding, and checks.

The server describes each loss's forward inputs in order (``LossInfo.inputs``: name, kind, optional,
default, choices) and whether the forward also takes other keywords (``extra_inputs``: mmdet's GHMC
takes ``**kwargs``, so heads pass it ``avg_factor``). A ``RemoteLoss`` takes exactly those arguments,
and :func:`check_argument` refuses a wrong one before anything is encoded, naming the loss, the
argument, what it accepts and what arrived (an ``ArgumentError``: a TypeError, and a RemoteLossError
INVALID_ARGUMENT as the server's refusal would be).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from .errors import ArgumentError

SAMPLE_LABELS, SAMPLE_GROUPS = "sample_labels", "sample_groups"
EXTRA = "kwargs"  # the name of the catch-all keyword parameter of a loss whose forward takes **kwargs
TENSOR_KINDS = frozenset({"tensor", "tensor_or_tuple", "tensors"})


def forward_signature(info: pb.LossInfo, sampled: bool) -> inspect.Signature:
    """The forward's signature: the described inputs, the sampler's keywords, ``**kwargs`` if taken."""
    parameters = [
        inspect.Parameter(
            item.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=codec.python_value(item.default) if item.optional else inspect.Parameter.empty,
        )
        for item in info.inputs
    ]
    if sampled:  # a sampler also takes the labels to sample by (default: the target) and image indices
        for name in (SAMPLE_LABELS, SAMPLE_GROUPS):
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    if info.extra_inputs:
        parameters.append(inspect.Parameter(EXTRA, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(parameters)


class CallShape:
    """A loss's forward arguments as the client needs them on every call, read once from its LossInfo."""

    __slots__ = ("extra", "keywords", "loss", "names", "required", "sampled", "signature", "specs")

    def __init__(self, info: pb.LossInfo, sampled: bool) -> None:
        self.loss = info.name
        self.names = tuple(item.name for item in info.inputs)
        self.required = tuple(item.name for item in info.inputs if not item.optional)
        self.specs = {item.name: item for item in info.inputs}
        self.signature = forward_signature(info, sampled)
        self.keywords = frozenset(self.signature.parameters) - {EXTRA}
        self.extra = info.extra_inputs
        self.sampled = sampled

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, as mmdet's module would take them (a TypeError for a wrong call);
        keywords a ``**kwargs`` forward collects are ordinary entries."""
        if len(args) <= len(self.names) and (not kwargs or self._takes(kwargs, len(args))):
            # the common call (positional, then known names not given twice): what Signature.bind
            # returns, without its per-call cost (~50 us); anything else goes to bind for its TypeError
            arguments = dict(zip(self.names, args, strict=False))
            arguments.update(kwargs)
            if all(name in arguments for name in self.required):
                return arguments
        try:
            bound = dict(self.signature.bind(*args, **kwargs).arguments)
        except TypeError as error:
            raise TypeError(f"{self.loss}: {error}; its forward is {self.loss}{self.signature}") from None
        extra = bound.pop(EXTRA, {})
        return {**bound, **extra}

    def _takes(self, kwargs: Mapping[str, Any], positional: int) -> bool:
        """Whether ``kwargs`` are all names the forward takes, not already given by the first ``positional``."""
        given = self.names[:positional]
        return all((key in self.keywords or self.extra) and key not in given for key in kwargs)

    def check(self, arguments: Mapping[str, Any]) -> None:
        """Refuse an argument the loss cannot take, before it is encoded (see :func:`check_argument`)."""
        for name, value in arguments.items():
            spec = self.specs.get(name)
            if spec is not None:
                check_argument(self.loss, spec, value)
                check_gradient(self.loss, spec, value)


def check_argument(loss: str, spec: pb.InputInfo, value: Any) -> None:
    """An :class:`ArgumentError` (a TypeError and a RemoteLossError) unless ``value`` is what input ``spec``
    of ``loss`` accepts."""
    if value is None:
        if spec.optional:
            return
        raise ArgumentError(loss, spec.name, f"is required ({describe_kind(spec)}), got None")
    if not _is_kind(spec.kind, value):
        raise ArgumentError(loss, spec.name, f"must be {describe_kind(spec)}, got {_described(value)}")
    for tensor in _tensors(value):
        _check_sendable(loss, spec.name, tensor)
    if value == "" and spec.name == "reduction_override":
        return  # mmdet's ``reduction_override if reduction_override else self.reduction``: "" keeps the config's
    choices = [codec.python_value(choice) for choice in spec.choices]
    if choices and value not in choices:
        raise ArgumentError(loss, spec.name, f"must be {describe_kind(spec)}, got {value!r}")


def check_gradient(loss: str, spec: pb.InputInfo, value: Any) -> None:
    """Refuse a tensor that requires grad in an input the server returns no gradient for (``avg_factor``).

    Locally autograd would carry that gradient (an ``avg_factor`` computed from ``pred`` without
    ``detach()`` adds a term to pred's gradient); remotely it would be lost without a word, a wrong
    gradient. mmdet's heads pass a detached count, so this meets only a caller's slip."""
    if spec.kind in TENSOR_KINDS or not torch.is_grad_enabled():
        return
    if isinstance(value, Tensor) and value.requires_grad:
        raise ArgumentError(
            loss,
            spec.name,
            f"requires grad ({_described(value)}), but the server returns gradients for tensor inputs only, not for "
            f"{spec.name!r}: the gradient the local module would send through it would be lost. Pass "
            f"{spec.name}.detach() (or a number); mmdet's heads pass a detached count",
        )


def _check_sendable(loss: str, name: str, tensor: Tensor) -> None:
    """Refuse a tensor whose values cannot travel, naming why (else torch's own error surfaces from deep in
    the encoder: "Cannot copy out of meta tensor", "unsupported memory format option Contiguous")."""
    if tensor.device.type == "meta":
        raise ArgumentError(
            loss,
            name,
            f"is on the 'meta' device ({_described(tensor)}): it has a shape but no values, and the server computes "
            "on values; pass a CPU or CUDA tensor",
        )
    if tensor.layout != torch.strided and tensor.requires_grad:
        # a sparse tensor that needs no gradient travels dense (terms.dense); its gradient would be sparse
        raise ArgumentError(
            loss,
            name,
            f"is a {tensor.layout} tensor that requires grad ({_described(tensor)}): losswire sends and returns dense "
            "tensors; pass tensor.to_dense() (a dense gradient), or a sparse tensor that does not require grad",
        )


def _tensors(value: Any) -> list[Tensor]:
    """The tensors an argument holds: itself, or the members of a tuple / list of tensors."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [item for item in value if isinstance(item, Tensor)]
    return []


def describe_kind(spec: pb.InputInfo) -> str:
    """What an input accepts, in words: "a tensor", "one of 'none', 'mean', 'sum' (or None)"."""
    choices = [codec.python_value(choice) for choice in spec.choices]
    text = f"one of {', '.join(repr(c) for c in choices)}" if choices else _KIND_WORDS.get(spec.kind, spec.kind)
    return f"{text} (or None)" if spec.optional and codec.python_value(spec.default) is None else text


_KIND_WORDS = {
    "tensor": "a tensor",
    "tensor_or_tuple": "a tensor or a tuple of tensors",
    "tensors": "a tuple of tensors",
    "number": "a number or a one-element tensor",
    "int": "an integer",
    "str": "a string",
    "any": "any value",
}


def _is_kind(kind: str, value: Any) -> bool:
    if kind == "tensor":
        return isinstance(value, Tensor)
    if kind in ("tensor_or_tuple", "tensors"):
        many = isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, Tensor) for v in value)
        return many or (kind == "tensor_or_tuple" and isinstance(value, Tensor))
    if kind == "number":
        if isinstance(value, Tensor):
            return value.numel() == 1
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]  # a 0-d array (np.array(num_pos)): its scalar, as the local module's arithmetic takes it
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return True


# the longest repr an error message quotes: a list of thousands of numbers tells nothing more
MAX_QUOTED_CHARS = 80


def _described(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    if isinstance(value, np.ndarray):  # its shape and dtype, not its numbers; and the one-call fix
        return (
            f"a numpy.ndarray of dtype {value.dtype} and shape {list(value.shape)} (torch.from_numpy(array) makes it "
            "a tensor)"
        )
    text = repr(value)
    if len(text) > MAX_QUOTED_CHARS:
        text = text[: MAX_QUOTED_CHARS - 3] + "..."
    return f"{type(value).__name__} {text}"
