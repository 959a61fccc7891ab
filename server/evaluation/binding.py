"""A term's fields onto its loss's forward inputs, by the loss's description: names, kinds, gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..losses import LossDescription, LossInputError
from ..losses.schema import INT64_MAX, INT64_MIN
from .terms import PRED, TARGET, TermRequest


def _check_kind(description: LossDescription, name: str, value: Any) -> Any:
    spec = next(i for i in description.inputs if i.name == name)
    where = f"{description.name} input {name!r}"
    if spec.kind == "tensor" and not isinstance(value, Tensor):
        raise LossInputError(f"{where} must be a tensor, got {type(value).__name__}", field=name)
    if spec.kind == "tensor_or_tuple" and not isinstance(value, (Tensor, tuple)):
        raise LossInputError(f"{where} must be a tensor or a tuple of tensors, got {type(value).__name__}", field=name)
    if spec.kind == "int":
        original = value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise LossInputError(f"{where} must be an integer, got {type(value).__name__} {value!r}", field=name)
        if not INT64_MIN <= value <= INT64_MAX:  # torch takes integer arguments as int64
            raise LossInputError(
                f"{where} must be an int64, in [-2**63, 2**63 - 1], got {_describe_number(original)}", field=name
            )
    if spec.kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float, Tensor))):
        raise LossInputError(f"{where} must be a number, got {type(value).__name__} {value!r}", field=name)
    if spec.kind == "str":
        if not isinstance(value, str):
            raise LossInputError(f"{where} must be a string, got {type(value).__name__} {value!r}", field=name)
        # "" is mmdet's "no override" (``reduction_override if reduction_override else self.reduction``)
        empty_override = value == "" and name == "reduction_override"
        if spec.choices and value not in spec.choices and not empty_override:
            raise LossInputError(f"{where} must be one of {list(spec.choices)}, got {value!r}", field=name)
    return value


def _describe_number(value: int | float) -> str:
    """``value`` for a message (an int of over 4300 digits cannot be printed: its size instead)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return f"{type(value).__name__} {value!r}"


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
        if name not in names and not description.extra_inputs:
            raise LossInputError(f"{description.name} has no input {name!r}; its inputs are: {valid}", field=name)
        if name in given:
            raise LossInputError(f"input {name!r} is given twice", field=name)
        given[name] = value
    for spec in description.inputs:
        if spec.name not in given and not spec.optional:
            field = TARGET if spec.name == names[1] else spec.name
            raise LossInputError(f"{description.name} needs input {spec.name!r}; its inputs are: {valid}", field=field)
    return {name: _check_kind(description, name, value) if name in names else value for name, value in given.items()}


def gradient_leaves(
    description: LossDescription, kwargs: dict[str, Any], requested: Sequence[str]
) -> dict[str, Tensor]:
    """Mark the requested inputs as requiring grad; return {response key: leaf tensor}."""
    names = [i.name for i in description.inputs]
    aliases = {PRED: names[0], TARGET: names[1] if len(names) > 1 else TARGET}
    leaves: dict[str, Tensor] = {}
    if "none" in requested and set(requested) != {"none"}:
        raise LossInputError(
            f"gradients: 'none' asks for the loss alone, so it comes alone; got {list(requested)[:8]}",
            field="gradients",
        )
    for key in requested:
        if key == "none":
            continue
        name = aliases.get(key, key)
        if name not in description.gradient_inputs:
            raise LossInputError(
                f"{description.name} returns gradients for its floating-point tensor inputs "
                f"{list(description.gradient_inputs)} only, not {key!r}",
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


WEIGHT_INPUTS = ("weight", "label_weights", "label_weight")  # where a sampler's zeros go
