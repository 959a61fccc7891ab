"""Caches keyed by what callers send (loss configs), bounded in entries and in bytes.

Callers choose how many configs differ and how big each is: one entry can be big (a CrossEntropyLoss
``class_weight`` of 90,000 numbers is keyed by 720 KB and kept by its module as 2.9 MB of Python floats;
a GHMC module of ``bins=7e6`` holds 28 MB of bin edges), so a count of entries alone let a caller sending
distinct configs grow the server by gigabytes that nothing gave back.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Generic, TypeVar

Value = TypeVar("Value")

# what an object costs besides what it holds (a tuple's or a string's header, a small number)
OBJECT_BYTES = 64


def held_bytes(key: Any) -> int:
    """About the bytes a hashable config (``evaluation.terms.frozen``) holds, or a tuple made of such."""
    if isinstance(key, (bytes, str)):
        return OBJECT_BYTES + len(key)
    if isinstance(key, tuple):
        return OBJECT_BYTES + sum(8 + held_bytes(item) for item in key)
    return OBJECT_BYTES


class BoundedCache(Generic[Value]):
    """At most ``entries`` values holding at most ``nbytes`` together (each value's bytes said when put), the
    oldest out first; a value of more than a quarter of ``nbytes`` is not kept (built again when asked
    for), so that a few big ones cannot push out every small one. Safe across threads."""

    def __init__(self, entries: int, nbytes: int) -> None:
        self.entries, self.nbytes = entries, nbytes
        self._values: collections.OrderedDict[Any, tuple[Value, int]] = collections.OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Value | None:
        found = self._values.get(key)
        return None if found is None else found[0]

    def put(self, key: Any, value: Value, size: int) -> None:
        if size > self.nbytes // 4:
            return
        with self._lock:
            previous = self._values.pop(key, None)
            if previous is not None:
                self._held -= previous[1]
            self._values[key] = (value, size)
            self._held += size
            while len(self._values) > self.entries or self._held > self.nbytes:
                _, (_, dropped) = self._values.popitem(last=False)
                self._held -= dropped

    def values(self) -> list[Value]:
        with self._lock:
            return [value for value, _ in self._values.values()]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._held = 0

    def __len__(self) -> int:
        return len(self._values)

    @property
    def held(self) -> int:
        """The bytes of the values kept now, as said when they were put."""
        return self._held
