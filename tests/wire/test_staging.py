"""The pinned staging pool (losswire.wire.staging): bounded, counted, reused, and a buffer is written again
only once the copy that used it is complete. Pinning needs a CUDA device; the pool's accounting is the same
over plain host memory, which these tests give it (``PlainMemory``, a ``HostMemory`` of their own)."""

from __future__ import annotations

import threading

import pytest
import torch

from losswire.wire.staging import MIN_STAGED_BYTES, PinnedPool, Staging

MiB = 1 << 20


class PlainMemory:
    """Host memory that is not pinned, counting what was asked for and given back; ``fail``: refuse."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.allocated: list[int] = []
        self.freed: list[int] = []

    def allocate(self, nbytes: int) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("no pinned memory here")
        self.allocated.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    def free(self, buffer: torch.Tensor) -> None:
        self.freed.append(len(buffer))


class Copy:
    """A copy's completion as a CUDA event says it: ``synchronize`` waits for it (here: records the wait)."""

    def __init__(self) -> None:
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


def test_a_buffer_given_back_is_lent_again_for_the_next_copy_of_its_size():
    memory = PlainMemory()
    pool = PinnedPool(64 * MiB, memory)
    first = pool.take(4 * MiB)
    assert pool.lent_bytes == pool.held_bytes == 4 * MiB
    pool.give_back(first)
    assert pool.lent_bytes == 0 and pool.held_bytes == 4 * MiB  # kept, pinned, for the next call
    second = pool.take(4 * MiB - 100)  # the same size class
    assert second.data_ptr() == first.data_ptr()
    assert (pool.created, pool.staged, memory.allocated) == (1, 2, [4 * MiB])


def test_a_buffer_is_written_again_only_after_its_last_copy_completes():
    pool = PinnedPool(64 * MiB, PlainMemory())
    copy = Copy()
    pool.give_back(pool.take(4 * MiB), copy)
    assert copy.waited == 0  # giving back does not wait: the copy runs on
    pool.take(4 * MiB)
    assert copy.waited == 1


def test_the_bound_is_never_passed_and_what_is_over_it_is_refused_not_failed():
    memory = PlainMemory()
    pool = PinnedPool(10 * MiB, memory)
    lent = [pool.take(4 * MiB), pool.take(4 * MiB)]
    assert pool.take(4 * MiB) is None  # 12 MiB would pass the bound: the caller copies the pageable way
    assert pool.take(16 * MiB) is None  # bigger than the whole bound
    assert (pool.held_bytes, pool.staged, pool.refused) == (8 * MiB, 2, 2)
    for buffer in lent:
        pool.give_back(buffer)
    assert pool.take(4 * MiB) is not None and pool.held_bytes == 8 * MiB


def test_idle_buffers_of_other_sizes_are_unpinned_to_make_room():
    memory = PlainMemory()
    pool = PinnedPool(10 * MiB, memory)
    copy = Copy()
    pool.give_back(pool.take(4 * MiB), copy)
    pool.give_back(pool.take(2 * MiB))  # another size class, kept idle too
    assert pool.take(5 * MiB) is not None  # 4 + 2 + 5 would pass 10: the oldest idle one goes, not both
    assert memory.freed == [4 * MiB] and copy.waited == 1  # never unpinned while its copy may still read it
    assert (pool.held_bytes, pool.lent_bytes, pool.freed) == (7 * MiB, 5 * MiB, 1)


def test_a_pool_that_cannot_pin_gives_its_reservation_back():
    pool = PinnedPool(64 * MiB, PlainMemory(fail=True))
    assert pool.take(4 * MiB) is None
    assert (pool.held_bytes, pool.lent_bytes, pool.staged, pool.refused) == (0, 0, 0, 1)


def test_clear_unpins_the_idle_buffers_and_leaves_the_lent_ones():
    memory = PlainMemory()
    pool = PinnedPool(64 * MiB, memory)
    lent = pool.take(2 * MiB)
    pool.give_back(pool.take(4 * MiB))
    pool.clear()
    assert memory.freed == [4 * MiB] and pool.held_bytes == pool.lent_bytes == 2 * MiB
    pool.give_back(lent)
    assert pool.lent_bytes == 0


def test_small_copies_and_an_off_pool_are_not_staged():
    assert not PinnedPool(64 * MiB, PlainMemory()).stages(MIN_STAGED_BYTES - 1)
    assert PinnedPool(64 * MiB, PlainMemory()).stages(MIN_STAGED_BYTES)
    assert not PinnedPool(0, PlainMemory()).stages(64 * MiB)


def test_threads_taking_at_once_never_pass_the_bound():
    pool = PinnedPool(16 * MiB, PlainMemory())
    most, lock = [0], threading.Lock()

    def borrow() -> None:
        for _ in range(200):
            buffer = pool.take(3 * MiB)
            with lock:
                most[0] = max(most[0], pool.held_bytes)
            if buffer is not None:
                pool.give_back(buffer)

    threads = [threading.Thread(target=borrow) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] <= 16 * MiB
    assert pool.lent_bytes == 0 and pool.staged + pool.refused == 1600


def test_nothing_crosses_to_or_from_the_cpu_so_nothing_is_staged():
    memory = PlainMemory()
    staging = Staging(PinnedPool(64 * MiB, memory))
    tensor = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    assert staging.to_device(tensor, torch.device("cpu")) is tensor
    with staging.to_host(tensor) as (host, lent):
        assert host.data_ptr() == tensor.data_ptr() and not lent
    assert memory.allocated == [] and staging.pool.staged == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_registered_memory_is_pinned_and_copies_are_exact():
    pool = PinnedPool(256 * MiB)
    staging = Staging(pool)
    tensor = torch.randn(16 * MiB // 4)
    moved = staging.to_device(tensor, torch.device("cuda"))
    assert pool.staged == 1 and pool.lent_bytes == 0
    with staging.to_host(moved * 2) as (host, lent):
        assert lent and host.is_pinned()
        assert torch.equal(host, tensor * 2)
    assert torch.equal(moved.cpu(), tensor)
    assert pool.lent_bytes == 0 and pool.held_bytes == 16 * MiB and pool.created == 1
    pool.clear()
    assert pool.held_bytes == 0 and pool.freed == 1
