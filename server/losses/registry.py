"""The loss registry: names -> classes, and ``build_loss`` from mmdet-style config dicts."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from torch import nn

from ..caches import BoundedCache, held_bytes
from . import cost
from .errors import DuplicateLossError, LossConfigError, UnknownLossError
from .schema import LossDescription, describe_class, unknown_parameter, validate_config

ModuleClass = TypeVar("ModuleClass", bound=type)


CHECKED_CACHE_SIZE = 1024
CHECKED_CACHE_BYTES = 16 << 20  # of configs' keys: a class_weight of 90,000 numbers is keyed by 720 KB


class Registry:
    """Maps a loss name to its ``nn.Module`` class and its description.

    Mirrors mmengine's ``Registry.register_module``: usable as ``@LOSSES.register_module()``,
    ``@LOSSES.register_module(name='Alias')`` or ``LOSSES.register_module(module=Cls)``.
    Registering a taken name fails unless ``force=True``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._classes: dict[str, type] = {}
        self._descriptions: dict[str, LossDescription] = {}
        # the loss type of valid configs checked before, by a hashable form of the config (loss_type)
        self._checked: BoundedCache[str] = BoundedCache(CHECKED_CACHE_SIZE, CHECKED_CACHE_BYTES)

    def register_module(
        self, name: str | None = None, force: bool = False, module: type | None = None
    ) -> Callable[[ModuleClass], ModuleClass] | type:
        def register(cls: ModuleClass) -> ModuleClass:
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise TypeError(f"{self.name} registers nn.Module subclasses, got {cls!r}")
            key = name or cls.__name__
            if key in self._classes and not force:
                taken = self._classes[key]
                raise DuplicateLossError(
                    f"{key!r} is already registered in {self.name} by "
                    f"{taken.__module__}.{taken.__qualname__}; pass force=True to replace it",
                    field="type",
                )
            # Describe at registration time: a class whose signature cannot be described fails
            # here, at import, not later on a caller's request.
            self._descriptions[key] = describe_class(key, cls)
            self._classes[key] = cls
            self._checked.clear()  # a replaced class may accept other configs
            return cls

        if module is not None:
            return register(module)
        return register

    def copy(self, name: str) -> Registry:
        """A new registry holding this one's losses (extra registrations stay in the copy)."""
        clone = Registry(name)
        clone._classes = dict(self._classes)
        clone._descriptions = dict(self._descriptions)
        return clone

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownLossError(self._unknown_message(name), field="type") from None

    def describe(self, name: str) -> LossDescription:
        self.get(name)
        return self._descriptions[name]

    def descriptions(self) -> list[LossDescription]:
        return [self._descriptions[n] for n in sorted(self._classes)]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._classes)

    def _unknown_message(self, name: str) -> str:
        if len(str(name)) > MAX_NAME_CHARS:  # no slip of the keyboard: not compared (difflib is quadratic) nor quoted
            registered = ", ".join(self.names())
            return f"unknown loss type {str(name)[:40]!r}... ({len(str(name))} characters; registered: {registered})"
        close = difflib.get_close_matches(str(name), self._classes, n=3, cutoff=0.5)
        lowered = {n.lower(): n for n in self._classes}
        same_but_case = lowered.get(str(name).lower())
        if same_but_case is not None:  # the likeliest slip: put it first
            close = [same_but_case] + [c for c in close if c != same_but_case]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown loss type {name!r}{hint} (registered: {', '.join(self.names())})"

    def build(self, cfg: Mapping[str, Any]) -> nn.Module:
        """Build a module from ``dict(type='Name', **params)``; the dict is not modified."""
        name, params = self.check_config(cfg)
        return self._classes[name](**params)

    def normalise(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The config with every parameter present: defaults filled in, values normalised."""
        name, params = self.check_config(cfg)
        defaults = {spec.name: spec.default for spec in self._descriptions[name].params}
        return {"type": name, **defaults, **params}

    def estimate(
        self, cfg: Mapping[str, Any], shapes: cost.Shapes | None = None, *, itemsize: int = 4
    ) -> cost.Estimate:
        """What building ``cfg`` and one forward + backward on inputs of ``shapes`` would cost, computed
        from the numbers alone (nothing is built or allocated): see ``cost.Estimate``.

        ``shapes`` maps forward input names to shapes (None: the module alone); ``itemsize`` is the
        floating-point inputs' element size (4 for float32, 8 for float64). The config is validated
        first (a ``LossConfigError`` for a bad one). A class that declares no ``estimate`` (a plugin's
        ``nn.Module``) is costed by ``cost.proportional``'s default: no buffers, 16 copies of its first input.
        """
        params = self.normalise(cfg)
        name = params["type"]
        shapes = None if shapes is None else cost.check_shapes(shapes)
        estimate = getattr(self._classes[name], "estimate", None)
        if callable(estimate):
            return estimate(params, shapes, itemsize)
        return cost.proportional(self._descriptions[name].inputs[0].name, shapes, itemsize)

    def own(self, name: str) -> bool:
        """Whether loss ``name`` is one of losswire's own (its costs are calibrated: ``cost``), not a plugin's."""
        cls = self._classes.get(name)
        return cls is not None and cls.__module__.startswith(__package__ + ".")

    def loss_type(self, cfg: Mapping[str, Any], key: Any = None) -> str:
        """The loss ``cfg`` names, the config validated (``check_config``). With ``key``, a hashable form of
        the config (``TermRequest.config_key``), a valid config is validated once: every call of a training
        loop sends the same few. A bad one is never kept: refused every time."""
        loss_type = self._checked.get(key) if key is not None else None
        if loss_type is None:
            loss_type, _ = self.check_config(cfg)
            if key is not None:  # clients choose the configs: bounded in entries and bytes
                self._checked.put(key, loss_type, held_bytes(key))
        return loss_type

    def check_shallow(self, name: str, kinds: Mapping[str, str]) -> None:
        """Refuse, before any value of a config of loss ``name`` is read, a key that is none of its parameters
        (the same LossConfigError as ``check_config``) and a JSON list or object (``kinds``: each key's JSON
        kind) given to a parameter that takes one value; everything else is left to ``check_config``, and so
        is a name not registered here."""
        description = self._descriptions.get(name)
        if description is None:
            return
        specs = {spec.name: spec for spec in description.params}
        for key, kind in kinds.items():
            spec = specs.get(key)
            if spec is None:
                raise unknown_parameter(name, description.params, key)
            if kind in SHALLOW_REFUSED.get(spec.type, ()):
                expected = f"a {spec.type}" + (" or None" if spec.nullable else "")
                raise LossConfigError(f"{name}.{key} must be {expected}, got a JSON {kind}", field=key)

    def check_config(self, cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Validate a config dict; return (type, normalised keyword arguments)."""
        if not isinstance(cfg, Mapping):
            raise LossConfigError(
                f"a loss config must be a dict with a 'type' key, got {type(cfg).__name__}", field="type"
            )
        if "type" not in cfg:
            raise LossConfigError(
                f"the loss config has no 'type' key (keys: {sorted(cfg)}); expected one of {', '.join(self.names())}",
                field="type",
            )
        loss_type = cfg["type"]
        if not isinstance(loss_type, str):
            raise LossConfigError(
                f"the config's 'type' must be a loss name (str), got {type(loss_type).__name__}",
                field="type",
            )
        self.get(loss_type)
        params = {k: v for k, v in cfg.items() if k != "type"}
        return loss_type, validate_config(self._descriptions[loss_type], params)


MAX_NAME_CHARS = 128  # a loss name longer than this is compared with none of the registered ones
# the JSON kinds a parameter of each type never takes, told from a config's structure without reading it
SHALLOW_REFUSED = {kind: ("list", "object") for kind in ("float", "int", "bool", "str")} | {"list[float]": ("object",)}

LOSSES = Registry("losses")


def build_loss(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a registered loss from an mmdet config dict, e.g. ``dict(type='FocalLoss', gamma=2.0)``."""
    return LOSSES.build(cfg)
