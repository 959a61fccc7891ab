"""Pinned host staging (``--pinned-staging-bytes``) through a real server: on a CUDA device a big call's
tensors cross through pinned buffers and its answer is the pageable path's, bit for bit, with every buffer
back in the pool afterwards; on a CPU device nothing is staged and nothing is pinned."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from losswire.client import LossClient, RemoteLoss
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig

MiB = 1 << 20
FOCAL = {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25}


def _staged(server: LosswireServer, state: str) -> float | None:
    return server.metrics.registry.get_sample_value("losswire_pinned_staging_bytes", {"state": state})


def test_a_cpu_server_stages_nothing_and_pins_nothing():
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", pinned_staging_bytes=1 << 30))
    assert server.config.pinned_staging_bytes > 0  # set, yet used only where the device is CUDA
    assert server.staging is None and server.dataplane.stage is None
    assert _staged(server, "held") == 0
    assert server.metrics.registry.get_sample_value("losswire_staged_copies_total", {"path": "pinned"}) == 0


def _gradient(target: str, pred: torch.Tensor, labels: torch.Tensor, shared_memory: str, lanes: int = 0) -> tuple:
    client = LossClient(target, timeout=120, shared_memory=shared_memory, lanes=lanes)
    try:
        leaf = pred.clone().requires_grad_()
        loss = RemoteLoss(FOCAL, client=client)(leaf, labels)
        loss.backward()
        return loss.detach(), leaf.grad
    finally:
        client.close()


@pytest.fixture(scope="module")
def cuda_servers():
    """(a server staging through pinned memory, one copying the pageable way), both on cuda."""
    base = ServerConfig(host="127.0.0.1", port=0, device="cuda", max_workers=4)
    staged, pageable = (dataclasses.replace(base, pinned_staging_bytes=size) for size in (1 << 30, 0))
    servers = [LosswireServer(staged), LosswireServer(pageable)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop(grace=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("mib", "shared_memory"), [(4, "off"), (64, "off"), (64, "auto")])
def test_a_big_call_on_cuda_is_the_pageable_paths_bit_for_bit(cuda_servers, mib: int, shared_memory: str):
    pinned, pageable = cuda_servers
    assert pinned.staging is not None and pageable.staging is None
    classes = 64
    rows = mib * MiB // 4 // classes
    generator = torch.Generator().manual_seed(mib)
    pred = torch.randn(rows, classes, generator=generator)
    labels = torch.randint(0, classes + 1, (rows,), generator=generator)
    pool = pinned.staging.pool
    staged = pool.staged
    answers = [_gradient(f"127.0.0.1:{server.port}", pred, labels, shared_memory) for server in cuda_servers]
    (loss, grad), (plain_loss, plain_grad) = answers
    assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad)
    assert pool.staged >= staged + 2  # pred there, its gradient back
    assert pool.lent_bytes == 0 and _staged(pinned, "lent") == 0  # every buffer back in the pool
    resting = pool.held_bytes
    _gradient(f"127.0.0.1:{pinned.port}", pred, labels, shared_memory)
    assert pool.held_bytes == resting and pool.lent_bytes == 0  # reused, not grown
    assert 0 < resting <= pool.max_bytes and _staged(pinned, "held") == resting


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("shared_memory", "lanes"), [("off", 0), ("off", 2), ("auto", 0)])
def test_a_caller_s_big_cuda_pred_gets_its_cpu_copy_s_answer_bit_for_bit(cuda_servers, shared_memory: str, lanes):
    """A caller's CUDA pred is held back on its device and copied once, to where it goes (a shared-memory
    segment, or chunks by gRPC, on one stream or several lanes): the answer is the same pred's from the
    host, its gradient on CUDA."""
    pinned, _ = cuda_servers
    rows, classes = 64 * MiB // 4 // 64, 64
    generator = torch.Generator().manual_seed(7)
    pred = torch.randn(rows, classes, generator=generator)
    labels = torch.randint(0, classes + 1, (rows,), generator=generator)
    target = f"127.0.0.1:{pinned.port}"
    loss, grad = _gradient(target, pred.cuda(), labels.cuda(), shared_memory, lanes)
    host_loss, host_grad = _gradient(target, pred, labels, shared_memory, lanes)
    assert loss.is_cuda and grad.is_cuda
    assert torch.equal(loss.cpu(), host_loss) and torch.equal(grad.cpu(), host_grad)
