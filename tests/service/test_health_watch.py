"""Health Watch streams, open to callers without a token and open for as long as their caller likes, are
bounded on their own (``--max-health-watches``, 4 on one connection) and take no call's place: Watch
streams from a few connections took every one of ``--max-concurrent-rpcs``, and every caller with a token
was refused."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.in_process import running_server
from support.polling import eventually

from losswire.client import Credentials, LossClient, RemoteLoss
from losswire.server.rpc.health import MAX_SERVICE_NAME_BYTES, PER_CONNECTION

TOKEN = "token-a-0123456789"


@contextlib.contextmanager
def watches(port: int, count: int, connection: str, service: str = "") -> Iterator[list[grpc.Call]]:
    """``count`` Watch streams on the connection named ``connection``, each having read its first answer or
    ended (a refused one has)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("losswire.test.connection", connection)])
    stub = health_pb2_grpc.HealthStub(channel)
    streams = [stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60) for _ in range(count)]
    for stream in streams:
        with contextlib.suppress(grpc.RpcError):
            next(stream)
    try:
        yield streams
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()


def refused(stream: grpc.Call) -> grpc.StatusCode | None:
    """The status a Watch stream ended with, None while it is open."""
    return stream.code() if stream.done() else None


def test_watch_streams_take_no_call_s_place():
    """--max-concurrent-rpcs 8, --max-health-watches 8: a caller without a token opens 16 Watch streams
    on three connections (4 each at most: 12 open, then the bound, 8); a caller with a token is answered."""
    settings = dict(auth_tokens=(TOKEN,), max_concurrent_rpcs=8, max_health_watches=8)
    with running_server(**settings) as server, contextlib.ExitStack() as stack:
        opened = [stack.enter_context(watches(server.port, 6, f"watcher {index}")) for index in range(3)]
        states = [refused(stream) for streams in opened for stream in streams]
        assert states.count(None) == 8 and states.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 10, states
        assert server.health.watching == 8
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30, credentials=Credentials(token=TOKEN))
        try:
            loss = RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(4), torch.zeros(4))
        finally:
            client.close()
        assert loss.item() == 1.0


def test_one_connection_has_at_most_four_watch_streams():
    """Six on one connection: four open, two refused (whichever the server takes last: it may take them
    in any order)."""
    with running_server() as server, watches(server.port, PER_CONNECTION + 2, "one") as streams:
        states = [refused(stream) for stream in streams]
        assert states.count(None) == PER_CONNECTION, states
        assert states.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2, states
        assert all("its most" in stream.details() for stream in streams if stream.done())


def test_a_watch_stream_that_ends_gives_its_place_back():
    with running_server(max_health_watches=1) as server:
        with watches(server.port, 1, "first") as streams:
            assert refused(streams[0]) is None and server.health.watching == 1
            with watches(server.port, 1, "second") as second:
                assert refused(second[0]) == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-health-watches" in second[0].details()
        assert eventually(lambda: server.health.watching == 0, 10), "the cancelled stream kept its place"
        with watches(server.port, 1, "third") as third:
            assert refused(third[0]) is None


def test_a_watched_service_name_is_bounded():
    """A Watch stream holds its service name while it is open: a name longer than any service's is
    INVALID_ARGUMENT, naming the field."""
    name = "x" * (MAX_SERVICE_NAME_BYTES + 1)
    with running_server() as server, watches(server.port, 1, "long name", service=name) as streams:
        assert refused(streams[0]) == grpc.StatusCode.INVALID_ARGUMENT
        assert "HealthCheckRequest.service" in streams[0].details()
        assert server.health.watching == 0


@pytest.mark.parametrize("size", [4096 + 1, 1 << 20])
def test_the_health_port_takes_only_health_sized_requests(size: int):
    """The plaintext health port (for probes that cannot do TLS) has the main port's connection bounds and
    takes requests of a HealthCheckRequest's size only: gRPC refuses a bigger one unread."""
    with running_server(health_port=0) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.health_port}")
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with channel, pytest.raises(grpc.RpcError) as refusal:
            check(bytes(size), timeout=10)
        assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.value.details()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.health_port}")
        with channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
