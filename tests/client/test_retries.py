"""The client retries UNAVAILABLE (gRPC's own retry policy) and honours deadlines."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.client.channels import RETRY_POLICY
from losswire.server.dataplane import Dataplane
from losswire.v1 import loss_service_pb2_grpc as pb_grpc


class FlakyThenReal(pb_grpc.LossServiceServicer):
    """The real dataplane behind a front that answers UNAVAILABLE the first `failures` times
    (as a restarting replica would), or that stalls Evaluate calls for `stall` seconds."""

    def __init__(self, failures: int = 0, stall: float = 0.0) -> None:
        self.real = Dataplane(torch.device("cpu"))
        self.failures, self.stall, self.calls = failures, stall, 0
        self.lock = threading.Lock()

    def _gate(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        time.sleep(self.stall)

    def Evaluate(self, request, context):  # noqa: N802
        self._gate(context)
        return self.real.evaluate(request, cancelled=lambda: False).response

    def Describe(self, request, context):  # noqa: N802
        return self.real.describe(request.config)


@pytest.fixture
def front():
    servers = []

    def start(servicer: FlakyThenReal) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_LossServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_unavailable_is_retried(front):
    servicer = FlakyThenReal(failures=2)
    loss = RemoteLoss(dict(type="L1Loss"), client=LossClient(front(servicer), timeout=10))
    out = loss(torch.tensor([1.0, 3.0]), torch.zeros(2))
    assert out.item() == 2.0
    assert servicer.calls == 3  # two UNAVAILABLE answers, then the real one


@pytest.mark.slow
def test_persistent_unavailable_surfaces(front):
    servicer = FlakyThenReal(failures=100)
    loss = RemoteLoss(dict(type="L1Loss"), client=LossClient(front(servicer), timeout=10))
    with pytest.raises(RemoteLossError) as info:
        loss(torch.ones(2), torch.zeros(2))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == RETRY_POLICY["maxAttempts"]


def test_deadline(front):
    servicer = FlakyThenReal(stall=2.0)
    loss = RemoteLoss(dict(type="L1Loss"), client=LossClient(front(servicer)), timeout=0.3)
    with pytest.raises(RemoteLossError) as info:
        loss(torch.ones(2), torch.zeros(2))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_deadline_names_the_server_and_how_to_change_it(front):
    """A server that answers the handshake but not the call: the deadline's message says where and how long."""
    address = front(FlakyThenReal(stall=2.0))
    loss = RemoteLoss(dict(type="L1Loss"), client=LossClient(address), timeout=0.3)
    with pytest.raises(RemoteLossError) as info:
        loss(torch.ones(2), torch.zeros(2))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    details = info.value.details
    assert details.startswith(f"Deadline Exceeded: no answer from the losswire server at {address} within the ")
    assert "the call's deadline (0.3 s)" in details
    assert details.endswith("timeout= (seconds, on RemoteLoss or LossClient) changes it")
