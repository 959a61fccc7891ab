"""A big stream's lanes: its chunks spread over several EvaluateStream calls (``EvaluateRequest.lanes``).

One HTTP/2 connection is read by one thread on each side. A link faster than that (tens of Gbit/s) fills
only when a call's bytes travel on several connections, as NCCL and the like open several sockets per
peer. With ``LossClient(lanes=n)`` a streamed request's tensors are cut in stripes dealt round-robin to
its own stream and ``n`` lanes, each lane an EvaluateStream on a connection of its own to the same
server; the answer comes back on the request's stream as without lanes, and equals it bit for bit.

Each stream is a gRPC call of its own: the first lane that fails cancels the request's stream, and the
call fails with the lane's error; a lane the server cancelled because its call had ended leaves the
call's own error to be told. A server that does not serve lanes (an older one), or one that the
lanes do not reach (a proxy that sent them elsewhere), is noticed on the first call: logged, and the
client sends one stream from then on.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import grpc

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks
from losswire.wire.protocol import LANE_CALL_MIN_BYTES, SESSION_HEADER

from .channels import Connection
from .errors import RemoteLossError

# Stripe size: each stream's share of a tensor in pieces this big, dealt round-robin, so the streams
# finish together and the server's rows fill from the front (what an overlapped call computes first)
LANE_STRIPE_BYTES = 1 << 20


def lanes_for(count: int, nbytes: int) -> pb.StreamLanes | None:
    """The lanes of a call whose streamed tensors hold ``nbytes``: None when ``count`` is 0 or the call has
    fewer stripes than streams (lanes would carry nothing)."""
    if count <= 0 or nbytes < (count + 1) * LANE_STRIPE_BYTES:
        return None
    return pb.StreamLanes(call=os.urandom(LANE_CALL_MIN_BYTES), count=count, stripe_bytes=LANE_STRIPE_BYTES)


def lanes_refused(error: RemoteLossError) -> bool:
    """Whether a call with lanes failed because lanes do not work with this server: it does not know them
    (a lane's first message is refused), or the call and its lanes reached different servers."""
    code, field = error.code, error.field or ""
    return (
        (code == grpc.StatusCode.INVALID_ARGUMENT and field == "request")
        or (code == grpc.StatusCode.NOT_FOUND and field == "lane.call")
        or (code == grpc.StatusCode.DEADLINE_EXCEEDED and field == "lanes")
    )


class LaneCalls:
    """One call's own stream and its lanes on ``connection``, started by ``start``: the first lane to fail
    cancels the call's stream and is ``failed``; ``close`` cancels whatever still runs."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.calls: list[Any] = []
        self.failed: grpc.RpcError | None = None
        self._lock = threading.Lock()
        self._main: Any = None
        self._closing = False

    def start(
        self,
        request: pb.EvaluateRequest,
        sink: chunks.StreamSink,
        lanes: pb.StreamLanes,
        timeout: float | None,
        metadata: Any,
        early_gradients: bool = False,
    ) -> Any:
        """Starts ``request`` (its big tensors held back in ``sink``) on this connection's stream channel,
        and its lanes each on its own; the stream's responses."""
        streams = chunks.lane_streams(request, sink, lanes, early_gradients=early_gradients)
        # one header on every stream of the call: a proxy that pins by it sends them all to one server
        pinned = metadata or [(SESSION_HEADER, f"lanes-{lanes.call.hex()}")]
        self._main = self.connection.evaluate_stream()(streams[0], timeout=timeout, metadata=pinned)
        for lane, messages in enumerate(streams[1:], 1):
            call = self.connection.evaluate_stream(lane)(messages, timeout=timeout, metadata=pinned)
            call.add_done_callback(self._ended)
            self.calls.append(call)
        return self._main

    def _ended(self, call: Any) -> None:
        # CANCELLED: the server ended the lane because its call had ended (refused as busy, say): the
        # call's own status is the one to tell, and a busy one is waited out
        if call.code() in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            return
        with self._lock:
            if self._closing or self.failed is not None:
                return
            self.failed = call
        self._main.cancel()  # its own failure would say less than the lane's

    def close(self) -> None:
        """Cancels the lanes and the call's own stream that still run (nothing for those that have ended)."""
        with self._lock:
            self._closing = True
        for call in self.calls:
            call.cancel()
        if self._main is not None:
            self._main.cancel()  # a call left by an error of this process's own
