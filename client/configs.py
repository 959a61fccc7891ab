"""A module's loss config as the wire carries it: a serialized ``google.protobuf.Struct``, encoded once.

``RemoteLoss.cfg`` is a plain dict a head may change (``DynamicRoIHead`` sets ``loss_bbox.beta``), so
the encoding is cached against a deep copy of what was encoded and made again only when the config
differs from it, in value or in type.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from losswire.wire import codec

JSON_SCALARS = (bool, int, float, str, type(None))


class ConfigEncoding:
    """The last config encoded and its bytes."""

    def __init__(self) -> None:
        self._cached: tuple[Any, bytes] | None = None  # (a copy of the cfg as encoded, its Struct's bytes)

    def encode(self, cfg: Mapping[str, Any]) -> bytes:
        """``cfg`` as a serialized Struct: the cached bytes while ``cfg`` is the same as last time."""
        cached = self._cached
        if cached is not None and same_config(cached[0], cfg):
            return cached[1]
        encoded = codec.encode_config(plain_config(cfg)).SerializeToString()
        self._cached = (copy.deepcopy(dict(cfg)), encoded)
        return encoded

    def clear(self) -> None:
        self._cached = None


def plain_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with numpy scalars and arrays as the Python numbers and lists they hold: mmdet's module takes
    ``gamma=np.float32(2.0)`` or a ``class_weight`` array, and the wire's JSON would refuse them with a bare
    "Unexpected type". Any other value JSON cannot hold is a TypeError naming its key."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"a loss config must be a dict, e.g. dict(type='FocalLoss', gamma=2.0); got {_short(cfg)}")
    return {key: _plain(value, f"cfg[{key!r}]", 1) for key, value in cfg.items()}


def _plain(value: Any, where: str, depth: int) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (*JSON_SCALARS, Tensor)) or depth > codec.MAX_JSON_DEPTH:
        return value  # deeper than the wire nests: the codec refuses it, naming the limit
    if isinstance(value, Mapping):
        return {key: _plain(item, f"{where}[{key!r}]", depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value)]
    raise TypeError(
        f"{where} is {_short(value)}, which a loss config cannot carry: it travels as JSON (numbers, strings, "
        "booleans, None, and lists and dicts of them; tensors and numpy arrays as lists)"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


def same_config(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``True == 1`` but they encode differently); a
    tensor or a numpy array is never the same (it may have changed in place)."""
    if isinstance(a, (Tensor, np.ndarray)) or isinstance(b, (Tensor, np.ndarray)):
        return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_config(v, b[k]) for k, v in a.items())
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_config(x, y) for x, y in zip(a, b, strict=True))
    return a == b
