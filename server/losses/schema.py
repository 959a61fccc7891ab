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
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union

import torch

from .errors import LossConfigError

# An int parameter is an int64 whatever its bounds say: torch holds it in one (sizes, indices).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class OutputKind(str, enum.Enum):
    """Shape of a loss's output for ``reduction='none'``."""

    ELEMENT = "element"  # same shape as pred (one loss per logit / coordinate)
    SAMPLE = "sample"  # one loss per sample (pred's class or box axis reduced)
    SCALAR = "scalar"  # always a single value, whatever the reduction


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a number must lie in: ``minimum <= value <= maximum``, each end open (``exclusive_*``) or
    absent (None). A loss declares it on its ``__init__`` argument: ``bins: Annotated[int, Bounds(1)]``
    (or one of the aliases below); validation refuses a value outside it, naming the range."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def __contains__(self, value: float) -> bool:
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return False
        return self.maximum is None or (value < self.maximum if self.exclusive_maximum else value <= self.maximum)

    def __str__(self) -> str:
        if self.maximum is None:
            return f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        if self.minimum is None:
            return f"{'<' if self.exclusive_maximum else '<='} {self.maximum:g}"
        low, high = "(" if self.exclusive_minimum else "[", ")" if self.exclusive_maximum else "]"
        return f"in {low}{self.minimum:g}, {self.maximum:g}{high}"


# The ranges the losses' math asks for, as annotations of their config arguments.
Positive = Annotated[float, Bounds(0.0, exclusive_minimum=True)]  # eps, thresholds, divisors
NonNegative = Annotated[float, Bounds(0.0)]  # exponents of a factor in [0, 1], extra weights
Probability = Annotated[float, Bounds(0.0, 1.0)]
Momentum = Annotated[float, Bounds(0.0, 1.0, exclusive_maximum=True)]  # a moving average's factor
AtLeastOne = Annotated[float, Bounds(1.0)]  # a temperature that softens
Count = Annotated[int, Bounds(1)]  # classes, bins


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One config key: ``dict(type=..., <name>=<value>)``.

    ``minimum``/``maximum`` bound a number (None: unbounded), each end inclusive unless its
    ``exclusive_*`` flag says otherwise. Beyond them every float must be finite and every int an int64.
    """

    name: str
    type: str  # "float", "int", "bool", "str", "list[float]", "any"
    default: Any
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    @property
    def bounds(self) -> Bounds | None:
        if self.minimum is None and self.maximum is None:
            return None
        return Bounds(self.minimum, self.maximum, self.exclusive_minimum, self.exclusive_maximum)


TENSOR_KINDS = ("tensor", "tensor_or_tuple", "tensors")  # the kinds of input that hold tensors


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
    # forward inputs the loss uses only as numbers in its arithmetic, never as indices, masks that
    # select, sizes or counts: one rewritten while the loss reads it changes that call's numbers and
    # nothing else (pred always). The server reads these in place in a caller's shared memory and
    # copies every other input before checking it.
    value_inputs: tuple[str, ...] = ()

    @property
    def gradient_inputs(self) -> tuple[str, ...]:
        """The inputs a call may ask the gradient of, whatever door it came through: those declared
        ``differentiable``, then every other tensor input (a weight, say), as autograd gives it."""
        tensors = (spec.name for spec in self.inputs if spec.kind in TENSOR_KINDS)
        return (*self.differentiable, *(name for name in tensors if name not in self.differentiable))

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


def _strip_bounds(annotation: Any) -> tuple[Any, Bounds | None]:
    """``Annotated[X, Bounds(...)]`` -> (X, the bounds); anything else -> (annotation, None)."""
    if typing.get_origin(annotation) is not Annotated:
        return annotation, None
    inner, *extras = typing.get_args(annotation)
    return inner, next((e for e in extras if isinstance(e, Bounds)), None)


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
    hints = typing.get_type_hints(func, include_extras=True)
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
        inner, bounds = _strip_bounds(inner)
        type_name, choices = _param_type(inner)
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        spec = ParamSpec(parameter.name, type_name, default, nullable, choices)
        if bounds is not None:
            spec = dataclasses.replace(spec, **dataclasses.asdict(bounds))
        params.append(spec)
    return tuple(params)


def describe_class(name: str, cls: type) -> LossDescription:
    """Build the description of one registered loss class from its signatures."""
    params = describe_params(cls)

    inputs = []
    for parameter, annotation in _signature_items(cls.forward):
        inner, _ = _strip_optional(annotation)
        kind, choices = _input_kind(_strip_bounds(inner)[0])
        optional = parameter.default is not inspect.Parameter.empty
        default = parameter.default if optional else None
        inputs.append(InputSpec(parameter.name, kind, optional, default, choices))

    output = getattr(cls, "output_kind", OutputKind.ELEMENT)
    variants = dict(getattr(cls, "output_variants", {}))
    first_input = inputs[0].name if inputs else "pred"
    differentiable = tuple(getattr(cls, "differentiable", (first_input,)))
    declared = tuple(cls.value_inputs) if _declares(cls, "value_inputs") else ()
    unknown = [n for n in declared if n not in {i.name for i in inputs}]
    if unknown:
        raise TypeError(f"{name}.value_inputs names {unknown}, which are not inputs of its forward")
    value_inputs = (first_input, *(n for n in declared if n != first_input))
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
        value_inputs=value_inputs,
    )


# The engine's own classes live under this package; a plugin's class lives anywhere else.
ENGINE_PACKAGE = __name__.rpartition(".")[0]


def is_engine_class(cls: type) -> bool:
    """Whether ``cls`` is one of the engine's classes (not a plugin's, nor a plugin's subclass of one)."""
    return cls.__module__ == ENGINE_PACKAGE or cls.__module__.startswith(ENGINE_PACKAGE + ".")


def _declares(cls: type, name: str) -> bool:
    """Whether ``cls`` says ``name`` itself: an engine class by any of its classes, a plugin's class only
    by a class of its own (a default inherited from an engine base says nothing of the plugin's forward)."""
    owner = next((klass for klass in cls.__mro__ if name in vars(klass)), None)
    return owner is not None and (is_engine_class(cls) or not is_engine_class(owner))


def keeps_state(module: Any) -> bool:
    """Whether a built module carries state from one forward to the next: its own answer
    (``keeps_state()``, or ``stateful``) where its class declares one, else whether it has buffers."""
    cls = type(module)
    if _declares(cls, "keeps_state"):
        return bool(module.keeps_state())
    if _declares(cls, "stateful"):
        return bool(module.stateful)
    return any(True for _ in module.buffers())


def shareable(module: Any) -> bool:
    """Whether one built module may serve concurrent calls with equal configs.

    Only where its class declares itself stateless (``stateful = False`` and, per config,
    ``keeps_state()`` False) and not stochastic (a caller seeds ``module.rng`` per call): the engine's
    classes do (their defaults are checked by tests/engine/test_shareable.py); a plugin's class only
    where a class of its own says ``stateful = False``, never by a default inherited from the engine.
    """
    cls = type(module)
    if getattr(cls, "stochastic", False) or not _declares(cls, "stateful"):
        return False
    return not keeps_state(module)


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
    coerced = _typed(spec, value)
    if coerced is _WRONG_TYPE:
        expected = f"a {spec.type}" + (" or None" if spec.nullable else "")
        raise LossConfigError(f"{where} must be {expected}, got {_describe_value(value)}", field=spec.name)
    if spec.type == "str" and spec.choices is not None and coerced not in spec.choices:
        raise LossConfigError(f"{where} must be one of {list(spec.choices)}, got {value!r}", field=spec.name)
    _check_range(where, spec, value, coerced)
    return coerced


_WRONG_TYPE = object()


def _typed(spec: ParamSpec, value: Any) -> Any:
    """``value`` as ``spec.type`` (JSON and protobuf Struct carry every number as a double, so an integral
    float is an int), or ``_WRONG_TYPE``."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.type == "bool":
        return value if isinstance(value, bool) else _WRONG_TYPE
    if spec.type == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _WRONG_TYPE
    if spec.type == "float":
        return _float(value) if is_number else _WRONG_TYPE
    if spec.type == "str":
        return value if isinstance(value, str) else _WRONG_TYPE
    if spec.type.startswith("list["):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        return [_float(v) for v in value] if ok else _WRONG_TYPE
    return value


def _float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range: reported as not finite
        return math.inf


def _check_range(where: str, spec: ParamSpec, value: Any, coerced: Any) -> None:
    """Floats finite, ints int64, numbers within the declared bounds."""
    numbers = coerced if isinstance(coerced, list) else [coerced]
    if spec.type in ("float", "list[float]") and not all(math.isfinite(v) for v in numbers):
        raise LossConfigError(f"{where} must be finite, got {_describe_value(value)}", field=spec.name)
    if spec.type == "int" and not INT64_MIN <= coerced <= INT64_MAX:
        raise LossConfigError(
            f"{where} must be an int64, in [-2**63, 2**63 - 1], got {_describe_value(value)}", field=spec.name
        )
    bounds = spec.bounds
    if bounds is not None and spec.type in ("int", "float") and coerced not in bounds:
        raise LossConfigError(f"{where} must be {bounds}, got {value!r}", field=spec.name)


def validate_config(description: LossDescription, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check config keys and value types against the description; return normalised kwargs."""
    return validate_params(description.name, description.params, params)


def validate_params(owner: str, specs: tuple[ParamSpec, ...], params: Mapping[str, Any]) -> dict[str, Any]:
    """Check keys and value types against ``specs`` (``owner`` names the class in messages)."""
    known = {spec.name: spec for spec in specs}
    checked = {}
    for key, value in params.items():
        if key not in known:
            raise unknown_parameter(owner, specs, key)
        checked[key] = _coerce(owner, known[key], value)
    return checked


def unknown_parameter(owner: str, specs: tuple[ParamSpec, ...], key: str) -> LossConfigError:
    """The error for a config key ``owner`` has no parameter of, naming the ones it has."""
    return LossConfigError(
        f"{owner} has no parameter {key!r}; valid parameters: "
        + ", ".join(f"{s.name} ({s.type}, default {s.default!r})" for s in specs),
        field=key,
    )
