"""Shared-memory segments: how a caller on the server's host hands over tensors without the wire.

A segment is a POSIX shared-memory object (``/dev/shm/losswire_*``). The caller creates it, holds a
shared ``flock`` on it for as long as it lives, writes a random nonce at its start and registers it
(``RegisterSharedMemory``); the server opens it by name, checks the nonce, and removes the name.
From then on the memory has no name: the kernel frees it when the last process that maps it
unmaps it or dies, so neither side's crash leaves a segment behind. The server tells a dead caller
by the lock: once it can take an exclusive lock, nobody holds the shared one.

Tensors then travel as ``Tensor.shm`` references (region, offset, byte_size): the caller copies a
tensor in once, the server computes on a view of the same pages, and writes the answer's big
tensors into the caller's output range, which the caller reads in place.

This module is the layout both sides agree on: names, the nonce, alignment, size classes, a mapped
:class:`Segment`, a :class:`SegmentRange` handed out front to back, and how ``Tensor.shm``
references are checked against their declared dtype and shape (:func:`shared_memory_tensors`).
The caller's pool lives in ``losswire.client``, the server's registry in ``losswire.server``.

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
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb

from .buffers import size_class
from .codec import CodecError, check_shape, wire_dtypes

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


# resolve(ref, field) -> a uint8 tensor viewing ref's bytes (checked against the region's bounds)
Resolve = Callable[[pb.SharedMemoryRef, str], Tensor]


# resolve(ref, field) -> a uint8 tensor viewing ref's bytes (checked against the region's bounds)
Resolve = Callable[[pb.SharedMemoryRef, str], Tensor]


def shared_memory_tensors(
    tensors: Iterable[tuple[str, pb.Tensor]], resolve: Resolve, max_elements: int | None = None
) -> dict[str, Tensor]:
    """Those of ``tensors`` (a message's ``tensors_of``: field path, Tensor) that lie in shared memory
    (``Tensor.shm``), by field path, viewed in place (declared shape, data dtype) for
    ``decode_tensor(..., streamed=...)``.

    The reference must agree with the declared dtype and shape: ``byte_size`` the tensor's bytes,
    the offset a multiple of the item size, and ``data`` empty; otherwise a CodecError names it.
    """
    found: dict[str, Tensor] = {}
    for path, message in tensors:
        if not message.HasField("shm"):
            continue
        ref, field = message.shm, f"{path}.shm"
        _, data_dtype = wire_dtypes(message, path)
        shape = list(message.shape)
        numel = check_shape(shape, path, max_elements=max_elements)
        if message.data:
            raise CodecError(f"{path} has both data and shm; send its bytes one way", field=f"{path}.data")
        expected = numel * data_dtype.itemsize
        if ref.byte_size != expected:
            raise CodecError(
                f"{field}.byte_size must be {numel} x {data_dtype.itemsize} = {expected} for shape {shape}, "
                f"got {ref.byte_size}",
                field=f"{field}.byte_size",
            )
        if ref.offset % data_dtype.itemsize:
            raise CodecError(
                f"{field}.offset must be a multiple of {data_dtype.itemsize} (the item size), got {ref.offset}",
                field=f"{field}.offset",
            )
        data = resolve(ref, field)
        found[path] = data.view(data_dtype).reshape(shape) if numel else torch.empty(shape, dtype=data_dtype)
    return found
