"""One streamed call on several streams (``EvaluateRequest.lanes``): its tensors' stripes dealt to its own
stream and its lanes, each lane an EvaluateStream on a connection of its own.

The answer must be the unary answer bit for bit, overlapped or not; the lanes must really travel apart;
and every way a caller can get lanes wrong (a lane for no call, a call whose lanes never come, a stripe
on the wrong stream, someone else's lane, a call that ends while its lanes still send) is refused with
its field named, leaves nothing held, and never reaches another caller's call. Stripes of 64 KiB (the
smallest allowed) spread small tensors over every lane.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.calls import connections_to, evaluate_stream, field_of, plain_channel
from support.in_process import nothing_held, running_server

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.client import lanes as client_lanes
from losswire.server.app import LosswireServer
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec

STRIPE = 64 << 10
N, C = 4096, 80  # 1.25 MiB of pred: 20 stripes
FOCAL = dict(type="FocalLoss", gamma=2.0, alpha=0.25)
TOKENS = ("token-a-0123456789", "token-b-0123456789")


@pytest.fixture(autouse=True)
def small_stripes(monkeypatch):
    monkeypatch.setattr(client_lanes, "LANE_STRIPE_BYTES", STRIPE)


def running(**settings) -> contextlib.AbstractContextManager[LosswireServer]:
    return running_server(**{"max_workers": 4, **settings})


@pytest.fixture(scope="module")
def quick_joins() -> Iterator[LosswireServer]:
    """A server whose lanes and calls wait 0.5 s for each other."""
    with running(lane_join_seconds=0.5) as server:
        yield server


def _target(server: LosswireServer) -> str:
    return f"127.0.0.1:{server.port}"


def _inputs(seed: int, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=generator), torch.randint(0, C + 1, (n,), generator=generator)


def _gradients(client: LossClient, cfg: dict, pred: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaf = pred.clone().requires_grad_()
    loss = RemoteLoss(cfg, client=client)(leaf, *args)
    loss.sum().backward()
    return loss.detach(), leaf.grad


# -- what a caller sees: the same answer, on connections of their own ---------------------------------


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("lanes", [1, 3])
@pytest.mark.parametrize(
    "cfg, weighted",
    [(FOCAL, False), (dict(FOCAL, reduction="none"), True), (dict(type="SmoothL1Loss", beta=0.5), True)],
)
def test_a_call_over_lanes_answers_as_unary_bit_for_bit(server, target, overlap, lanes, cfg, weighted):
    pred, labels = _inputs(lanes)
    if cfg["type"] == "SmoothL1Loss":  # boxes: pred, target and weight all [N, 4] x 80 (no row kernel)
        target_or_labels = torch.randn_like(pred)
    else:
        target_or_labels = labels
    extra = (torch.rand(N, C),) if weighted else ()
    unary = LossClient(target, timeout=60, stream_threshold=None, shared_memory="off")
    spread = LossClient(target, timeout=60, stream_threshold=0, shared_memory="off", overlap=overlap, lanes=lanes)
    try:
        joined = server.lanes.joined
        expected = _gradients(unary, cfg, pred, target_or_labels, *extra)
        got = _gradients(spread, cfg, pred, target_or_labels, *extra)
        assert server.lanes.joined == joined + lanes  # the call went over its lanes
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    finally:
        unary.close()
        spread.close()
    assert nothing_held(server)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_narrowed_call_over_lanes_answers_as_a_narrowed_unary_call(server, target, dtype):
    """transfer_dtype halves the streamed bytes: the stripes cut the narrowed data."""
    pred, labels = _inputs(13)
    unary = LossClient(target, timeout=60, stream_threshold=None, shared_memory="off", transfer_dtype=dtype)
    spread = LossClient(target, timeout=60, stream_threshold=0, shared_memory="off", transfer_dtype=dtype, lanes=2)
    try:
        joined = server.lanes.joined
        expected = _gradients(unary, FOCAL, pred, labels)
        got = _gradients(spread, FOCAL, pred, labels)
        assert server.lanes.joined == joined + 2
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    finally:
        unary.close()
        spread.close()


def test_a_session_call_over_lanes_steps_its_state_as_a_unary_one(server, target):
    """A stateful loss (SeesawLoss keeps its class counts in a session) over lanes: the same answers, the
    same steps, call after call; the session's name is the header that pins the lanes behind a proxy."""
    unary = LossClient(target, timeout=60, stream_threshold=None, shared_memory="off")
    spread = LossClient(target, timeout=60, stream_threshold=0, shared_memory="off", lanes=2)
    cfg = dict(type="SeesawLoss", num_classes=80)
    try:
        joined = server.lanes.joined
        modules = [RemoteLoss(cfg, client=c, session=f"lanes/{i}/{os.getpid()}") for i, c in enumerate((unary, spread))]
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            scores, labels = (
                torch.randn(1024, 82, generator=generator),
                torch.randint(0, 80, (1024,), generator=generator),
            )
            answers = []
            for module in modules:
                leaf = scores.clone().requires_grad_()
                parts = module(leaf, labels)  # Seesaw's class and objectness losses
                loss = sum(parts.values())
                loss.backward()
                answers.append((loss.detach(), leaf.grad, module.last_session_step))
            assert all(torch.equal(a, b) for a, b in zip(answers[0][:2], answers[1][:2], strict=True))
            assert answers[0][2] == answers[1][2] == step + 1
        # each step streams twice (Seesaw is not separable: backward sends the upstream gradient), 2 lanes each
        assert server.lanes.joined == joined + 3 * 2 * 2
    finally:
        unary.close()
        spread.close()


def test_each_lane_has_a_connection_of_its_own_kept_for_the_next_calls():
    with running() as server:
        client = LossClient(_target(server), timeout=60, stream_threshold=0, shared_memory="off", lanes=2)
        try:
            pred, labels = _inputs(3)
            first = _gradients(client, FOCAL, pred, labels)
            assert connections_to(server.port) == 4  # unary calls, the stream, two lanes
            again = _gradients(client, FOCAL, pred, labels)
            assert connections_to(server.port) == 4
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        finally:
            client.close()


def test_a_call_too_small_for_its_lanes_goes_on_one_stream(server, target):
    """Fewer stripes than streams: the lanes would carry nothing, so none are opened."""
    client = LossClient(target, timeout=60, stream_threshold=0, shared_memory="off", lanes=3)
    try:
        joined = server.lanes.joined
        pred, labels = _inputs(4, n=(3 * STRIPE) // (4 * C))  # 3 stripes for 4 streams
        _gradients(client, FOCAL, pred, labels)
        assert server.lanes.joined == joined
    finally:
        client.close()


def test_lanes_is_bounded_where_the_client_is_made(monkeypatch):
    with pytest.raises(ValueError, match=r"lanes \(LOSSWIRE_CLIENT_LANES\) must be 0 to 8"):
        LossClient("127.0.0.1:1", lanes=9)
    monkeypatch.setenv("LOSSWIRE_CLIENT_LANES", "many")
    with pytest.raises(ValueError, match="LOSSWIRE_CLIENT_LANES must be 0 to 8, got 'many'"):
        LossClient("127.0.0.1:1")


def test_the_environment_gives_lanes_to_a_client_made_without_them(server, target, monkeypatch):
    """What a config's or an unpickled module's client gets: LossClient.shared(target) reads the variable."""
    monkeypatch.setenv("LOSSWIRE_CLIENT_LANES", "2")
    client = LossClient(target, timeout=60, stream_threshold=0, shared_memory="off")
    try:
        assert client.transports.lanes == 2
        joined = server.lanes.joined
        _gradients(client, FOCAL, *_inputs(15))
        assert server.lanes.joined == joined + 2
    finally:
        client.close()


# -- the contract, sent by hand ------------------------------------------------------------------------


def _header(pred: torch.Tensor, labels: torch.Tensor, lanes: int, call: bytes) -> pb.EvaluateRequest:
    """A FocalLoss request spread over ``lanes`` lanes, named ``call``."""
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(FOCAL), gradients=["pred"])
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(labels, term.target)
    request.lanes.CopyFrom(pb.StreamLanes(call=call, count=lanes, stripe_bytes=STRIPE))
    return request


def _streams(request: pb.EvaluateRequest) -> list[list]:
    """The messages of every stream of ``request``, as the client deals them."""
    sink = chunks.StreamSink.take(request)
    lanes = pb.StreamLanes()
    lanes.CopyFrom(request.lanes)
    request.ClearField("lanes")
    return [list(messages) for messages in chunks.lane_streams(request, sink, lanes)]


class Calls:
    """EvaluateStream calls started in threads; each one's answer messages, or its error."""

    def __init__(self, target: str, token: str | None = None) -> None:
        self.target, self.token = target, token
        self.results: list[queue.Queue] = []
        self.threads: list[threading.Thread] = []

    def start(self, messages: Iterator) -> int:
        """Starts a call sending ``messages``; its index."""
        results: queue.Queue = queue.Queue()
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else None

        def run() -> None:
            with plain_channel(self.target) as channel:  # a connection of its own, as a lane's
                try:
                    results.put(list(evaluate_stream(channel)(messages, timeout=60, metadata=metadata)))
                except grpc.RpcError as error:
                    results.put(error)

        self.results.append(results)
        self.threads.append(threading.Thread(target=run, daemon=True))
        self.threads[-1].start()
        return len(self.results) - 1

    def outcome(self, index: int) -> list | grpc.RpcError:
        return self.results[index].get(timeout=60)


def test_a_call_sent_by_hand_over_two_lanes_is_answered_on_its_own_stream(server, target):
    pred, labels = _inputs(5)
    streams = _streams(_header(pred, labels, 2, os.urandom(16)))
    calls = Calls(target)
    for messages in reversed(streams):  # lanes first: they wait for their call's request
        calls.start(iter(messages))
    answered = calls.outcome(2)
    assert calls.outcome(1) == [] and calls.outcome(0) == []  # a lane ends OK, with no message
    assert not isinstance(answered, grpc.RpcError), answered
    assert answered[-1].WhichOneof("kind") in ("response", "chunk")
    assert nothing_held(server)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("count", 0, "lanes.count"),
        ("count", 9, "lanes.count"),
        ("call", b"short", "lanes.call"),
        ("call", bytes(65), "lanes.call"),
        ("stripe_bytes", 1000, "lanes.stripe_bytes"),
        ("stripe_bytes", 0, "lanes.stripe_bytes"),
        ("stripe_bytes", 128 << 20, "lanes.stripe_bytes"),
    ],
)
def test_lanes_out_of_bounds_are_refused_naming_the_field(server, target, field, value, named):
    pred, labels = _inputs(6, n=64)
    request = _header(pred, labels, 2, os.urandom(16))
    setattr(request.lanes, field, value)
    with plain_channel(target) as channel, pytest.raises(grpc.RpcError) as raised:
        list(evaluate_stream(channel)(iter([pb.EvaluateChunk(request=request)]), timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(raised.value) == named, raised.value.details()
    assert nothing_held(server)


def test_lanes_on_a_unary_call_are_refused(client):
    pred, labels = _inputs(7, n=64)
    with pytest.raises(RemoteLossError) as raised:
        client.evaluate_tensors(_header(pred, labels, 1, os.urandom(16)))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.field == "lanes"


def test_a_lane_that_names_no_call_is_not_found(quick_joins):
    lane = pb.EvaluateChunk(lane=pb.StreamLane(call=os.urandom(16), lane=1))
    calls = Calls(_target(quick_joins))
    started = time.monotonic()
    error = calls.outcome(calls.start(iter([lane])))
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.NOT_FOUND
    assert field_of(error) == "lane.call" and "--lane-join-timeout" in error.details()
    assert time.monotonic() - started >= 0.5
    assert nothing_held(quick_joins)


@pytest.mark.parametrize("length", [3, 65, 4 << 20])
def test_a_lane_whose_call_name_no_call_can_have_is_refused_at_once(quick_joins, length):
    """``lane.call`` outside a call name's 16 to 64 bytes: INVALID_ARGUMENT at once, not NOT_FOUND after the
    join timeout with the name held meanwhile."""
    lane = pb.EvaluateChunk(lane=pb.StreamLane(call=b"n" * length, lane=1))
    calls = Calls(_target(quick_joins))
    error = calls.outcome(calls.start(iter([lane])))
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field_of(error) == "lane.call" and f"got {length}" in error.details()
    assert nothing_held(quick_joins)


def test_a_lane_that_comes_after_its_call_has_ended_is_not_found(quick_joins):
    """The server keeps nothing of a call that is over: a lane that opens once its call has been answered
    is one that names no call, NOT_FOUND after the join timeout (not CANCELLED)."""
    pred, labels = _inputs(16)
    streams = _streams(_header(pred, labels, 1, os.urandom(16)))
    calls = Calls(_target(quick_joins))
    started = [calls.start(iter(messages)) for messages in streams]
    answered, lane = calls.outcome(started[0]), calls.outcome(started[1])
    assert not isinstance(answered, grpc.RpcError) and lane == [], (answered, lane)
    assert nothing_held(quick_joins)
    begun = time.monotonic()
    late = calls.outcome(calls.start(iter(streams[1])))  # the same lane once more: its call is over
    assert isinstance(late, grpc.RpcError) and late.code() == grpc.StatusCode.NOT_FOUND, late
    assert field_of(late) == "lane.call" and "--lane-join-timeout" in late.details()
    assert time.monotonic() - begun >= 0.5
    assert nothing_held(quick_joins)


def test_a_call_whose_lanes_never_come_fails_and_holds_nothing(quick_joins):
    pred, labels = _inputs(8)
    streams = _streams(_header(pred, labels, 2, os.urandom(16)))
    calls = Calls(_target(quick_joins))
    error = calls.outcome(calls.start(iter(streams[0])))  # lanes 1 and 2 never come
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert field_of(error) == "lanes" and "lane 1, 2 of 2 did not join" in error.details()
    assert nothing_held(quick_joins)


def _misdealt(streams: list[list]) -> list[list]:
    """The same streams with lane 1's first chunk sent on lane 2 instead."""
    moved = streams[1].pop(1)
    streams[2].insert(1, moved)
    return streams


def _held(messages: list, release: threading.Event) -> Iterator:
    """``messages``, then nothing until ``release``: the stream stays open, silent."""
    yield from messages
    release.wait(30)


@pytest.mark.parametrize("fault", ["wrong stream", "across a stripe", "lane number 3 of 2", "lane twice"])
def test_a_lane_that_breaks_the_stripes_fails_itself_and_its_call(quick_joins, fault):
    pred, labels = _inputs(9)
    call = os.urandom(16)
    streams = _streams(_header(pred, labels, 2, call))
    if fault == "wrong stream":
        streams = _misdealt(streams)
        field, said = "terms[0].pred.data", "its next byte due there is at offset"
    elif fault == "across a stripe":
        path, offset = "terms[0].pred", STRIPE  # lane 1's first stripe, and one byte of the next
        data = pred.numpy().view("uint8").reshape(-1)[offset : offset + STRIPE + 1].tobytes()
        streams[1][1] = chunks.chunk_wire_bytes(path, offset, memoryview(data))
        field, said = "terms[0].pred.data", "past the end of its stripe"
    elif fault == "lane number 3 of 2":
        streams[2][0] = pb.EvaluateChunk(lane=pb.StreamLane(call=call, lane=3))
        field, said = "lane.lane", "must be 1 to 2"
    else:
        # a second lane 1 that sends nothing after joining: whichever of the two joins first, the other is
        # refused, and no chunk of the wrong stream's can fail the call first
        streams[2] = _held([pb.EvaluateChunk(lane=pb.StreamLane(call=call, lane=1))], release := threading.Event())
        field, said = "lane.lane", "has joined already"
    calls = Calls(_target(quick_joins))
    started = [calls.start(iter(messages)) for messages in streams]
    main = calls.outcome(started[0])
    if fault == "lane twice":
        release.set()
    outcomes = [main, *(calls.outcome(index) for index in started[1:])]
    assert isinstance(main, grpc.RpcError), main
    if field == "lane.lane":  # the odd lane is refused, and the call with it (not at the join timeout)
        refused = [o for o in outcomes[1:] if isinstance(o, grpc.RpcError) and field_of(o) == "lane.lane"]
        assert refused and refused[0].code() == grpc.StatusCode.INVALID_ARGUMENT and said in refused[0].details()
    assert main.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(main) == field, main.details()
    assert said in main.details(), main.details()
    assert nothing_held(quick_joins)


def test_a_lane_of_another_token_never_joins():
    """With bearer tokens a call is found only by its own token: another caller's lane, even one that knows
    the call's name, is NOT_FOUND, and the call misses a lane instead of taking a stranger's bytes."""
    with running(auth_tokens=TOKENS, lane_join_seconds=0.5) as server:
        pred, labels = _inputs(10)
        streams = _streams(_header(pred, labels, 1, os.urandom(16)))
        owner, stranger = Calls(_target(server), TOKENS[0]), Calls(_target(server), TOKENS[1])
        main = owner.start(iter(streams[0]))
        lane = stranger.start(iter(streams[1]))
        lane_error, main_error = stranger.outcome(lane), owner.outcome(main)
        assert isinstance(lane_error, grpc.RpcError) and lane_error.code() == grpc.StatusCode.NOT_FOUND
        assert isinstance(main_error, grpc.RpcError) and main_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert field_of(main_error) == "lanes"
        assert nothing_held(server)


def test_lanes_still_sending_when_their_call_is_cancelled_are_cancelled_and_nothing_is_held(quick_joins):
    pred, labels = _inputs(11)
    streams = _streams(_header(pred, labels, 2, os.urandom(16)))
    gate = threading.Event()

    def held_back(messages: list) -> Iterator:
        yield from messages[:2]
        gate.wait(30)  # the lane's caller stalls here
        yield from messages[2:]

    calls = Calls(_target(quick_joins))
    joined = quick_joins.lanes.joined
    lanes = [calls.start(held_back(messages)) for messages in streams[1:]]
    with plain_channel(_target(quick_joins)) as channel:
        main = evaluate_stream(channel)(iter(streams[0]), timeout=60)
        waited = 0.0
        while quick_joins.lanes.joined < joined + 2 and waited < 10:
            time.sleep(0.02)  # a condition, polled: both lanes joined the call, then stalled
            waited += 0.02
        main.cancel()
        waited = 0.0
        while quick_joins.lanes.held and waited < 10:
            time.sleep(0.02)  # a condition, polled: the server has ended the call (else lanes could finish first)
            waited += 0.02
    gate.set()
    outcomes = [calls.outcome(index) for index in lanes]
    assert all(isinstance(o, grpc.RpcError) and o.code() == grpc.StatusCode.CANCELLED for o in outcomes), outcomes
    assert nothing_held(quick_joins)


def _same(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_lanes_that_reach_another_server_fall_back_to_one_stream(caplog):
    """Two servers on one port (``--reuse-port``: the kernel deals connections between them): a lane, a
    connection of its own, may reach the other server. That call fails as the lanes do not join, and the
    client retries it on one stream, says so once, and sends one stream per call from then on; every
    answer is the unary one."""
    settings = dict(reuse_port=True, lane_join_seconds=0.5)
    with running(**settings) as first, running(**settings, port=first.port) as second:
        target = _target(first)
        unary = LossClient(target, timeout=60, stream_threshold=None, shared_memory="off")
        pred, labels = _inputs(12)
        expected = _gradients(unary, FOCAL, pred, labels)
        unary.close()
        fell_back = 0
        for _ in range(8):  # a client whose lanes all reach its stream's server keeps them: try several
            spread = LossClient(target, timeout=60, stream_threshold=0, shared_memory="off", lanes=2)
            try:
                assert _same(_gradients(spread, FOCAL, pred, labels), expected)
                if spread.transports.lanes == 0:
                    fell_back += 1
                    assert _same(_gradients(spread, FOCAL, pred, labels), expected)  # one stream, at once
            finally:
                spread.close()
        assert fell_back, "every client's lanes reached its stream's server"
        assert caplog.text.count("lanes fail with") == fell_back
        assert nothing_held(first) and nothing_held(second)


def test_a_lane_refused_as_busy_is_the_error_told_not_the_call_it_cancelled():
    """With room for two request streams (--max-open-streams 2), a call and two lanes never all fit: the
    third stream is refused as busy, which cancels the call. The client waits that out like any busy
    answer, and at its deadline says RESOURCE_EXHAUSTED naming the streams, not the CANCELLED of the call
    it cancelled itself (or, when the deadline passed during its last attempt, DEADLINE_EXCEEDED and the
    refusal before); the server holds nothing afterwards."""
    with running(max_open_streams=2) as server:
        client = LossClient(_target(server), timeout=2, stream_threshold=0, shared_memory="off", lanes=2)
        try:
            pred, labels = _inputs(14)
            with pytest.raises(RemoteLossError) as raised:
                _gradients(client, FOCAL, pred, labels)
        finally:
            client.close()
        told = raised.value.code
        assert told in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED), raised.value
        assert "--max-open-streams" in raised.value.details, raised.value
        assert nothing_held(server)


def test_a_lane_sending_something_else_than_chunks_is_named_in_its_call_s_error(quick_joins):
    """A lane's second message carries another StreamLane: the lane and its call are refused, and the error
    says which stream broke (it said "message 2 of the stream", as if the call's own)."""
    pred, labels = _inputs(11)
    call = os.urandom(16)
    streams = _streams(_header(pred, labels, 2, call))
    streams[2].insert(1, pb.EvaluateChunk(lane=pb.StreamLane(call=call, lane=2)))
    calls = Calls(_target(quick_joins))
    started = [calls.start(iter(messages)) for messages in streams]
    outcomes = [calls.outcome(index) for index in started]  # every stream ended, lanes too
    main = outcomes[0]
    assert isinstance(main, grpc.RpcError) and main.code() == grpc.StatusCode.INVALID_ARGUMENT, main
    assert "message 2 of lane 2's stream carries lane" in main.details(), main.details()
    assert nothing_held(quick_joins)
