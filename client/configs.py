"""A module's loss config as the wire carries it: a serialized ``google.protobuf.Struct``, encoded once.

``RemoteLoss.cfg`` is a plain dict a head may change (``DynamicRoIHead`` sets ``loss_bbox.beta``), so
the encoding is cached against a deep copy of what was encoded and made again only when the config
differs from it, in value or in type.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from losswire.wire import codec


class ConfigEncoding:
    """The last config encoded and its bytes."""

    def __init__(self) -> None:
        self._cached: tuple[Any, bytes] | None = None  # (a copy of the cfg as encoded, its Struct's bytes)

    def encode(self, cfg: Mapping[str, Any]) -> bytes:
        """``cfg`` as a serialized Struct: the cached bytes while ``cfg`` is the same as last time."""
        cached = self._cached
        if cached is not None and same_config(cached[0], cfg):
            return cached[1]
        encoded = codec.encode_config(cfg).SerializeToString()
        self._cached = (copy.deepcopy(dict(cfg)), encoded)
        return encoded

    def clear(self) -> None:
        self._cached = None


def same_config(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``True == 1`` but they encode differently); a
    tensor is never the same (it may have changed in place)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_config(v, b[k]) for k, v in a.items())
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_config(x, y) for x, y in zip(a, b, strict=True))
    return a == b
