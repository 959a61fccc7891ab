"""Waiting costs no worker: callers that open streams and send nothing delay neither small calls nor health.

A stream that waits for its caller's bytes is a suspended coroutine on the server's event loop, not a
thread; request streams are bounded in number (``--max-open-streams``, below ``--max-concurrent-rpcs``) and
in idle time (``--stream-idle-timeout``). Each test holds silent streams open from threads of its own, then
makes a small Evaluate and a health check with deadlines of a few seconds, which the old thread-pool server
(8 workers) could not meet once 8 silent streams held every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from support.calls import RETRYING_RESOURCE_EXHAUSTED, evaluate_stream, l1_header, l1_stream, plain_channel
from support.in_process import nothing_held, running_server
from support.polling import eventually

from losswire.client import Credentials, LossClient, RemoteLoss, RemoteLossError
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.rpc.hangup import hang_up
from losswire.server.rpc.streams import within
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec
from losswire.wire.protocol import NO_RETRY

DEADLINE = 5.0  # a small call and a health check must be answered within this, silent streams or not


@contextlib.contextmanager
def running(**settings) -> Iterator[str]:
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", **settings))
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=0)


class SilentCallers:
    """``count`` streams held open on ``target`` with nothing sent after ``first`` messages."""

    def __init__(
        self, target: str, count: int, first: list | None = None, reflection: bool = False, metadata: tuple = ()
    ) -> None:
        self.release = threading.Event()
        self.channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
        self.calls = []
        for _ in range(count):
            if reflection:
                method = reflection_pb2_grpc.ServerReflectionStub(self.channel).ServerReflectionInfo
            else:
                method = evaluate_stream(self.channel)
            self.calls.append(method(self._requests(first or []), timeout=120, metadata=metadata))

    def _requests(self, first: list) -> Iterator:
        yield from first
        self.release.wait()

    def outcomes(self) -> list[grpc.StatusCode]:
        """How each stream ended (waits for each)."""
        codes = []
        for call in self.calls:
            try:
                list(call)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        return codes

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


def small_call_and_health_are_answered(target: str) -> None:
    client = LossClient(target, timeout=DEADLINE, shared_memory="off")
    try:
        pred, labels = torch.randn(16, 4), torch.randint(0, 5, (16,))
        loss = RemoteLoss(dict(type="FocalLoss"), client=client)(pred, labels)
        assert torch.isfinite(loss)
    finally:
        client.close()
    with plain_channel(target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("count", [8, 80])
def test_silent_streams_delay_neither_a_small_call_nor_health(count):
    with running(max_workers=2) as target:
        silent = SilentCallers(target, count)
        silent_reflection = SilentCallers(target, 8, reflection=True)
        try:
            small_call_and_health_are_answered(target)
        finally:
            silent.close()
            silent_reflection.close()


def test_streams_beyond_the_bound_are_told_to_come_back_and_the_rest_keep_room():
    with running(max_workers=2, max_open_streams=4) as target:
        silent = SilentCallers(target, 6)
        try:
            small_call_and_health_are_answered(target)
            refused = [call for call in silent.calls if call.done()]
            assert len(refused) >= 2
            for call in refused:
                assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
                assert "--max-open-streams" in call.details()
                assert NO_RETRY not in tuple(call.trailing_metadata() or ())  # busy, not a limit: comes back
        finally:
            silent.close()


def test_a_retry_policy_retries_a_stream_refused_as_busy():
    """A request stream refused because every stream is open is sent its refusal without headers, so a
    caller's own gRPC retry policy covering RESOURCE_EXHAUSTED retries it (losswire's client retries
    streams itself; a caller in another language may leave it to gRPC)."""
    with running_server(max_workers=2, max_open_streams=1) as server:
        target = f"127.0.0.1:{server.port}"
        silent = SilentCallers(target, 1)
        try:
            assert eventually(lambda: server.stream_guard.open == 1, 10), "the silent stream never opened"
            refused = server.metrics.registry.get_sample_value
            labels = {"method": "EvaluateStream", "code": "RESOURCE_EXHAUSTED"}
            channel = grpc.insecure_channel(target, options=RETRYING_RESOURCE_EXHAUSTED)
            with channel, pytest.raises(grpc.RpcError) as caught:
                list(evaluate_stream(channel)(iter(l1_stream(64)), timeout=DEADLINE))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
            assert "--max-open-streams" in caught.value.details()
            assert refused("losswire_requests_total", labels) == 3
        finally:
            silent.close()


def test_one_token_s_silent_streams_leave_other_tokens_room():
    """Tokens on, --max-open-streams 4: one token holds at most all but a quarter of them (3); its other
    silent streams are refused as busy, naming the share, and another token's streamed call is answered
    while the three stay open. (The first token's four silent streams took every one, for as long as it
    renewed them.)"""
    tokens = ("token-a-0123456789", "token-b-0123456789")
    with running(max_workers=2, max_open_streams=4, auth_tokens=tokens) as target:
        silent = SilentCallers(target, 5, metadata=(("authorization", f"Bearer {tokens[0]}"),))
        try:
            assert eventually(lambda: sum(call.done() for call in silent.calls) == 2, 10)
            for call in (call for call in silent.calls if call.done()):
                assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
                assert "--max-open-streams, which leaves other tokens room" in call.details()
            credentials = Credentials(token=tokens[1])
            client = LossClient(target, timeout=30, stream_threshold=0, shared_memory="off", credentials=credentials)
            try:
                pred, target_ = torch.randn(256, 4), torch.randn(256, 4)
                loss = RemoteLoss(dict(type="L1Loss"), client=client)(pred, target_)
            finally:
                client.close()
            torch.testing.assert_close(loss, (pred - target_).abs().mean())
            assert sum(not call.done() for call in silent.calls) == 3
        finally:
            silent.close()


def test_an_idle_stream_is_ended_and_leaves_its_big_call_slot():
    with running(max_workers=2, max_stream_calls=1, stream_idle_seconds=0.5) as target:
        silent = SilentCallers(target, 2, first=[l1_header(1 << 20)])
        try:
            outcomes = silent.outcomes()
        finally:
            silent.close()
        assert grpc.StatusCode.DEADLINE_EXCEEDED in outcomes, outcomes
        ended = next(c for c in silent.calls if c.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "--stream-idle-timeout" in ended.details()
        # the slot is free again: a real streamed call goes through
        client = LossClient(target, timeout=30, stream_threshold=0, shared_memory="off")
        try:
            pred, target_ = torch.randn(256, 4), torch.randn(256, 4)
            loss = RemoteLoss(dict(type="L1Loss"), client=client)(pred, target_)
            torch.testing.assert_close(loss, (pred - target_).abs().mean())
        except RemoteLossError as error:  # pragma: no cover - the assertion's message
            raise AssertionError(f"a stream after idle ones was refused: {error}") from None
        finally:
            client.close()


def test_a_silent_stream_holds_no_big_call_slot():
    """Two streams that sent a valid header, then nothing: a real streamed call still goes through at once
    (the slots, and the buffers of the declared tensors, are taken only when their chunks come)."""
    with running(max_workers=2, max_stream_calls=1) as target:
        silent = SilentCallers(target, 2, first=[l1_header(1 << 20)])
        client = LossClient(target, timeout=DEADLINE, stream_threshold=0, shared_memory="off")
        try:
            pred, target_ = torch.randn(256, 4), torch.randn(256, 4)
            loss = RemoteLoss(dict(type="L1Loss"), client=client)(pred, target_)
            torch.testing.assert_close(loss, (pred - target_).abs().mean())
        finally:
            client.close()
            silent.close()


@pytest.mark.parametrize("seconds", [10.0, None])
def test_the_idle_guard_never_loses_the_cancellation_of_a_call_whose_read_just_ended(seconds):
    """gRPC cancels a handler once, when its caller goes away, and that same moment ends the read the
    idle guard waits on. A guard that returned the read's result then (``asyncio.wait_for`` before Python
    3.12 does) lost the cancellation: the handler went on as if the caller had half-closed; a call waiting
    for its lanes waited for them (tests/service/test_lanes.py met it under load)."""

    async def scenario() -> None:
        read = asyncio.get_running_loop().create_future()
        guarded = asyncio.ensure_future(within(read, seconds))
        await asyncio.sleep(0)  # the guard waits on the read
        read.set_result("end of stream")
        guarded.cancel()  # at the same moment
        with pytest.raises(asyncio.CancelledError):
            await guarded

    asyncio.run(scenario())


def test_the_idle_guard_times_out_and_leaves_no_read_behind():
    async def scenario() -> None:
        read = asyncio.get_running_loop().create_future()
        with pytest.raises(TimeoutError):
            await within(read, 0.01)
        assert read.cancelled()

    asyncio.run(scenario())


@pytest.mark.parametrize("rate", [None, 64 << 20], ids=["idle", "too-slow"])
def test_a_caller_that_reads_its_answer_too_late_is_told_why_it_stops_short(rate):
    """The server ends a call whose answer its caller leaves unread (or reads too slowly): the status goes
    after the message gRPC was writing, so a caller that reads at last gets that message and then
    DEADLINE_EXCEEDED naming the bound. (Before, the handler was only cancelled, which sends no status:
    such a caller waited until its own deadline, or for ever without one.)"""
    messages = l1_stream(4 << 20)  # answered: a 16 MiB loss and a 16 MiB gradient, beyond the windows
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 << 20)]
    with running_server(stream_idle_seconds=1.0, stream_min_rate=rate) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
            late = evaluate_stream(channel)(iter(messages), timeout=30)
            assert eventually(lambda: server.dataplane.slots.in_use == 1, 10), "the call never started"
            assert nothing_held(server, 15), "the server never ended the unread call"
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                for _ in late:
                    pass
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.value.details()
        assert "--stream-idle-timeout" in ended.value.details() or "--stream-min-rate" in ended.value.details()
        assert time.monotonic() - started < 10, "the caller was told only by its own deadline"


def test_a_caller_that_never_reads_its_streamed_answer_leaves_its_memory_and_slot():
    """A big streamed call whose caller half-closes and never reads (no deadline): the answer (32 MiB) fills
    the connection's window and the server's write waits. After ``--stream-idle-timeout`` (2 s) the call
    ends, its memory budget, big-call slot and open stream come back, and other big calls are served. (It
    held them for as long as the caller kept its connection.)"""
    messages = l1_stream(4 << 20)  # 16 MiB of pred and of target; answered: a 16 MiB loss and a 16 MiB gradient
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 << 20)]
    with running_server(stream_idle_seconds=2.0, max_stream_calls=1) as server:
        target = f"127.0.0.1:{server.port}"
        with (
            grpc.insecure_channel(target, options=options) as silent,
            grpc.insecure_channel(target, options=options) as other,
        ):
            unread = evaluate_stream(silent)(iter(messages))  # no deadline, never read
            started = time.monotonic()
            assert eventually(lambda: server.dataplane.slots.in_use == 1, 10), "the call never started"
            assert nothing_held(server, 15), "the unread call still holds its memory or slot"
            assert time.monotonic() - started < 12
            answer = list(evaluate_stream(other)(iter(messages), timeout=30))  # the one slot is free again
            assert answer[0].WhichOneof("kind") == "response"
            unread.cancel()


def test_a_caller_that_still_does_not_read_its_ended_stream_is_hung_up_on():
    """A streamed call ended because its caller read nothing of its answer: the message gRPC was writing
    (a chunk, up to 4 MiB) stays in gRPC, which neither the handler's end nor its status frees. The call
    keeps its open stream counted meanwhile, and a caller that has still not read when ``--stream-idle-timeout``
    (1 s) plus a second per ``--stream-min-rate`` bytes of that message have passed again has its connection
    closed, which frees it. (The stream was given back at once and the message held for as long as the
    caller kept its connection, so a caller could leave one behind stream after stream.)"""
    messages = l1_stream(4 << 20)
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 << 20)]
    with running_server(stream_idle_seconds=1.0, stream_min_rate=32 << 20) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
            unread = evaluate_stream(channel)(iter(messages), timeout=60)  # never read in time
            assert eventually(lambda: server.dataplane.slots.in_use == 1, 10), "the call never started"
            assert nothing_held(server, 15), "the server never ended the unread call"
            assert server.stream_guard.open == 1, "the ended call gave its stream back with its message in gRPC"
            assert eventually(lambda: server.stream_guard.open == 0, 10), "the caller was never hung up on"
            with pytest.raises(grpc.RpcError) as ended:
                for _ in unread:
                    pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30)
        assert RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(3), torch.zeros(3)).item() == 1.0


def test_a_caller_that_never_takes_its_unary_answer_is_hung_up_on():
    """A unary Evaluate (32 MB of pred and target; answered with a 16 MiB loss and a 16 MiB gradient) whose
    caller never takes the answer: called as a stream whose answers are never read, the same bytes on the
    wire. The call keeps its call slot and request room while its answer waits; once
    ``--stream-idle-timeout`` (1 s) plus a second per ``--stream-min-rate`` bytes of the answer have passed,
    the server closes the caller's connection, which frees the answer gRPC held, and the call gives its
    slot and room back. (Returned to gRPC, the answer and the request were held beyond every bound for as
    long as the caller kept its connection: 12 such calls took a server's memory up 1.6 GB; a caller that
    read at last got the whole answer.)"""
    request = l1_request(4 << 20)
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 << 20)]
    with running_server(stream_idle_seconds=1.0, stream_min_rate=32 << 20) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
            as_stream = channel.stream_stream(
                "/losswire.v1.LossService/Evaluate",
                request_serializer=pb.EvaluateRequest.SerializeToString,
                response_deserializer=pb.EvaluateResponse.FromString,
            )
            unread = as_stream(iter([request]), timeout=60)  # never read
            assert eventually(lambda: server.call_slots.open == 1 and server.request_room.held > 0, 10)
            started = time.monotonic()
            assert eventually(lambda: server.call_slots.open == 0 and server.request_room.held == 0, 15), (
                "the unread call still holds its slot or room"
            )
            assert time.monotonic() - started < 10
            with pytest.raises(grpc.RpcError) as ended:
                for _ in unread:
                    pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30)
        assert RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(3), torch.zeros(3)).item() == 1.0


def l1_request(elements: int) -> pb.EvaluateRequest:
    """A unary L1Loss 'none' call on [elements] float32 pred and target, with pred's gradient."""
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config({"type": "L1Loss", "reduction": "none"}))
    codec.encode_tensor(torch.randn(elements), term.pred)
    codec.encode_value(torch.randn(elements), term.target)
    term.gradients.append("pred")
    return request


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_hang_up_shuts_the_servers_side_of_the_peers_connection(host):
    """``hang_up(peer)`` finds the socket whose remote end is gRPC's peer string and shuts it down: the
    accepted side (it can no longer send), not the caller's own socket in the same process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family)
        listener.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    with listener:
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]) as caller:
            accepted, remote = listener.accept()
            with accepted:
                peer = (
                    f"ipv4:{remote[0]}:{remote[1]}" if family == socket.AF_INET else f"ipv6:[{remote[0]}]:{remote[1]}"
                )
                assert hang_up(peer)
                caller.settimeout(5)
                assert caller.recv(1) == b""  # the caller sees its connection end
                with pytest.raises(OSError):
                    accepted.send(b"x")  # and it is the server's side that was shut
    assert not hang_up("unix:/tmp/losswire.sock") and not hang_up("ipv4:10.255.255.1:1")
