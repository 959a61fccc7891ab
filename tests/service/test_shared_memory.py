"""Shared memory for callers on the server's host: equal answers, no copies left behind, clean-up
when either side goes away, and clear errors for every bad registration or reference.

Every test runs a real server (the session's, or one of its own) on loopback and real POSIX
segments under /dev/shm. Calls carry at least 1 MiB of tensors (the client's threshold).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.calls import dice_recompute_gradients, plain_channel

from losswire.client import LossClient, RemoteLoss, evaluate_terms
from losswire.client.shared_memory import SharedMemoryPool
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as shm

pytestmark = pytest.mark.skipif(not shm.supported(), reason="needs POSIX shared memory under /dev/shm")

FOCAL = dict(type="FocalLoss", gamma=2.0, alpha=0.25)
ROWS = 4096  # [4096, 80] float32: 1.25 MiB, over the client's 1 MiB threshold


@pytest.fixture(scope="module")
def shared(target) -> Iterator[LossClient]:
    client = LossClient(target, timeout=60, shared_memory="on")
    yield client
    client.close()


@pytest.fixture(scope="module")
def wire(target) -> Iterator[LossClient]:
    client = LossClient(target, timeout=60, shared_memory="off")
    yield client
    client.close()


def focal_inputs(rows: int = ROWS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 80, generator=generator), torch.randint(0, 81, (rows,), generator=generator)


def boxes(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(rows, 2, generator=generator) * 100
    return torch.cat([xy, xy + 1 + torch.rand(rows, 2, generator=generator) * 50], dim=1)


def remote(cfg: dict, client: LossClient, pred: torch.Tensor, target: torch.Tensor, grads=("pred",)):
    inputs = {"pred": pred.clone().requires_grad_("pred" in grads), "target": target.clone()}
    if "target" in grads:
        inputs["target"].requires_grad_()
    loss = RemoteLoss(cfg, client=client)(inputs["pred"], inputs["target"])
    loss.sum().backward()
    return loss.detach().clone(), {k: inputs[k].grad.clone() for k in grads}


def own_names() -> set[str]:
    return {name for name in os.listdir(shm.SEGMENT_DIR) if name.startswith(shm.NAME_PREFIX)}


# -- answers: shared memory == gRPC -------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, grads",
    [
        (FOCAL, ("pred",)),
        ({**FOCAL, "reduction": "none"}, ("pred",)),
        (dict(type="GIoULoss", loss_weight=2.0), ("pred",)),
        (dict(type="GIoULoss", loss_weight=2.0), ("pred", "target")),
    ],
    ids=["focal-mean", "focal-none", "giou-pred", "giou-pred-and-target"],
)
def test_answers_equal_the_wire_bit_for_bit(shared, wire, server, cfg, grads):
    if cfg["type"] == "GIoULoss":
        pred, target = boxes(1 << 16, seed=1), boxes(1 << 16, seed=2)  # 1 MiB each
    else:
        pred, target = focal_inputs()
    registered = server.shared_memory.regions
    by_memory, by_wire = remote(cfg, shared, pred, target, grads), remote(cfg, wire, pred, target, grads)
    assert torch.equal(by_memory[0], by_wire[0])
    for name in grads:
        assert torch.equal(by_memory[1][name], by_wire[1][name]), name
    assert shared.shared_memory_threshold is not None  # still on: it worked
    assert server.shared_memory.regions >= max(registered, 1)


def test_a_call_leaves_no_named_segment_and_reuses_its_segment(shared, server):
    pred, labels = focal_inputs(seed=3)
    before = own_names()
    remote(FOCAL, shared, pred, labels)
    gc.collect()
    pool = shared._pool
    regions = server.shared_memory.regions
    segments = pool.nbytes
    assert segments > 0 and regions > 0
    assert own_names() <= before  # the server removed the name when it mapped the segment
    for seed in range(3):  # the same size again: the idle segment is lent again, nothing new registered
        remote(FOCAL, shared, *focal_inputs(seed=seed))
        gc.collect()
    assert pool.nbytes == segments
    assert server.shared_memory.regions == regions


def test_the_gradient_is_the_servers_write_in_the_segment_without_a_copy(shared):
    pred, labels = focal_inputs(seed=4)
    pred.requires_grad_()
    loss = RemoteLoss(FOCAL, client=shared)(pred, labels)
    loss.backward()
    pointer = pred.grad.data_ptr()
    inside = [
        s for s in shared._pool._segments.values() if s.array.ctypes.data <= pointer < s.array.ctypes.data + s.size
    ]
    assert inside, "pred.grad does not lie in a shared segment"
    # a segment whose answer is still alive (pred.grad) is not lent to another call
    other, labels2 = focal_inputs(seed=5)
    other.requires_grad_()
    RemoteLoss(FOCAL, client=shared)(other, labels2).backward()
    assert other.grad.data_ptr() != pointer
    expected = pred.grad.clone()
    assert torch.equal(pred.grad, expected)  # the second call did not write over the first's gradient


def test_a_second_backward_adds_and_a_third_after_accumulating_refuses(shared):
    pred, labels = focal_inputs(seed=6)
    pred.requires_grad_()
    loss = RemoteLoss(FOCAL, client=shared)(pred, labels)
    loss.backward(retain_graph=True)
    once = pred.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(pred.grad, 2 * once)
    with pytest.raises(RuntimeError, match="second backward through one RemoteLoss forward"):
        loss.backward()


def test_a_scaled_loss_gets_a_scaled_copy(shared, wire):
    pred, labels = focal_inputs(seed=7)
    grads = []
    for client in (shared, wire):
        p = pred.clone().requires_grad_()
        (0.5 * RemoteLoss(FOCAL, client=client)(p, labels)).backward()
        grads.append(p.grad)
    assert torch.equal(grads[0], grads[1])


def test_several_terms_in_one_request(shared, wire):
    pred, labels = focal_inputs(seed=8)
    box_pred, box_target = boxes(1 << 16, seed=9), boxes(1 << 16, seed=10)
    results = []
    for client in (shared, wire):
        p, b = pred.clone().requires_grad_(), box_pred.clone().requires_grad_()
        losses = evaluate_terms(
            {
                "loss_cls": (RemoteLoss(FOCAL, client=client), (p, labels), {}),
                "loss_bbox": (RemoteLoss(dict(type="GIoULoss"), client=client), (b, box_target), {}),
            }
        )
        sum(losses.values()).backward()
        results.append((losses["loss_cls"].detach(), losses["loss_bbox"].detach(), p.grad, b.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_a_non_separable_loss_resends_with_its_tensors(shared, wire):
    """DiceLoss 'none' is recomputed with the upstream gradient: the resend carries the tensors
    inline (the segment's inputs may be reused by then)."""
    grads = dice_recompute_gradients((shared, wire), seed=11)
    assert torch.equal(grads[0], grads[1])


def test_threads_sharing_one_client_each_get_their_own_answer(shared, wire):
    inputs = [focal_inputs(seed=20 + i) for i in range(4)]
    expected = [remote(FOCAL, wire, *pair)[1]["pred"] for pair in inputs]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for _ in range(3):
                got[index] = remote(FOCAL, shared, *inputs[index])[1]["pred"]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, gradient in enumerate(expected):
        assert torch.equal(got[index], gradient), index


# -- either side going away ---------------------------------------------------------------------------


def fresh_server(port: int = 0, **config) -> LosswireServer:
    config = {"max_workers": 4, **config}
    instance = LosswireServer(ServerConfig(host="127.0.0.1", port=port, device="cpu", **config))
    instance.start()
    return instance


CALLER = textwrap.dedent(
    """
    import sys, time, torch
    from losswire.client import LossClient, RemoteLoss
    client = LossClient(sys.argv[1], timeout=60, shared_memory="on")
    pred = torch.randn(4096, 80, requires_grad=True)
    RemoteLoss(dict(type="FocalLoss"), client=client)(pred, torch.randint(0, 81, (4096,))).backward()
    print(",".join(client._pool._regions.values()), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_caller_that_dies_has_its_regions_dropped(server, target):
    caller = subprocess.Popen([sys.executable, "-c", CALLER, target], stdout=subprocess.PIPE, text=True)
    try:
        regions = caller.stdout.readline().strip().split(",")
        assert regions and all(region in server.shared_memory for region in regions)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait(30)
    # the sweeper runs every 2 s; a condition with a generous bound, not a timing
    deadline = time.monotonic() + 30
    while any(region in server.shared_memory for region in regions) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(region in server.shared_memory for region in regions)


@pytest.mark.slow
def test_a_server_that_restarted_is_registered_with_again(wire):
    first = fresh_server()
    port = first.port
    client = LossClient(f"127.0.0.1:{port}", timeout=60, shared_memory="on")
    try:
        pred, labels = focal_inputs(seed=30)
        expected = remote(FOCAL, wire, pred, labels)
        assert torch.equal(remote(FOCAL, client, pred, labels)[1]["pred"], expected[1]["pred"])
        assert first.shared_memory.regions == 1
        first.stop(grace=1)
        second = fresh_server(port)
        try:
            # the client's region is unknown there: NOT_FOUND, a new registration, the call again
            assert torch.equal(remote(FOCAL, client, pred, labels)[1]["pred"], expected[1]["pred"])
            assert second.shared_memory.regions == 1
            assert client.shared_memory_threshold is not None
        finally:
            second.stop(grace=1)
    finally:
        client.close()


def test_a_server_with_shared_memory_off_is_used_over_grpc(wire):
    off = fresh_server(shared_memory=False)
    client = LossClient(f"127.0.0.1:{off.port}", timeout=60, shared_memory="on")
    try:
        pred, labels = focal_inputs(seed=31)
        got = remote(FOCAL, client, pred, labels)
        assert torch.equal(got[1]["pred"], remote(FOCAL, wire, pred, labels)[1]["pred"])
        assert client.shared_memory_threshold is None  # noticed once: gRPC from now on
        assert off.shared_memory.regions == 0
    finally:
        client.close()
        off.stop(grace=1)


def test_closing_the_client_unregisters_its_regions(target, server):
    client = LossClient(target, timeout=60, shared_memory="on")
    remote(FOCAL, client, *focal_inputs(seed=32))
    regions = list(client._pool._regions.values())
    assert regions and all(region in server.shared_memory for region in regions)
    client.close()
    assert not any(region in server.shared_memory for region in regions)


def test_shared_memory_calls_take_a_big_call_slot_and_wait_for_one(wire):
    """With the one big-call slot held by a stream receiving its chunks, a shared-memory call is refused as
    busy (retryable: no "do not retry" pushback); the client waits it out and is answered once the stream
    ends."""
    server = fresh_server(max_workers=3, max_stream_calls=1)
    target = f"127.0.0.1:{server.port}"
    client = LossClient(target, timeout=60, shared_memory="on")
    pred, labels = focal_inputs(seed=33)
    header = pb.EvaluateRequest()
    term = header.terms.add(config=codec.encode_config(FOCAL), gradients=["pred"])
    term.pred.dtype, term.pred.shape[:] = pb.FLOAT32, list(pred.shape)
    codec.encode_value(labels, term.target)
    data = pred.numpy().tobytes()
    release, answers = threading.Event(), []

    def held_open() -> Iterator[pb.EvaluateChunk | bytes]:
        yield pb.EvaluateChunk(request=header)
        yield chunks.chunk_wire_bytes("terms[0].pred", 0, data[:4096])  # its first chunk: it holds the slot
        release.wait(60)  # receiving until the test says
        yield chunks.chunk_wire_bytes("terms[0].pred", 4096, data[4096:])

    try:
        with plain_channel(target) as channel:
            method = channel.stream_stream(
                "/losswire.v1.LossService/EvaluateStream",
                request_serializer=chunks.serialize_chunk,
                response_deserializer=pb.EvaluateChunk.FromString,
            )
            big = threading.Thread(target=lambda: answers.extend(method(held_open(), timeout=60)))
            big.start()
            deadline = time.monotonic() + 30
            while server.dataplane.slots.in_use < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.dataplane.slots.in_use == 1
            # by hand: refused at once, busy
            segment = shm.Segment.create(1 << 22)
            try:
                stub = pb_grpc.LossServiceStub(channel)
                request = shm_request(register(stub, segment))
                request.output_shm.region, request.output_shm.offset = request.terms[0].pred.shm.region, 2 << 20
                request.output_shm.byte_size = 1 << 20
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Evaluate(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-stream-calls" in caught.value.details()
                assert ("grpc-retry-pushback-ms", "-1") not in tuple(caught.value.trailing_metadata() or ())
            finally:
                segment.unlink()
                segment.close()
            # through the client: it waits; the stream ends; the call is answered
            done: dict[str, torch.Tensor] = {}
            caller = threading.Thread(target=lambda: done.update(remote(FOCAL, client, pred, labels)[1]))
            caller.start()
            release.set()
            big.join(60)
            caller.join(60)
        assert answers and answers[0].WhichOneof("kind") == "response"
        assert torch.equal(done["pred"], remote(FOCAL, wire, pred, labels)[1]["pred"])
    finally:
        release.set()
        client.close()
        server.stop(grace=1)


# -- bad registrations and references -----------------------------------------------------------------


@pytest.fixture()
def stub(target) -> Iterator[pb_grpc.LossServiceStub]:
    with plain_channel(target) as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.fixture()
def segment() -> Iterator[shm.Segment]:
    made = shm.Segment.create(1 << 20)
    yield made
    made.unlink()
    made.close()


def register(stub: pb_grpc.LossServiceStub, segment: shm.Segment) -> str:
    request = pb.RegisterSharedMemoryRequest(name=segment.name, byte_size=segment.size, nonce=segment.nonce)
    return stub.RegisterSharedMemory(request, timeout=30).region


def expect(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details(), caught.value.details()
    return caught.value.details()


@pytest.mark.parametrize(
    "change, code, words",
    [
        ({"name": "../etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT, ("name must be",)),
        ({"name": "losswire_no_such_segment"}, grpc.StatusCode.NOT_FOUND, ("same host", "--ipc=host")),
        ({"nonce": b"0" * 16}, grpc.StatusCode.INVALID_ARGUMENT, ("nonce",)),
        ({"nonce": b"short"}, grpc.StatusCode.INVALID_ARGUMENT, ("16 to 64 bytes",)),
        ({"byte_size": (1 << 20) + 1}, grpc.StatusCode.INVALID_ARGUMENT, ("has 1048576 bytes",)),
    ],
    ids=["path-name", "missing", "wrong-nonce", "short-nonce", "bigger-than-segment"],
)
def test_bad_registrations_are_refused_with_the_field(stub, segment, change, code, words):
    fields = {"name": segment.name, "byte_size": segment.size, "nonce": segment.nonce, **change}
    expect(lambda: stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(**fields), timeout=30), code, *words)


def test_registration_is_refused_when_off_or_over_the_limit(segment):
    for config, code, word in (
        ({"shared_memory": False}, grpc.StatusCode.FAILED_PRECONDITION, "--shared-memory on"),
        ({"max_shared_memory": 1 << 19}, grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-shared-memory"),
    ):
        instance = fresh_server(**config)
        try:
            with plain_channel(f"127.0.0.1:{instance.port}") as channel:
                expect(lambda channel=channel: register(pb_grpc.LossServiceStub(channel), segment), code, word)
        finally:
            instance.stop(grace=1)


def test_unregistering_an_unknown_region_is_not_found(stub):
    request = pb.UnregisterSharedMemoryRequest(region="f" * 32)
    expect(lambda: stub.UnregisterSharedMemory(request, timeout=30), grpc.StatusCode.NOT_FOUND, "no shared-memory")


def shm_request(region: str, offset: int = 64, byte_size: int | None = None, rows: int = 1024) -> pb.EvaluateRequest:
    """FocalLoss with pred [rows, 80] float32 in ``region`` at ``offset``, labels inline."""
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(FOCAL), gradients=["pred"])
    term.pred.dtype, term.pred.shape[:] = pb.FLOAT32, [rows, 80]
    term.pred.shm.region, term.pred.shm.offset = region, offset
    term.pred.shm.byte_size = rows * 80 * 4 if byte_size is None else byte_size
    codec.encode_value(torch.zeros(rows, dtype=torch.int64), term.target)
    return request


@pytest.mark.parametrize(
    "make, code, field",
    [
        (lambda r: shm_request("0" * 32), grpc.StatusCode.NOT_FOUND, "terms[0].pred.shm.region"),
        (lambda r: shm_request(r, offset=1 << 20), grpc.StatusCode.INVALID_ARGUMENT, "terms[0].pred.shm.byte_size"),
        (lambda r: shm_request(r, byte_size=100), grpc.StatusCode.INVALID_ARGUMENT, "terms[0].pred.shm.byte_size"),
        (lambda r: shm_request(r, offset=66), grpc.StatusCode.INVALID_ARGUMENT, "terms[0].pred.shm.offset"),
        (lambda r: shm_request(r, offset=0), grpc.StatusCode.INVALID_ARGUMENT, "terms[0].pred.shm.offset"),
    ],
    ids=["unknown-region", "past-the-end", "wrong-byte-size", "misaligned", "over-the-nonce"],
)
def test_bad_references_name_the_field(stub, segment, make, code, field):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    region = register(stub, segment)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(make(region), timeout=30)
    assert caught.value.code() == code, caught.value.details()
    status = rpc_status.from_call(caught.value)
    violation = error_details_pb2.BadRequest()
    status.details[0].Unpack(violation)
    assert violation.field_violations[0].field == field


def test_data_and_a_reference_together_are_refused(stub, segment):
    request = shm_request(register(stub, segment))
    request.terms[0].pred.data = b"\0" * (1024 * 80 * 4)
    expect(lambda: stub.Evaluate(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "both data and shm")


def test_a_segment_that_shrank_is_refused_not_read(stub, segment):
    request = shm_request(register(stub, segment), offset=512 << 10)
    os.ftruncate(segment.fd, 256 << 10)  # the caller cuts its segment short after registering it
    expect(lambda: stub.Evaluate(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "shrank")


def test_a_hand_made_reference_is_answered_and_the_gradient_written_where_asked(stub, segment, wire):
    pred, labels = focal_inputs(1024, seed=40)
    region = register(stub, segment)
    segment.bytes_at(64, pred.nbytes).copy_(pred.reshape(-1).view(torch.uint8))
    request = shm_request(region)
    codec.encode_value(labels, request.terms[0].target)
    out_offset = shm.align(64 + pred.nbytes)
    request.output_shm.region, request.output_shm.offset = region, out_offset
    request.output_shm.byte_size = segment.size - out_offset
    response = stub.Evaluate(request, timeout=30)
    answer = response.results[0].gradients["pred"]
    assert answer.HasField("shm") and not answer.data and answer.shm.offset >= out_offset
    gradient = segment.bytes_at(answer.shm.offset, answer.shm.byte_size).view(torch.float32).reshape(1024, 80)
    assert torch.equal(gradient, remote(FOCAL, wire, pred, labels)[1]["pred"])


def test_the_focal_kernel_writes_its_gradient_into_the_callers_range(stub, segment, wire):
    """Reduction 'none': the answer holds a loss and a gradient of pred's size. Placed after the
    compute, the loss would come first (it is encoded first); the gradient comes first because the
    kernel wrote it into the range while computing, and the answer names it where it lies."""
    pred, labels = focal_inputs(1024, seed=42)
    region = register(stub, segment)
    segment.bytes_at(64, pred.nbytes).copy_(pred.reshape(-1).view(torch.uint8))
    request = shm_request(region)
    request.terms[0].config.CopyFrom(codec.encode_config({**FOCAL, "reduction": "none"}))
    codec.encode_value(labels, request.terms[0].target)
    out_offset = shm.align(64 + pred.nbytes)
    request.output_shm.region, request.output_shm.offset = region, out_offset
    request.output_shm.byte_size = segment.size - out_offset
    result = stub.Evaluate(request, timeout=30).results[0]
    gradient_ref, loss_ref = result.gradients["pred"].shm, result.loss.shm
    assert gradient_ref.offset == out_offset < loss_ref.offset
    expected_loss, expected = remote({**FOCAL, "reduction": "none"}, wire, pred, labels)
    gradient = segment.bytes_at(gradient_ref.offset, gradient_ref.byte_size).view(torch.float32).reshape(1024, 80)
    loss = segment.bytes_at(loss_ref.offset, loss_ref.byte_size).view(torch.float32).reshape(1024, 80)
    assert torch.equal(gradient, expected["pred"]) and torch.equal(loss, expected_loss)


def test_a_stream_may_carry_references_too(target, segment, wire):
    pred, labels = focal_inputs(1024, seed=41)
    with plain_channel(target) as channel:
        region = register(pb_grpc.LossServiceStub(channel), segment)
        segment.bytes_at(64, pred.nbytes).copy_(pred.reshape(-1).view(torch.uint8))
        request = shm_request(region)
        codec.encode_value(labels, request.terms[0].target)
        method = channel.stream_stream(
            "/losswire.v1.LossService/EvaluateStream",
            request_serializer=pb.EvaluateChunk.SerializeToString,
            response_deserializer=pb.EvaluateChunk.FromString,
        )
        answers = list(method(iter([pb.EvaluateChunk(request=request)]), timeout=30))
    assert answers[0].WhichOneof("kind") == "response"
    # no chunks were sent for pred (it lay in the segment); the gradient comes back in chunks
    gradient = torch.cat([torch.frombuffer(bytearray(m.chunk.data), dtype=torch.uint8) for m in answers[1:]])
    assert torch.equal(gradient.view(torch.float32).reshape(1024, 80), remote(FOCAL, wire, pred, labels)[1]["pred"])


# -- the caller's side ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_segments_of_callers_that_died_before_registering_are_swept():
    made_by_the_dead = subprocess.run(
        [sys.executable, "-c", "from losswire.wire import shared_memory as s; print(s.Segment.create(1 << 20).name)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()  # the process exited without unlinking it: its lock went with it
    alive = shm.Segment.create(1 << 20)
    try:
        old = time.time() - 2 * shm.STALE_SECONDS
        for name in (made_by_the_dead, alive.name):
            os.utime(os.path.join(shm.SEGMENT_DIR, name), (old, old))
        assert made_by_the_dead in own_names()
        shm.sweep_stale()
        assert made_by_the_dead not in own_names()  # unlocked and old: removed
        assert alive.name in own_names()  # still locked by this process: kept
    finally:
        alive.unlink()
        alive.close()


@pytest.mark.parametrize(
    "nbytes, size",
    [(1, 1 << 20), (1 << 20, 1 << 20), ((1 << 20) + 1, 5 << 18), (3 << 20, 3 << 20), (9 << 20, 10 << 20)],
)
def test_segment_sizes_round_up_to_a_size_class(nbytes, size):
    assert shm.segment_size(nbytes) == size


def test_a_forked_child_never_leases_its_parents_segments():
    """A pool used in a forked child (a DataLoader worker, say) would share the parent's pages: it
    starts afresh there instead. The registration callables stand in for the RPCs."""
    registered: list[str] = []
    pool = SharedMemoryPool(lambda name, size, nonce: registered.append(name) or name, lambda region: None)
    lease = pool.lease(1 << 20)
    parents = lease.segment.name
    lease.done()  # idle in the parent
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            other = pool.lease(1 << 20)
            os.write(write, other.segment.name.encode())
            other.done()
        finally:
            os._exit(0)
    os.close(write)
    childs = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(child, 0)
    assert childs and childs != parents
    again = pool.lease(1 << 20)  # the parent still lends its own
    assert again.segment.name == parents
    again.done()
    pool.close()
