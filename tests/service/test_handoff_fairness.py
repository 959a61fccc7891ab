"""Handoffs of different callers do not wait behind one another's adoption.

Adopting a segment (``Segment.adopt``: its ``posix_fallocate`` walks every page) takes a fraction of a
second per GiB. The handoff socket's thread only reads and writes; adoptions run on a few workers, one
at a time per connection: a tiny handoff is answered while another caller's big one is still being
adopted, the bounds on what callers hold stay exact when adoptions run side by side, and stopping the
server leaves no mapping, connection or thread behind.

Every test runs a real server on an ephemeral loopback port and hands memfds over with the client's own
``Link``. The big segments are 2 GiB of memfd (allocated by the caller, as the client does: 2 GiB of
memory for each one a test holds); how long their adoption takes varies (0.2 to 1.5 s a GiB on a
2-core machine), so the tests wait until the server has mapped a big segment, or start two handoffs
at once, and assert the order in which answers come, never a duration.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from support.calls import plain_channel
from support.polling import wait_until

from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.dataplane import SharedMemoryRegistry
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import shared_memory as shm

pytestmark = pytest.mark.skipif(not shm.supported(), reason="needs memfd shared memory and descriptor passing")

BIG = 2 << 30
TINY = 4096

Done = list[tuple[str, object]]  # (who, what its handoff got: an answer, or the exception), in order of arrival


def fresh_server(**config: object) -> LosswireServer:
    instance = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2, **config))
    instance.start()
    return instance


@pytest.fixture()
def fresh() -> Iterator[LosswireServer]:
    instance = fresh_server()
    yield instance
    instance.stop(grace=1)


@pytest.fixture()
def stub(fresh: LosswireServer) -> Iterator[pb_grpc.LossServiceStub]:
    with plain_channel(f"127.0.0.1:{fresh.port}") as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.fixture()
def segments() -> Iterator[Callable[[int], shm.Segment]]:
    """``make(size)``: a new segment, closed (the test's descriptor; its mapping goes with it) at teardown."""
    made: list[shm.Segment] = []

    def make(size: int) -> shm.Segment:
        made.append(shm.Segment.create(size))
        return made[-1]

    yield make
    for segment in made:
        segment.close()


def endpoint(stub: pb_grpc.LossServiceStub) -> tuple[str, int]:
    """The handoff socket's address and a connection key for one connection to it."""
    answer = stub.SharedMemoryEndpoint(pb.SharedMemoryEndpointRequest(), timeout=30)
    return answer.address, answer.connection_key


def mappings_of(size: int) -> int:
    """How many mappings of losswire segments of ``size`` bytes this process (test and server) holds."""
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == f"/memfd:{shm.MEMFD_NAME}":
                start, end = (int(part, 16) for part in fields[0].split("-"))
                count += end - start == size
    return count


def wait_for_adoption(size: int, before: int) -> None:
    """Until the server has mapped a segment of ``size`` bytes (``before``: the mappings of that size until
    then, the caller's own among them). ``Segment.adopt`` maps first, then allocates every page: the slow
    part of the adoption is still ahead then."""
    wait_until(lambda: mappings_of(size) > before, "the server maps the big segment")


def in_background(work: Callable[[], object], who: str, done: Done) -> threading.Thread:
    """``work()`` on a thread of its own; (who, its result or exception) appended to ``done`` when it ends."""

    def run() -> None:
        try:
            result: object = work()
        except Exception as error:
            result = error
        done.append((who, result))

    thread = threading.Thread(target=run, name=f"test-{who}", daemon=True)
    thread.start()
    return thread


def read_answers(link: shm.Link, whose: list[str], done: Done) -> None:
    """The answers to handoffs sent on ``link`` by hand, one for each of ``whose``, appended as they come."""
    for who in whose:
        done.append((who, shm.read_answer(link.sock)))


def together(
    start: threading.Barrier, link: shm.Link, segment: shm.Segment, registry: SharedMemoryRegistry
) -> tuple[str | shm.HandoffRefusedError, int]:
    """``segment`` handed over on ``link`` as soon as every party of ``start`` is ready: its claim or the
    refusal, and how many handoffs the server held (adopted, not registered) when the answer came."""
    start.wait(30)
    try:
        answer: str | shm.HandoffRefusedError = link.hand_over(segment)
    except shm.HandoffRefusedError as refused:
        answer = refused
    return answer, registry.pending


def handoff_threads() -> set[threading.Thread]:
    """The shared-memory threads of every server in this process (the session's own server's too)."""
    return {thread for thread in threading.enumerate() if thread.name.startswith("losswire-shm")}


def register(stub: pb_grpc.LossServiceStub, claim: str, byte_size: int) -> str:
    request = pb.RegisterSharedMemoryRequest(claim=claim, byte_size=byte_size)
    return stub.RegisterSharedMemory(request, timeout=30).region


def test_a_tiny_handoff_is_answered_while_another_callers_big_one_is_adopted(fresh, stub, segments):
    """Caller A hands over 2 GiB and, right behind it on the same connection, 4 KiB; caller B hands over
    4 KiB once the server is adopting A's big segment. B is answered first. A's answers come in the order
    A sent its handoffs (each claim registers with its own segment's size only). Before, B waited for
    the whole adoption of A's segment on the one handoff thread."""
    big, a_tiny, b_tiny = segments(BIG), segments(TINY), segments(TINY)
    done: Done = []
    with contextlib.closing(shm.Link(*endpoint(stub))) as a, contextlib.closing(shm.Link(*endpoint(stub))) as b:
        before = mappings_of(BIG)
        socket.send_fds(a.sock, [shm.handoff_frame(big.size)], [big.fd])
        socket.send_fds(a.sock, [shm.handoff_frame(a_tiny.size)], [a_tiny.fd])
        answers = threading.Thread(target=read_answers, args=(a, ["A big", "A tiny"], done), daemon=True)
        answers.start()
        wait_for_adoption(BIG, before)
        done.append(("B tiny", b.hand_over(b_tiny)))
        answers.join(60)
        assert [who for who, _ in done] == ["B tiny", "A big", "A tiny"], done
        (big_status, big_claim), (tiny_status, tiny_claim) = done[1][1], done[2][1]
        assert big_status == tiny_status == shm.OK, done
        assert register(stub, big_claim, BIG) and register(stub, tiny_claim, TINY)
        registry = fresh.shared_memory  # A's two regions, B's claim
        assert (registry.regions, registry.pending, registry.mapped_bytes) == (2, 1, BIG + 2 * TINY)


@pytest.mark.parametrize(
    "limit, flag",
    [
        ({"max_shared_memory": BIG + BIG // 2}, "--max-shared-memory)"),  # ")": this flag, not a longer one
        ({"max_shared_memory_total_regions": 1}, "--max-shared-memory-total-regions"),
    ],
    ids=["total-bytes", "total-regions"],
)
def test_two_callers_at_once_where_one_fits_one_is_adopted_and_the_other_refused_at_once(segments, limit, flag):
    """Two callers hand over 2 GiB each at the same moment to a server that has room for one (in bytes,
    or in regions): exactly one gets a claim, the other the limit's refusal, naming its setting. The
    refusal does not wait for the other's adoption: when it comes, the other's segment is not adopted yet.
    Nothing more is held than the one."""
    instance = fresh_server(**limit)
    first, second = segments(BIG), segments(BIG)
    done: Done = []
    try:
        with plain_channel(f"127.0.0.1:{instance.port}") as channel:
            connection_keys = [endpoint(pb_grpc.LossServiceStub(channel)) for _ in range(2)]
        with (
            contextlib.closing(shm.Link(*connection_keys[0])) as a,
            contextlib.closing(shm.Link(*connection_keys[1])) as b,
        ):
            start = threading.Barrier(2)
            threads = [
                in_background(functools.partial(together, start, link, segment, instance.shared_memory), who, done)
                for who, link, segment in (("A", a, first), ("B", b, second))
            ]
            for thread in threads:
                thread.join(60)
            assert instance.shared_memory.mapped_bytes == BIG  # the one adopted (held while its link is open)
        assert len(done) == 2 and all(isinstance(result, tuple) for _, result in done), done
        answers = dict(result for _, result in done)  # claim or refusal -> handoffs held when it came
        claims = [answer for answer in answers if isinstance(answer, str)]
        refusals = [answer for answer in answers if isinstance(answer, shm.HandoffRefusedError)]
        assert len(claims) == 1 and len(refusals) == 1, done
        assert refusals[0].status == shm.RESOURCE_EXHAUSTED and flag in refusals[0].message, refusals[0]
        assert answers[refusals[0]] == 0, f"the refusal waited for the other's adoption: {done}"
        assert answers[claims[0]] == 1
    finally:
        instance.stop(grace=1)


def test_stopping_during_an_adoption_closes_the_connection_and_leaves_nothing_behind(segments):
    """The server stops while it adopts a caller's 2 GiB: the caller's connection closes without a claim
    (the adoption's result is dropped, not handed to a caller that can no longer register it), and once
    ``stop`` returns the server holds no mapping of it, no connection and no handoff thread."""
    others = handoff_threads()
    instance = fresh_server()
    big = segments(BIG)
    done: Done = []
    stopped = False
    try:
        with plain_channel(f"127.0.0.1:{instance.port}") as channel:
            address, connection_key = endpoint(pb_grpc.LossServiceStub(channel))
        with contextlib.closing(shm.Link(address, connection_key, timeout=60)) as link:
            before = mappings_of(BIG)
            caller = in_background(lambda: link.hand_over(big), "caller", done)
            wait_for_adoption(BIG, before)
            instance.stop(grace=1)
            stopped = True
            caller.join(60)
        assert not handoff_threads() - others, handoff_threads() - others
        assert mappings_of(BIG) == before, "the server still maps the caller's segment"
        registry = instance.shared_memory
        assert (registry.connections, registry.pending, registry.regions, registry.mapped_bytes) == (0, 0, 0, 0)
        ((_, result),) = done
        assert isinstance(result, ConnectionError), f"a claim for a server that stopped: {result!r}"
    finally:
        if not stopped:
            instance.stop(grace=1)
