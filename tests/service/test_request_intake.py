"""A unary request is read only with room for it, within a time bound, and only from a caller the token
check admits; one bigger than ``--max-request-message-bytes`` is refused unread.

gRPC receives a unary request whole before its handler runs, outside every budget of the dataplane (four
400 MiB Evaluate calls at once took a server with a 1 GiB memory budget to 6.1 GiB, however soon each was
refused). Each test holds "silent" calls: a unary method called with its request never sent (the client
API for a client stream, which is the same bytes on the wire as a unary call that has not sent yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.calls import HeldOpen, plain_channel
from support.in_process import nothing_held, running_server
from support.polling import eventually

from losswire.client import Credentials, LossClient, RemoteLoss, RemoteLossError
from losswire.server.app import LosswireServer
from losswire.server.rpc.intake import RequestRoom
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec
from losswire.wire.protocol import NO_RETRY, SERVICE_NAME

EVALUATE = f"/{SERVICE_NAME}/Evaluate"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
TOKENS = ("token-a-0123456789",)


def focal_request(rows: int = 16) -> bytes:
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config({"type": "FocalLoss"}))
    codec.encode_tensor(torch.randn(rows, 4), term.pred)
    codec.encode_value(torch.randint(0, 5, (rows,)), term.target)
    return request.SerializeToString()


class SilentCalls:
    """``count`` calls (Evaluate unless ``method``) whose request never comes (until ``close``), on the
    connection named ``connection`` (channels of different names never share one)."""

    def __init__(
        self, target: str, count: int, metadata: tuple | None = None, connection: str = "", method: str = EVALUATE
    ) -> None:
        self.release = threading.Event()
        options = [("grpc.enable_retries", 0), ("losswire.test.connection", f"silent {connection}")]
        self.channel = grpc.insecure_channel(target, options=options)
        call = self.channel.stream_unary(method)
        self.calls = [call.future(self._nothing(), timeout=60, metadata=metadata) for _ in range(count)]

    def _nothing(self) -> Iterator[bytes]:
        self.release.wait(60)
        return
        yield

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


@contextlib.contextmanager
def silent(target: str, count: int, metadata: tuple | None = None, connection: str = "") -> Iterator[SilentCalls]:
    calls = SilentCalls(target, count, metadata, connection)
    try:
        yield calls
    finally:
        calls.close()


def unary(target: str) -> grpc.Future:
    """A FocalLoss Evaluate on a connection of its own (an option of its own keeps gRPC from sharing one)."""
    options = [("grpc.enable_retries", 0), ("losswire.test.connection", "unary")]
    channel = grpc.insecure_channel(target, options=options)
    return channel.unary_unary(EVALUATE).future(focal_request(), timeout=60)


def room_of(server: LosswireServer):
    return server.request_room


def test_a_call_waits_unread_while_the_room_is_full_and_is_answered_once_there_is_room():
    """Requests of up to 1 MiB, room for 4 (the least: a quarter of it is bigger than an eighth of the 4 MiB
    budget): four silent calls take all of it, a fifth call's request stays unread (the call waits) until
    one of them leaves, and it is then answered."""
    with running_server(max_request_message_bytes=1 << 20, memory_budget=4 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        room = room_of(server)
        assert room.capacity == 4 << 20
        with silent(target, 4) as holders:
            assert eventually(lambda: room.held == 4 << 20, 10), room.held
            waiting = unary(target)
            assert eventually(lambda: room.waiting == 1, 10), "the fifth call took room that was not there"
            assert not waiting.done()
            holders.calls[0].cancel()
            answer = pb.EvaluateResponse.FromString(waiting.result(timeout=30))
        assert len(answer.results) == 1
        assert eventually(lambda: room.held == 0 and room.waiting == 0, 10), (room.held, room.waiting)


def test_the_bounds_are_in_the_metrics_while_they_hold():
    """Four silent calls fill the request room: the metrics say so (losswire_bound_used / _limit), and
    the calls they hold; once they leave, the room is empty again there too."""
    with running_server(max_request_message_bytes=1 << 20, memory_budget=4 << 20, max_concurrent_rpcs=64) as server:
        registry = server.metrics.registry

        def bound(name: str, kind: str = "used") -> float | None:
            return registry.get_sample_value(f"losswire_bound_{kind}", {"bound": name})

        assert bound("request_room_bytes", "limit") == 4 << 20 and bound("calls", "limit") == 64
        with silent(f"127.0.0.1:{server.port}", 5):
            assert eventually(lambda: bound("request_room_bytes") == 4 << 20, 10), bound("request_room_bytes")
            assert eventually(lambda: bound("request_room_waiting") == 1 and bound("calls") == 5, 10)
        assert eventually(lambda: bound("request_room_bytes") == 0 and bound("calls") == 0, 10)
        assert bound("request_room_waiting", "limit") is None  # unbounded: no limit sample


def test_a_request_that_does_not_arrive_in_time_is_refused_and_its_room_given_back():
    """A caller that starts a call and never sends its request: DEADLINE_EXCEEDED naming the setting once
    the grace (5 s) and a second per 16 MiB of the largest request (1 MiB) have passed; its room comes
    back. (It held a call for as long as it kept its connection.)"""
    with running_server(max_request_message_bytes=1 << 20) as server:
        with silent(f"127.0.0.1:{server.port}", 1) as holders, pytest.raises(grpc.RpcError) as late:
            holders.calls[0].result(timeout=30)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late.value.details()
        assert "--max-request-message-bytes" in late.value.details() and "5.0625 s" in late.value.details()
        assert eventually(lambda: room_of(server).held == 0, 10)


def test_a_stream_s_first_message_keeps_room_until_its_call_ends():
    """A streamed call's first message is its request, which may carry tensors inline, and the call holds it
    as long as it lasts: it keeps room for its bytes, as a unary request does (a silent stream held a 60 MB
    one for the whole idle timeout, outside every bound but the open streams). Room for 4 MiB of requests
    of up to 1 MiB: four silent streams whose first message carries 0.9 MiB inline hold four of those; a
    fifth's waits for room, and is refused as busy once the unary read bound (5.06 s) has passed; a stream
    that ends gives its room back."""
    first = pb.EvaluateChunk(request=pb.EvaluateRequest.FromString(focal_request(rows=39_000)))
    nbytes = first.ByteSize()
    assert 0.85 * (1 << 20) < nbytes < 1 << 20
    with running_server(max_request_message_bytes=1 << 20, memory_budget=4 << 20) as server:
        target, room = f"127.0.0.1:{server.port}", room_of(server)
        with plain_channel(target, "holders") as to_hold, plain_channel(target, "late") as to_wait:
            holders = HeldOpen(to_hold, [first], count=4)
            late: HeldOpen | None = None
            try:
                assert eventually(lambda: room.held == 4 * nbytes, 10), room.held
                late = HeldOpen(to_wait, [first])  # once the four hold their room: it is the one waiting
                assert eventually(lambda: room.waiting == 1, 10), (room.held, room.waiting)
                assert late.calls[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, late.calls[0].details()
                assert f"first message ({nbytes} bytes) found no room" in late.calls[0].details()
                assert room.held == 4 * nbytes and room.waiting == 0
                holders.calls[0].cancel()
                assert eventually(lambda: room.held == 3 * nbytes, 10), room.held
            finally:
                holders.close()
                if late is not None:
                    late.close()
        assert eventually(lambda: room.held == 0, 10), room.held
        assert nothing_held(server)


def test_one_connection_has_at_most_four_requests_being_received():
    """Room for eight requests of up to 1 MiB (an eighth of a 64 MiB budget). Eight silent calls on one
    connection take room for four only, the other four wait; a call on another connection is read and
    answered at once, while those four still wait (their neighbours' requests are overdue only after 5 s)."""
    with running_server(max_request_message_bytes=1 << 20, memory_budget=64 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        room = room_of(server)
        assert room.capacity == 8 << 20
        with silent(target, 8):
            assert eventually(lambda: room.held == 4 << 20 and room.waiting == 4, 10), (room.held, room.waiting)
            answer = pb.EvaluateResponse.FromString(unary(target).result(timeout=30))
            assert len(answer.results) == 1
            assert room.waiting == 4, "the other connection's call was read only once silent ones timed out"


def test_a_request_over_the_largest_message_is_refused_unread():
    with running_server(max_request_message_bytes=1 << 20) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.enable_retries", 0)])
        with channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(EVALUATE)(bytes(2 << 20), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in refused.value.details()
        assert room_of(server).held == 0


def test_a_call_without_its_request_message_is_refused():
    with running_server() as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.enable_retries", 0)])
        with channel, pytest.raises(grpc.RpcError) as refused:
            channel.stream_unary(EVALUATE)(iter(()), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no request message" in refused.value.details()
        assert eventually(lambda: room_of(server).held == 0, 10)


def test_a_caller_without_a_token_is_refused_without_its_request_being_read():
    """With tokens on, a call without one is UNAUTHENTICATED at once, though its request never comes, and
    takes no room: a caller without a token cannot make the server receive anything."""
    with running_server(auth_tokens=TOKENS) as server:
        with silent(f"127.0.0.1:{server.port}", 3) as strangers:
            for call in strangers.calls:
                with pytest.raises(grpc.RpcError) as refused:
                    call.result(timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert room_of(server).held == 0
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30, credentials=Credentials(token=TOKENS[0]))
        try:
            loss = RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(4), torch.zeros(4))
            assert loss.item() == 1.0
        finally:
            client.close()


def test_the_client_is_told_of_the_limit_and_does_not_retry_it():
    """A LossClient that never streams, sending a request over the server's 1 MiB: RESOURCE_EXHAUSTED
    naming the setting and what streams instead, not mistaken for a busy server (which the client waits
    out, here for 60 s)."""
    with running_server(max_request_message_bytes=1 << 20) as server:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=60, stream_threshold=None, shared_memory="off")
        try:
            with pytest.raises(RemoteLossError) as refused:
                RemoteLoss(dict(type="L1Loss"), client=client)(torch.zeros(1 << 19), torch.zeros(1 << 19))
        finally:
            client.close()
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not refused.value.busy
    assert "--max-request-message-bytes" in refused.value.details and "stream_threshold" in refused.value.details


def test_callers_without_a_token_cannot_take_the_room_of_those_with_one():
    """With tokens on, health calls without a token read in a room of their own: four silent ones on one
    connection take room for one request there (the rest wait), and a token holder's Evaluate is still
    read and answered."""
    with running_server(auth_tokens=TOKENS, max_request_message_bytes=1 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
        check = channel.stream_unary("/grpc.health.v1.Health/Check")
        release = threading.Event()

        def nothing() -> Iterator[bytes]:
            release.wait(60)
            return
            yield

        probes = [check.future(nothing(), timeout=60) for _ in range(4)]
        try:
            open_room = server.open_room  # one connection: one request being received there, three waiting
            assert eventually(lambda: open_room.held == 1 << 20 and open_room.waiting == 3, 10), open_room.held
            client = LossClient(target, timeout=30, credentials=Credentials(token=TOKENS[0]), shared_memory="off")
            try:
                loss = RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(4), torch.zeros(4))
                assert loss.item() == 1.0
            finally:
                client.close()
        finally:
            release.set()
            for probe in probes:
                probe.cancel()
            channel.close()


def test_a_waiter_that_leaves_gives_up_its_place_and_holds_nothing():
    """Room for two takers of 1: both taken, three wait; the first waiter is cancelled (its caller reset its
    call), then room comes back: it goes to the next waiter, none to the one that left. (A cancelled
    waiter was handed room, and the hand-over raised: every reset while the room was full leaked room,
    until no unary call was read any more.)"""

    async def scenario() -> None:
        room = RequestRoom(2)
        await room.take(1)
        await room.take(1)
        waiters = [asyncio.ensure_future(room.take(1)) for _ in range(3)]
        await asyncio.sleep(0)
        assert room.waiting == 3
        waiters[0].cancel()
        await asyncio.sleep(0)
        room.give_back(1, "", "")
        await asyncio.sleep(0)
        assert waiters[1].done() and not waiters[2].done() and room.held == 2
        waiters[2].cancel()
        await asyncio.sleep(0)
        room.give_back(1, "", "")
        room.give_back(1, "", "")
        assert room.held == 0 and room.waiting == 0
        await room.take(2)  # the whole room is there again
        assert room.held == 2

    asyncio.run(scenario())


def test_room_that_comes_back_goes_to_the_caller_that_holds_least():
    """Room for four: caller x holds all of it and waits for more, then caller y waits. Room coming back
    goes to y, which holds nothing, not to x's earlier waiter; then to x. (First come, first served, a
    caller's flood kept another caller's call waiting for every call of the flood.)"""

    async def scenario() -> None:
        room = RequestRoom(4)
        for _ in range(4):
            await room.take(1, "x")
        more_of_x = asyncio.ensure_future(room.take(1, "x"))
        await asyncio.sleep(0)
        first_of_y = asyncio.ensure_future(room.take(1, "y"))
        await asyncio.sleep(0)
        assert room.waiting == 2
        room.give_back(1, "x", "x")
        await asyncio.sleep(0)
        assert first_of_y.done() and not more_of_x.done()
        assert room.holding("y") == 1 and room.holding("x") == 3
        room.give_back(1, "x", "x")
        await asyncio.sleep(0)
        assert more_of_x.done() and room.waiting == 0 and room.held == 4

    asyncio.run(scenario())


def test_one_caller_leaves_room_for_another_whatever_connections_it_opens():
    """A caller may hold all of the room but one request's worth (here 3 of 4), on one connection or
    several; another caller's request is read at once."""

    async def scenario() -> None:
        room = RequestRoom(4, per_caller=3)
        for connection in ("a1", "a2", "a3"):
            await room.take(1, connection, "token a")
        fourth_of_a = asyncio.ensure_future(room.take(1, "a4", "token a"))
        await asyncio.sleep(0)
        assert not fourth_of_a.done() and room.held == 3
        await asyncio.wait_for(room.take(1, "b1", "token b"), 1)
        assert room.held == 4 and room.holding("token a") == 3
        room.give_back(1, "token b", "b1")
        await asyncio.sleep(0)
        assert not fourth_of_a.done(), "a caller passed its share"
        room.give_back(1, "token a", "a1")
        await asyncio.sleep(0)
        assert fourth_of_a.done() and room.holding("token a") == 3

    asyncio.run(scenario())


def test_a_token_flooding_silent_calls_leaves_room_for_another_token():
    """Room for four 1 MiB requests, tokens on. Token a opens eight silent calls on two connections: it
    takes three requests' worth, the other five wait. Token b's call is read and answered at once, while
    a's calls still wait (they are overdue only after 5 s). With the whole room a's, b's call waited for
    them."""
    tokens = ("token-a-0123456789", "token-b-0123456789")
    with running_server(auth_tokens=tokens, max_request_message_bytes=1 << 20, memory_budget=1 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        room = room_of(server)
        as_a = (("authorization", f"Bearer {tokens[0]}"),)
        with silent(target, 4, as_a, connection="a1"), silent(target, 4, as_a, connection="a2"):
            assert eventually(lambda: room.held == 3 << 20 and room.waiting == 5, 10), (room.held, room.waiting)
            client = LossClient(target, timeout=30, credentials=Credentials(token=tokens[1]), shared_memory="off")
            try:
                loss = RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(4), torch.zeros(4))
            finally:
                client.close()
            assert loss.item() == 1.0
            assert room.waiting == 5 and room.holding(tokens[0]) == 3 << 20, "b's call waited for a's"


def test_a_connection_flooding_silent_calls_does_not_queue_ahead_of_another():
    """Room for four 1 MiB requests, no tokens. Connection x holds it with four silent calls and queues
    four more; then another connection's call queues. When one of x's calls ends, its room goes to the
    other connection (which holds none): the call is answered while x's other calls still wait for their
    requests. First come, first served, it waited until x's silent calls were overdue (5 s)."""
    with running_server(max_request_message_bytes=1 << 20, memory_budget=1 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        room = room_of(server)
        with silent(target, 8, connection="x") as flood:
            assert eventually(lambda: room.held == 4 << 20 and room.waiting == 4, 10), (room.held, room.waiting)
            other = unary(target)
            assert eventually(lambda: room.waiting == 5, 10), room.waiting
            flood.calls[0].cancel()
            answer = pb.EvaluateResponse.FromString(other.result(timeout=30))
            assert len(answer.results) == 1
            assert not any(call.done() for call in flood.calls[1:]), "the call was read only once x's were overdue"


def test_health_is_read_while_silent_calls_hold_the_request_room():
    """Four silent Evaluate calls from four connections fill the request room (4 x 1 MiB); health checks
    read in a room of their own, and are answered meanwhile."""
    with running_server(max_request_message_bytes=1 << 20, memory_budget=1 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        holders = [SilentCalls(target, 1, connection=str(index)) for index in range(4)]
        try:
            room = room_of(server)
            assert eventually(lambda: room.held == room.capacity, 10), room.held
            channel = grpc.insecure_channel(target, options=[("losswire.test.connection", "health")])
            with channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for calls in holders:
                calls.close()


def test_silent_health_calls_hold_the_health_room_briefly():
    """Eight silent health checks on eight connections fill the room health checks are read in (one each).
    A health request is a few bytes and must come within 2 s, so a probe with a 4 s deadline is answered:
    the first room that comes back is the probe's, which holds none. (They held it for the 5 s a unary
    request of up to 1 MiB may take, and the probe ran out of time.)"""
    with running_server(max_request_message_bytes=1 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        room = server.open_room
        holders = [SilentCalls(target, 1, connection=str(index), method=HEALTH_CHECK) for index in range(8)]
        try:
            assert eventually(lambda: room.held == room.capacity, 10), room.held
            channel = grpc.insecure_channel(target, options=[("losswire.test.connection", "probe")])
            with channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as late:
                holders[0].calls[0].result(timeout=10)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late.value.details()
            assert "a health check request is a few bytes" in late.value.details()
        finally:
            for calls in holders:
                calls.close()


def test_silent_health_checks_without_a_token_leave_token_holders_their_call_slots():
    """Tokens on, 16 call slots: 100 silent health checks without a token, on five connections, take none of
    them (they have slots of their own), and a token holder's calls are all answered. (They took every
    slot: 11 connections of them made nine of twenty such calls RESOURCE_EXHAUSTED.)"""
    with running_server(auth_tokens=TOKENS, max_concurrent_rpcs=16) as server:
        target = f"127.0.0.1:{server.port}"
        holders = [SilentCalls(target, 20, connection=str(index), method=HEALTH_CHECK) for index in range(5)]
        try:
            arrived = eventually(lambda: server.open_room.waiting >= 16 or server.call_slots.open == 16, 10)
            assert arrived and server.call_slots.open == 0, server.call_slots.open
            client = LossClient(target, timeout=30, credentials=Credentials(token=TOKENS[0]), shared_memory="off")
            try:
                for _ in range(20):
                    loss = RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(4), torch.zeros(4))
                    assert loss.item() == 1.0
            finally:
                client.close()
            refused = [c.exception() for h in holders for c in h.calls if c.done() and c.exception() is not None]
            busy = [e for e in refused if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert busy and all("--health-port" in e.details() for e in busy), [e.details() for e in refused]
        finally:
            for calls in holders:
                calls.close()


def test_silent_checks_on_the_health_port_leave_a_probe_answered():
    """The plaintext health port admits a few calls on each connection (``HEALTH_PORT_STREAMS_PER_CONNECTION``:
    the rest wait in their client) and room for them on every connection: twenty silent checks on each of
    twelve connections leave a probe on its own connection answered at once. (Silent checks are held until
    their callers' deadlines: these 240 took every call the port admitted, 72 with 8 Watch streams, and
    the probe was RESOURCE_EXHAUSTED.)"""
    with running_server(health_port=0, max_health_watches=8) as server:
        target = f"127.0.0.1:{server.health_port}"
        holders = [SilentCalls(target, 20, connection=str(index), method=HEALTH_CHECK) for index in range(12)]
        try:
            time.sleep(1)  # a condition cannot be polled: gRPC holds silent calls where no handler sees them
            channel = grpc.insecure_channel(target, options=[("losswire.test.connection", "probe")])
            with channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert not any(call.done() for calls in holders for call in calls.calls)
        finally:
            for calls in holders:
                calls.close()


def test_a_call_that_waits_too_long_for_room_is_told_to_come_back():
    """Room for four 1 MiB requests. Four silent calls hold it; 2 s later four more queue on a connection
    of their own, then a fifth call behind them on theirs. When the first four are overdue (5.0625 s) the
    next four take the room until 2 s later than that (their connection has its most being received). The
    fifth call waits at most as long as a request may take to arrive, then gets RESOURCE_EXHAUSTED without
    the no-retry pushback (the client waits it out), rather than waiting, unread, without bound."""
    with running_server(max_request_message_bytes=1 << 20, memory_budget=1 << 20) as server:
        target = f"127.0.0.1:{server.port}"
        room = room_of(server)
        with silent(target, 4):
            assert eventually(lambda: room.held == room.capacity, 10), room.held
            time.sleep(2.0)  # the next silent calls are overdue 2 s after the first
            with silent(target, 4, connection="later") as later:
                assert eventually(lambda: room.waiting == 4, 10), room.waiting
                fifth = later.channel.unary_unary(EVALUATE).future(focal_request(), timeout=30)
                with pytest.raises(grpc.RpcError) as busy:
                    fifth.result(timeout=30)
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, busy.value.details()
    assert "retry later" in busy.value.details()
    assert NO_RETRY not in tuple(busy.value.trailing_metadata() or ())


def test_a_malformed_request_of_a_streaming_answer_is_invalid_argument():
    """Health Watch (a unary request, answers streamed) with bytes that are no HealthCheckRequest."""
    with running_server() as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.enable_retries", 0)])
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        with channel, pytest.raises(grpc.RpcError) as refused:
            list(watch(b"\xff\xff\xff", timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "do not parse" in refused.value.details()


def test_a_compressed_request_is_refused():
    """gzip would let a few bytes on the wire count as many against the stream pace (a 256 KiB chunk of
    zeros is about 300 bytes): neither losswire side compresses, and the server accepts identity only."""
    with running_server() as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", compression=grpc.Compression.Gzip)
        with channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(EVALUATE)(focal_request(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value.details()
    assert "gzip" in refused.value.details()
