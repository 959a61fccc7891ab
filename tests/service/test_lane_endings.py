"""How the streams of a call with lanes end (``EvaluateRequest.lanes``): a stream that ends its request
stream while it still owes stripes of its call is refused, naming itself and what it owed, and so is its
call; a stream that delivered everything it owed ends OK.

A lane's caller used to be told OK for a lane that half-closed owing stripes, while its call failed for the
missing bytes. Streams are sent by hand (``chunks.lane_streams``), each on a connection of its own; the
call's own stream holds its end until its lanes have ended, so that each lane's outcome is its own, not the
CANCELLED of a call that ended first. Stripes of 64 KiB (the smallest allowed): pred and weight, 1.25 MiB
each, are 20 stripes, dealt to the call's stream (0, 3, ... 18), lane 1 (1, 4, ... 19) and lane 2 (2, 5,
... 17).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator

import grpc
import pytest
import torch
from support.calls import HeldOpen, evaluate_stream, field_of, plain_channel
from support.in_process import nothing_held, running_server
from support.polling import eventually

from losswire.server.app import LosswireServer
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec

STRIPE = 64 << 10
N, C = 4096, 80  # 1.25 MiB a tensor: 20 stripes
FOCAL = dict(type="FocalLoss", gamma=2.0, alpha=0.25, reduction="none")
LANES = 2
RULE = (
    f"; stripe j of lanes.stripe_bytes {STRIPE} goes on stream j mod {LANES + 1} (0: the request's stream, i: lane i)"
)


@pytest.fixture(scope="module")
def server() -> Iterator[LosswireServer]:
    """A server whose lanes and calls wait 0.5 s for each other (a lost lane fails fast)."""
    with running_server(max_workers=4, lane_join_seconds=0.5) as instance:
        yield instance


def _request(seed: int) -> pb.EvaluateRequest:
    """A FocalLoss request whose pred and weight are streamed (labels are small: inline)."""
    generator = torch.Generator().manual_seed(seed)
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(FOCAL), gradients=["pred"])
    codec.encode_tensor(torch.randn(N, C, generator=generator), term.pred)
    codec.encode_value(torch.randint(0, C + 1, (N,), generator=generator), term.target)
    codec.encode_tensor(torch.rand(N, C, generator=generator), term.weight)
    return request


def _streams(request: pb.EvaluateRequest) -> list[list]:
    """The messages of the call's stream and of each lane, as the client deals them."""
    spread = pb.EvaluateRequest()
    spread.CopyFrom(request)
    sink = chunks.StreamSink.take(spread)
    lanes = pb.StreamLanes(call=os.urandom(16), count=LANES, stripe_bytes=STRIPE)
    return [list(messages) for messages in chunks.lane_streams(spread, sink, lanes)]


def _stripes(messages: list) -> list[chunks.RawChunk]:
    """The chunks (path, offset, data) of a stream's messages after its first."""
    return [chunks.parse_chunk(message) for message in messages[1:]]


class Streams:
    """EvaluateStream calls started in threads, each on a connection of its own; each one's answer
    messages, or its error."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.results: list[queue.Queue] = []

    def start(self, messages: Iterable) -> int:
        results: queue.Queue = queue.Queue()

        def run() -> None:
            with plain_channel(self.target) as channel:
                try:
                    results.put(list(evaluate_stream(channel)(iter(messages), timeout=60)))
                except grpc.RpcError as error:
                    results.put(error)

        self.results.append(results)
        threading.Thread(target=run, daemon=True).start()
        return len(self.results) - 1

    def outcome(self, index: int) -> list | grpc.RpcError:
        return self.results[index].get(timeout=60)


def _held_open(messages: list, until: threading.Event) -> Iterator:
    """``messages``, then the stream stays open until ``until`` is set (the call's stream waits for its
    lanes' outcomes before it ends)."""
    yield from messages
    until.wait(30)


def _send(server: LosswireServer, streams: list[list]) -> tuple[list | grpc.RpcError, list]:
    """Sends ``streams`` (the call's first); the call's outcome and its lanes', each lane's awaited before
    the call's stream ends."""
    calls, lanes_ended = Streams(f"127.0.0.1:{server.port}"), threading.Event()
    main = calls.start(_held_open(streams[0], lanes_ended))
    lanes = [calls.outcome(calls.start(messages)) for messages in streams[1:]]
    lanes_ended.set()
    return calls.outcome(main), lanes


def _refused(outcome: list | grpc.RpcError, field: str) -> str:
    """The details of ``outcome``, an INVALID_ARGUMENT naming ``field``."""
    assert isinstance(outcome, grpc.RpcError), outcome
    assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code(), outcome.details())
    assert field_of(outcome) == field, outcome.details()
    return outcome.details()


def _answer(messages: list) -> pb.EvaluateResponse:
    """The response of an EvaluateStream answer, its streamed tensors put back in."""
    response = messages[0].response
    assembler = chunks.StreamAssembler(response)
    for message in messages[1:]:
        assembler.add(message.chunk)
    chunks.fill_streamed(response, assembler.finish())
    return response


@pytest.mark.parametrize("dropped", ["its last stripe", "every stripe"])
def test_a_lane_that_ends_owing_stripes_is_refused_naming_itself_and_so_is_its_call(server, dropped):
    streams = _streams(_request(1))
    if dropped == "its last stripe":
        last = _stripes(streams[2])[-1]
        streams[2].pop()
        owed = f"lane 2 ended its stream owing {len(last.data)} bytes: its stripes of {last.tensor} from offset "
        owed += f"{last.offset} on"
        field = f"{last.tensor}.data"
    else:  # its StreamLane, then nothing: every stripe of lane 1, of both tensors
        del streams[1][1:]
        owed = (
            f"lane 1 ended its stream owing {14 * STRIPE} bytes: its stripes of terms[0].pred from offset {STRIPE} on "
            f"({7 * STRIPE} bytes) and of terms[0].weight from offset {STRIPE} on ({7 * STRIPE} bytes)"
        )
        field = "terms[0].pred.data"
    main, lanes = _send(server, streams)
    said = [_refused(outcome, field) for outcome in lanes if isinstance(outcome, grpc.RpcError)]
    assert len(said) == 1 and lanes.count([]) == 1, lanes  # the other lane delivered everything: OK
    assert said[0] == owed + RULE
    assert _refused(main, field) == said[0]  # the call's caller is told which lane failed it, and how
    assert nothing_held(server)


def test_a_call_whose_own_stream_ends_owing_stripes_is_refused_naming_it(server):
    streams = _streams(_request(2))
    last = _stripes(streams[0])[-1]
    streams[0].pop()
    main, lanes = _send(server, streams)
    assert lanes == [[], []]  # its lanes delivered everything they owed
    said = _refused(main, f"{last.tensor}.data")
    owed = f"the request's stream ended owing {len(last.data)} bytes: its stripes of {last.tensor} from offset "
    assert said == f"{owed}{last.offset} on{RULE}"
    assert nothing_held(server)


def test_lanes_that_deliver_everything_end_ok_and_the_call_answers_as_unary(server):
    request = _request(3)
    main, lanes = _send(server, _streams(request))
    assert lanes == [[], []], lanes
    assert not isinstance(main, grpc.RpcError), main
    with plain_channel(f"127.0.0.1:{server.port}") as channel:
        unary = pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=60)
    assert list(_answer(main).results) == list(unary.results)
    assert nothing_held(server)


def _owed_by(server: LosswireServer, stream: int) -> list:
    """What ``stream`` of the one call open for lanes still owes (``StreamIntake.owed``)."""
    (call,) = server.lanes._open.values()
    return call.intake.owed(stream)


@pytest.mark.parametrize("sent", ["half its stripes", "every stripe"])
def test_a_lane_its_caller_cancels_fails_its_call_only_if_it_owed_stripes(server, sent):
    """A lane's caller cancels it: owing stripes, its call fails as for a lane that ended owing them
    (INVALID_ARGUMENT naming the tensor; it was CANCELLED, or that, as the cancellation and the stream's end
    raced); having sent everything, the call is answered. The call's caller cancelled nothing."""
    request = _request(4)
    streams = _streams(request)
    kept = streams[1][: 1 + len(streams[1][1:]) // 2] if sent == "half its stripes" else streams[1]
    calls, lanes_ended = Streams(f"127.0.0.1:{server.port}"), threading.Event()
    main = calls.start(_held_open(streams[0], lanes_ended))
    other = calls.start(streams[2])
    with plain_channel(f"127.0.0.1:{server.port}", "lane 1") as channel:
        lane = HeldOpen(channel, kept)
        try:
            assert calls.outcome(other) == []
            owed_after = 7 * STRIPE if sent == "half its stripes" else 0  # pred's 7 stripes and weight's 7
            assert eventually(lambda: sum(count for _, count, _ in _owed_by(server, 1)) == owed_after, 10)
            lane.calls[0].cancel()
        finally:
            lane.close()
    lanes_ended.set()
    outcome = calls.outcome(main)
    if sent == "every stripe":
        assert not isinstance(outcome, grpc.RpcError), outcome
        with plain_channel(f"127.0.0.1:{server.port}") as channel:
            unary = pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=60)
        assert list(_answer(outcome).results) == list(unary.results)
    else:
        assert _refused(outcome, "terms[0].weight.data").startswith(f"lane 1 ended its stream owing {owed_after} bytes")
    assert nothing_held(server)


def test_a_silent_lane_fails_its_call_naming_the_lane():
    """A lane that sends part of its stripes and then nothing: the idle guard ends it, telling its caller it
    sent nothing; its call's caller, which sent everything, is told which lane was silent (field ``lanes``),
    not that it was silent itself."""
    with running_server(max_workers=2, stream_idle_seconds=1, lane_join_seconds=5) as server:
        streams = _streams(_request(5))
        calls = Streams(f"127.0.0.1:{server.port}")
        main = calls.start(streams[0])  # half-closed at once: only its lanes keep it waiting, not its own silence
        other = calls.start(streams[2])
        with plain_channel(f"127.0.0.1:{server.port}", "lane 1") as channel:
            lane = HeldOpen(channel, streams[1][:3])
            try:
                assert calls.outcome(other) == []
                with pytest.raises(grpc.RpcError) as silent:
                    list(lane.calls[0])
            finally:
                lane.close()
        assert silent.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert silent.value.details().startswith("the caller sent nothing for 1 s"), silent.value.details()
        outcome = calls.outcome(main)
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
        assert field_of(outcome) == "lanes"
        assert outcome.details() == f"lane 1's stream: {silent.value.details()}"
        assert nothing_held(server)
