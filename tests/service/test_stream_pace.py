"""A big streamed call holds a big-call slot and its tensors' memory until its answer has gone, so holding
one is bounded twice over: its upload must keep a pace (``--stream-min-rate`` once it has waited
``--stream-idle-timeout`` for its caller), and with tokens on one token holds at most
``--max-stream-calls-per-token`` of the slots. (A caller sending a few bytes just inside the idle timeout
held its slot and memory for as long as it kept sending; one token could hold every slot.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import torch
from support.calls import evaluate_stream, l1_header, l1_stream, plain_channel
from support.in_process import nothing_held, running_server
from support.logs import watching_server_log
from support.polling import eventually

from losswire.client import Credentials, LossClient, RemoteLoss
from losswire.server.errors import StreamIdleError
from losswire.server.rpc.streams import StreamGuardInterceptor
from losswire.wire import chunks, codec

TOKENS = ("token-a-0123456789", "token-b-0123456789")


def trickle(stop: threading.Event, elements: int = 1 << 20, nbytes: int = 4, every: float = 0.25) -> Iterator:
    """A header, then ``nbytes`` of pred every ``every`` seconds (inside any idle timeout) until ``stop``."""
    yield l1_header(elements)
    offset = 0
    while not stop.wait(every) and offset + nbytes <= 4 * elements:
        yield chunks.chunk_wire_bytes("terms[0].pred", offset, bytes(nbytes))
        offset += nbytes


def paced(pred: torch.Tensor, target: torch.Tensor, chunk_bytes: int, every: float) -> Iterator:
    """The whole L1Loss call, ``chunk_bytes`` at a time, one chunk every ``every`` seconds."""
    yield l1_header(pred.numel())
    for path, tensor in (("terms[0].pred", pred), ("terms[0].target", target)):
        data = tensor.numpy().tobytes()
        for offset in range(0, len(data), chunk_bytes):
            time.sleep(every)
            yield chunks.chunk_wire_bytes(path, offset, data[offset : offset + chunk_bytes])


def held_open(release: threading.Event, elements: int = 1 << 16) -> Iterator:
    """A big call that has taken its slot (its first chunk came), then waits for ``release``."""
    yield l1_header(elements)
    yield chunks.chunk_wire_bytes("terms[0].pred", 0, bytes(4096))
    release.wait(30)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_a_caller_trickling_its_upload_is_ended_and_leaves_its_slot_and_memory():
    """4 bytes every 0.25 s: never idle for the 1 s idle timeout, far below 1 MiB/s. The call ends after
    about 1 s of waiting, with DEADLINE_EXCEEDED naming the pace's setting; its slot and 8 MiB of budget
    come back, and the one slot serves the next big call."""
    with running_server(stream_idle_seconds=1.0, stream_min_rate=1 << 20, max_stream_calls=1) as server:
        target = f"127.0.0.1:{server.port}"
        stop = threading.Event()
        with plain_channel(target) as channel:
            call = evaluate_stream(channel)(trickle(stop), timeout=15)
            assert eventually(lambda: server.dataplane.slots.in_use == 1, 10), "the trickle never took its slot"
            try:
                with pytest.raises(grpc.RpcError) as ended:
                    list(call)
            finally:
                stop.set()
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.value.details()
        assert "--stream-min-rate" in ended.value.details()
        assert nothing_held(server, 10), "the ended trickle still holds its slot or memory"
        client = LossClient(target, timeout=30, stream_threshold=0, shared_memory="off")
        try:
            pred, labels = torch.randn(256, 4), torch.randn(256, 4)
            loss = RemoteLoss(dict(type="L1Loss"), client=client)(pred, labels)
            torch.testing.assert_close(loss, (pred - labels).abs().mean())
        finally:
            client.close()


def test_an_upload_above_the_pace_is_answered_however_long_it_takes():
    """512 KiB in 32 KiB chunks every 0.1 s (about 300 KiB/s) against a pace of 64 KiB/s after 0.5 s: the
    upload outlasts the idle timeout three times over and is answered, as the server computes it."""
    generator = torch.Generator().manual_seed(3)
    pred, target_ = torch.randn(1 << 16, generator=generator), torch.randn(1 << 16, generator=generator)
    with (
        running_server(stream_idle_seconds=0.5, stream_min_rate=64 << 10) as server,
        plain_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        answer = list(evaluate_stream(channel)(paced(pred, target_, 32 << 10, 0.1), timeout=30))
    loss = codec.decode_tensor(answer[0].response.results[0].loss, "loss")
    torch.testing.assert_close(loss, (pred - target_).abs().mean())


async def _messages(count: int, before_each: float) -> AsyncIterator[bytes]:
    for _ in range(count):
        await asyncio.sleep(before_each)
        yield b"x"


def test_only_time_spent_waiting_for_the_caller_counts_against_the_pace():
    """Messages there at once, read by a server that takes 0.3 s over each (beyond the 0.2 s allowance):
    all pass. The same bytes, each 0.15 s after the last: the stream falls behind 1000 bytes/s."""
    guard = StreamGuardInterceptor(4, idle_seconds=0.2, min_rate=1000, paced=frozenset({"EvaluateStream"}))

    async def read(source: AsyncIterator[bytes], busy: float) -> int:
        count = 0
        async for _ in guard._watched(source, paced=True):
            count += 1
            await asyncio.sleep(busy)  # the server's own work on what arrived
        return count

    assert asyncio.run(read(_messages(6, 0.0), busy=0.3)) == 6
    with pytest.raises(StreamIdleError, match="--stream-min-rate"):
        asyncio.run(read(_messages(6, 0.15), busy=0.0))


@contextlib.contextmanager
def holding(target: str, token: str | None, release: threading.Event) -> Iterator[grpc.Future]:
    """A big call of ``token`` (None: no token) holding its slot until ``release``."""
    with plain_channel(target) as channel:
        metadata = bearer(token) if token else None
        call = evaluate_stream(channel)(held_open(release), timeout=30, metadata=metadata)
        try:
            yield call
        finally:
            release.set()
            call.cancel()


def test_one_token_holds_at_most_all_but_one_big_call_slot():
    """Two slots, two tokens: token a's first big call takes a slot; its second is told to come back,
    naming the setting, while token b's big call is answered with the slot left."""
    with running_server(auth_tokens=TOKENS, max_workers=4, max_stream_calls=2) as server:
        target, release = f"127.0.0.1:{server.port}", threading.Event()
        with holding(target, TOKENS[0], release):
            assert eventually(lambda: server.dataplane.slots.in_use == 1, 10), "a's first call never took a slot"
            with plain_channel(target) as channel:
                second = evaluate_stream(channel)(held_open(release), timeout=30, metadata=bearer(TOKENS[0]))
                with pytest.raises(grpc.RpcError) as refused:
                    list(second)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert "--max-stream-calls-per-token" in refused.value.details()
            bob = LossClient(
                target, timeout=30, stream_threshold=0, shared_memory="off", credentials=Credentials(token=TOKENS[1])
            )
            try:
                pred, labels = torch.randn(256, 4), torch.randn(256, 4)
                loss = RemoteLoss(dict(type="L1Loss"), client=bob)(pred, labels)
                torch.testing.assert_close(loss, (pred - labels).abs().mean())
            finally:
                bob.close()
        assert nothing_held(server, 10)


def test_without_tokens_one_caller_may_hold_every_slot():
    """Callers without tokens cannot be told apart: two of their big calls take both slots."""
    with running_server(max_workers=4, max_stream_calls=2) as server:
        target, release = f"127.0.0.1:{server.port}", threading.Event()
        with holding(target, None, release), holding(target, None, release):
            assert eventually(lambda: server.dataplane.slots.in_use == 2, 10), server.dataplane.slots.in_use
        assert nothing_held(server, 10)


def test_a_caller_reading_its_answer_too_slowly_is_ended_and_leaves_its_slot_and_memory():
    """A 64 MiB answer (loss and gradient of an L1Loss 'none' term, 17 messages) read one message every
    0.2 s, about 20 MiB/s, against a pace of 256 MiB/s after 1.5 s: the server ends the call once the
    reader falls behind, logging why, and gives back its slot and memory while the caller still has
    messages to read. (Before, a reader fast enough never to leave one message unread for the idle timeout held them
    for as long as it kept reading.)"""
    messages = l1_stream(8 << 20)  # pred and target 32 MiB each
    read, stop = [], threading.Event()
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 << 20)]
    with (
        watching_server_log() as log,
        running_server(stream_idle_seconds=1.5, stream_min_rate=256 << 20, max_stream_calls=1) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel,
    ):
        call = evaluate_stream(channel)(iter(messages), timeout=60)

        def slowly() -> None:
            with contextlib.suppress(grpc.RpcError):
                for message in call:
                    read.append(message)
                    if stop.wait(0.2):
                        return

        reader = threading.Thread(target=slowly, daemon=True)
        reader.start()
        try:
            log.wait_for(r"EvaluateStream: the caller read \d+ bytes of its answer in .*--stream-min-rate", 0)
            assert nothing_held(server, 10), "the slow reader's call still holds its slot or memory"
            assert len(read) < 17, "the whole answer was read before the server ended the call"
        finally:
            stop.set()
            call.cancel()
            reader.join(10)
