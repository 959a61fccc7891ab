"""The server's registered shared-memory regions (RegisterSharedMemory; see client/shared_memory.py).

A region is a caller's segment, mapped here once and named by a random handle. Requests then name
tensors by (region, offset, byte_size): inputs are viewed in place (no copy), and the answer's big
tensors are written into the caller's output range. A region is dropped on UnregisterSharedMemory,
when its caller has gone (the caller's shared lock is free: checked every ``sweep_seconds`` by a
daemon thread), and when the server stops.

Trust: a caller that shares memory with the server can change it while a call runs (its own call
then computes on what it wrote) or shrink the segment (the server checks the size before each
call, but a shrink racing a running call would fault the process). Shared memory is for
co-located callers the operator trusts; ``losswire serve --shared-memory off`` turns it off.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable

import torch

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import shared_memory as wire_memory
from losswire.wire.shared_memory import NAME_PATTERN, NONCE_BYTES, Segment, SegmentRange

from ..errors import AccessDeniedError, LimitExceededError, NotAvailableError, NotFoundError, RequestError

log = logging.getLogger("losswire.server")
SWEEP_SECONDS = 2.0


class SharedMemoryRegistry:
    """Regions by handle. ``enabled`` False: every call is FAILED_PRECONDITION; ``max_bytes``: the
    mapped bytes of all regions together (beyond: RESOURCE_EXHAUSTED)."""

    def __init__(self, enabled: bool = True, max_bytes: int | None = None, sweep_seconds: float = SWEEP_SECONDS):
        self.enabled, self.max_bytes = enabled, max_bytes
        self._regions: dict[str, Segment] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.sweep_seconds = sweep_seconds

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_loop, name="losswire-shm-sweeper", daemon=True)
            self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for segment in regions:
            segment.close()

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_seconds):
            self.sweep()

    def sweep(self) -> list[str]:
        """Drop every region whose caller has gone; returns their handles."""
        with self._lock:
            gone = [region for region, segment in self._regions.items() if segment.owner_gone()]
            dropped = [self._regions.pop(region) for region in gone]
        for region, segment in zip(gone, dropped, strict=True):
            log.info("shared memory: region %s (%d bytes) dropped, its caller has gone", region, segment.size)
            segment.close()
        return gone

    # -- the RPCs --------------------------------------------------------------------------------

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise NotAvailableError(
                "shared memory is off on this server (losswire serve --shared-memory on); send tensors inline"
            )

    def register(self, name: str, byte_size: int, nonce: bytes) -> str:
        self._check_enabled()
        if not NAME_PATTERN.fullmatch(name):
            raise RequestError(f"name must be 'losswire_' and 1-200 letters, digits or '_', got {name!r}", field="name")
        if not NONCE_BYTES <= len(nonce) <= 64:
            raise RequestError(f"nonce must hold {NONCE_BYTES} to 64 bytes, got {len(nonce)}", field="nonce")
        if byte_size < len(nonce):
            message = f"byte_size must be at least the nonce's {len(nonce)} bytes, got {byte_size}"
            raise RequestError(message, field="byte_size")
        with self._lock:
            mapped = sum(s.size for s in self._regions.values())
        if self.max_bytes is not None and mapped + byte_size > self.max_bytes:
            raise LimitExceededError(
                f"byte_size {byte_size} would map {mapped + byte_size} bytes of shared memory; this server maps at "
                f"most {self.max_bytes} (losswire serve --max-shared-memory)",
                field="byte_size",
            )
        segment = self._open(name, byte_size)
        if segment.array[: len(nonce)].tobytes() != nonce:
            segment.close()
            raise RequestError(
                f"segment {name} does not start with the nonce sent: the server sees another segment of that name "
                "(the caller is on another host or container)",
                field="nonce",
            )
        segment.unlink()  # nameless from now on: freed when the caller and the server unmap it
        region = secrets.token_hex(16)
        with self._lock:
            self._regions[region] = segment
        log.info("shared memory: region %s registered (%s, %d bytes)", region, name, byte_size)
        return region

    @staticmethod
    def _open(name: str, byte_size: int) -> Segment:
        try:
            return Segment.open(name, byte_size)
        except FileNotFoundError:
            raise NotFoundError(
                f"no shared-memory segment {name!r} on the server's host: shared memory needs the caller on the same "
                "host (and, across containers, a shared /dev/shm: docker run --ipc=host)",
                field="name",
            ) from None
        except PermissionError:
            raise AccessDeniedError(
                f"the server may not open shared-memory segment {name!r}: it belongs to another user (mode 0600); "
                "run the caller as the server's user",
                field="name",
            ) from None
        except (ValueError, OSError) as error:
            raise RequestError(f"cannot map shared-memory segment {name!r}: {error}", field="byte_size") from None

    def unregister(self, region: str) -> None:
        with self._lock:
            segment = self._regions.pop(region, None)
        if segment is None:
            raise NotFoundError(f"no shared-memory region {region!r} is registered", "region")
        segment.close()

    # -- requests --------------------------------------------------------------------------------

    def _segment(self, ref: pb.SharedMemoryRef, field: str) -> Segment:
        self._check_enabled()
        with self._lock:
            segment = self._regions.get(ref.region)
        if segment is None:
            raise NotFoundError(
                f"{field}.region {ref.region!r} is not registered on this server (it restarted, or the region was "
                "unregistered or its caller's lock released); register the segment again",
                field=f"{field}.region",
            )
        if ref.offset + ref.byte_size > segment.size:
            raise RequestError(
                f"{field} covers bytes [{ref.offset}, {ref.offset + ref.byte_size}) but region {ref.region} has "
                f"{segment.size} bytes",
                field=f"{field}.byte_size",
            )
        if ref.offset < NONCE_BYTES and ref.byte_size:
            raise RequestError(
                f"{field}.offset {ref.offset} overlaps the region's nonce (its first {NONCE_BYTES} bytes)",
                field=f"{field}.offset",
            )
        if segment.truncated():
            raise RequestError(
                f"{field}: region {ref.region}'s segment shrank below its registered {segment.size} bytes",
                field=f"{field}.region",
            )
        return segment

    def resolve(self, ref: pb.SharedMemoryRef, field: str) -> torch.Tensor:
        """A uint8 view of the referenced bytes (``wire_memory.shared_memory_tensors``'s ``resolve``)."""
        return self._segment(ref, field).bytes_at(ref.offset, ref.byte_size)

    def inputs(
        self, tensors: Iterable[tuple[str, pb.Tensor]], max_elements: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Those of a request's tensors (``codec.tensors_of``) that lie in shared memory, by field
        path, viewed in place."""
        return wire_memory.shared_memory_tensors(tensors, self.resolve, max_elements)

    def output_range(self, ref: pb.SharedMemoryRef) -> SegmentRange:
        """A ``StreamSink.place`` reserve that fills ``ref``'s range front to back, 64-byte aligned."""
        segment = self._segment(ref, "output_shm")
        return SegmentRange(segment, ref.region, ref.offset, ref.offset + ref.byte_size)

    @property
    def regions(self) -> int:
        with self._lock:
            return len(self._regions)

    def __contains__(self, region: object) -> bool:
        with self._lock:
            return region in self._regions
