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

import re
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.calls import answer_headers, send_call_to
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
                label = "health" if port == "health port" else "callers"
                assert (
                    server.metrics.registry.get_sample_value("losswire_ports_served_again_total", {"port": label}) == 1
                )
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


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.slow
def test_a_caller_repeating_the_frame_grows_neither_the_log_nor_the_server():
    """400 such frames in a row: each costs a new gRPC server, and the old one is destroyed (grpcio's own
    shutdown stopped at the error before destroying it: ~40 KB of memory stayed each time, 238 -> 259 MiB
    over 500 frames); the log says so a bounded number of times, without tracebacks (before: grpcio's
    error line and asyncio's "Task exception was never retrieved" with a traceback, per frame)."""
    process = ServerProcess(serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu"), server_env())
    try:
        process.wait_started()
        frames, first = 400, None
        for sent in range(frames):
            deadline = time.monotonic() + 10
            while True:  # the port is closed for a moment while it is served again
                try:
                    sock = send_call_to(process.port, b"/\xff")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the port was not served again"
                    time.sleep(0.01)
            with sock:
                answer_headers(sock)  # the connection ends with its server
            if sent == 20:  # the first servers' memory may come from the allocator's free lists
                first = resident_mib(process.proc.pid)
        grown = resident_mib(process.proc.pid) - first
        assert grown < 4, f"{grown:.1f} MiB more after {frames - 20} more frames"
        client = LossClient(process.target, timeout=30)
        try:
            assert RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(3), torch.zeros(3)).item() == 1.0
        finally:
            client.close()
        log = process.log()
        assert "Traceback" not in log and "never retrieved" not in log, log[-3000:]
        assert len(re.findall(r"stopped accepting calls", log)) <= 2 * 10, log[-3000:]  # 10 a minute
        assert len(re.findall(r"grpcio ended a gRPC server", log)) <= 2 * 7, log[-3000:]  # 1 each 10 s
    finally:
        process.close()
