"""``grpc.health.v1``, open to every caller, with its open-ended calls bounded.

A ``Watch`` stream stays open for as long as its caller likes: that is what a gRPC client that checks
the health of the replicas it balances over keeps, one per connection (losswire's client does so with a
list or DNS target). Each is a call of the server's, and the health service is open to callers
without a token. Unbounded, Watch streams from a few connections took every one of
``--max-concurrent-rpcs`` and every caller with a token was refused (RESOURCE_EXHAUSTED). So Watch
streams have a bound of their own (``max_watches``, and ``PER_CONNECTION`` on one connection) and take
no call's place: the server admits ``--max-concurrent-rpcs`` calls besides them. A stream also holds its
service name for as long as it is open: a name is at most ``MAX_SERVICE_NAME_BYTES``.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

from ..counts import count_down

HEALTH_WATCH = f"/{health.SERVICE_NAME}/Watch"
PER_CONNECTION = 4  # Watch streams of one connection (a client keeps one per connection and service)
MAX_SERVICE_NAME_BYTES = 256  # a fully qualified gRPC service name is far shorter


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpc's health servicer with at most ``max_watches`` Watch streams open at once, ``PER_CONNECTION``
    of them on one connection; beyond, RESOURCE_EXHAUSTED. Check is unchanged (it answers at once)."""

    def __init__(self, max_watches: int) -> None:
        super().__init__()
        self.max_watches = max_watches
        self.watching = 0
        self._by_connection: dict[str, int] = {}

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if len(request.service.encode()) > MAX_SERVICE_NAME_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"HealthCheckRequest.service must be a service name of at most {MAX_SERVICE_NAME_BYTES} bytes, "
                f"got {len(request.service.encode())} bytes",
            )
        connection = context.peer() or ""
        refusal = self._refusal(connection)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        self.watching += 1
        self._by_connection[connection] = self._by_connection.get(connection, 0) + 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1
            count_down(self._by_connection, connection)

    def _refusal(self, connection: str) -> str | None:
        """Why a Watch stream of ``connection`` is refused now (None: it may open)."""
        if self._by_connection.get(connection, 0) >= PER_CONNECTION:
            return (
                f"this connection has {PER_CONNECTION} health Watch streams open, its most; close one, or "
                "poll Check instead"
            )
        if self.watching >= self.max_watches:
            return (
                f"the server has {self.watching} health Watch streams open, its most (losswire serve "
                "--max-health-watches); retry later, or poll Check instead"
            )
        return None
