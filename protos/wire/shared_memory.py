"""Shared-memory segments: how a caller on the server's host hands over tensors without the wire.

A segment is a memfd (``memfd_create``: no name in any file system), sized with ``ftruncate``, every
page allocated with ``posix_fallocate`` (a full system fails there, with ENOSPC or ENOMEM, instead of
killing whichever process first touches a missing page with SIGBUS), sealed against shrinking and
growing (``F_SEAL_SHRINK | F_SEAL_GROW``) and mapped shared. The caller hands its descriptor to the
server over a Unix socket (``SCM_RIGHTS``) and gets a one-time claim back; ``RegisterSharedMemory
(claim)`` turns it into a region. The server maps a descriptor only after :meth:`Segment.adopt`'s
checks (a memfd of the declared size, every page allocated, the shrink and grow seals set), then seals
it against new writable mappings and hole punching (``F_SEAL_FUTURE_WRITE | F_SEAL_SEAL``): nobody can
cut a segment short or free its pages under the server, so a view of it never faults.

Tensors then travel as ``Tensor.shm`` references (region, offset, byte_size): the caller copies a
tensor in once, the server computes on a view of the same pages, and writes the answer's big
tensors into the caller's output range, which the caller reads in place.

This module is what both sides agree on: alignment, size classes, a mapped :class:`Segment`, a
:class:`SegmentRange` handed out front to back, the handoff's framing over the Unix socket (the
caller's end is :class:`Link`; the server's listener lives in ``losswire.server``), and how
``Tensor.shm`` references are checked against their declared dtype and shape
(:func:`shared_memory_tensors`). The caller's pool lives in ``losswire.client``.

Linux only (memfd, seals, descriptor passing); :func:`supported` says whether this host has them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import socket
import stat
import struct
import sys
import weakref
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb

from .buffers import size_class
from .codec import CodecError, check_shape, wire_dtypes

ALIGNMENT = 64  # every tensor starts on a cache line: vector loads stay aligned
MIN_SEGMENT_BYTES = 1 << 20
MEMFD_NAME = "losswire"  # shown in /proc/<pid>/maps as /memfd:losswire; in no file system
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE = 0x1, 0x2, 0x4, 0x8, 0x10  # <linux/fcntl.h>
CALLER_SEALS = F_SEAL_SHRINK | F_SEAL_GROW  # the caller's: nobody can cut the segment short or grow it
# the server's, once it has mapped the segment: nobody can map it writable again, write(2) it or punch holes
# in it (fallocate, madvise(MADV_REMOVE): a page freed under a mapping is refaulted, SIGBUS where memory is
# short); the mappings made before (the caller's, the server's) stay writable. F_SEAL_SEAL: no more seals.
SERVER_SEALS = F_SEAL_FUTURE_WRITE | F_SEAL_SEAL
TMPFS_MAGIC = 0x01021994  # statfs f_type of shmem, where memfds live (hugetlbfs is refused: its pool runs out)

# -- the handoff's framing over the Unix socket (documented in loss_service.proto) ------------------
MAGIC = b"LWSM"
VERSION = 1
HANDOFF = 1  # the kind of a handoff message: its value is the segment's byte_size, one fd attached
CONNECTION_KEY = 2  # the kind of a connection's first message: the key SharedMemoryEndpoint answered
HANDOFF_FRAME = struct.Struct("!4sBBHQ")  # magic, version, kind, zero, value: 16 bytes
ANSWER_HEAD = struct.Struct("!4sBBH")  # magic, version, status, length of the UTF-8 text that follows
MAX_ANSWER_TEXT = 4096
PEERCRED = struct.Struct("3i")  # struct ucred (SO_PEERCRED): pid, uid, gid
# answer statuses: 0 accepts; the rest are google.rpc codes (the numbers gRPC uses)
OK = 0
INVALID_ARGUMENT = 3
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
UNAVAILABLE = 14


def segment_size(nbytes: int) -> int:
    """The size of a new segment for ``nbytes``: at least 1 MiB, rounded up to a size class (a
    power of two times 1, 1.25, 1.5 or 1.75: at most 25 % unused, and reusable by similar calls)."""
    return size_class(max(nbytes, MIN_SEGMENT_BYTES))


@functools.cache
def supported() -> bool:
    """Whether this host can make sealed memfds and pass descriptors over Unix sockets (tried once)."""
    needed = hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and hasattr(fcntl, "F_ADD_SEALS")
    if not needed or not sys.platform.startswith("linux"):
        return False
    try:
        Segment.create(mmap.PAGESIZE).close()
    except OSError:  # a sandbox that forbids memfd_create or sealing
        return False
    return True


def align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


# -- mapping without a descriptor ----------------------------------------------------------------------
# Python's mmap keeps a duplicate of the descriptor for the mapping's life: one descriptor per region
# held by the server. Mapped through libc instead, a region costs none: the descriptor is closed once
# mapped, and the mapping is unmapped when the last view of it is freed.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
MAP_FAILED = ctypes.c_void_p(-1).value


def _map_shared(fd: int, size: int) -> ctypes.Array:
    """``size`` bytes of ``fd`` mapped shared, read-write, as a ctypes array; unmapped when the array
    (and so every numpy array or tensor made from it) is freed."""
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address in (None, MAP_FAILED):
        code = ctypes.get_errno()
        raise OSError(code, f"mmap of {size} bytes: {os.strerror(code)}")
    memory = (ctypes.c_uint8 * size).from_address(address)
    weakref.finalize(memory, _libc.munmap, address, size)
    return memory


def _filesystem_type(fd: int) -> int | None:
    """statfs's f_type of the file ``fd`` lies in (None where the call fails)."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux; f_type first
    if _libc.fstatfs(fd, buffer) != 0:
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def _missing_seals(seals: int) -> list[str]:
    return [name for bit, name in ((F_SEAL_SHRINK, "F_SEAL_SHRINK"), (F_SEAL_GROW, "F_SEAL_GROW")) if not seals & bit]


def size_mismatch(actual: int, declared: int) -> str | None:
    """Why a segment of ``actual`` bytes is not the ``declared`` bytes of its handoff (None: it is)."""
    if actual == declared:
        return None
    return f"the segment handed over has {actual} bytes, its handoff declared {declared}"


class SegmentRefusedError(ValueError):
    """A descriptor handed over is not a segment the server may map; the message names what is missing.
    ``exhausted``: it was fine, but the system has no memory left to back it."""

    def __init__(self, message: str, exhausted: bool = False) -> None:
        super().__init__(message)
        self.exhausted = exhausted


class Segment:
    """One mapped segment: ``size`` bytes, ``array`` (uint8, the whole segment), ``fd`` (-1 once closed).

    The mapping lives as long as anything views it (``array``, ``buffer``, tensors from
    :meth:`bytes_at`), whether or not the descriptor is still open."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.buffer = _map_shared(fd, size)
        self.array = np.frombuffer(self.buffer, dtype=np.uint8)  # whole segment; slices are views

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new segment of ``size`` bytes, every page allocated (OSError ENOSPC or ENOMEM when the
        system has no room: now, not as a SIGBUS later), sealed against shrinking and growing, mapped."""
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, CALLER_SEALS)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int, size: int) -> Segment:
        """Map a descriptor handed over (the server's side), after checking that it is a memfd of exactly
        ``size`` bytes, every page allocated, sealed against shrinking and growing; then seal it against
        new writable mappings and hole punching (``SERVER_SEALS``) and allocate any page freed before
        that, so that every page of the mapping stays backed for its life.

        Takes ``fd``: it is closed whether or not the segment is adopted (a mapping needs no descriptor,
        so an adopted segment costs the server none). SegmentRefusedError names what is missing."""
        try:
            _check_handed_over(fd, size)
            try:
                segment = cls(fd, size)
            except OSError as error:  # F_SEAL_WRITE / F_SEAL_FUTURE_WRITE forbid a writable mapping
                message = f"the segment handed over cannot be mapped writable: {error.strerror}"
                raise SegmentRefusedError(message) from None
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SERVER_SEALS)
            except OSError as error:
                if error.errno != errno.EINVAL:  # EINVAL: a kernel before 5.1 (no F_SEAL_FUTURE_WRITE)
                    raise SegmentRefusedError(f"the segment handed over cannot be sealed: {error.strerror}") from None
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_SEAL)
            try:
                os.posix_fallocate(fd, 0, size)  # pages punched out before the seal: backed again, or refused
            except OSError as error:
                message = f"no memory to back the {size} bytes handed over: {error.strerror}"
                raise SegmentRefusedError(message, exhausted=True) from None
        finally:
            os.close(fd)
        segment.fd = -1
        return segment

    def bytes_at(self, offset: int, count: int) -> Tensor:
        """A uint8 tensor viewing ``count`` bytes at ``offset`` (shares the memory; keeps it mapped)."""
        return torch.from_numpy(self.array[offset : offset + count])

    def close(self) -> None:
        """Close the descriptor (idempotent). The mapping stays while anything views it (a call in flight,
        an answer's tensors) and is unmapped when the last view is freed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_handed_over(fd: int, size: int) -> None:
    """SegmentRefusedError unless ``fd`` is a memfd of ``size`` bytes, every page allocated, sealed against
    shrinking and growing (``CALLER_SEALS``) and not yet against writing or further seals."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SegmentRefusedError("the descriptor handed over is not a regular file (a memfd)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as error:  # a file that cannot be sealed at all, or a descriptor of no open file (O_PATH)
        raise SegmentRefusedError(
            f"the descriptor handed over is not a memfd that can be sealed (F_GET_SEALS: {error.strerror})"
        ) from None
    missing = _missing_seals(seals)
    if missing:
        raise SegmentRefusedError(
            f"the segment handed over is not sealed with {' and '.join(missing)}: its owner could shrink or grow "
            "it under the server (memfd_create with MFD_ALLOW_SEALING, then F_ADD_SEALS)"
        )
    if seals & (F_SEAL_SEAL | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise SegmentRefusedError(
            "the segment handed over is sealed with F_SEAL_SEAL or against writing: the server writes answers "
            "into it and adds F_SEAL_FUTURE_WRITE and F_SEAL_SEAL itself once it has mapped it"
        )
    if size <= 0:
        raise SegmentRefusedError(f"the handoff declared {size} bytes: a segment must hold at least one byte")
    mismatch = size_mismatch(info.st_size, size)
    if mismatch is not None:
        raise SegmentRefusedError(mismatch)
    kind = _filesystem_type(fd)
    if kind is not None and kind != TMPFS_MAGIC:
        raise SegmentRefusedError(f"the segment handed over is not a memfd on shmem (file system type {kind:#x})")
    allocated = info.st_blocks * 512
    if allocated < size:
        raise SegmentRefusedError(
            f"the segment handed over is sparse ({allocated} of {size} bytes allocated): allocate every page "
            "(posix_fallocate) before handing it over"
        )


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


# -- the handoff: framing and the caller's end -----------------------------------------------------------


class HandoffRefusedError(Exception):
    """The server refused a connection or a handoff: ``status`` (a google.rpc code number) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def socket_address(address: str) -> str:
    """The AF_UNIX address of an endpoint: ``@name`` is the abstract name ``\\0name``; else a path."""
    return "\0" + address[1:] if address.startswith("@") else address


def answer_frame(status: int, text: str) -> bytes:
    """An answer (the connection's greeting, or a handoff's): the status and its UTF-8 text."""
    data = text.encode()[:MAX_ANSWER_TEXT]
    return ANSWER_HEAD.pack(MAGIC, VERSION, status, len(data)) + data


def handoff_frame(byte_size: int) -> bytes:
    return HANDOFF_FRAME.pack(MAGIC, VERSION, HANDOFF, 0, byte_size)


def connection_key_frame(connection_key: int) -> bytes:
    return HANDOFF_FRAME.pack(MAGIC, VERSION, CONNECTION_KEY, 0, connection_key)


def parse_frame(frame: bytes) -> tuple[int, int]:
    """A caller's message: (its kind, HANDOFF or CONNECTION_KEY; its value); ValueError for anything else."""
    magic, version, kind, zero, value = HANDOFF_FRAME.unpack(frame)
    if magic != MAGIC or version != VERSION or kind not in (HANDOFF, CONNECTION_KEY) or zero:
        raise ValueError(
            f"not a version-{VERSION} handoff or connection-key message (magic {magic!r}, version {version}, "
            f"kind {kind}); "
            "see loss_service.proto, RegisterSharedMemory"
        )
    return kind, value


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        part = sock.recv(count - len(data))
        if not part:
            raise ConnectionResetError(errno.ECONNRESET, "the losswire server closed the shared-memory connection")
        data += part
    return bytes(data)


def read_answer(sock: socket.socket) -> tuple[int, str]:
    """One answer from the server: (status, text)."""
    magic, version, status, length = ANSWER_HEAD.unpack(_receive_exactly(sock, ANSWER_HEAD.size))
    if magic != MAGIC or version != VERSION:
        raise ConnectionError(f"not a losswire shared-memory endpoint (it answered {magic!r}, version {version})")
    return status, _receive_exactly(sock, length).decode(errors="replace")


class Link:
    """The caller's end of the handoff connection: connected once, kept open for the process's life
    (the server drops the regions handed over on it when it closes), its first message the ``connection_key``
    SharedMemoryEndpoint answered (it ties the connection to the caller's token). ``hand_over`` is
    thread-safe when the caller serializes it (the pool holds a lock)."""

    def __init__(self, address: str, connection_key: int, timeout: float | None = 30.0) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(socket_address(address))
            # the listening process: our own user's, or our memory would go to someone else's process
            _, uid, _ = PEERCRED.unpack(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
            if uid != os.geteuid():
                raise HandoffRefusedError(
                    PERMISSION_DENIED,
                    f"the shared-memory socket {address} belongs to uid {uid}, this caller runs as uid {os.geteuid()}; "
                    "memory is handed only to a server of the caller's own user",
                )
            # the connection key at once, before the greeting: it is then there when the server accepts, which takes it
            # before anything can make this connection wait (or make way for a newer one). Refused and closed
            # already (a broken pipe): the greeting, still to be read, says why.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.sock.sendall(connection_key_frame(connection_key))
            self._answered()  # the greeting: accepted, or refused and closed
            self._answered()  # the connection key: taken, or refused and closed
        except BaseException:
            self.sock.close()
            raise

    def _answered(self) -> str:
        status, text = read_answer(self.sock)
        if status != OK:
            raise HandoffRefusedError(status, text)
        return text

    def hand_over(self, segment: Segment) -> str:
        """Send ``segment``'s descriptor; the server's one-time claim for RegisterSharedMemory
        (HandoffRefusedError when the server refuses the segment)."""
        socket.send_fds(self.sock, [handoff_frame(segment.size)], [segment.fd])
        return self._answered()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


# resolve(ref, field) -> a uint8 tensor viewing ref's bytes (checked against the region's bounds)
Resolve = Callable[[pb.SharedMemoryRef, str], Tensor]


def shared_memory_tensors(
    tensors: Iterable[tuple[str, pb.Tensor]], resolve: Resolve, max_elements: int | None = None
) -> dict[str, Tensor]:
    """Those of ``tensors`` (a message's ``tensors_of``: field path, Tensor) that lie in shared memory
    (``Tensor.shm``), by field path, as views of the segment (declared shape, data dtype) for
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
