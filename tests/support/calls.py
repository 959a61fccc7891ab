"""Calls in tests: a channel without retries, EvaluateStream on it (and streams held open there), L1Loss
streams sent by hand, the field a refusal names, a recompute through a client, a server's log read up to
now, this host's connections to a port."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator, Sequence

import grpc
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from losswire.client import LossClient, RemoteLoss
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec
from losswire.wire.protocol import EVALUATE_STREAM_METHOD

from .servers import CALL_TIMEOUT, ServerProcess


def read_log_to_now(process: ServerProcess) -> None:
    """A sentinel call of its own (SmoothL1Loss) to ``process``, run with ``--log-level DEBUG``, and its log
    line awaited: once that line is read, so is every line the server wrote before it."""
    mark = process.mark()
    client = LossClient(process.target, timeout=CALL_TIMEOUT)
    try:
        RemoteLoss(dict(type="SmoothL1Loss"), client=client, validate=False)(torch.zeros(2), torch.zeros(2))
    finally:
        client.close()
    process.wait_for(r"Evaluate SmoothL1Loss:", since=mark)


# the options of a caller's own channel (any language) whose gRPC retry policy retries RESOURCE_EXHAUSTED:
# 3 attempts of every LossService method, with a brief backoff
RETRYING_RESOURCE_EXHAUSTED = [
    (
        "grpc.service_config",
        json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": "losswire.v1.LossService"}],
                        "retryPolicy": {
                            "maxAttempts": 3,
                            "initialBackoff": "0.01s",
                            "maxBackoff": "0.05s",
                            "backoffMultiplier": 2,
                            "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                        },
                    }
                ]
            }
        ),
    ),
    ("grpc.enable_retries", 1),
]


@contextlib.contextmanager
def plain_channel(target: str, connection: str | None = None) -> Iterator[grpc.Channel]:
    """A channel without losswire's retry policy (nor gRPC's transparent retries): each call is one
    attempt, answered as the server answered it. ``connection``: a name of its own, so that gRPC gives it a
    connection of its own (channels of the same options may share one)."""
    options = [("grpc.enable_retries", 0)]
    if connection is not None:
        options.append(("losswire.test.connection", connection))
    channel = grpc.insecure_channel(target, options=options)
    try:
        yield channel
    finally:
        channel.close()


def evaluate_stream(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """``EvaluateStream`` on ``channel``: messages (or chunks already serialized) out, ``EvaluateChunk``s in."""
    return channel.stream_stream(
        EVALUATE_STREAM_METHOD,
        request_serializer=chunks.serialize_chunk,
        response_deserializer=pb.EvaluateChunk.FromString,
    )


class HeldOpen:
    """``count`` EvaluateStream calls on ``channel``, each sending ``messages`` and then nothing, neither
    half-closed nor cancelled, until ``close`` (the channel stays its owner's)."""

    def __init__(self, channel: grpc.Channel, messages: Sequence, count: int = 1) -> None:
        self.release = threading.Event()
        stream = evaluate_stream(channel)
        self.calls = [stream(self._then_open(messages), timeout=60) for _ in range(count)]

    def _then_open(self, messages: Sequence) -> Iterator:
        yield from messages
        self.release.wait(60)

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


def l1_header(elements: int, reduction: str = "mean") -> pb.EvaluateChunk:
    """A stream's first message: an L1Loss term whose pred and target ([elements] float32) come in chunks."""
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config({"type": "L1Loss", "reduction": reduction}))
    for message in (term.pred, term.target.tensor):
        message.dtype, message.shape[:] = pb.FLOAT32, [elements]
    return pb.EvaluateChunk(request=request)


def l1_stream(elements: int, reduction: str = "none") -> list:
    """A whole L1Loss stream, by hand: its header, then pred and target (the same random [elements]
    float32) in 4 MiB chunks, serialized. With reduction "none" the answer is as big as both inputs."""
    data = torch.randn(elements).numpy().tobytes()
    return [l1_header(elements, reduction)] + [
        chunks.chunk_wire_bytes(path, offset, data[offset : offset + (4 << 20)])
        for path in ("terms[0].pred", "terms[0].target")
        for offset in range(0, len(data), 4 << 20)
    ]


def dice_recompute_gradients(clients: tuple[LossClient, ...], seed: int) -> list[torch.Tensor]:
    """pred's gradient of a DiceLoss 'none' term [64, 64, 64] (1 MiB) through each of ``clients``.

    An element-wise output with an upstream gradient makes the client recompute with ``grad_output``
    in backward, a second request that needs the tensors again: a transport that kept them out of
    the first message (a stream, shared memory) must send them once more.
    """
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(64, 64, 64, generator=generator)
    target = (torch.rand(64, 64, 64, generator=generator) > 0.5).float()
    upstream = torch.rand(64, generator=generator)
    grads = []
    for client in clients:
        p = pred.clone().requires_grad_()
        loss = RemoteLoss(dict(type="DiceLoss", reduction="none"), client=client)(p, target)
        (loss * upstream).sum().backward()
        grads.append(p.grad)
    return grads


def field_of(error: grpc.RpcError) -> str | None:
    """The field a refusal names (its ``google.rpc.BadRequest`` detail), or None."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return bad.field_violations[0].field
    return None


ESTABLISHED = "01"


def connections_to(port: int) -> int:
    """TCP connections of this host in ESTABLISHED state whose remote end is ``port`` (client sides)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                count += remote_port == port and fields[3] == ESTABLISHED
    return count


# -- raw HTTP/2 -------------------------------------------------------------------------------------

# the client preface, then an empty SETTINGS frame
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, its name and value raw (not Huffman coded)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def send_call_to(port: int, path: bytes) -> socket.socket:
    """A connection that opens one call to ``path`` (HEADERS with END_STREAM and END_HEADERS) and stays."""
    block = b"".join(
        _literal(name, value)
        for name, value in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )
    headers = len(block).to_bytes(3, "big") + bytes([1, 0x4 | 0x1]) + (1).to_bytes(4, "big") + block
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(PREFACE + headers)
    return sock


def answer_headers(sock: socket.socket, stream: int = 1) -> int:
    """Read HTTP/2 frames from ``sock`` until the peer answers ``stream`` (HEADERS or RST_STREAM) or closes
    the connection; the frame type that ended it (1 HEADERS, 3 RST_STREAM, 7 GOAWAY, 0 closed or reset)."""
    buffered = b""
    while True:
        while len(buffered) >= 9:
            length, kind, number = (
                int.from_bytes(buffered[:3], "big"),
                buffered[3],
                int.from_bytes(buffered[5:9], "big"),
            )
            if len(buffered) < 9 + length:
                break
            buffered = buffered[9 + length :]
            if kind == 7 or (kind in (1, 3) and number & 0x7FFFFFFF == stream):
                return kind
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return 0
        if not chunk:
            return 0
        buffered += chunk
