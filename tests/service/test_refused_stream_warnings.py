"""A request stream turned away leaves nothing for Python to complain about on the server's stderr.

gRPC hands a streaming handler a request reader that makes its async generator (Cython's) on the first
``aiter()``. An interceptor within the intake (the metrics' tally of EvaluateStream) made it before the
stream guard or the token check had admitted the call; refused, the call never read it, and once the
reader was collected Python printed ``RuntimeWarning: coroutine '_MessageReceiver._async_message_receiver'
was never awaited`` on stderr, outside the server's log format (not JSON under ``--log-format json``),
once per refused stream. The tally now makes it at its first read. The server runs in this process, on an
event loop of its own: warnings it raises are recorded here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.calls import evaluate_stream, l1_stream, plain_channel
from support.in_process import running_server
from support.polling import eventually

from losswire.server.app import LosswireServer
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire.protocol import EVALUATE_STREAM_METHOD

TOKENS = ("token-a-0123456789", "token-b-0123456789")
AS_A = (("authorization", f"Bearer {TOKENS[0]}"),)
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
UNPARSABLE = b"\x0a\xff\xff\xff\xff\x0f"  # a length past the end
DEADLINE = 10.0


@contextlib.contextmanager
def silent_streams(target: str, count: int, metadata: tuple = ()) -> Iterator[None]:
    """``count`` EvaluateStreams on ``target`` that send nothing until the block ends."""
    release = threading.Event()

    def nothing() -> Iterator[pb.EvaluateChunk]:
        release.wait()
        yield from ()

    with plain_channel(target) as channel:
        calls = [evaluate_stream(channel)(nothing(), timeout=60, metadata=metadata) for _ in range(count)]
        try:
            yield
        finally:
            release.set()
            for call in calls:
                call.cancel()


def outcome(call: Callable[..., Iterator], requests: list, metadata: tuple = ()) -> grpc.RpcError:
    """The error a streaming ``call`` of ``requests`` ends with (it must end with one)."""
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter(requests), timeout=DEADLINE, metadata=metadata))
    return caught.value


def refused_while_open(
    server: LosswireServer, open_first: int, method: str, requests: list, metadata: tuple = ()
) -> grpc.RpcError:
    """A call of ``method`` made while ``open_first`` silent EvaluateStreams (with ``metadata``) are open."""
    target = f"127.0.0.1:{server.port}"
    with silent_streams(target, open_first, metadata), plain_channel(target) as channel:
        assert eventually(lambda: server.stream_guard.open == open_first, DEADLINE), "the silent streams never opened"
        return outcome(streamed(channel, method), requests, metadata)


def streamed(channel: grpc.Channel, method: str) -> Callable[..., Iterator]:
    """``method`` (EvaluateStream, whose requests may be bytes already serialized, or reflection) on ``channel``."""
    if method == REFLECTION_METHOD:
        return reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    return evaluate_stream(channel)


def alone(server: LosswireServer, method: str, requests: list, metadata: tuple = ()) -> grpc.RpcError:
    """A call of ``method`` on an otherwise idle ``server``."""
    with plain_channel(f"127.0.0.1:{server.port}") as channel:
        return outcome(streamed(channel, method), requests, metadata)


def lane_of_no_call() -> list:
    return [pb.EvaluateChunk(lane=pb.StreamLane(call=os.urandom(16), lane=1))]


def list_services() -> list:
    return [reflection_pb2.ServerReflectionRequest(list_services="")]


# (settings, the refused call, its code, words of its details)
REFUSALS = {
    "every stream is open": (
        dict(max_open_streams=1),
        lambda server: refused_while_open(server, 1, EVALUATE_STREAM_METHOD, l1_stream(64)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "--max-open-streams",
    ),
    "the token's share of streams is open": (
        dict(max_open_streams=4, auth_tokens=TOKENS),
        lambda server: refused_while_open(server, 3, EVALUATE_STREAM_METHOD, l1_stream(64), AS_A),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "leaves other tokens room",
    ),
    "the token's calls are all in flight": (
        dict(max_concurrent_rpcs_per_token=1, auth_tokens=TOKENS),
        lambda server: refused_while_open(server, 1, EVALUATE_STREAM_METHOD, l1_stream(64), AS_A),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "--max-concurrent-rpcs-per-token",
    ),
    "no token": (
        dict(auth_tokens=TOKENS),
        lambda server: alone(server, EVALUATE_STREAM_METHOD, l1_stream(64)),
        grpc.StatusCode.UNAUTHENTICATED,
        "token",
    ),
    "reflection while every stream is open": (
        dict(max_open_streams=1),
        lambda server: refused_while_open(server, 1, REFLECTION_METHOD, list_services()),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "--max-open-streams",
    ),
    "a lane of no call": (
        dict(lane_join_seconds=0.3),
        lambda server: alone(server, EVALUATE_STREAM_METHOD, lane_of_no_call()),
        grpc.StatusCode.NOT_FOUND,
        "lane.call",
    ),
    "a malformed first message": (
        {},
        lambda server: alone(server, EVALUATE_STREAM_METHOD, [UNPARSABLE]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid losswire.v1.EvaluateChunk",
    ),
}


@contextlib.contextmanager
def never_awaited() -> Iterator[list[str]]:
    """The "never awaited" RuntimeWarnings raised in this process (the server's thread included: the
    warnings filters are the process's) until the block ends and its garbage has been collected."""
    gc.collect()  # what earlier tests left is not this block's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        found: list[str] = []
        try:
            yield found
        finally:
            gc.collect()
            found.extend(str(w.message) for w in caught if "never awaited" in str(w.message))


@pytest.mark.parametrize("why", list(REFUSALS))
def test_a_refused_request_stream_leaves_no_never_awaited_coroutine(why: str) -> None:
    settings, refused_call, code, words = REFUSALS[why]
    with never_awaited() as found:
        with running_server(max_workers=2, **settings) as server:  # stopped, every call's task done, at its end
            error = refused_call(server)
        assert error.code() == code, error.details()
        assert words in error.details()
    assert not found, found
