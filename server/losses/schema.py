"""Each loss's description, derived from its typed signatures: the single schema.

A loss class declares its config parameters as typed ``__init__`` arguments and its inputs as a
typed ``forward`` -- exactly MMDetection's signatures. This module reads those signatures once and
turns them into a plain, JSON-ready ``LossDescription``. The same description validates configs
(``validate_config``), binds a remote caller's arguments, feeds ``ListLosses`` and renders the
README catalogue, so the facts about a loss are written in one place: its code.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import torch

from .errors import LossConfigError


class OutputKind(str, enum.Enum):
    """Shape of a loss's output for ``reduction='none'``."""

    ELEMENT = "element"  # same shape as pred (one loss per logit / coordinate)
    SAMPLE = "sample"  # one loss per sample (pred's class or box axis reduced)
    SCALAR = "scalar"  # always a single value, whatever the reduction


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One config key: ``dict(type=..., <name>=<value>)``."""

    name: str
    type: str  # "float", "int", "bool", "str", "list[float]", "any"
    default: Any
    nullable: bool = False
    choices: tuple[Any, ...] | None = None


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One forward argument, in positional order."""

    name: str
    kind: str  # "tensor", "tensor_or_tuple", "tensors", "number", "int", "str", "any"
    optional: bool
    default: Any = None
    choices: tuple[Any, ...] | None = None


@dataclasses.dataclass(frozen=True)
class LossDescription:
    """Everything a caller in any language needs to build a correct request for one loss."""

    name: str
    summary: str
    params: tuple[ParamSpec, ...]
    inputs: tuple[InputSpec, ...]
    output: OutputKind
    # config conditions under which the output kind differs, e.g. {"use_sigmoid=True": "element"}
    output_variants: Mapping[str, OutputKind]
    # forward inputs whose gradient the loss can return (pred always; float targets where defined)
    differentiable: tuple[str, ...]
    # each loss element depends only on its own element / row of each input, so the gradient for
    # any upstream gradient follows from the one for all-ones (see the protocol's TermResult)
    separable: bool = False
    # for "sample" outputs: the input axis the loss reduces over (1 = classes, -1 = box coordinates)
    sample_axis: int = 1
    # draws random numbers (L2Loss's negative mining): a request's seed makes it reproducible
    stochastic: bool = False
    # some configs keep state across calls (buffers a forward updates): see keeps_state
    stateful: bool = False
    # the forward takes **kwargs: other named inputs are accepted and handed to it (GHMC ignores them)
    extra_inputs: bool = False

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (enums as strings, tuples as lists)."""
        raw = dataclasses.asdict(self)
        raw["output"] = self.output.value
        raw["output_variants"] = {k: v.value for k, v in self.output_variants.items()}
        return _jsonable(raw)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- reading annotations ---------------------------------------------------------------------------

_NONE = type(None)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> (X, True); anything else -> (annotation, False)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not _NONE]
        nullable = len(args) < len(typing.get_args(annotation))
        inner = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 - runtime construction
        return inner, nullable
    return annotation, False


def _is_tensor_tuple(annotation: Any) -> bool:
    return typing.get_origin(annotation) is tuple and all(
        a is torch.Tensor or a is Ellipsis for a in typing.get_args(annotation)
    )


def _param_type(annotation: Any) -> tuple[str, tuple[Any, ...] | None]:
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]).__name__, choices
    if annotation in (bool, int, float, str):
        return annotation.__name__, None
    if typing.get_origin(annotation) in (list, Sequence, tuple) and typing.get_args(annotation):
        item = typing.get_args(annotation)[0]
        return f"list[{getattr(item, '__name__', 'any')}]", None
    return "any", None


def _input_kind(annotation: Any) -> tuple[str, tuple[Any, ...] | None]:
    if annotation is torch.Tensor:
        return "tensor", None
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = typing.get_args(annotation)
        if torch.Tensor in members and any(_is_tensor_tuple(m) for m in members):
            return "tensor_or_tuple", None
    if _is_tensor_tuple(annotation):
        return "tensors", None
    if typing.get_origin(annotation) is Literal:
        return "str", typing.get_args(annotation)
    if annotation is float or annotation == Union[float, torch.Tensor]:  # noqa: UP007
        return "number", None
    if annotation is int:
        return "int", None
    if annotation is str:
        return "str", None
    return "any", None


def _signature_items(func: Any) -> list[tuple[inspect.Parameter, Any]]:
    hints = typing.get_type_hints(func)
    items = []
    for parameter in list(inspect.signature(func).parameters.values())[1:]:  # skip self
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        items.append((parameter, hints.get(parameter.name, Any)))
    return items


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def describe_params(cls: type) -> tuple[ParamSpec, ...]:
    """The config parameters of a class, from its typed ``__init__``."""
    params = []
    for parameter, annotation in _signature_items(cls.__init__):
        inner, nullable = _strip_optional(annotation)
        type_name, choices = _param_type(inner)
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        params.append(ParamSpec(parameter.name, type_name, default, nullable, choices))
    return tuple(params)


def describe_class(name: str, cls: type) -> LossDescription:
    """Build the description of one registered loss class from its signatures."""
    params = describe_params(cls)

    inputs = []
    for parameter, annotation in _signature_items(cls.forward):
        inner, _ = _strip_optional(annotation)
        kind, choices = _input_kind(inner)
        optional = parameter.default is not inspect.Parameter.empty
        default = parameter.default if optional else None
        inputs.append(InputSpec(parameter.name, kind, optional, default, choices))

    output = getattr(cls, "output_kind", OutputKind.ELEMENT)
    variants = dict(getattr(cls, "output_variants", {}))
    first_input = inputs[0].name if inputs else "pred"
    differentiable = tuple(getattr(cls, "differentiable", (first_input,)))
    return LossDescription(
        name=name,
        summary=_summary(cls),
        params=params,
        inputs=tuple(inputs),
        output=OutputKind(output),
        output_variants={k: OutputKind(v) for k, v in variants.items()},
        differentiable=differentiable,
        separable=bool(getattr(cls, "separable", False)),
        sample_axis=int(getattr(cls, "sample_axis", 1)),
        stochastic=bool(getattr(cls, "stochastic", False)),
        stateful=bool(getattr(cls, "stateful", False)),
        extra_inputs=any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values()
        ),
    )


def keeps_state(module: Any) -> bool:
    """Whether a built module carries state from one forward to the next: its own answer
    (``keeps_state()``), else, for a module that does not say (a plugin), whether it has buffers."""
    declared = getattr(module, "keeps_state", None)
    if callable(declared):
        return bool(declared())
    return any(True for _ in module.buffers())


def output_kind_of(module: Any, description: LossDescription) -> OutputKind:
    """The output kind of a built module: its config may change the class's (CrossEntropyLoss)."""
    return OutputKind(getattr(module, "current_output_kind", description.output))


# -- config validation -----------------------------------------------------------------------------


def _describe_value(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(loss: str, spec: ParamSpec, value: Any) -> Any:
    """Check one config value against its spec; return it, normalised (JSON numbers -> int)."""
    where = f"{loss}.{spec.name}"
    if value is None:
        if spec.nullable:
            return None
        raise LossConfigError(f"{where} must be a {spec.type}, got None", field=spec.name)
    if spec.type == "bool":
        if isinstance(value, bool):
            return value
    elif spec.type == "int":
        # JSON (and protobuf Struct) carry every number as a double: accept integral floats.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif spec.type == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif spec.type == "str":
        if isinstance(value, str):
            if spec.choices is None or value in spec.choices:
                return value
            raise LossConfigError(f"{where} must be one of {list(spec.choices)}, got {value!r}", field=spec.name)
    elif spec.type.startswith("list["):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        if ok:
            return [float(v) for v in value]
    else:
        return value
    expected = f"a {spec.type}" + (" or None" if spec.nullable else "")
    raise LossConfigError(f"{where} must be {expected}, got {_describe_value(value)}", field=spec.name)


def validate_config(description: LossDescription, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check config keys and value types against the description; return normalised kwargs."""
    return validate_params(description.name, description.params, params)


def validate_params(owner: str, specs: tuple[ParamSpec, ...], params: Mapping[str, Any]) -> dict[str, Any]:
    """Check keys and value types against ``specs`` (``owner`` names the class in messages)."""
    known = {spec.name: spec for spec in specs}
    checked = {}
    for key, value in params.items():
        if key not in known:
            raise LossConfigError(
                f"{owner} has no parameter {key!r}; valid parameters: "
                + ", ".join(f"{s.name} ({s.type}, default {s.default!r})" for s in specs),
                field=key,
            )
        checked[key] = _coerce(owner, known[key], value)
    return checked
