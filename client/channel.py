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
SESSION_HEADER = "x-losswire-session"
MAX_MESSAGE_BYTES = 2**31 - 1

# gRPC's own retry policy: a call that met an UNAVAILABLE server (restarting, overloaded, a replica
# going away) is tried again with backoff. Every call is idempotent: stateless terms trivially, and a
# session term carries a forward_id, so a retried forward is answered without updating state twice.
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

    def _call(self, method: Any, request: Any, timeout: float | None, metadata: Any = None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise RemoteLossError.from_rpc_error(error) from None

    def evaluate(self, request: pb.EvaluateRequest, timeout: float | None = None) -> pb.EvaluateResponse:
        # A session's state lives on one replica: the header lets a proxy route by session
        # (consistent hashing on x-losswire-session), see the README's "Sessions and replicas".
        sessions = sorted({term.session for term in request.terms if term.session})
        metadata = [(SESSION_HEADER, ",".join(sessions))] if sessions else None
        return self._call(self.stub.Evaluate, request, timeout, metadata)

    def describe(self, config: Mapping[str, Any], timeout: float | None = None) -> pb.DescribeResponse:
        return self._call(self.stub.Describe, pb.DescribeRequest(config=codec.encode_config(config)), timeout)

    def list_losses(self, timeout: float | None = None) -> pb.ListLossesResponse:
        return self._call(self.stub.ListLosses, pb.ListLossesRequest(), timeout)

    def get_session(self, session: str, timeout: float | None = None) -> pb.SessionInfo:
        return self._call(
            self.stub.GetSession, pb.SessionRequest(session=session), timeout, [(SESSION_HEADER, session)]
        )

    def reset_session(self, session: str, timeout: float | None = None) -> pb.SessionInfo:
        return self._call(
            self.stub.ResetSession, pb.SessionRequest(session=session), timeout, [(SESSION_HEADER, session)]
        )

    def list_sessions(self, timeout: float | None = None) -> pb.ListSessionsResponse:
        return self._call(self.stub.ListSessions, pb.ListSessionsRequest(), timeout)

    def close(self) -> None:
        self.channel.close()
