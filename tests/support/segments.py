"""Shared memory as a test caller does it by hand: a segment handed over on the server's Unix socket and
registered (what ``losswire.client``'s pool does for every call), with the raw stubs."""

from __future__ import annotations

from typing import Any

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import shared_memory as shm


class Handoff:
    """A connection to the shared-memory endpoint of the server ``stub`` calls, kept open (the server
    drops what was handed over on it when it closes). ``metadata``: sent with every RPC (a token)."""

    def __init__(self, stub: Any, metadata: Any = None) -> None:
        self.stub, self.metadata = stub, metadata
        request = pb.SharedMemoryEndpointRequest()
        answer = stub.SharedMemoryEndpoint(request, timeout=30, metadata=metadata)
        self.address = answer.address
        self.link = shm.Link(answer.address, answer.connection_key)

    def claim(self, segment: shm.Segment) -> str:
        """``segment`` handed over: the server's claim (HandoffRefusedError when refused)."""
        return self.link.hand_over(segment)

    def register(self, segment: shm.Segment) -> str:
        """``segment`` handed over and registered: its region."""
        request = pb.RegisterSharedMemoryRequest(claim=self.claim(segment), byte_size=segment.size)
        return self.stub.RegisterSharedMemory(request, timeout=30, metadata=self.metadata).region

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def register_segment(stub: Any, segment: shm.Segment) -> tuple[str, Handoff]:
    """``segment`` registered on a connection of its own: (its region, the connection to close after use)."""
    handoff = Handoff(stub)
    return handoff.register(segment), handoff
