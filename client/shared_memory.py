"""The caller's side of shared memory: sealed segments handed to the server, reused call after call.

:class:`SharedMemoryPool` lends segments (``losswire.wire.shared_memory``) one call at a time
(:class:`Lease`). It asks the server's endpoint and a connection key once, keeps one Unix connection to it for
the process's life (the server's sign that this process lives: when it closes, the server drops what it
handed over), sends the connection key first, hands each new segment over on it and registers the claim it got
back.

A segment returns to the pool once its call ended with an answer and no tensor of that answer is alive
any more (a finalizer on the numpy array the answer's views are cut from). A call that did not end
cleanly (a deadline, a cancellation, an error) **retires** its segment instead: unregistered and never
lent again, so whatever the server may still write there lands in memory nobody reads.

A forked child (a DataLoader worker) starts afresh: the parent's segments and connection are
forgotten in the child (their descriptors closed there), and its first lease connects on its own.
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

from losswire.wire.shared_memory import Link, Segment, SegmentRange, segment_size

_POOLS: weakref.WeakSet[SharedMemoryPool] = weakref.WeakSet()


class Lease:
    """One call's use of one registered segment: inputs from offset 0 up (``reserve``), then the rest as
    the output range (``reserve_outputs``, ``output_bytes``). It ends with ``done()`` (an answer came)
    or ``retire()`` (it did not)."""

    def __init__(self, pool: SharedMemoryPool, segment: Segment, region: str) -> None:
        self.pool, self.segment, self.region = pool, segment, region
        self.inputs = SegmentRange(segment, region, 0, segment.size)
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
        self.outputs = np.frombuffer(self.segment.buffer, np.uint8, self.output_size, self.output_offset)
        weakref.finalize(self.outputs, self.pool.give_back, self.segment)
        return self.output_offset, self.output_size

    def output_bytes(self, ref: Any, field: str) -> Tensor:
        """A uint8 view of the answer's bytes ``ref`` names (``wire_memory.shared_memory_tensors``'s
        ``resolve``); a ValueError unless they lie in this call's output range."""
        start = ref.offset - self.output_offset
        inside = self.outputs is not None and start >= 0 and ref.offset + ref.byte_size <= self.segment.size
        if ref.region != self.region or not inside:
            raise ValueError(
                f"{field}: the server answered bytes [{ref.offset}, {ref.offset + ref.byte_size}) outside this "
                f"call's output range [{self.output_offset}, {self.segment.size}) of its region"
            )
        return torch.from_numpy(self.outputs[start : start + ref.byte_size])

    def done(self) -> None:
        """The call ended with an answer: the segment returns to the pool when the answer's views are freed."""
        if self.outputs is None:
            self.pool.give_back(self.segment)
        self.outputs = None

    def retire(self) -> None:
        """The call did not end cleanly: the server may still be writing into this segment (a kernel that
        began before the deadline). It is unregistered and never lent again; its memory is freed with the
        last view of it."""
        self.outputs = None
        self.pool.retire(self.segment)


Endpoint = Callable[[], "tuple[str, int]"]  # the handoff socket and a connection key for it (SharedMemoryEndpoint)
Register = Callable[[str, int], str]  # (claim, byte_size) -> region (RegisterSharedMemory)
Unregister = Callable[[str, bool], None]  # (region, wait): UnregisterSharedMemory; wait=False: send and go on


class SharedMemoryPool:
    """The caller's registered segments, lent one call at a time.

    ``endpoint()``, ``register(claim, byte_size) -> region`` and ``unregister(region, wait)`` are the RPCs
    (the pool knows no gRPC). A call needing ``n`` bytes gets the smallest idle segment of at least ``n``
    bytes, else a new one of the next size class (at least 1 MiB), handed over on the pool's connection.
    At most ``max_idle`` idle segments are kept; more are unregistered and freed.
    """

    def __init__(
        self, endpoint: Endpoint, register: Register, unregister: Unregister, max_idle: int = 4, timeout: float = 30.0
    ) -> None:
        self._endpoint, self._register, self._unregister = endpoint, register, unregister
        self.max_idle, self.timeout = max_idle, timeout
        self._lock = threading.Lock()
        self._link_lock = threading.Lock()  # one handoff at a time on the connection
        self._link: Link | None = None
        self._regions: dict[Segment, str] = {}  # every live segment, lent or idle -> its region
        self._idle: list[Segment] = []
        _POOLS.add(self)

    def lease(self, nbytes: int) -> Lease:
        """A segment of at least ``nbytes`` bytes, registered. Raises what the RPCs raise, OSError (no
        connection to the endpoint; no memory for a segment) and HandoffRefusedError (the server refused)."""
        with self._lock:
            fitting = [s for s in self._idle if s.size >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda s: s.size)
                self._idle.remove(segment)
                return Lease(self, segment, self._regions[segment])
        segment = Segment.create(segment_size(nbytes))
        try:
            region = self._register(self._hand_over(segment), segment.size)
        finally:
            segment.close()  # the server has its own descriptor (or none); the mapping stays
        with self._lock:
            self._regions[segment] = region
        return Lease(self, segment, region)

    def _hand_over(self, segment: Segment) -> str:
        """``segment`` handed over on the pool's connection (made on first use; made again, once, when the
        one kept from before was closed by the server's side): the server's claim."""
        with self._link_lock:
            if self._link is not None:
                try:
                    return self._link.hand_over(segment)
                except ConnectionError:  # the server restarted, or dropped this connection
                    self._link.close()
                    self._link = None
            address, connection_key = self._endpoint()
            self._link = Link(address, connection_key, self.timeout)
            return self._link.hand_over(segment)

    def give_back(self, segment: Segment) -> None:
        with self._lock:
            if segment not in self._regions:
                return  # retired, or forgotten by reset() or close(): freed with its last view
            self._idle.append(segment)
            extra = sorted(self._idle, key=lambda s: s.size)[: max(len(self._idle) - self.max_idle, 0)]
            for old in extra:
                self._idle.remove(old)
        for old in extra:
            self._drop(old, unregister=True, wait=True)

    def retire(self, segment: Segment) -> None:
        """Never lend ``segment`` again; unregister it without waiting (the server may be busy)."""
        with self._lock:
            if segment in self._idle:
                self._idle.remove(segment)
        self._drop(segment, unregister=True, wait=False)

    def _drop(self, segment: Segment, unregister: bool, wait: bool) -> None:
        with self._lock:
            region = self._regions.pop(segment, None)
        if unregister and region is not None:
            # best effort: the server drops it anyway when this process's connection closes
            with contextlib.suppress(Exception):
                self._unregister(region, wait)

    def reset(self) -> None:
        """Forget every segment and the connection (the server no longer knows them: it restarted, or this
        client's gRPC connection changed). Closing the connection makes the server drop whatever it still
        holds of ours; lent segments are freed when their calls' views are; the next lease starts afresh."""
        with self._lock:
            self._regions.clear()
            self._idle.clear()
        with self._link_lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()

    def close(self) -> None:
        """Unregister and free every segment; close the connection."""
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
            self._idle.clear()
        for region in regions:
            with contextlib.suppress(Exception):
                self._unregister(region, True)
        self.reset()

    def _after_fork(self) -> None:
        """In a forked child: the parent's segments and connection are the parent's. Close the child's
        copy of the connection (else the server would not notice the parent's death while the child
        lives) and start afresh."""
        self._lock, self._link_lock = threading.Lock(), threading.Lock()
        self._regions, self._idle = {}, []
        if self._link is not None:
            with contextlib.suppress(OSError):
                self._link.close()
            self._link = None

    @property
    def nbytes(self) -> int:
        """Bytes of every live segment."""
        with self._lock:
            return sum(s.size for s in self._regions)

    @property
    def regions(self) -> list[str]:
        """The regions of every live segment (lent or idle)."""
        with self._lock:
            return list(self._regions.values())

    def segment_of(self, pointer: int) -> Segment | None:
        """The live segment whose memory holds address ``pointer`` (None: none)."""
        with self._lock:
            for segment in self._regions:
                start = segment.array.ctypes.data
                if start <= pointer < start + segment.size:
                    return segment
        return None


def _forget_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
