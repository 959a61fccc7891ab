"""The baselines of ``bench/run.py``, each served from its own process on loopback.

* ``grpc_echo``: a bare grpcio server (generic handler, raw bytes, no protobuf) that answers a request
  with a response of the size the request's first 8 bytes ask for: the transport floor of a call.
* ``tcp_echo``: a raw TCP socket that reads a message and sends the same amount back, 4 MiB at a time.
* ``plain_grpc_loss``: "grpcio unary without our optimisations": pickled ``.numpy().tobytes()``
  tensors in, the engine's loss and gradient pickled out.
* ``rpc_callee``: the torch.distributed.rpc (TensorPipe) peer that runs the engine for its caller.

Each server function takes a queue, binds an ephemeral port, puts the port on the queue and serves
until its process is terminated. ``Peer`` starts one and the client helpers call it.
"""

from __future__ import annotations

import multiprocessing
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import torch
from timing import engine_loss_grad
from torch import Tensor

CHUNK = 4 << 20  # the raw socket moves 4 MiB per send/recv
HEADER = struct.Struct("<Q")
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
ECHO_METHOD = "/bench.Echo/Call"
LOSS_METHOD = "/bench.PlainLoss/Evaluate"
START_TIMEOUT = 120.0  # a child imports torch and the engine on a busy 2-core machine


class Peer:
    """``serve(queue, *args)`` in its own (spawned) process, once it put its first message on ``queue``:
    the port it listens on (``port``), or any other sign that it is ready."""

    def __init__(self, serve: Callable[..., None], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.process = context.Process(target=serve, args=(self.queue, *args), daemon=True)
        self.process.start()
        self.port: Any = self.queue.get(timeout=START_TIMEOUT)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


# -- servers (run in the child process) ------------------------------------------------------------


def _grpc_server(queue: multiprocessing.Queue, method: str, handler: Callable[[bytes, Any], bytes]) -> None:
    service, name = method.strip("/").split("/")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=UNLIMITED)
    # no (de)serializers: the handler sees and returns raw bytes
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {name: grpc.unary_unary_rpc_method_handler(handler)})]
    )
    queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def grpc_echo(queue: multiprocessing.Queue) -> None:
    responses: dict[int, bytes] = {}  # one preallocated answer per size: the floor does no work

    def echo(request: bytes, context: Any) -> bytes:
        (size,) = HEADER.unpack_from(request)
        if size not in responses:
            responses[size] = bytes(size)
        return responses[size]

    _grpc_server(queue, ECHO_METHOD, echo)


def plain_grpc_loss(queue: multiprocessing.Queue) -> None:
    def evaluate(request: bytes, context: Any) -> bytes:
        cfg, pred, target = pickle.loads(request)
        loss, grad = engine_loss_grad(cfg, _from_bytes(*pred), _from_bytes(*target))
        return pickle.dumps((loss.item(), _to_bytes(grad)))

    _grpc_server(queue, LOSS_METHOD, evaluate)


def tcp_echo(queue: multiprocessing.Queue, host: str = "127.0.0.1") -> None:
    listener = socket.create_server((host, 0))
    queue.put(listener.getsockname()[1])
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=_echo_connection, args=(connection,), daemon=True).start()


def _echo_connection(connection: socket.socket) -> None:
    buffer = bytearray()
    with connection:
        while True:
            header = _recv_exactly(connection, memoryview(bytearray(HEADER.size)))
            if header is None:
                return
            (size,) = HEADER.unpack(header)
            if len(buffer) < size:
                buffer = bytearray(size)
            view = memoryview(buffer)[:size]
            _recv_exactly(connection, view)
            for start in range(0, size, CHUNK):
                connection.sendall(view[start : start + CHUNK])


def _recv_exactly(connection: socket.socket, view: memoryview) -> memoryview | None:
    got = 0
    while got < len(view):
        n = connection.recv_into(view[got : got + CHUNK])
        if n == 0:
            return None
        got += n
    return view


def rpc_callee(queue: multiprocessing.Queue, port: int, transports: list[str] | None) -> None:
    from torch.distributed import rpc

    queue.put(port)  # the caller (rank 0) hosts the rendezvous; both sides must init together
    rpc.init_rpc("callee", rank=1, world_size=2, rpc_backend_options=rpc_options(port, transports))
    rpc.shutdown()  # serves the caller's calls until it shuts down too


# -- clients (run in the benchmark process) --------------------------------------------------------


def rpc_options(port: int, transports: list[str] | None) -> Any:
    """TensorPipe over ``transports`` (``["uv"]``: TCP loopback, as gRPC; None: TensorPipe picks,
    which on one host means shared memory)."""
    from torch.distributed import rpc

    channels = ["basic"] if transports == ["uv"] else None  # "basic" sends tensors over the transport
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=600, _transports=transports, _channels=channels
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def grpc_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=UNLIMITED)


def echo_request(request_bytes: int, response_bytes: int) -> bytes:
    """An echo request of ``request_bytes`` bytes asking for ``response_bytes`` back."""
    payload = bytearray(max(request_bytes, HEADER.size))
    HEADER.pack_into(payload, 0, response_bytes)
    return bytes(payload)


def tcp_roundtrip(connection: socket.socket, payload: memoryview) -> None:
    """Send ``payload`` (4 MiB at a time) and read the same amount back."""
    connection.sendall(HEADER.pack(len(payload)))
    for start in range(0, len(payload), CHUNK):
        connection.sendall(payload[start : start + CHUNK])
    sink = memoryview(bytearray(min(len(payload), CHUNK)))
    got = 0
    while got < len(payload):
        n = connection.recv_into(sink[: min(CHUNK, len(payload) - got)])
        if n == 0:
            raise ConnectionError("the echo closed the connection")
        got += n


def plain_grpc_call(call: Callable[[bytes], bytes], cfg: dict, pred: Tensor, target: Tensor) -> tuple[float, Tensor]:
    """The loss and pred's gradient through ``plain_grpc_loss``, with the plain encoding."""
    loss, grad = pickle.loads(call(pickle.dumps((cfg, _to_bytes(pred), _to_bytes(target)))))
    return loss, _from_bytes(*grad)


def _to_bytes(tensor: Tensor) -> tuple[bytes, tuple[int, ...], str]:
    array = tensor.detach().cpu().numpy()
    return array.tobytes(), array.shape, array.dtype.str


def _from_bytes(data: bytes, shape: tuple[int, ...], dtype: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape).copy())
