"""Where the loss runs and the gradient is made: bind a term's inputs, forward, backward.

Plain torch, no gRPC: the service decodes a request into ``TermRequest`` objects, hands them here
and encodes the ``TermOutcome`` objects it gets back. Engine errors (``LossError``) pass through
untouched for the service to map to status codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .losses import LOSSES, LossDescription, LossInputError, OutputKind, Registry, output_kind_of

PRED, TARGET = "pred", "target"


@dataclasses.dataclass
class TermRequest:
    """One loss term, decoded: tensors already on the compute device."""

    name: str
    config: Mapping[str, Any]
    pred: Tensor
    target: Any = None
    weight: Tensor | None = None
    avg_factor: float | None = None
    reduction_override: str | None = None
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gradients: Sequence[str] = (PRED,)
    grad_output: Tensor | None = None


@dataclasses.dataclass
class TermOutcome:
    name: str
    loss: Tensor
    gradients: dict[str, Tensor]
    output: OutputKind
    separable: bool
    sample_axis: int


class LossFailedError(LossInputError):
    """A loss raised something other than a LossError on these inputs (e.g. a plugin's torch error)."""


def _check_kind(description: LossDescription, name: str, value: Any) -> Any:
    spec = next(i for i in description.inputs if i.name == name)
    where = f"{description.name} input {name!r}"
    if spec.kind == "tensor" and not isinstance(value, Tensor):
        raise LossInputError(f"{where} must be a tensor, got {type(value).__name__}", field=name)
    if spec.kind == "tensor_or_tuple" and not isinstance(value, (Tensor, tuple)):
        raise LossInputError(f"{where} must be a tensor or a tuple of tensors, got {type(value).__name__}", field=name)
    if spec.kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise LossInputError(f"{where} must be an integer, got {type(value).__name__} {value!r}", field=name)
    if spec.kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float, Tensor))):
        raise LossInputError(f"{where} must be a number, got {type(value).__name__} {value!r}", field=name)
    if spec.kind == "str":
        if not isinstance(value, str):
            raise LossInputError(f"{where} must be a string, got {type(value).__name__} {value!r}", field=name)
        if spec.choices and value not in spec.choices:
            raise LossInputError(f"{where} must be one of {list(spec.choices)}, got {value!r}", field=name)
    return value


def bind_inputs(description: LossDescription, term: TermRequest) -> dict[str, Any]:
    """Map a term's fields onto the loss's forward inputs by name; refuse unknown or missing ones."""
    names = [i.name for i in description.inputs]
    valid = ", ".join(names)
    given: dict[str, Any] = {names[0]: term.pred}
    named = {
        "weight": term.weight,
        "avg_factor": term.avg_factor,
        "reduction_override": term.reduction_override,
    }
    if term.target is not None:
        if len(names) < 2:
            raise LossInputError(f"{description.name} takes no target; its inputs are: {valid}", field=TARGET)
        given[names[1]] = term.target
    for name, value in [*named.items(), *term.inputs.items()]:
        if value is None:
            continue
        if name not in names:
            raise LossInputError(f"{description.name} has no input {name!r}; its inputs are: {valid}", field=name)
        if name in given:
            raise LossInputError(f"input {name!r} is given twice", field=name)
        given[name] = value
    for spec in description.inputs:
        if spec.name not in given and not spec.optional:
            field = TARGET if spec.name == names[1] else spec.name
            raise LossInputError(f"{description.name} needs input {spec.name!r}; its inputs are: {valid}", field=field)
    return {name: _check_kind(description, name, value) for name, value in given.items()}


def _gradient_leaves(
    description: LossDescription, kwargs: dict[str, Any], requested: Sequence[str]
) -> dict[str, Tensor]:
    """Mark the requested inputs as requiring grad; return {response key: leaf tensor}."""
    names = [i.name for i in description.inputs]
    aliases = {PRED: names[0], TARGET: names[1] if len(names) > 1 else TARGET}
    leaves: dict[str, Tensor] = {}
    for key in requested:
        if key == "none":
            continue
        name = aliases.get(key, key)
        if name not in description.differentiable:
            raise LossInputError(
                f"{description.name} returns gradients for {list(description.differentiable)} only, not {key!r}",
                field="gradients",
            )
        value = kwargs.get(name)
        if value is None:
            raise LossInputError(f"gradient of {key!r} requested but that input was not sent", field="gradients")
        members = [(key, value)] if isinstance(value, Tensor) else [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        floats = [(k, v) for k, v in members if v.is_floating_point()]
        if not floats:
            raise LossInputError(
                f"gradient of {key!r} requested but it holds no floating-point tensor "
                f"({', '.join(str(v.dtype) for _, v in members)})",
                field="gradients",
            )
        for member_key, tensor in floats:
            leaves[member_key] = tensor.requires_grad_()
    return leaves


class Evaluator:
    """Evaluates decoded loss terms on one device with the losses of one registry."""

    def __init__(self, registry: Registry = LOSSES) -> None:
        self.registry = registry

    def evaluate(self, term: TermRequest) -> TermOutcome:
        module = self.registry.build(term.config)
        description = self.registry.describe(term.config["type"])
        kwargs = bind_inputs(description, term)
        leaves = _gradient_leaves(description, kwargs, term.gradients)
        loss = self._forward(module, description, kwargs)
        gradients = self._backward(loss, leaves, term.grad_output)
        output = output_kind_of(module, description)
        return TermOutcome(
            name=term.name,
            loss=loss.detach(),
            gradients=gradients,
            output=OutputKind.SCALAR if loss.dim() == 0 else output,
            separable=description.separable,
            sample_axis=description.sample_axis,
        )

    @staticmethod
    def _forward(module: nn.Module, description: LossDescription, kwargs: dict[str, Any]) -> Tensor:
        try:
            with torch.enable_grad():
                loss = module(**kwargs)
        except LossInputError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
            if isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LossFailedError(f"{description.name} failed on these inputs: {message}") from error
        if not isinstance(loss, Tensor):
            raise LossFailedError(f"{description.name} returned a {type(loss).__name__}, not a tensor")
        return loss

    @staticmethod
    def _backward(loss: Tensor, leaves: dict[str, Tensor], grad_output: Tensor | None) -> dict[str, Tensor]:
        if not leaves:
            return {}
        if grad_output is None:
            grad_output = torch.ones_like(loss)
        elif grad_output.shape != loss.shape:
            raise LossInputError(
                f"grad_output must have the loss's shape {list(loss.shape)}, got {list(grad_output.shape)}",
                field="grad_output",
            )
        tensors = list(leaves.values())
        if not loss.requires_grad:
            return {key: torch.zeros_like(t) for key, t in leaves.items()}
        grads = torch.autograd.grad(loss, tensors, grad_output.to(loss.dtype), allow_unused=True)
        return {key: torch.zeros_like(t) if g is None else g for (key, t), g in zip(leaves.items(), grads, strict=True)}
