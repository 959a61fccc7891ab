"""The floor of a small call in losswire's design: ``RemoteLoss`` against a server that does no work.

``canned_losswire`` serves ``losswire.v1.LossService`` on ``grpc.aio`` as ``losswire serve`` does (the same
servicer, handlers and protobuf messages), without the interceptors, and answers every ``Evaluate`` with
the response it computed for the first one. A call to it costs what the design costs before any of
losswire's per-call work: the client (``RemoteLoss``, autograd, encoding and decoding), gRPC on both
sides, protobuf parsing and serializing. The small-call section reports it beside the bare grpcio echo,
so that the distance between losswire and the echo splits into this floor and losswire's own work.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import grpc
import torch

from losswire.server.dataplane import Dataplane
from losswire.server.rpc.compute import Compute
from losswire.server.rpc.loss_service import LossService, add_to_server
from losswire.v1 import loss_service_pb2 as pb


class CannedEvaluate(LossService):
    """``LossService`` whose ``Evaluate`` answers with the first call's response (computed once)."""

    def __init__(self, dataplane: Dataplane, compute: Compute) -> None:
        super().__init__(dataplane, compute)
        self.canned: pb.EvaluateResponse | None = None

    async def Evaluate(self, request: pb.EvaluateRequest, context: Any) -> pb.EvaluateResponse:  # noqa: N802
        if self.canned is None:
            self.canned = self.dataplane.evaluate(request, lambda: False).response
        return self.canned


def canned_losswire(queue: multiprocessing.Queue) -> None:
    """Serve ``CannedEvaluate`` on an ephemeral loopback port (a ``baselines.Peer`` target)."""
    torch.set_num_threads(1)

    async def serve() -> None:
        server = grpc.aio.server()
        add_to_server(CannedEvaluate(Dataplane(torch.device("cpu")), Compute(2)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        queue.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())
