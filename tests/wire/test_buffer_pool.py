"""Reused receive buffers (losswire.client.buffers): a buffer is lent again only once every tensor
viewing it is gone, and streamed calls on a real server reuse them without changing a result or
touching an answer the caller still holds."""

from __future__ import annotations

import gc
import multiprocessing

import pytest
import torch

from losswire.client import LossClient, RemoteLoss
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec
from losswire.wire.buffers import MIN_POOLED_BYTES, BufferPool, size_class

MiB = 1 << 20


def test_a_buffer_is_lent_again_only_after_its_last_view_is_freed():
    pool = BufferPool()
    first = pool.take(2 * MiB)
    address = first.data_ptr()
    view = first.view(torch.float32)[10:]  # a view outlives the tensor the pool lent
    del first
    gc.collect()
    second = pool.take(2 * MiB)
    assert second.data_ptr() != address, "lent while a view of it was alive"
    del view
    gc.collect()
    third = pool.take(2 * MiB)
    assert third.data_ptr() == address
    assert (pool.created, pool.reused) == (2, 1)


def test_what_was_written_survives_until_the_holder_lets_go():
    pool = BufferPool()
    held = pool.take(MiB).fill_(7)
    for _ in range(3):  # other calls come and go meanwhile
        pool.take(MiB).fill_(1)
    assert bool((held == 7).all())


def test_sizes_of_one_class_share_buffers_and_other_classes_do_not():
    pool = BufferPool()
    assert size_class(MiB + 1) == size_class(MiB + MiB // 4) == MiB + MiB // 4
    address = pool.take(MiB + 1).data_ptr()
    gc.collect()
    again = pool.take(MiB + 1000)  # the same class
    assert again.data_ptr() == address and again.numel() == MiB + 1000
    del again
    other = pool.take(4 * MiB)  # another class: a new buffer
    assert other.data_ptr() != address


def test_idle_buffers_are_bounded_and_small_ones_never_pooled():
    pool = BufferPool(max_idle_bytes=2 * MiB)
    taken = [pool.take(MiB) for _ in range(4)]
    del taken
    gc.collect()
    assert pool.idle_bytes == 2 * MiB
    small = pool.take(MIN_POOLED_BYTES - 1)
    assert small.numel() == MIN_POOLED_BYTES - 1 and pool.created == 4  # plain memory, not from the pool
    pool.clear()
    assert pool.idle_bytes == 0


def test_no_pool_means_fresh_memory_every_time():
    pool = BufferPool(max_idle_bytes=0)
    for _ in range(3):
        assert pool.take(2 * MiB).numel() == 2 * MiB
    assert (pool.created, pool.reused, pool.idle_bytes) == (0, 0, 0)


def _write_in_child(tensor: torch.Tensor) -> None:
    tensor.numpy()[:] = 2  # numpy, not torch: torch's thread pool does not survive a fork


def test_a_forked_child_writes_its_own_copy():
    pool = BufferPool()
    tensor = pool.take(MiB).fill_(1)
    child = multiprocessing.get_context("fork").Process(target=_write_in_child, args=(tensor,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert bool((tensor == 1).all())


# -- on a real server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled_server():
    instance = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=4))
    instance.start()
    yield instance
    instance.stop(grace=1)


def _focal(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 80, generator=generator), torch.randint(0, 81, (n,), generator=generator)


def test_streamed_calls_reuse_buffers_on_both_sides_with_the_same_results(pooled_server):
    cfg = dict(type="FocalLoss", gamma=2.0, alpha=0.25)
    streamed = LossClient(f"127.0.0.1:{pooled_server.port}", timeout=60, stream_threshold=0, shared_memory="off")
    unary = LossClient(f"127.0.0.1:{pooled_server.port}", timeout=60, stream_threshold=None, shared_memory="off")
    n = 8192  # pred 2.5 MiB: above the pool's smallest buffer

    def gradient(client: LossClient, seed: int) -> torch.Tensor:
        pred, target = _focal(n, seed)
        pred.requires_grad_()
        RemoteLoss(cfg, client=client)(pred, target).backward()
        return pred.grad

    try:
        kept = gradient(streamed, 0)  # held by the caller from here on
        kept_copy = kept.clone()
        for seed in (1, 2, 3):  # each answer freed before the next call: its buffers come back
            assert torch.equal(gradient(streamed, seed), gradient(unary, seed))
        assert torch.equal(kept, kept_copy), "a buffer the caller holds was lent to a later call"
        assert streamed.buffers.reused >= 2
        assert pooled_server.dataplane.buffers.reused >= 2  # the server's receive and answer buffers
    finally:
        streamed.close()
        unary.close()


def test_buffer_pool_zero_turns_reuse_off_on_the_server():
    instance = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", buffer_pool_bytes=0))
    instance.start()
    client = LossClient(f"127.0.0.1:{instance.port}", timeout=60, stream_threshold=0, shared_memory="off")
    try:
        pred, target = _focal(8192, 0)
        for _ in range(2):
            pred.grad = None
            RemoteLoss(dict(type="FocalLoss"), client=client)(pred.requires_grad_(), target).backward()
        assert (instance.dataplane.buffers.created, instance.dataplane.buffers.reused) == (0, 0)
        assert client.buffers.reused >= 1
    finally:
        client.close()
        instance.stop(grace=1)


def test_client_buffer_pool_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOSSWIRE_CLIENT_BUFFER_POOL", "0")
    assert LossClient("127.0.0.1:1").buffers.max_idle_bytes == 0
    monkeypatch.setenv("LOSSWIRE_CLIENT_BUFFER_POOL", "lots")
    with pytest.raises(ValueError, match="LOSSWIRE_CLIENT_BUFFER_POOL must be a number of bytes"):
        LossClient("127.0.0.1:1")


# -- narrowed transfers (transfer_dtype) cast into reused memory ------------------------------------


@pytest.mark.parametrize("wire", [pb.BFLOAT16, pb.FLOAT16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_narrowed_tensor_cast_into_pooled_memory_equals_torchs_own_cast(wire: int, layout: str):
    pool = BufferPool()
    source = torch.randn(8192, 96, dtype=torch.float32)  # 1.5 MiB narrowed: pooled (MIN_POOLED_BYTES)
    tensor = source if layout == "contiguous" else source.t()
    message = codec.encode_tensor(tensor, transfer_dtype=wire, allocate=pool.take)
    narrow = codec.DTYPE_TO_TORCH[wire]
    assert message.data == tensor.to(narrow).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    widened = codec.decode_tensor(message, "pred", allocate=pool.take)
    assert widened.dtype == torch.float32 and widened.shape == tensor.shape
    assert torch.equal(widened, tensor.to(narrow).to(torch.float32))
    assert pool.created == 2  # the narrowed copy and the widened one, each in a pooled buffer
    del widened
    codec.decode_tensor(message, "pred", allocate=pool.take)
    assert pool.reused >= 1


def test_narrowed_calls_reuse_buffers_on_both_sides_with_the_same_results(pooled_server):
    """bfloat16 transfer, streamed and unary: the casts land in reused buffers on both sides and
    the answers are the same bit for bit as a client without a pool."""
    cfg = dict(type="FocalLoss", reduction="sum")
    target = f"127.0.0.1:{pooled_server.port}"
    pooled = LossClient(target, timeout=60, stream_threshold=0, shared_memory="off", transfer_dtype="bfloat16")
    fresh = LossClient(
        target, timeout=60, stream_threshold=None, shared_memory="off", transfer_dtype="bfloat16", buffer_pool_bytes=0
    )

    def gradient(client: LossClient, seed: int) -> torch.Tensor:
        pred, labels = _focal(8192, seed)
        pred.requires_grad_()
        RemoteLoss(cfg, client=client)(pred, labels).backward()
        return pred.grad

    try:
        server = pooled_server.dataplane.buffers
        takes_before = server.created + server.reused
        for seed in (4, 5, 6):
            assert torch.equal(gradient(pooled, seed), gradient(fresh, seed))
        # per seed, the client takes one for pred narrowed, the gradient's chunks and the gradient widened
        assert pooled.buffers.created + pooled.buffers.reused >= 3 * 3 and pooled.buffers.reused >= 2
        assert fresh.buffers.created == fresh.buffers.reused == 0
        # per seed, the server takes a buffer for the streamed call's received pred, its widened pred,
        # its gradient and the gradient narrowed, and for the unary call's widened pred and narrowed gradient
        assert server.created + server.reused - takes_before >= 3 * 6
    finally:
        pooled.close()
        fresh.close()
