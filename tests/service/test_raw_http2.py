"""One HTTP/2 frame cannot take a port down.

grpcio's asyncio server decodes the ``:path`` of each call to an unregistered method as UTF-8 in its
accept loop; a path that is not UTF-8 (one HEADERS frame from anyone who can reach the port, before any
token is checked) raises there, and grpcio then shuts that gRPC server down, cancelling its calls. Before,
the port stayed closed for good while the process lived on, health still SERVING, so that no probe or
supervisor noticed. Now the server serves the port again within about a second, with everything it holds
outside gRPC (sessions, budgets) as it was; where it cannot (the port taken meanwhile), health turns
NOT_SERVING and ``losswire serve`` exits 1, for its supervisor to restart it.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.calls import send_call_to
from support.in_process import running_server
from support.polling import eventually
from support.servers import ServerProcess, serve_cmd, server_env

from losswire.client import LossClient, RemoteLoss

SERVING = health_pb2.HealthCheckResponse.SERVING


def health_status(port: int) -> health_pb2.HealthCheckResponse.ServingStatus | None:
    """Health on ``port`` from a new connection; None when nothing answers there."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def seesaw_steps(client: LossClient, session: str, steps: int) -> None:
    seesaw = RemoteLoss(dict(type="SeesawLoss", num_classes=3), client=client, session=session)
    for _ in range(steps):
        seesaw(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("port", ["callers' port", "health port"])
def test_a_call_whose_path_is_not_utf8_leaves_the_port_served_and_the_sessions_kept(port):
    with running_server(health_port=0) as server:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30)
        try:
            seesaw_steps(client, "kept", 3)
            attacked = server.port if port == "callers' port" else server.health_port
            with send_call_to(attacked, b"/\xff"):
                assert eventually(lambda: server.restarts == 1, 10), "grpcio's server was never served again"
                assert health_status(server.health_port) == SERVING
                assert health_status(server.port) == SERVING
                assert not server.failed.is_set()
                seesaw_steps(client, "kept", 1)  # the callers' port answers, the session as it was
                assert client.get_session("kept").steps == 4
        finally:
            client.close()


@pytest.mark.slow
def test_losswire_serve_serves_its_port_again_and_says_so():
    process = ServerProcess(serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu"), server_env())
    try:
        process.wait_started()
        with send_call_to(process.port, b"/\xff"):
            process.wait_for(r"ERROR losswire\.server: the callers' port stopped accepting calls \(UnicodeDecodeError")
            client = LossClient(process.target, timeout=30)
            try:
                assert RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(3), torch.zeros(3)).item() == 1.0
            finally:
                client.close()
        assert process.proc.poll() is None, process.log()
    finally:
        process.close()
