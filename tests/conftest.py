"""Shared fixtures: a real losswire server on an ephemeral loopback port, in this process.

``LOSSWIRE_TEST_DEVICE=cuda`` runs that server's losses on the GPU (CI has none: cpu by default).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import torch

from losswire.client import LossClient, RemoteLoss
from losswire.server.app import LosswireServer, ServerConfig


@pytest.fixture(scope="session")
def server():
    instance = LosswireServer(
        ServerConfig(host="127.0.0.1", port=0, device=os.environ.get("LOSSWIRE_TEST_DEVICE", "cpu"), max_workers=4)
    )
    instance.start()
    yield instance
    instance.stop(grace=1)


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def client(target) -> LossClient:
    return LossClient(target, timeout=30)


def import_example(path: Path, name: str) -> Iterator[ModuleType]:
    """Imports a script of examples/ as module ``name`` for a fixture's lifetime (``yield from`` it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@contextlib.contextmanager
def plain_channel(target: str) -> Iterator[grpc.Channel]:
    """A channel without losswire's retry policy (nor gRPC's transparent retries): each call is one
    attempt, answered as the server answered it."""
    channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    try:
        yield channel
    finally:
        channel.close()


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
