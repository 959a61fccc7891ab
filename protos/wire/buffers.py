"""Big byte buffers reused call after call instead of fresh memory every time.

A tensor that arrives in chunks is reassembled into one buffer. Fresh memory of that size comes
straight from the kernel (glibc maps every block above 32 MiB anew, and gives it back on free), and
its first write costs a page fault per 4 KiB page: measured here, filling a fresh 64 MiB buffer
took 20-27 ms against 3.5-4.5 ms for the same copies into a buffer already written once. A training
loop sends and receives tensors of the same sizes every step, so keeping the buffer of one call
for the next saves most of the receiving side's time.

:class:`BufferPool` lends buffers as uint8 tensors. A buffer returns to the pool once no tensor
viewing it is alive (a finalizer on the numpy array the tensor is made from), so a buffer that a
caller keeps, as ``.grad`` or in a list, is never lent twice; one freed is lent again to the next
call of the same size class. Idle buffers beyond ``max_idle_bytes`` are freed, oldest first.

The memory is a private anonymous mapping: a forked child gets copy-on-write pages, never the
parent's buffers themselves.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

MIN_POOLED_BYTES = 1 << 20  # smaller blocks come from malloc's own reused heap: nothing to save
DEFAULT_IDLE_BYTES = 1 << 30


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to a power of two times 1, 1.25, 1.5 or 1.75: at most 25 % unused, and
    one class for calls whose sizes differ a little."""
    step = 1 << max(nbytes.bit_length() - 3, 0)  # a quarter of the power of two below nbytes
    return -(-nbytes // step) * step


class BufferPool:
    """Reusable byte buffers of at least :data:`MIN_POOLED_BYTES`; ``max_idle_bytes`` bounds the idle
    ones kept (0: no pool, every ``take`` is fresh memory). Safe to share between threads."""

    def __init__(self, max_idle_bytes: int = DEFAULT_IDLE_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        # reentrant: a finalizer may run in a thread that holds the lock already (a collection
        # triggered inside take)
        self._lock = threading.RLock()
        self._idle: list[mmap.mmap] = []  # oldest first
        self.reused = self.created = 0  # buffers lent from the pool / mapped anew (for tests and benchmarks)

    def take(self, nbytes: int) -> Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined), from an idle buffer of its size class
        when there is one."""
        if nbytes < MIN_POOLED_BYTES or self.max_idle_bytes <= 0:
            return torch.empty(nbytes, dtype=torch.uint8)
        size = size_class(nbytes)
        with self._lock:
            memory = next((m for m in reversed(self._idle) if len(m) == size), None)
            if memory is not None:
                self._idle.remove(memory)
                self.reused += 1
            else:
                self.created += 1
        if memory is None:
            memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # an array of its own over the mapping: every view of the tensor keeps it alive, and its
        # end (the last view freed) hands the mapping back
        array = np.frombuffer(memory, np.uint8, nbytes)
        weakref.finalize(array, self._give_back, memory)
        return torch.from_numpy(array)

    def _give_back(self, memory: mmap.mmap) -> None:
        with self._lock:
            self._idle.append(memory)
            while self._idle and self.idle_bytes > self.max_idle_bytes:
                # dropped, not closed: the array being freed still holds the mapping's buffer; the
                # mapping goes with its last reference
                self._idle.pop(0)

    @property
    def idle_bytes(self) -> int:
        """Bytes of the idle buffers kept for reuse."""
        with self._lock:
            return sum(len(m) for m in self._idle)

    def clear(self) -> None:
        """Free every idle buffer (lent ones are freed with their last view)."""
        with self._lock:
            self._idle.clear()
