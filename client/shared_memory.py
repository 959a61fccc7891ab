"""Shared-memory segments: how a caller on the server's host moves tensors without the wire.

A segment is a POSIX shared-memory object (``/dev/shm/losswire_*``). The caller creates it, holds a
shared ``flock`` on it for as long as it lives, writes a random nonce at its start and registers it
(``RegisterSharedMemory``); the server opens it by name, checks the nonce, and removes the name.
From then on the memory has no name: the kernel frees it when the last process that maps it
unmaps it or dies, so neither side's crash leaves a segment behind. The server tells a dead caller
by the lock: once it can take an exclusive lock, nobody holds the shared one.

Tensors then travel as ``Tensor.shm`` references (region, offset, byte_size): the caller copies a
tensor in once, the server computes on a view of the same pages, and writes the answer's big
tensors into the caller's output range, which the caller reads in place.

:class:`SharedMemoryPool` is the caller's side: segments reused call after call, each lent to one
call at a time (:class:`Lease`) and returned once the call is over and no tensor of its answer is
alive any more (a finalizer on the numpy array the answer's views are cut from).

Linux only (POSIX shared memory under /dev/shm); :func:`supported` says whether this host has it.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .buffers import size_class

SEGMENT_DIR = "/dev/shm"
NAME_PREFIX = "losswire_"
NAME_PATTERN = re.compile(r"losswire_[A-Za-z0-9_]{1,200}")
NONCE_BYTES = 16
ALIGNMENT = 64  # every tensor starts on a cache line: vector loads stay aligned
MIN_SEGMENT_BYTES = 1 << 20
STALE_SECONDS = 60.0  # an unlocked, unregistered segment this old was left by a caller that died


def segment_size(nbytes: int) -> int:
    """The size of a new segment for ``nbytes``: at least 1 MiB, rounded up to a size class (a
    power of two times 1, 1.25, 1.5 or 1.75: at most 25 % unused, and reusable by similar calls)."""
    return size_class(max(nbytes, MIN_SEGMENT_BYTES))


def supported() -> bool:
    """Whether this host has POSIX shared memory where this module looks for it."""
    return os.path.isdir(SEGMENT_DIR) and os.access(SEGMENT_DIR, os.W_OK)


def align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _path(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"a shared-memory name must be {NAME_PREFIX!r} and 1-200 letters, digits or '_'; got {name!r}")
    return os.path.join(SEGMENT_DIR, name)


class Segment:
    """One mapped segment: ``fd`` (held open for its lock), ``memory`` (the mapping), ``size``."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name, self.fd, self.size = name, fd, size
        self.memory = mmap.mmap(fd, size)
        self.array = np.frombuffer(self.memory, dtype=np.uint8)  # whole segment; slices are views

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new segment of ``size`` bytes, locked shared (ours while this process lives), with a
        fresh nonce at offset 0. Only its creator's user may open it (mode 0600)."""
        name = f"{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(8)}"
        fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            # allocate every page now: a full /dev/shm fails here (ENOSPC) instead of killing whichever
            # process first touches an unbacked page (SIGBUS), the server writing an answer included
            os.posix_fallocate(fd, 0, size)
            segment = cls(name, fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(_path(name))
            raise
        segment.array[:NONCE_BYTES] = np.frombuffer(secrets.token_bytes(NONCE_BYTES), dtype=np.uint8)
        return segment

    @classmethod
    def open(cls, name: str, size: int) -> Segment:
        """Map an existing segment (the server's side). FileNotFoundError: no such segment here;
        ValueError: a bad name, not a plain file, or smaller than ``size``."""
        fd = os.open(_path(name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{name} is not a shared-memory segment")
            if info.st_size < size or size <= 0:
                raise ValueError(f"segment {name} has {info.st_size} bytes; byte_size {size} must be 1 to that")
            return cls(name, fd, size)
        except BaseException:
            os.close(fd)
            raise

    @property
    def nonce(self) -> bytes:
        return self.array[:NONCE_BYTES].tobytes()

    def unlink(self) -> None:
        """Remove the name (the memory stays while it is mapped)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(self.name))

    def owner_gone(self) -> bool:
        """True once no other process holds its shared lock (the server's test for a dead caller)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def truncated(self) -> bool:
        """Whether the file shrank below the mapped size (touching the lost pages would be SIGBUS)."""
        try:
            return os.fstat(self.fd).st_size < self.size
        except OSError:
            return True

    def bytes_at(self, offset: int, count: int) -> Tensor:
        """A uint8 tensor viewing ``count`` bytes at ``offset`` (shares the memory; keeps it mapped)."""
        return torch.from_numpy(self.array[offset : offset + count])

    def close(self) -> None:
        """Close the descriptor. The mapping stays while anything views it (a call in flight, an
        answer's tensors) and is unmapped when the last view is freed; the lock goes with it (the
        mapping keeps a duplicate of the descriptor, which shares the lock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sweep_stale(now: float | None = None) -> int:
    """Remove segments whose creator died between creating and registering them (nobody holds
    their lock, and they are older than ``STALE_SECONDS``). Returns how many were removed."""
    now = time.time() if now is None else now
    removed = 0
    try:
        names = [n for n in os.listdir(SEGMENT_DIR) if NAME_PATTERN.fullmatch(n)]
    except OSError:
        return 0
    for name in names:
        path = os.path.join(SEGMENT_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < STALE_SECONDS:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            removed += 1
        except OSError:
            pass  # locked (alive), or gone already
        finally:
            os.close(fd)
    return removed


class SegmentRange:
    """Room in bytes [start, end) of a segment, handed out front to back, each piece 64-byte aligned:
    ``range(nbytes)`` is (region, offset, a uint8 view of nbytes) or None when it does not fit (a
    ``codec.StreamSink.place`` reserve). The caller's inputs and the server's answers use it alike."""

    def __init__(self, segment: Segment, region: str, start: int, end: int) -> None:
        self.segment, self.region, self.end = segment, region, end
        self.cursor = align(start)

    def __call__(self, nbytes: int) -> tuple[str, int, Tensor] | None:
        offset = self.cursor
        if offset + nbytes > self.end:
            return None
        self.cursor = align(offset + nbytes)
        return self.region, offset, self.segment.bytes_at(offset, nbytes)


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
        """A uint8 view of the answer's bytes ``ref`` names (``codec.shared_memory_tensors``'s
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
