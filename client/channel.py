"""Channels and stubs: one channel per target, shared by every RemoteLoss that talks to it."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import grpc

from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc

from . import codec
from .errors import RemoteLossError

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 2**31 - 1

# gRPC's own retry policy: every losswire call is stateless and idempotent, so a call that met an
# UNAVAILABLE server (restarting, overloaded, a replica going away) is tried again with backoff.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "losswire.v1.LossService"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def make_channel(target: str, options: Mapping[str, Any] | None = None) -> grpc.Channel:
    settings = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.service_config": SERVICE_CONFIG,
        "grpc.enable_retries": 1,
        **(options or {}),
    }
    return grpc.insecure_channel(target, options=list(settings.items()))


class LossClient:
    """A connection to one losswire server (or one load-balanced name).

    ``LossClient.shared(target)`` returns the same client for the same target, so every module
    reuses one channel. Each call has a deadline of ``timeout`` seconds (None: no deadline).
    """

    _shared: dict[str, LossClient] = {}
    _lock = threading.Lock()

    def __init__(
        self, target: str = DEFAULT_TARGET, timeout: float | None = 300.0, channel: grpc.Channel | None = None
    ):
        self.target = target
        self.timeout = timeout
        self.channel = channel if channel is not None else make_channel(target)
        self.stub = pb_grpc.LossServiceStub(self.channel)

    @classmethod
    def shared(cls, target: str = DEFAULT_TARGET) -> LossClient:
        with cls._lock:
            if target not in cls._shared:
                cls._shared[target] = cls(target)
            return cls._shared[target]

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise RemoteLossError.from_rpc_error(error) from None

    def evaluate(self, request: pb.EvaluateRequest, timeout: float | None = None) -> pb.EvaluateResponse:
        return self._call(self.stub.Evaluate, request, timeout)

    def describe(self, config: Mapping[str, Any], timeout: float | None = None) -> pb.DescribeResponse:
        return self._call(self.stub.Describe, pb.DescribeRequest(config=codec.encode_config(config)), timeout)

    def list_losses(self, timeout: float | None = None) -> pb.ListLossesResponse:
        return self._call(self.stub.ListLosses, pb.ListLossesRequest(), timeout)

    def close(self) -> None:
        self.channel.close()
