"""Connections are bounded: at most ``--max-connections`` open at once (an idle HTTP/2 connection stays
open, holding a descriptor and about 15 KiB), never so many that the server runs out of descriptors of its
own; and one that never finishes its handshake is closed after 10 s."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.in_process import running_server

from losswire.server.app import HANDSHAKE_TIMEOUT_MS, OWN_FILES, connection_bound

# what an HTTP/2 client sends first: the preface, then its (empty) SETTINGS frame
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTINGS_ACK = bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])


def idle_connection(port: int, speak: bool = True) -> socket.socket:
    """A connection that says what an HTTP/2 client says first (``speak``), or nothing, then stays idle."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if speak:
        sock.sendall(PREFACE)
    return sock


def closed_by_server(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (what it sends before is read and dropped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def answered(sock: socket.socket) -> bool:
    """Whether the server answered ``sock``'s preface with a frame of its own (its SETTINGS), which
    ``sock`` then acknowledges, as a client that keeps its connection does."""
    sock.settimeout(10)
    try:
        if not sock.recv(9):
            return False
        sock.sendall(SETTINGS_ACK)
        return True
    except (TimeoutError, ConnectionResetError):
        return False


def health_check(port: int, name: str, wait_for_ready: bool = False) -> health_pb2.HealthCheckResponse:
    """A health check on a connection of its own (``name``: channels of different names share none);
    ``wait_for_ready``: its channel tries to connect again (with backoff) until it can, for 20 s."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("losswire.test.connection", name)])
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=20, wait_for_ready=wait_for_ready)


@contextlib.contextmanager
def connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    socks = [idle_connection(port) for _ in range(count)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_connections_beyond_the_bound_are_closed_at_once_and_callers_get_in_once_others_leave():
    """With --max-connections 20: twenty idle HTTP/2 connections are served and stay; the next one is
    closed at once and a new caller's call fails (UNAVAILABLE, which clients retry). When ten leave, a
    new caller is answered."""
    with running_server(max_connections=20) as server, connections(server.port, 20) as held:
        assert all(answered(sock) for sock in held)
        extra = idle_connection(server.port)
        try:
            assert closed_by_server(extra, 10), "a connection beyond the bound was kept"
        finally:
            extra.close()
        with pytest.raises(grpc.RpcError) as refused:
            health_check(server.port, "while full")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        for sock in held[:10]:
            sock.close()
        answer = health_check(server.port, "after ten left", wait_for_ready=True)  # their ends are seen in time
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert not any(closed_by_server(sock, 0.2) for sock in held[10:]), "a held connection was dropped"


def test_connections_leave_the_server_descriptors_of_its_own():
    """A quarter of the open-files limit, at least 512, is never given to connections; --max-connections
    bounds them below that (none: that limit alone)."""
    assert connection_bound(10_000, 20_000) == 10_000
    assert connection_bound(None, 20_000) == 15_000
    assert connection_bound(None, 1_048_576) == 786_432
    assert connection_bound(10_000, 1024) == 1024 - OWN_FILES
    assert connection_bound(5, 1024) == 5
    assert connection_bound(None, 100) == 1  # a limit below what the server keeps: one connection still


@pytest.mark.slow  # waits out the handshake timeout
def test_a_connection_that_never_finishes_its_handshake_is_closed():
    """A socket that connects and says nothing holds a descriptor until the handshake timeout (10 s; gRPC's
    own default is 60-120 s) closes it, and no call of anybody waits meanwhile."""
    with running_server() as server:
        silent = idle_connection(server.port, speak=False)
        try:
            started = time.monotonic()
            assert health_check(server.port, "meanwhile").status == health_pb2.HealthCheckResponse.SERVING
            assert closed_by_server(silent, HANDSHAKE_TIMEOUT_MS / 1000 + 10), "still open"
            assert time.monotonic() - started >= HANDSHAKE_TIMEOUT_MS / 1000 - 1, "closed before the timeout"
        finally:
            silent.close()
