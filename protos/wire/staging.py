"""Host staging in pinned (page-locked) memory for copies between the host and a CUDA device.

A copy from or to pageable host memory goes through the driver's own small staging buffers, one piece
after another, at a fraction of the bus's bandwidth, and the host waits for it. From or to pinned memory
the device copies by DMA at the bus's speed, and a host-to-device copy can run while the host goes on.
Pinning has a fixed cost (the pages are locked, registered with the driver, and held out of the page
cache), so pinned buffers are kept and reused call after call, like :mod:`losswire.wire.buffers`' are for
casts, and only tensors of at least ``min_bytes`` are staged: a small one keeps the plain path.

:class:`PinnedPool` holds at most ``max_bytes`` of pinned memory, lent and idle together. A buffer is
lent only for the length of one copy: a received tensor is written into it and sent to the device without
waiting (:meth:`Staging.to_device`), and the buffer goes back with the copy's CUDA event, which the next
borrower waits on before writing into it; an answer is copied into it, read once the copy is complete, and
the buffer goes back as soon as its bytes are out (:meth:`Staging.to_host`). What the bound does not
allow takes the pageable path: staging never fails a call and never grows past the bound.

The memory is the pool's own (an anonymous mapping registered with ``cudaHostRegister``), not torch's
caching host allocator, which keeps every block it ever pinned: a buffer the pool frees is unpinned and
unmapped, so what ``held_bytes`` counts is what is pinned. The allocator is injectable: the pool's
accounting is the same with plain host memory, which is how it is tested without a device.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .buffers import size_class

MIN_STAGED_BYTES = 1 << 20  # below, pinning's fixed cost is not won back: the plain copy


class Ready(Protocol):
    """What a lent buffer's last copy completes with: a ``torch.cuda.Event``."""

    def synchronize(self) -> None: ...


class HostMemory(Protocol):
    """Where a pool's buffers come from, and go back to."""

    def allocate(self, nbytes: int) -> Tensor:
        """A uint8 CPU tensor of ``nbytes``; an exception when none can be had (the pool falls back)."""
        ...

    def free(self, buffer: Tensor) -> None:
        """Give ``buffer`` (from :meth:`allocate`, no copy reading or writing it any more) back."""
        ...


class RegisteredMemory:
    """Anonymous mappings pinned by ``cudaHostRegister``: freed for real (unpinned, unmapped) by :meth:`free`."""

    def __init__(self) -> None:
        self._mappings: dict[int, mmap.mmap] = {}  # data address -> its mapping, alive while the buffer is

    def allocate(self, nbytes: int) -> Tensor:
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer = torch.from_numpy(np.frombuffer(memory, np.uint8, nbytes))
        # cudaHostRegisterPortable: pinned for every CUDA context of the process, not only the current one
        code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 1))
        if code != 0:
            del buffer
            memory.close()
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (cudaError {code})")
        self._mappings[buffer.data_ptr()] = memory
        return buffer

    def free(self, buffer: Tensor) -> None:
        address = buffer.data_ptr()
        torch.cuda.cudart().cudaHostUnregister(address)
        # the mapping is unmapped with its last reference (the caller's tensor may still be going away)
        self._mappings.pop(address, None)


class PinnedPool:
    """At most ``max_bytes`` of pinned host buffers (lent and idle), of at least ``min_bytes`` each,
    reused by size class; ``memory`` makes them (:class:`RegisteredMemory` by default). Safe to share
    between threads.

    Counts, for metrics and tests: ``held_bytes`` (pinned now), ``lent_bytes`` (in a copy now),
    ``staged`` (copies through a pinned buffer), ``refused`` (copies the bound sent the pageable way),
    ``created`` / ``freed`` (buffers pinned / unpinned).
    """

    def __init__(self, max_bytes: int, memory: HostMemory | None = None, min_bytes: int = MIN_STAGED_BYTES) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.memory = memory if memory is not None else RegisteredMemory()
        self._lock = threading.Lock()
        self._idle: list[tuple[Tensor, Ready | None]] = []  # oldest first, each with its last copy's event
        self.held_bytes = self.lent_bytes = 0
        self.staged = self.refused = self.created = self.freed = 0

    def stages(self, nbytes: int) -> bool:
        """Whether a copy of ``nbytes`` is worth staging at all (the pool on, the tensor big enough)."""
        return self.max_bytes > 0 and nbytes >= self.min_bytes

    def take(self, nbytes: int) -> Tensor | None:
        """A pinned uint8 buffer of at least ``nbytes``, no copy still using it; None where the bound does
        not allow one (the caller copies the pageable way)."""
        size = size_class(nbytes)
        with self._lock:
            found = next((i for i in range(len(self._idle) - 1, -1, -1) if len(self._idle[i][0]) == size), None)
            evicted: list[tuple[Tensor, Ready | None]] = []
            if found is not None:
                buffer, ready = self._idle.pop(found)
            else:
                room = self._room_for(size)
                if room is None:
                    self.refused += 1
                    return None
                evicted = room
                buffer, ready = None, None
                self.held_bytes += size  # reserved before pinning, outside the lock
            self.lent_bytes += size
            self.staged += 1
        if found is None:
            self._free(evicted)
            buffer = self._allocate(size)
            if buffer is None:
                return None
        if ready is not None:
            ready.synchronize()  # the last copy from it may still be reading it
        return buffer

    def give_back(self, buffer: Tensor, ready: Ready | None = None) -> None:
        """``buffer`` back from its copy; ``ready``: the event that copy completes with (None: complete)."""
        with self._lock:
            self.lent_bytes -= len(buffer)
            self._idle.append((buffer, ready))

    def clear(self) -> None:
        """Unpin every idle buffer (lent ones stay until they come back)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self.held_bytes -= sum(len(buffer) for buffer, _ in idle)
        self._free(idle)

    def _room_for(self, size: int) -> list[tuple[Tensor, Ready | None]] | None:
        """Idle buffers to free (oldest first) so that ``size`` more fits the bound; None if it cannot.
        Called with the lock held; their bytes are no longer counted."""
        if size > self.max_bytes - self.lent_bytes:
            return None
        evicted = []
        while self.held_bytes + size > self.max_bytes:
            buffer, ready = self._idle.pop(0)
            self.held_bytes -= len(buffer)
            evicted.append((buffer, ready))
        return evicted

    def _allocate(self, size: int) -> Tensor | None:
        """A new buffer of ``size`` (reserved already); None, its reservation returned, if none can be had."""
        try:
            buffer = self.memory.allocate(size)
        except (RuntimeError, OSError):
            with self._lock:
                self.held_bytes -= size
                self.lent_bytes -= size
                self.staged -= 1
                self.refused += 1
            return None
        with self._lock:
            self.created += 1
        return buffer

    def _free(self, buffers: list[tuple[Tensor, Ready | None]]) -> None:
        for buffer, ready in buffers:
            if ready is not None:
                ready.synchronize()  # never unpin memory a copy still reads
            self.memory.free(buffer)
            with self._lock:
                self.freed += 1


def _recorded(device: torch.device) -> Ready:
    """An event recorded now on ``device``'s current stream: complete once what was queued there is."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class Staging:
    """Tensors moved between the host and a CUDA device through ``pool``'s pinned buffers when they are
    big enough and the pool has room; else the plain, pageable way (:mod:`losswire.wire.codec`'s ``stage``)."""

    def __init__(self, pool: PinnedPool) -> None:
        self.pool = pool

    def to_device(self, tensor: Tensor, device: torch.device) -> Tensor:
        """``tensor`` (on the host) on ``device``; the copy from a pinned buffer is queued on the device's
        current stream without waiting, so work queued after it on that stream (the loss) reads it complete."""
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self._take(nbytes, tensor.device.type == "cpu" and device.type == "cuda")
        if buffer is None:
            return tensor.to(device)
        try:
            host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor)
            moved = host.to(device, non_blocking=True)  # may raise (the device out of memory): nothing queued
        except BaseException:
            self.pool.give_back(buffer)
            raise
        self.pool.give_back(buffer, _recorded(device))  # reused only once the copy has read it
        return moved

    @contextlib.contextmanager
    def to_host(self, tensor: Tensor) -> Iterator[tuple[Tensor, bool]]:
        """(``tensor`` on the host, whether that memory is lent): lent memory is read inside the ``with``
        and goes back to the pool at its end, so whatever must outlive it is copied out first."""
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self._take(nbytes, tensor.device.type == "cuda")
        if buffer is None:
            yield tensor.to("cpu"), False
            return
        try:
            host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor, non_blocking=True)
            _recorded(tensor.device).synchronize()  # the bytes are on the host only once the copy is done
            yield host, True
        finally:
            self.pool.give_back(buffer)

    def _take(self, nbytes: int, crosses: bool) -> Tensor | None:
        return self.pool.take(nbytes) if crosses and self.pool.stages(nbytes) else None
