"""Connection keys on the shared-memory handoff socket: a connection takes handoffs only once it has sent the
connection key ``SharedMemoryEndpoint`` gave (one use), which makes it its token's. With tokens on, one token's
connections, unused connection keys and handoffs not yet registered take at most all but a quarter of the
server's, so another token always finds room, whatever processes and connections the first one uses.

Every test runs a real server of its own on loopback, with real memfds handed over on its Unix socket.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import grpc
import pytest
from support.calls import plain_channel
from support.polling import eventually
from support.segments import Handoff

from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.dataplane import handoff as handoff_socket
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import shared_memory as shm

pytestmark = pytest.mark.skipif(not shm.supported(), reason="needs memfd shared memory and descriptor passing")

TOKENS = ("token-a-0123456789", "token-b-0123456789")
AS_A, AS_B = ((("authorization", f"Bearer {token}"),) for token in TOKENS)
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@contextlib.contextmanager
def serving(**config: object) -> Iterator[tuple[LosswireServer, pb_grpc.LossServiceStub]]:
    instance = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2, **config))
    instance.start()
    try:
        with plain_channel(f"127.0.0.1:{instance.port}") as channel:
            yield instance, pb_grpc.LossServiceStub(channel)
    finally:
        instance.stop(grace=1)


@pytest.fixture()
def segments() -> Iterator[list[shm.Segment]]:
    made = [shm.Segment.create(1 << 20) for _ in range(6)]
    yield made
    for segment in made:
        segment.close()


def endpoint(stub: pb_grpc.LossServiceStub, metadata: object = None) -> tuple[str, int]:
    answer = stub.SharedMemoryEndpoint(pb.SharedMemoryEndpointRequest(), timeout=30, metadata=metadata)
    return answer.address, answer.connection_key


def greeted(address: str) -> socket.socket:
    """A connection to the handoff socket whose greeting accepted it, and nothing sent yet."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(shm.socket_address(address))
    assert shm.read_answer(sock) == (shm.OK, "losswire shared memory")
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


def descriptors_on(fd: int) -> int:
    """Descriptors open in this process (the in-process server's included) on the file ``fd`` is."""
    mine = os.fstat(fd)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            other = os.stat(f"/proc/self/fd/{name}")
            count += (other.st_dev, other.st_ino) == (mine.st_dev, mine.st_ino)
    return count


def test_a_handoff_before_the_connection_key_is_refused_and_its_descriptor_not_kept(segments):
    """A connection whose first message is a handoff (what a caller of before connection keys sent) gets
    PERMISSION_DENIED naming the connection key and is closed; the server keeps nothing of it, its descriptor
    included."""
    segment = segments[0]
    with serving() as (server, stub):
        address, _ = endpoint(stub)
        with greeted(address) as sock:
            socket.send_fds(sock, [shm.handoff_frame(segment.size)], [segment.fd])
            status, text = shm.read_answer(sock)
            assert status == PERMISSION_DENIED and "first message is the connection key SharedMemoryEndpoint" in text, (
                text
            )
            assert closed_by_server(sock)
        assert eventually(lambda: server.shared_memory.connections == 0)
        assert server.shared_memory.pending == 0 and server.shared_memory.mapped_bytes == 0
        assert eventually(lambda: descriptors_on(segment.fd) == 1)  # ours alone


def test_a_connection_key_opens_one_connection_and_only_its_own_server_gave_it(segments):
    """A connection key used once more, or one the server never gave, is PERMISSION_DENIED and the connection
    closed; the connection it opened hands over and registers as before. A second connection key on a connection
    is a violation of the framing."""
    with serving() as (server, stub):
        address, connection_key = endpoint(stub)
        with contextlib.closing(shm.Link(address, connection_key)) as link:
            for wrong in (connection_key, connection_key ^ 1):
                with pytest.raises(shm.HandoffRefusedError) as refused:
                    shm.Link(address, wrong)
                assert refused.value.status == PERMISSION_DENIED, refused.value.message
                assert "none this server gave, or was used already or expired" in refused.value.message
            claim = link.hand_over(segments[0])
            request = pb.RegisterSharedMemoryRequest(claim=claim, byte_size=segments[0].size)
            assert stub.RegisterSharedMemory(request, timeout=30).region
            _, another = endpoint(stub)
            link.sock.sendall(shm.connection_key_frame(another))
            status, text = shm.read_answer(link.sock)
            assert status == INVALID_ARGUMENT and "one connection key, as its first message" in text, text
            assert closed_by_server(link.sock)
        assert eventually(lambda: server.shared_memory.regions == 0)  # its connection closed: dropped


def test_a_connection_that_sends_no_connection_key_is_closed_after_the_wait(monkeypatch):
    """A connection that says nothing after its greeting is refused (PERMISSION_DENIED, naming the wait)
    and closed once the connection key's wait is over, so it stops counting against the connections."""
    monkeypatch.setattr(handoff_socket, "KEY_WAIT_SECONDS", 1.0)
    with serving() as (server, stub):
        address, _ = endpoint(stub)
        with greeted(address) as sock:
            assert eventually(lambda: server.shared_memory.connections == 1)  # counted just after its greeting
            status, text = shm.read_answer(sock)  # waits for the server's tick
            assert status == PERMISSION_DENIED and "no connection key within 1 s of connecting" in text, text
            assert closed_by_server(sock)
        assert eventually(lambda: server.shared_memory.connections == 0)


def test_a_connection_waiting_for_its_connection_key_makes_way_for_a_newer_one():
    """--max-shared-memory-connections 4: one connection may wait for its connection key at a time. A client that
    connects meanwhile (its connection key sent at once) is taken, and the silent one is refused RESOURCE_EXHAUSTED
    and closed, so silent connections reopened over and over cannot keep callers out. (Refusing the
    newcomer instead let a process that kept two silent connections open shut every other caller out.)"""
    with serving(max_shared_memory_connections=4) as (server, stub):
        address, _ = endpoint(stub)
        with greeted(address) as silent, contextlib.closing(shm.Link(*endpoint(stub))):
            status, text = shm.read_answer(silent)
            assert status == RESOURCE_EXHAUSTED and "made way for a newer one" in text, text
            assert closed_by_server(silent)
            assert eventually(lambda: server.shared_memory.connections == 1)


def test_a_full_socket_still_takes_a_connection_in_place_of_one_without_its_connection_key():
    """Every place taken, one by a connection that has not sent its connection key: a new client takes its place.
    Once every place is a client's that sent its connection key, a new connection is refused at the greeting."""
    with serving(max_shared_memory_connections=4) as (server, stub), contextlib.ExitStack() as links:
        for _ in range(3):
            links.enter_context(contextlib.closing(shm.Link(*endpoint(stub))))
        address, _ = endpoint(stub)
        silent = links.enter_context(greeted(address))
        links.enter_context(contextlib.closing(shm.Link(*endpoint(stub))))
        assert shm.read_answer(silent)[0] == RESOURCE_EXHAUSTED and closed_by_server(silent)
        assert eventually(lambda: server.shared_memory.connections == 4)
        with pytest.raises(shm.HandoffRefusedError) as refused:
            shm.Link(*endpoint(stub))
        assert refused.value.status == RESOURCE_EXHAUSTED, refused.value.message
        assert "4 callers are connected to this server already" in refused.value.message


def test_connection_keys_are_never_refused_and_the_oldest_unused_are_forgotten():
    """--max-shared-memory-connections 4, every place taken: connections refused at the greeting leave
    their connection keys unused, over and over; SharedMemoryEndpoint still answers, and once a place is
    free the next key opens a connection. Unused keys stay bounded: beyond four, the oldest is forgotten
    (using it is PERMISSION_DENIED, as for a key the server never gave)."""
    with serving(max_shared_memory_connections=4) as (server, stub), contextlib.ExitStack() as links:
        held = [links.enter_context(contextlib.closing(shm.Link(*endpoint(stub)))) for _ in range(4)]
        for _ in range(12):
            with pytest.raises(shm.HandoffRefusedError) as refused:
                shm.Link(*endpoint(stub))
            assert refused.value.status == RESOURCE_EXHAUSTED, refused.value.message
        oldest = endpoint(stub)
        newer = [endpoint(stub) for _ in range(4)]
        held[0].close()
        assert eventually(lambda: server.shared_memory.connections == 3)
        with pytest.raises(shm.HandoffRefusedError) as forgotten:
            shm.Link(*oldest)
        assert forgotten.value.status == PERMISSION_DENIED, forgotten.value.message
        links.enter_context(contextlib.closing(shm.Link(*newer[-1])))
        assert server.shared_memory.connections == 4


def test_one_token_leaves_another_tokens_room_on_the_socket():
    """Tokens on, --max-shared-memory-connections 4: token a's connections are at most 3 (all but a
    quarter); beyond, RESOURCE_EXHAUSTED naming the share, and token b then still gets a connection. Token
    a's unused connection keys are at most 3 too: its fourth forgets its own oldest, never b's."""
    with serving(auth_tokens=TOKENS, max_shared_memory_connections=4) as (server, stub):
        for_b = endpoint(stub, AS_B)
        connection_keys = [endpoint(stub, AS_A) for _ in range(4)]
        with pytest.raises(shm.HandoffRefusedError) as forgotten:
            shm.Link(*connection_keys[0])
        assert forgotten.value.status == PERMISSION_DENIED, forgotten.value.message
        with contextlib.ExitStack() as links:
            for address, connection_key in connection_keys[1:]:
                links.enter_context(contextlib.closing(shm.Link(address, connection_key)))
            with pytest.raises(shm.HandoffRefusedError) as over:
                shm.Link(*endpoint(stub, AS_A))
            assert over.value.status == RESOURCE_EXHAUSTED, over.value.message
            assert "this token has 3 connections" in over.value.message
            assert "--max-shared-memory-connections" in over.value.message
            with contextlib.closing(shm.Link(*for_b)):
                assert server.shared_memory.connections == 4


def test_one_tokens_unregistered_handoffs_leave_another_token_room(segments):
    """Tokens on, --max-shared-memory-total-regions 4: token a hands three segments over and registers
    none; its fourth handoff is RESOURCE_EXHAUSTED naming the token's share, and token b's handoff is then
    registered. A claim answers only the token whose connection it came over (NOT_FOUND for b, word for
    word as for no claim), and a's own registration of it goes through. (Before connection keys, the socket knew no
    token: a's pending handoffs took all four, and b's first handoff was refused.)"""
    with (
        serving(auth_tokens=TOKENS, max_shared_memory_total_regions=4) as (server, stub),
        Handoff(stub, AS_A) as a,
        Handoff(stub, AS_B) as b,
    ):
        claims = [a.claim(segment) for segment in segments[:3]]
        with pytest.raises(shm.HandoffRefusedError) as refused:
            a.claim(segments[3])
        assert refused.value.status == RESOURCE_EXHAUSTED, refused.value.message
        assert "this token holds 3 shared-memory regions and handoffs" in refused.value.message
        assert "--max-shared-memory-total-regions" in refused.value.message
        assert b.register(segments[4])
        request = pb.RegisterSharedMemoryRequest(claim=claims[0], byte_size=segments[0].size)
        with pytest.raises(grpc.RpcError) as not_b:
            stub.RegisterSharedMemory(request, timeout=30, metadata=AS_B)
        nobody = pb.RegisterSharedMemoryRequest(claim="0" * 32, byte_size=segments[0].size)
        with pytest.raises(grpc.RpcError) as none:
            stub.RegisterSharedMemory(nobody, timeout=30, metadata=AS_B)
        assert not_b.value.code() == none.value.code() == grpc.StatusCode.NOT_FOUND
        assert not_b.value.details() == none.value.details()
        assert stub.RegisterSharedMemory(request, timeout=30, metadata=AS_A).region
        assert (server.shared_memory.regions, server.shared_memory.pending) == (2, 2)
