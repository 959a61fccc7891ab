"""Unreachable and silent servers are reported early and say where, which deadline, and how to change it.

A hung server used to cost the call's whole deadline (300 s) and then ``DEADLINE_EXCEEDED: Deadline
Exceeded``. Here: a real socket that accepts connections and never answers (as a stopped or hung
server's kernel does), a port nobody listens on, and a server that answers the handshake but not the call.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.client.channels import CONNECT_TIMEOUT_SECONDS


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A listening socket that accepts every connection, reads what arrives and never writes a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def closed_port() -> str:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_silent_server_is_reported_after_the_connect_timeout():
    with silent_server() as address:
        client = LossClient(address, timeout=300, connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(RemoteLossError) as error:
            RemoteLoss(dict(type="L1Loss"), client=client)  # Describe is the first call
        elapsed = time.monotonic() - started
        client.close()
    assert 0.9 <= elapsed < 5.0, elapsed
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    message = error.value.details
    assert f"losswire server at {address}" in message and "within 1 s (connect_timeout)" in message
    assert "no HTTP/2 handshake" in message and "timeout=" in message and "connect_timeout=" in message


def test_a_shorter_call_deadline_bounds_the_wait_and_is_named():
    with silent_server() as address:
        client = LossClient(address, timeout=0.5, connect_timeout=5.0)
        started = time.monotonic()
        with pytest.raises(RemoteLossError) as error:
            client.list_losses()
        elapsed = time.monotonic() - started
        client.close()
    assert elapsed < 3.0
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the call's deadline (timeout=0.5 s)" in error.value.details and address in error.value.details


@pytest.mark.slow
def test_by_default_a_silent_server_is_reported_within_seconds_not_at_the_deadline():
    with silent_server() as address:
        loss = RemoteLoss(dict(type="L1Loss"), client=LossClient(address), validate=False)  # timeout 300 s
        started = time.monotonic()
        with pytest.raises(RemoteLossError, match=f"losswire server at {address}"):
            loss(torch.ones(2), torch.zeros(2))
    assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS + 3


def test_a_closed_port_fails_fast_naming_target_and_deadline():
    address = closed_port()
    client = LossClient(address, timeout=45)
    started = time.monotonic()
    with pytest.raises(RemoteLossError) as error:
        RemoteLoss(dict(type="L1Loss"), client=client)
    client.close()
    assert time.monotonic() - started < 5.0  # gRPC's retries of a refused connection, not the deadline
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    message = error.value.details
    assert f"losswire server at {address} is unavailable and never answered this client" in message
    assert "the call's deadline: 45 s" in message and "timeout=" in message and "check the target" in message


def test_without_a_connect_timeout_a_call_waits_for_a_server_up_to_its_deadline():
    """connect_timeout=None: no first check, and every call waits for the server (a job started before
    its server), so a target nothing listens on fails at the deadline, naming it."""
    address = closed_port()
    client = LossClient(address, timeout=1.0, connect_timeout=None)
    started = time.monotonic()
    with pytest.raises(RemoteLossError) as error:
        client.list_losses()
    client.close()
    assert 0.9 <= time.monotonic() - started < 4.0
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"losswire server at {address} within the call's deadline (1 s)" in error.value.details
    assert "it never answered; check the target" in error.value.details


def test_a_server_that_answers_once_connected_needs_no_second_probe(target):
    """The probe runs once per connection: later calls go straight out (and a good server passes it)."""
    client = LossClient(target, timeout=30, connect_timeout=2.0)
    try:
        loss = RemoteLoss(dict(type="L1Loss"), client=client)
        assert client.connection.reached
        torch.testing.assert_close(loss(torch.tensor([1.0, 3.0]), torch.zeros(2)), torch.tensor(2.0))
    finally:
        client.close()


CLOSED_CLIENT = """
import sys
from losswire.client import Credentials, LossClient
client = LossClient(sys.argv[1], credentials=Credentials(token="t0ken"), shared_memory="off")
client.list_losses()
client.close()
for call in (client.list_losses, lambda: client.reset_session("private/0", 1.0)):  # used before, and not
    try:
        call()
    except ValueError as error:
        print("ValueError:", error)
"""


def test_a_closed_client_refuses_calls_with_a_value_error(target):
    """A call on a closed client (a private session dropped after its client was closed) raises a
    ValueError. Through the bearer token's interceptor, gRPC used to crash the process (SIGSEGV) on the
    first call of a method after close; a subprocess, so that a crash fails this test only."""
    done = subprocess.run(
        [sys.executable, "-c", CLOSED_CLIENT, target], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.count("ValueError: Cannot invoke RPC: the losswire client was closed") == 2, done.stdout
