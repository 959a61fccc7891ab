"""The caller's side of shared memory: registered segments reused call after call.

:class:`SharedMemoryPool` lends segments (``losswire.wire.shared_memory``) one call at a time
(:class:`Lease`); a segment returns once the call is over and no tensor of its answer is alive any
more (a finalizer on the numpy array the answer's views are cut from).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from losswire.wire.shared_memory import NONCE_BYTES, Segment, SegmentRange, segment_size, sweep_stale


class Lease:
    """One call's use of one registered segment: inputs from offset ``NONCE_BYTES`` (aligned) up
    (``reserve``), then the rest as the output range (``reserve_outputs``, ``output_bytes``)."""

    def __init__(self, pool: SharedMemoryPool, segment: Segment, region: str) -> None:
        self.pool, self.segment, self.region = pool, segment, region
        self.inputs = SegmentRange(segment, region, NONCE_BYTES, segment.size)
        self.output_offset = self.output_size = 0
        self.outputs: np.ndarray | None = None

    def reserve(self, nbytes: int) -> tuple[str, int, Tensor] | None:
        """Room for ``nbytes`` of input (see SegmentRange); None once the output range is taken."""
        return None if self.outputs is not None else self.inputs(nbytes)

    def reserve_outputs(self) -> tuple[int, int]:
        """The rest of the segment as the output range; its views live on the array kept here,
        and the segment goes back to the pool once that array is freed (see ``done``)."""
        self.output_offset = self.inputs.cursor
        self.output_size = self.segment.size - self.output_offset
        # an array of its own over the mapping (not a slice of segment.array: numpy would make every
        # view's base segment.array, and the finalizer would fire while views still read the range)
        self.outputs = np.frombuffer(self.segment.memory, np.uint8, self.output_size, self.output_offset)
        weakref.finalize(self.outputs, self.pool.give_back, self.segment)
        return self.output_offset, self.output_size

    def output_bytes(self, ref: Any, field: str) -> Tensor:
        """A uint8 view of the answer's bytes ``ref`` names (``wire_memory.shared_memory_tensors``'s
        ``resolve``); a ValueError unless they lie in this call's output range."""
        start = ref.offset - self.output_offset
        inside = self.outputs is not None and start >= 0 and ref.offset + ref.byte_size <= self.segment.size
        if ref.region != self.region or not inside:
            raise ValueError(
                f"{field}: the server answered bytes [{ref.offset}, {ref.offset + ref.byte_size}) of region "
                f"{ref.region!r}, outside this call's output range [{self.output_offset}, {self.segment.size}) of "
                f"{self.region!r}"
            )
        return torch.from_numpy(self.outputs[start : start + ref.byte_size])

    def done(self) -> None:
        """The call is over: the segment returns to the pool when the answer's views are freed."""
        if self.outputs is None:
            self.pool.give_back(self.segment)
        self.outputs = None


Register = Callable[[str, int, bytes], str]
Unregister = Callable[[str], None]


class SharedMemoryPool:
    """The caller's registered segments, lent one call at a time.

    ``register(name, byte_size, nonce) -> region`` and ``unregister(region)`` are the RPCs (the
    pool knows no gRPC). A call needing ``n`` bytes gets the smallest idle segment of at least
    ``n`` bytes, else a new one of the next power of two (at least 1 MiB). At most ``max_idle``
    idle segments are kept; more are unregistered and freed.
    """

    def __init__(self, register: Register, unregister: Unregister, max_idle: int = 4) -> None:
        self._register, self._unregister = register, unregister
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._regions: dict[str, str] = {}  # segment name -> region
        self._idle: list[Segment] = []
        self._segments: dict[str, Segment] = {}  # every live segment, lent or idle
        self._swept = False
        self._pid = os.getpid()

    def lease(self, nbytes: int) -> Lease:
        """A segment of at least ``nbytes`` bytes, registered (raises what ``register`` raises)."""
        if os.getpid() != self._pid:  # a forked child shares the parent's pages: never lend them twice
            self._after_fork()
        with self._lock:
            fitting = [s for s in self._idle if s.size >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda s: s.size)
                self._idle.remove(segment)
                return Lease(self, segment, self._regions[segment.name])
            if not self._swept:
                self._swept = True
                sweep_stale()
        segment = Segment.create(segment_size(nbytes))
        try:
            region = self._register(segment.name, segment.size, segment.nonce)
        except BaseException:
            segment.unlink()
            segment.close()
            raise
        segment.unlink()  # the server unlinked it already; this covers a server that did not
        with self._lock:
            self._regions[segment.name] = region
            self._segments[segment.name] = segment
        return Lease(self, segment, region)

    def _after_fork(self) -> None:
        """In a child: forget the parent's segments (theirs to use and unregister) and start afresh."""
        self._lock = threading.Lock()
        self._regions, self._idle, self._segments = {}, [], {}
        self._pid = os.getpid()

    def give_back(self, segment: Segment) -> None:
        with self._lock:
            if segment.name not in self._segments:
                return  # forgotten by reset() or close(): it is freed with its last view
            self._idle.append(segment)
            extra = sorted(self._idle, key=lambda s: s.size)[: max(len(self._idle) - self.max_idle, 0)]
            for old in extra:
                self._idle.remove(old)
        for old in extra:
            self._drop(old, unregister=True)

    def _drop(self, segment: Segment, unregister: bool) -> None:
        with self._lock:
            region = self._regions.pop(segment.name, None)
            self._segments.pop(segment.name, None)
        if unregister and region is not None:
            # best effort: a server that cannot be reached drops it itself once our lock is gone
            with contextlib.suppress(Exception):
                self._unregister(region)
        segment.close()

    def reset(self) -> None:
        """Forget every segment (the server no longer knows them: it restarted). Lent ones are
        freed when their calls' views are; the next lease registers a new one."""
        with self._lock:
            segments = list(self._segments.values())
            self._idle.clear()
        for segment in segments:
            self._drop(segment, unregister=False)

    def close(self) -> None:
        """Unregister and free every segment."""
        with self._lock:
            segments = list(self._segments.values())
            self._idle.clear()
        for segment in segments:
            self._drop(segment, unregister=True)

    @property
    def nbytes(self) -> int:
        """Bytes of every live segment."""
        with self._lock:
            return sum(s.size for s in self._segments.values())
