"""Big streams travel on a connection of their own, without gRPC's retries (the client retries them itself).

With retries enabled a gRPC channel keeps a copy of every chunk it sends in its retry buffer, which slowed
a 64 MiB upload by 15-30 %; and on a connection of their own, big streams share no flow-control window
with the small calls beside them. What a caller sees: one connection for unary calls, a second one once a
call streams, and the same answers either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from support.calls import connections_to

from losswire.client import LossClient, RemoteLoss
from losswire.client.channels import make_channel
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig


@contextlib.contextmanager
def running() -> Iterator[int]:
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu"))
    server.start()
    try:
        yield server.port
    finally:
        server.stop(grace=0)


def focal_gradient(client: LossClient, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(512, 80, generator=generator).requires_grad_()
    labels = torch.randint(0, 81, (512,), generator=generator)
    RemoteLoss(dict(type="FocalLoss"), client=client)(pred, labels).backward()
    return pred.grad


def test_a_stream_opens_a_second_connection_and_answers_as_the_first_does():
    with running() as port:
        target = f"127.0.0.1:{port}"
        unary_only = LossClient(target, timeout=60, stream_threshold=None, shared_memory="off")
        try:
            unary = focal_gradient(unary_only, 0)
            assert connections_to(port) == 1  # unary calls: one connection
        finally:
            unary_only.close()
        gone = time.monotonic() + 10
        while connections_to(port) and time.monotonic() < gone:
            time.sleep(0.05)
        client = LossClient(target, timeout=60, stream_threshold=64 << 10, shared_memory="off")
        try:
            client.list_losses()
            assert connections_to(port) == 1
            streamed = focal_gradient(client, 0)  # 160 KiB of pred: above the threshold, streamed
            assert torch.equal(streamed, unary)
            assert connections_to(port) == 2  # the stream went on a connection of its own
            focal_gradient(client, 1)
            assert connections_to(port) == 2  # ...and keeps using it
        finally:
            client.close()


def test_a_callers_own_channel_carries_its_streams_too():
    """A LossClient on a channel the caller made has no second channel to open: everything uses that one."""
    with running() as port:
        channel = make_channel(f"127.0.0.1:{port}")
        client = LossClient(channel=channel, timeout=60, stream_threshold=64 << 10, shared_memory="off")
        try:
            client.list_losses()
            focal_gradient(client, 2)
            assert connections_to(port) == 1
        finally:
            client.close()
