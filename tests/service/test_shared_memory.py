"""Shared memory for callers on the server's host: equal answers, no copies left behind, clean-up when
either side goes away, clear errors for every bad handoff, registration or reference, and nothing a
hostile caller on the host can do to crash the server or reach another caller's data.

Every test runs a real server (the session's in-process one, or one of its own) on loopback and real
memfds handed over on the server's Unix socket. Calls carry at least 1 MiB of tensors (the client's
threshold). Each hostile row of the old design (named segments) has a test here:

* truncating a registered segment (SIGBUS): ``test_a_caller_cannot_shrink_grow_or_punch_its_segment``;
* unsealed, growable or sparse memory: ``test_an_unsealed_growable_or_sparse_memfd_is_refused``;
* a handle used from another connection or token: ``test_a_region_answers_only_*``;
* another uid: ``test_another_user_is_refused_and_nothing_is_kept``;
* one file registered hundreds of times: ``test_registrations_are_bounded_per_caller_and_descriptors_too``;
* a call past its deadline: ``test_a_call_past_its_deadline_retires_its_segment_and_nothing_is_written_late``;
* a dead caller: ``test_a_caller_that_dies_has_its_regions_dropped_and_its_memory_freed``;
* names under /dev/shm: ``test_no_named_segment_is_ever_created``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.calls import HeldOpen, dice_recompute_gradients, evaluate_stream, field_of, plain_channel
from support.faults import load_fault_losses
from support.in_process import DEVICE
from support.polling import eventually
from support.segments import Handoff
from torch import Tensor

from losswire.client import LossClient, RemoteLoss, RemoteLossError, evaluate_terms
from losswire.client.shared_memory import SharedMemoryPool
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.dataplane.shared_memory import values_read_in_place
from losswire.server.losses import LOSSES
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as shm

pytestmark = pytest.mark.skipif(not shm.supported(), reason="needs memfd shared memory and descriptor passing")

FOCAL = dict(type="FocalLoss", gamma=2.0, alpha=0.25)
ROWS = 4096  # [4096, 80] float32: 1.25 MiB, over the client's 1 MiB threshold
NOBODY = 65534
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


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


def fresh_server(port: int = 0, registry=None, **config) -> LosswireServer:
    config = {"max_workers": 4, **config}
    settings = ServerConfig(host="127.0.0.1", port=port, device=DEVICE, **config)
    instance = LosswireServer(settings) if registry is None else LosswireServer(settings, registry=registry)
    instance.start()
    return instance


def open_descriptors() -> int:
    """Descriptors open in this process (the in-process servers' included)."""
    return len(os.listdir("/proc/self/fd"))


def descriptors_on(sent: os.stat_result) -> int:
    """Descriptors open in this process (the in-process servers' included) on the file, socket or memfd
    that ``sent`` (its ``fstat``) describes."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since it was listed
            here = os.stat(f"/proc/self/fd/{name}")
            count += (here.st_dev, here.st_ino) == (sent.st_dev, sent.st_ino)
    return count


def memfd_mappings() -> set[str]:
    """The address ranges of this process's mappings of losswire segments."""
    with open("/proc/self/maps") as maps:
        return {line.split()[0] for line in maps if f"/memfd:{shm.MEMFD_NAME} " in line + " "}


def expect(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details(), caught.value.details()
    return caught.value.details()


def shm_request(region: str, offset: int = 0, byte_size: int | None = None, rows: int = 1024) -> pb.EvaluateRequest:
    """FocalLoss with pred [rows, 80] float32 in ``region`` at ``offset``, labels inline."""
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(FOCAL), gradients=["pred"])
    term.pred.dtype, term.pred.shape[:] = pb.FLOAT32, [rows, 80]
    term.pred.shm.region, term.pred.shm.offset = region, offset
    term.pred.shm.byte_size = rows * 80 * 4 if byte_size is None else byte_size
    codec.encode_value(torch.zeros(rows, dtype=torch.int64), term.target)
    return request


def filled_request(segment: shm.Segment, region: str, pred: torch.Tensor, labels: torch.Tensor, cfg=FOCAL):
    """``pred`` copied into ``segment`` at 0, labels inline, the rest of the segment as the output range."""
    segment.bytes_at(0, pred.nbytes).copy_(pred.reshape(-1).view(torch.uint8))
    request = shm_request(region, rows=pred.shape[0])
    request.terms[0].config.CopyFrom(codec.encode_config(cfg))
    codec.encode_value(labels, request.terms[0].target)
    out_offset = shm.align(pred.nbytes)
    request.output_shm.region, request.output_shm.offset = region, out_offset
    request.output_shm.byte_size = segment.size - out_offset
    return request


@pytest.fixture()
def stub(target) -> Iterator[pb_grpc.LossServiceStub]:
    with plain_channel(target) as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.fixture()
def handoff(stub) -> Iterator[Handoff]:
    with Handoff(stub) as made:
        yield made


@pytest.fixture()
def segment() -> Iterator[shm.Segment]:
    made = shm.Segment.create(1 << 20)
    yield made
    made.close()


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
    by_memory, by_wire = remote(cfg, shared, pred, target, grads), remote(cfg, wire, pred, target, grads)
    assert torch.equal(by_memory[0], by_wire[0])
    for name in grads:
        assert torch.equal(by_memory[1][name], by_wire[1][name]), name
    assert shared.shared_memory_threshold is not None  # still on: it worked
    assert server.shared_memory.regions >= 1


def test_a_call_reuses_its_segment(shared, server):
    remote(FOCAL, shared, *focal_inputs(seed=3))
    gc.collect()
    pool = shared._pool
    regions, segments = server.shared_memory.regions, pool.nbytes
    assert segments > 0 and regions > 0
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
    assert shared._pool.segment_of(pointer) is not None, "pred.grad does not lie in a shared segment"
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


def test_a_hand_made_reference_is_answered_and_the_gradient_written_where_asked(stub, handoff, segment, wire):
    pred, labels = focal_inputs(1024, seed=40)
    request = filled_request(segment, handoff.register(segment), pred, labels)
    response = stub.Evaluate(request, timeout=30)
    answer = response.results[0].gradients["pred"]
    assert answer.HasField("shm") and not answer.data and answer.shm.offset >= request.output_shm.offset
    gradient = segment.bytes_at(answer.shm.offset, answer.shm.byte_size).view(torch.float32).reshape(1024, 80)
    assert torch.equal(gradient, remote(FOCAL, wire, pred, labels)[1]["pred"])


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU's gradient is copied to the host, not into the caller's range")
def test_the_focal_kernel_writes_its_gradient_into_the_callers_range(stub, handoff, segment, wire):
    """Reduction 'none': the answer holds a loss and a gradient of pred's size. Placed after the
    compute, the loss would come first (it is encoded first); the gradient comes first because the
    kernel wrote it into the range while computing, and the answer names it where it lies."""
    pred, labels = focal_inputs(1024, seed=42)
    cfg = {**FOCAL, "reduction": "none"}
    request = filled_request(segment, handoff.register(segment), pred, labels, cfg)
    result = stub.Evaluate(request, timeout=30).results[0]
    gradient_ref, loss_ref = result.gradients["pred"].shm, result.loss.shm
    assert gradient_ref.offset == request.output_shm.offset < loss_ref.offset
    expected_loss, expected = remote(cfg, wire, pred, labels)
    gradient = segment.bytes_at(gradient_ref.offset, gradient_ref.byte_size).view(torch.float32).reshape(1024, 80)
    loss = segment.bytes_at(loss_ref.offset, loss_ref.byte_size).view(torch.float32).reshape(1024, 80)
    assert torch.equal(gradient, expected["pred"]) and torch.equal(loss, expected_loss)


def test_a_stream_may_carry_references_too(target, segment, wire):
    pred, labels = focal_inputs(1024, seed=41)
    with plain_channel(target) as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
        request = filled_request(segment, handoff.register(segment), pred, labels)
        request.ClearField("output_shm")
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


# -- hostile callers ------------------------------------------------------------------------------------


def test_a_caller_cannot_shrink_grow_or_punch_its_segment(stub, handoff, wire):
    """Once handed over, a segment cannot be cut short, grown, or have its pages freed (the old design:
    truncating a registered segment ~30 ms into a call killed the server with SIGBUS). Tried while calls
    on it run; every call is answered right, and the server keeps serving."""
    pred, labels = focal_inputs(ROWS, seed=43)
    expected = remote(FOCAL, wire, pred, labels)[1]["pred"]
    segment = shm.Segment.create(shm.segment_size(3 * pred.nbytes))
    try:
        request = filled_request(segment, handoff.register(segment), pred, labels)
        answers: list[pb.EvaluateResponse] = []
        calls = threading.Thread(target=lambda: answers.extend(stub.Evaluate(request, timeout=30) for _ in range(5)))
        calls.start()
        refused = []
        libc = ctypes.CDLL(None, use_errno=True)
        punch = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        while calls.is_alive() or not refused:
            for size in (0, 4096, segment.size // 2, 2 * segment.size):
                with pytest.raises(PermissionError):
                    os.ftruncate(segment.fd, size)
            result = libc.fallocate(segment.fd, punch, ctypes.c_long(0), ctypes.c_long(segment.size))
            refused.append((result, ctypes.get_errno()))
        calls.join()
        assert all(result == (-1, errno.EPERM) for result in refused), refused[:3]
        assert os.fstat(segment.fd).st_size == segment.size
        assert len(answers) == 5
        for response in answers:
            ref = response.results[0].gradients["pred"].shm
            gradient = segment.bytes_at(ref.offset, ref.byte_size).view(torch.float32).reshape(ROWS, 80)
            assert torch.equal(gradient, expected)
    finally:
        segment.close()
    assert torch.equal(remote(FOCAL, wire, pred, labels)[1]["pred"], expected)  # still serving


def memfd(size: int = 1 << 20, allocate: bool = True, seals: int = shm.CALLER_SEALS) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if allocate:
        os.posix_fallocate(fd, 0, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def a_socket() -> int:
    with socket.socket() as sock:
        return os.dup(sock.fileno())


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: memfd(seals=0), "not sealed with F_SEAL_SHRINK and F_SEAL_GROW"),
        (lambda: memfd(seals=shm.F_SEAL_SHRINK), "not sealed with F_SEAL_GROW"),
        (lambda: memfd(allocate=False), "sparse (0 of 1048576 bytes allocated)"),
        (lambda: memfd(size=1 << 19), "has 524288 bytes, its handoff declared 1048576"),
        (lambda: memfd(seals=shm.CALLER_SEALS | shm.F_SEAL_FUTURE_WRITE), "against writing"),
        (lambda: os.open("/proc/self/exe", os.O_RDONLY), "not a memfd that can be sealed"),
        (lambda: os.open("/proc/self/exe", os.O_PATH), "not a memfd that can be sealed"),
        (lambda: a_socket(), "not a regular file"),
    ],
    ids=["unsealed", "growable", "sparse", "smaller", "write-sealed", "a-file", "an-o-path", "a-socket"],
)
def test_an_unsealed_growable_or_sparse_memfd_is_refused(server, handoff, shared, make, words):
    """Anything but a sealed, fully allocated memfd of the declared size is refused at the handoff, with
    INVALID_ARGUMENT naming what is missing; nothing is kept (the descriptor is closed at once), and the
    server keeps serving."""
    fd = make()
    sent, pending = os.fstat(fd), server.shared_memory.pending
    try:
        socket.send_fds(handoff.link.sock, [shm.handoff_frame(1 << 20)], [fd])
        status, message = shm.read_answer(handoff.link.sock)
    finally:
        os.close(fd)
    assert status == INVALID_ARGUMENT, message
    assert words in message, message
    assert server.shared_memory.pending == pending
    # the server's copy is closed (ours too, now); counted by what it is, not by how many descriptors this
    # process holds, which another test's channel reconnecting meanwhile can change
    assert eventually(lambda: descriptors_on(sent) == 0), descriptors_on(sent)
    pred, labels = focal_inputs(seed=44)
    assert remote(FOCAL, shared, pred, labels)[0].isfinite()  # the server serves on, by shared memory too
    assert handoff.register(shm.Segment.create(1 << 20))  # and this connection takes good segments


def test_a_registration_refused_for_its_byte_size_leaves_the_claim_to_register_again(server, segment):
    """The memory a claim stands for is sealed once handed over and can never be handed over again: a
    registration with the wrong byte_size is refused (INVALID_ARGUMENT naming it) and leaves the claim
    pending, so the caller registers it corrected (it was used up, the memory lost to the caller)."""
    with plain_channel(f"127.0.0.1:{server.port}") as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
        claim = handoff.claim(segment)
        wrong = pb.RegisterSharedMemoryRequest(claim=claim, byte_size=segment.size - 1)
        said = expect(lambda: handoff.stub.RegisterSharedMemory(wrong, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
        assert f"byte_size must be the segment's {segment.size} bytes" in said
        right = pb.RegisterSharedMemoryRequest(claim=claim, byte_size=segment.size)
        region = handoff.stub.RegisterSharedMemory(right, timeout=30).region
        assert region in server.shared_memory
        again = expect(lambda: handoff.stub.RegisterSharedMemory(right, timeout=30), grpc.StatusCode.NOT_FOUND)
        assert "a claim registers once" in again
    assert eventually(lambda: region not in server.shared_memory)


def test_a_handoff_declaring_no_bytes_is_refused_saying_so(server, handoff):
    fd = memfd(size=0, allocate=False)
    try:
        socket.send_fds(handoff.link.sock, [shm.handoff_frame(0)], [fd])
        status, message = shm.read_answer(handoff.link.sock)
    finally:
        os.close(fd)
    assert status == INVALID_ARGUMENT and "the handoff declared 0 bytes: a segment must hold at least one" in message


@pytest.mark.parametrize("declared", [2**63 - 1, 2**40], ids=["int64-max", "a-terabyte"])
def test_a_handoff_declaring_more_than_its_segment_holds_is_refused_as_the_caller_s_mistake(server, handoff, declared):
    """A declared size beyond the server's room is not the server being full (RESOURCE_EXHAUSTED, which a
    client waits out) when the descriptor holds less: INVALID_ARGUMENT naming both sizes."""
    fd = memfd()
    try:
        socket.send_fds(handoff.link.sock, [shm.handoff_frame(declared)], [fd])
        status, message = shm.read_answer(handoff.link.sock)
    finally:
        os.close(fd)
    assert status == INVALID_ARGUMENT, message
    assert f"has {1 << 20} bytes, its handoff declared {declared}" in message


def test_a_region_answers_only_the_connection_that_registered_it(target, server, segment, caplog):
    """A handle read from a log, or guessed, used from another gRPC connection is NOT_FOUND, word for word
    as a handle that does not exist; it reads nothing and writes nothing there. Handles and claims never
    appear in the server's log."""
    pred, labels = focal_inputs(1024, seed=45)
    caplog.set_level(logging.DEBUG, logger="losswire.server")
    # channels of one process with the same settings share one TCP connection (gRPC's global subchannel
    # pool): a connection of its own, as another process has
    own_connection = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    with plain_channel(target) as first, grpc.insecure_channel(target, options=own_connection) as second:
        owner, other = pb_grpc.LossServiceStub(first), pb_grpc.LossServiceStub(second)
        with Handoff(owner) as handoff:
            claim = handoff.claim(segment)
            registration = pb.RegisterSharedMemoryRequest(claim=claim, byte_size=segment.size)
            region = owner.RegisterSharedMemory(registration, timeout=30).region
            request = filled_request(segment, region, pred, labels)
            sentinel = bytes(range(256)) * 16
            watched = segment.bytes_at(request.output_shm.offset, len(sentinel))
            watched.copy_(torch.frombuffer(bytearray(sentinel), dtype=torch.uint8))
            stranger = expect(lambda: other.Evaluate(request, timeout=30), grpc.StatusCode.NOT_FOUND)
            unknown = expect(lambda: other.Evaluate(shm_request("0" * 32), timeout=30), grpc.StatusCode.NOT_FOUND)
            assert stranger == unknown  # nothing tells another caller's region from no region
            unregister = pb.UnregisterSharedMemoryRequest(region=region)
            expect(lambda: other.UnregisterSharedMemory(unregister, timeout=30), grpc.StatusCode.NOT_FOUND)
            # nothing was written into the owner's output range, and the owner's region is still there
            assert segment.bytes_at(request.output_shm.offset, len(sentinel)).numpy().tobytes() == sentinel
            assert owner.Evaluate(request, timeout=30).results[0].gradients["pred"].HasField("shm")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert region not in logged and claim not in logged


def test_a_region_answers_only_the_token_that_registered_it(segment):
    """With tokens on, another token on the very same connection naming the handle is NOT_FOUND."""
    instance = fresh_server(auth_tokens=("token-a-0123456789", "token-b-0123456789"))
    a, b = [("authorization", "Bearer token-a-0123456789")], [("authorization", "Bearer token-b-0123456789")]
    try:
        with plain_channel(f"127.0.0.1:{instance.port}") as channel:
            stub = pb_grpc.LossServiceStub(channel)
            with Handoff(stub, metadata=a) as handoff:
                region = handoff.register(segment)
                request = filled_request(segment, region, *focal_inputs(1024, seed=46))
                expect(lambda: stub.Evaluate(request, timeout=30, metadata=b), grpc.StatusCode.NOT_FOUND, "region")
                unregister = pb.UnregisterSharedMemoryRequest(region=region)
                expect(
                    lambda: stub.UnregisterSharedMemory(unregister, timeout=30, metadata=b), grpc.StatusCode.NOT_FOUND
                )
                assert stub.Evaluate(request, timeout=30, metadata=a).results[0].loss.dtype == pb.FLOAT32
                stub.UnregisterSharedMemory(unregister, timeout=30, metadata=a)
                assert instance.shared_memory.regions == 0
    finally:
        instance.stop(grace=1)


def _as_nobody(address: str, write: int) -> None:  # pragma: no cover - runs in a forked child
    """In a child running as nobody: connect to ``address`` and report the server's greeting; push a memfd
    at the server anyway (a caller that ignores the refusal); then try as the client does (``Link``, which
    also refuses a socket of another user's)."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    report = [f"uid {os.getuid()}"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(shm.socket_address(address))
        status, message = shm.read_answer(sock)
        report += [str(status), message]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(shm.socket_address(address))
            fd = os.memfd_create("theirs", os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, 1 << 20)
            socket.send_fds(sock, [shm.handoff_frame(1 << 20)], [fd])
            time.sleep(0.2)
        except OSError as error:
            report.append(f"push: {error.strerror}")
    try:
        shm.Link(address, 0).close()  # refused at the greeting, before any connection key
        report.append("link accepted")
    except shm.HandoffRefusedError as refused:
        report.append(f"link {refused.status}")
    os.write(write, "|".join(report).encode())


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_another_user_is_refused_and_nothing_is_kept(server, stub):
    """A caller running as another user (nobody, here) gets PERMISSION_DENIED naming both uids before it
    can send anything; one that sends a descriptor anyway leaves nothing in the server (its descriptor
    count does not grow). The old design answered INTERNAL, leaked a descriptor per try and pinned the
    memory until the server stopped."""
    address = stub.SharedMemoryEndpoint(pb.SharedMemoryEndpointRequest(), timeout=30).address
    before, connections = open_descriptors(), server.shared_memory.connections
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            _as_nobody(address, write)
        finally:
            os._exit(0)
    os.close(write)
    report = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(child, 0)
    uid, status, message = report.split("|")[:3]
    assert uid == f"uid {NOBODY}"
    assert status == str(PERMISSION_DENIED), report
    assert f"uid {NOBODY}" in message and f"uid {os.geteuid()}" in message, message
    assert report.endswith(f"link {PERMISSION_DENIED}"), report  # the client refuses another user's socket too
    assert eventually(lambda: open_descriptors() == before), (before, open_descriptors())
    assert server.shared_memory.connections == connections and server.shared_memory.pending == 0


def test_registrations_are_bounded_per_caller_and_descriptors_too():
    """Beyond --max-shared-memory-regions a caller's registration is RESOURCE_EXHAUSTED naming the setting.
    One memfd handed over again and again (the old design: one file registered 507 times under hard-link
    names exhausted the server's descriptors) is refused after its first adoption (the server sealed it);
    handoffs waiting per connection and connections are bounded; and a region holds a mapping, not a
    descriptor: the server's descriptors stay bounded whatever a caller sends."""
    instance = fresh_server(max_shared_memory_regions=4, max_shared_memory_connections=6)
    try:
        with plain_channel(f"127.0.0.1:{instance.port}") as channel:
            stub = pb_grpc.LossServiceStub(channel)
            stub.ListLosses(pb.ListLossesRequest(), timeout=30)  # the gRPC connection is open, both its ends
            before = open_descriptors()
            with Handoff(stub) as handoff:
                segments = [shm.Segment.create(1 << 20) for _ in range(5)]
                regions = [handoff.register(segment) for segment in segments[:4]]
                assert len(set(regions)) == 4 and instance.shared_memory.regions == 4
                details = expect(lambda: handoff.register(segments[4]), grpc.StatusCode.RESOURCE_EXHAUSTED)
                assert "--max-shared-memory-regions" in details, details
                # one memfd, handed over 500 times more: each refused, nothing kept
                again = []
                for _ in range(500):
                    with pytest.raises(shm.HandoffRefusedError) as refused:
                        handoff.claim(segments[0])
                    again.append(refused.value.status)
                assert set(again) == {INVALID_ARGUMENT}
                # fresh memfds, handed over and never registered: refused beyond a few waiting per connection
                answers = []
                for _ in range(40):
                    fresh = shm.Segment.create(1 << 20)
                    try:
                        answers.append(handoff.claim(fresh))
                    except shm.HandoffRefusedError as refused:
                        answers.append(refused.status)
                    fresh.close()
                assert answers.count(RESOURCE_EXHAUSTED) >= 30, answers[:12]
                assert "--max-shared-memory-connections" in connect_beyond(stub, instance, 10)
                assert instance.shared_memory.connections == 6
                # each connection costs two descriptors here (both its ends live in this process), each of our
                # segments one (ours); the server's regions and refused handoffs none
                assert open_descriptors() <= before + 2 * 6 + len(segments) + 2, (before, open_descriptors())
                for segment in segments:
                    segment.close()
                for link in LINKS:
                    link.close()
                LINKS.clear()
            # a closed connection leaves the count first, then its regions and pending handoffs are dropped
            assert eventually(lambda: instance.shared_memory.connections == 0)
            assert eventually(lambda: instance.shared_memory.regions == 0 and instance.shared_memory.pending == 0)
            assert eventually(lambda: open_descriptors() <= before)
    finally:
        instance.stop(grace=1)


LINKS: list[Handoff] = []


def connect_beyond(stub, instance: LosswireServer, tries: int) -> str:
    """Connect ``tries`` times (kept in LINKS); the refusal's message once the server refuses."""
    message = ""
    for _ in range(tries):
        try:
            LINKS.append(Handoff(stub))
        except shm.HandoffRefusedError as refused:
            assert refused.status == RESOURCE_EXHAUSTED
            message = refused.message
    return message


def test_bytes_are_bounded_per_caller_and_in_all():
    for config, flag, where in (
        ({"max_shared_memory_per_caller": 1 << 19}, "--max-shared-memory-per-caller", "register"),
        ({"max_shared_memory": 1 << 19}, "--max-shared-memory", "handoff"),
    ):
        instance, segment = fresh_server(**config), shm.Segment.create(1 << 20)
        try:
            with plain_channel(f"127.0.0.1:{instance.port}") as channel, Handoff(pb_grpc.LossServiceStub(channel)) as h:
                if where == "register":
                    expect(lambda h=h, s=segment: h.register(s), grpc.StatusCode.RESOURCE_EXHAUSTED, flag)
                else:
                    with pytest.raises(shm.HandoffRefusedError) as refused:
                        h.claim(segment)
                    assert refused.value.status == RESOURCE_EXHAUSTED and flag in refused.value.message
        finally:
            segment.close()
            instance.stop(grace=1)


def test_a_region_unregistered_while_a_call_reads_it_counts_until_the_call_ends():
    """A region unregistered while an open EvaluateStream's header reads it stays mapped until that call ends:
    it keeps counting against the caller's bytes meanwhile. (It left the counts at once: a caller with a
    1 MiB share kept 12 MiB mapped by unregistering under twelve open streams.)"""
    instance, segments = (
        fresh_server(max_shared_memory_per_caller=1 << 20),
        [shm.Segment.create(1 << 20) for _ in "abc"],
    )
    try:
        with plain_channel(f"127.0.0.1:{instance.port}") as channel, Handoff(pb_grpc.LossServiceStub(channel)) as h:
            region = h.register(segments[0])
            rows = (1 << 20) // 328  # pred [rows, 80] and the labels in the segment (copied out: budget taken)
            header = shm_request(region, rows=rows)
            labels = header.terms[0].target.tensor
            labels.ClearField("data")
            labels.shm.region, labels.shm.offset, labels.shm.byte_size = region, shm.align(rows * 320), rows * 8
            weight = header.terms[0].weight  # to come in chunks: never sent, so the call stays open
            weight.dtype, weight.shape[:] = pb.FLOAT32, [rows]
            held = HeldOpen(channel, [pb.EvaluateChunk(request=header)])  # the region's caller: its connection
            assert eventually(lambda: instance.dataplane.budget.held > 0, 10)  # the header read: labels copied
            h.stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(region=region), timeout=10)
            assert instance.shared_memory.still_viewed == 1 and instance.shared_memory.mapped_bytes == 1 << 20
            details = expect(lambda: h.register(segments[1]), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "(1 of them unregistered, still read by calls in flight)" in details, details
            held.close()
            assert eventually(lambda: gc.collect() >= 0 and instance.shared_memory.still_viewed == 0, 10)
            assert h.register(segments[2])  # the call's end let it go (a refused segment is sealed: another one)
    finally:
        for segment in segments:
            segment.close()
        instance.stop(grace=1)


def test_one_token_leaves_other_tokens_shared_memory_whatever_connections_it_opens():
    """Tokens on, 4 regions on the server: token a registers over two gRPC connections (each a caller of
    its own, with its own per-caller bounds) and its fourth handoff is refused, naming the token's share
    (all but a quarter); token b's region is then registered. (Token a took all four, and b was refused.)"""
    tokens = ("token-a-0123456789", "token-b-0123456789")
    as_a, as_b = ((("authorization", f"Bearer {token}"),) for token in tokens)
    instance = fresh_server(auth_tokens=tokens, max_shared_memory_total_regions=4)
    segments = [shm.Segment.create(1 << 20) for _ in range(5)]
    target = f"127.0.0.1:{instance.port}"
    options = [("grpc.use_local_subchannel_pool", 1)]  # each channel a connection of its own
    try:
        with (
            grpc.insecure_channel(target, options=options) as first,
            grpc.insecure_channel(target, options=options) as second,
            Handoff(pb_grpc.LossServiceStub(first), as_a) as over_first,
            Handoff(pb_grpc.LossServiceStub(second), as_a) as over_second,
            Handoff(pb_grpc.LossServiceStub(first), as_b) as for_b,
        ):
            for handoff, segment in zip((over_first, over_first, over_second), segments, strict=False):
                handoff.register(segment)
            flag = "all but a quarter of losswire serve --max-shared-memory-total-regions"
            with pytest.raises(shm.HandoffRefusedError) as refused:
                over_second.claim(segments[3])
            assert refused.value.status == RESOURCE_EXHAUSTED, refused.value.message
            assert "this token holds 3" in refused.value.message and flag in refused.value.message
            assert for_b.register(segments[4])
            assert instance.shared_memory.regions == 4
    finally:
        for segment in segments:
            segment.close()
        instance.stop(grace=1)


@pytest.fixture(scope="module")
def gated_server() -> Iterator[tuple[LosswireServer, object]]:
    faults, registry = load_fault_losses()
    instance = fresh_server(registry=registry)
    yield instance, faults
    instance.stop(grace=1)


def test_a_call_past_its_deadline_retires_its_segment_and_nothing_is_written_late(gated_server, segment):
    """A shared-memory call whose deadline passes while the server computes (a gated loss holds it) ends
    for the caller; the server places nothing into its memory afterwards, and the client never lends
    that segment again (the old design lent it to the next call while the server could still write
    there: up to 58 MB written after the call had ended)."""
    server, faults = gated_server
    target = f"127.0.0.1:{server.port}"
    client = LossClient(target, timeout=60, shared_memory="on")
    pred = torch.randn(512, 1024)  # 2 MiB
    try:
        remote(dict(type="L1Loss"), client, pred, pred + 1)  # the pool now holds one idle segment
        pool = client._pool
        (first,) = pool.regions
        gate = f"shm-{os.getpid()}-{time.monotonic_ns()}"
        gated = RemoteLoss(dict(type="GatedL1Loss", gate=gate, reduction="none"), client=client, timeout=1.0)
        p = pred.clone().requires_grad_()
        with pytest.raises(RemoteLossError) as caught:
            gated(p, pred + 1)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert first not in pool.regions  # retired: never lent again
        assert eventually(lambda: first not in server.shared_memory, 5)  # and unregistered
        # by hand: a gated call with its output range in our segment, past its deadline
        with plain_channel(target) as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
            cfg = {"type": "GatedL1Loss", "gate": gate, "reduction": "none"}
            request = filled_request(segment, handoff.register(segment), *focal_inputs(1024, seed=47), cfg)
            request.terms[0].ClearField("target")
            codec.encode_value(torch.zeros(1024, 80), request.terms[0].target)
            out = segment.bytes_at(request.output_shm.offset, request.output_shm.byte_size)
            out.fill_(0xAB)
            expect(lambda: handoff.stub.Evaluate(request, timeout=1.0), grpc.StatusCode.DEADLINE_EXCEEDED)
            faults.wait_started(gate, 2)
            faults.open_gate(gate)  # both calls compute on now, for callers that are gone
            assert eventually(lambda: server.dataplane.slots.in_use == 0, 30)
            assert bool((out == 0xAB).all()), "the server wrote into a caller's memory after its call ended"
        # the next call gets a fresh segment and its own right answer
        _, grads = remote(dict(type="L1Loss", reduction="none"), client, pred, pred + 1)
        assert first not in pool.regions and len(pool.regions) >= 1
        assert torch.equal(grads["pred"], torch.full_like(pred, -1.0))
    finally:
        client.close()


def test_a_call_past_its_deadline_keeps_nothing_of_the_segment_once_unregistered(gated_server):
    """A call whose caller's deadline passed while it computed stops at its next stage; that stop's error,
    like a refusal's, held the call's views of the segment through its traceback until a cycle collection:
    2 segments of 128 MiB stayed mapped after a run of short-deadline calls, every caller gone. The
    collector is off here, so only letting go of them when the call stops passes."""
    server, faults = gated_server
    gate = f"shm-late-{os.getpid()}-{time.monotonic_ns()}"
    before = memfd_mappings()
    segment = shm.Segment.create(1 << 20)
    ours = memfd_mappings() - before
    collecting = gc.isenabled()
    try:
        with plain_channel(f"127.0.0.1:{server.port}") as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
            region = handoff.register(segment)
            servers = memfd_mappings() - before - ours
            cfg = {"type": "GatedL1Loss", "gate": gate, "reduction": "none"}
            request = filled_request(segment, region, *focal_inputs(1024, seed=51), cfg)
            request.terms[0].ClearField("target")
            codec.encode_value(torch.zeros(1024, 80), request.terms[0].target)
            gc.disable()
            expect(lambda: handoff.stub.Evaluate(request, timeout=1.0), grpc.StatusCode.DEADLINE_EXCEEDED)
            faults.wait_started(gate, 1)
            faults.open_gate(gate)  # it computes on, for a caller that is gone, and stops
            assert eventually(lambda: server.dataplane.slots.in_use == 0, 30)
            handoff.stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(region=region), timeout=30)
        segment.close()
        assert eventually(lambda: not memfd_mappings() & servers, 5), "the server still maps the segment"
    finally:
        faults.open_gate(gate)
        if collecting:
            gc.enable()


def _rewritten_while_gated(server, faults, loss: str, pred: Tensor, goal: Tensor) -> tuple[int, Tensor]:
    """A ``loss`` (a gated L1) call on pred and target in a new segment: while the gate holds it in its
    forward, the caller adds 1 to pred and subtracts 2 from the target there. (Budget held then, loss.)"""
    segment = shm.Segment.create(1 << 20)
    try:
        return _rewrite(server, faults, segment, loss, pred, goal)
    finally:
        segment.close()


def _rewrite(server, faults, segment, loss: str, pred: Tensor, goal: Tensor) -> tuple[int, Tensor]:
    goal_at = shm.align(pred.nbytes)
    segment.bytes_at(0, pred.nbytes).copy_(pred.reshape(-1).view(torch.uint8))
    segment.bytes_at(goal_at, goal.nbytes).copy_(goal.reshape(-1).view(torch.uint8))
    gate = f"rewrite-{os.getpid()}-{time.monotonic_ns()}"
    with plain_channel(f"127.0.0.1:{server.port}") as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
        region = handoff.register(segment)
        request = pb.EvaluateRequest()
        term = request.terms.add(config=codec.encode_config({"type": loss, "gate": gate}))
        for tensor, at in ((term.pred, 0), (term.target.tensor, goal_at)):
            tensor.dtype, tensor.shape[:] = pb.FLOAT32, list(pred.shape)
            tensor.shm.region, tensor.shm.offset, tensor.shm.byte_size = region, at, pred.nbytes
        answer = handoff.stub.Evaluate.future(request, timeout=30)
        faults.wait_started(gate, 1)
        held = server.dataplane.budget.held
        segment.bytes_at(0, pred.nbytes).view(torch.float32).add_(1.0)
        segment.bytes_at(goal_at, goal.nbytes).view(torch.float32).sub_(2.0)
        faults.open_gate(gate)
        return held, codec.decode_tensor(answer.result().results[0].loss, "loss")


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU server copies every input to the device: nothing is read in place")
def test_a_call_computes_on_the_target_it_was_checked_with_whatever_the_caller_writes_later(gated_server):
    """The caller rewrites its pred and target in its segment while the loss runs. pred is read in
    place: its rewrite reaches the loss. A target is copied out before the checks, so a label written
    after the check can never reach a kernel (an out-of-range index would fail inside the loss and be
    answered as the server's own fault), unless the loss declares it read only as values
    (``value_inputs``): then it is read in place too, and its rewrite changes only this caller's
    numbers. The copy is held in the budget while the call runs (the two losses' working memory is
    the same), and nothing is held once the calls are over."""
    server, faults = gated_server
    pred, goal = torch.randn(256, 80), torch.randn(256, 80)
    held_copied, copied = _rewritten_while_gated(server, faults, "GatedL1Loss", pred, goal)
    held_in_place, in_place = _rewritten_while_gated(server, faults, "GatedValuesL1Loss", pred, goal)
    assert torch.equal(copied, ((pred + 1.0) - goal).abs().mean())
    assert torch.equal(in_place, ((pred + 1.0) - (goal - 2.0)).abs().mean())
    assert held_copied - held_in_place == goal.nbytes
    assert eventually(lambda: server.dataplane.budget.held == 0)


def test_a_copy_that_does_not_fit_the_memory_budget_is_refused_naming_the_input(segment):
    """The copies of a call's shared-memory inputs come out of the memory budget like a stream's buffers:
    one larger than the whole budget is refused naming its input, before the loss is looked at. (A
    FocalLoss target, soft labels here, is copied: FocalLoss reads only pred as plain values.)"""
    instance = fresh_server(memory_budget=256 << 10)
    try:
        with (
            plain_channel(f"127.0.0.1:{instance.port}") as channel,
            Handoff(pb_grpc.LossServiceStub(channel)) as handoff,
        ):
            region = handoff.register(segment)
            for rows, code in ((16, grpc.StatusCode.OK), (1024, grpc.StatusCode.RESOURCE_EXHAUSTED)):
                request = pb.EvaluateRequest()  # [rows, 80] float32 pred and soft target: the same zero bytes
                term = request.terms.add(config=codec.encode_config({"type": "FocalLoss", "reduction": "sum"}))
                for tensor in (term.pred, term.target.tensor):
                    tensor.dtype, tensor.shape[:] = pb.FLOAT32, [rows, 80]
                    tensor.shm.region, tensor.shm.offset, tensor.shm.byte_size = region, 0, rows * 80 * 4
                if code == grpc.StatusCode.OK:
                    assert handoff.stub.Evaluate(request, timeout=30).results[0].HasField("loss")
                else:  # 320 KiB of target to copy, 256 KiB of budget
                    words = ("the copy of terms[0].target needs about 327680 bytes", "--memory-budget")
                    expect(functools.partial(handoff.stub.Evaluate, request, timeout=30), code, *words)
            assert instance.dataplane.budget.held == 0
    finally:
        instance.stop(grace=1)


def test_the_inputs_read_in_place_are_those_each_term_s_loss_reads_only_as_values():
    """By the field that carries each: target and weight, or ``inputs[name]``; pred and the upstream
    gradients of every term; nothing more for a term with a sampler (it draws from the target's labels)
    or one whose loss the server does not know (decoding it refuses it)."""
    request = pb.EvaluateRequest()
    request.terms.add(config=codec.encode_config({"type": "GIoULoss"}))
    request.terms.add(config=codec.encode_config({"type": "KnowledgeDistillationKLDivLoss"}))
    request.terms.add(config=codec.encode_config({"type": "FocalLoss"})).grad_outputs["loss"].dtype = pb.FLOAT32
    request.terms.add(config=codec.encode_config({"type": "L1Loss", "sampler": {"type": "PseudoSampler"}}))
    request.terms.add(config=codec.encode_config({"type": "NoSuchLoss"}))
    paths = values_read_in_place(request.terms, LOSSES)
    always = {f"terms[{i}].{field}" for i in range(5) for field in ("pred", "grad_output")}
    assert paths == always | {
        "terms[0].target",
        "terms[0].weight",
        "terms[0].inputs[target]",
        "terms[0].inputs[weight]",
        "terms[1].target",
        "terms[1].weight",
        "terms[1].inputs[soft_label]",
        "terms[1].inputs[weight]",
        "terms[2].grad_outputs[loss]",
    }


def test_a_box_loss_reads_its_target_and_weight_in_place_and_its_answer_is_the_inline_one(server, segment):
    """GIoULoss declares pred, target and weight read only as values, so all three are read in place
    (its fused kernel included): its loss and gradient are bit for bit those of the same call sent
    inline."""
    pred, goal = torch.rand(512, 4) * 10, torch.rand(512, 4) * 10
    pred[:, 2:] += pred[:, :2]
    goal[:, 2:] += goal[:, :2]
    weight = torch.rand(512)
    offsets = [0, shm.align(pred.nbytes), shm.align(pred.nbytes) + shm.align(goal.nbytes)]
    for tensor, at in zip((pred, goal, weight), offsets, strict=True):
        segment.bytes_at(at, tensor.nbytes).copy_(tensor.reshape(-1).view(torch.uint8))
    config = codec.encode_config({"type": "GIoULoss", "reduction": "sum"})
    with plain_channel(f"127.0.0.1:{server.port}") as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
        region = handoff.register(segment)
        shared, inline = pb.EvaluateRequest(), pb.EvaluateRequest()
        for request in (shared, inline):
            term = request.terms.add(config=config)
            term.gradients.append("pred")
            slots = (term.pred, term.target.tensor, term.weight)
            for slot, tensor, at in zip(slots, (pred, goal, weight), offsets, strict=True):
                if request is shared:
                    slot.dtype, slot.shape[:] = pb.FLOAT32, list(tensor.shape)
                    slot.shm.region, slot.shm.offset, slot.shm.byte_size = region, at, tensor.nbytes
                else:
                    codec.encode_tensor(tensor, slot)
        got, want = (handoff.stub.Evaluate(r, timeout=30).results[0] for r in (shared, inline))
    assert torch.equal(codec.decode_tensor(got.loss, "loss"), codec.decode_tensor(want.loss, "loss"))
    grads = [codec.decode_tensor(r.gradients["pred"], "grad") for r in (got, want)]
    assert torch.equal(*grads)
    # the handoff connection closed: its region goes (the next tests count the shared server's mappings)
    assert eventually(lambda: region not in server.shared_memory)


# -- either side going away ---------------------------------------------------------------------------

CALLER = textwrap.dedent(
    """
    import sys, time, torch
    from losswire.client import LossClient, RemoteLoss
    client = LossClient(sys.argv[1], timeout=60, shared_memory="on")
    pred = torch.randn(4096, 80, requires_grad=True)
    RemoteLoss(dict(type="FocalLoss"), client=client)(pred, torch.randint(0, 81, (4096,))).backward()
    print(",".join(client._pool.regions), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_caller_that_dies_has_its_regions_dropped_and_its_memory_freed(server, target):
    """SIGKILL: the caller's connection to the handoff socket closes with its process, and the server drops
    its regions at once (the old design polled a lock every 2 s, ~1 region freed per 2 s) and unmaps them."""
    mapped_before, bytes_before = memfd_mappings(), server.shared_memory.mapped_bytes
    caller = subprocess.Popen([sys.executable, "-c", CALLER, target], stdout=subprocess.PIPE, text=True)
    try:
        regions = caller.stdout.readline().strip().split(",")
        assert regions and all(region in server.shared_memory for region in regions)
        assert memfd_mappings() - mapped_before  # the server maps the caller's segment
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait(30)
    killed = time.monotonic()
    assert eventually(lambda: not any(region in server.shared_memory for region in regions), 2.0)
    dropped = time.monotonic() - killed
    assert eventually(lambda: not (memfd_mappings() - mapped_before), 2.0), "the caller's memory is still mapped"
    assert server.shared_memory.mapped_bytes == bytes_before
    assert dropped < 2.0


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
            # the client's region is unknown there: NOT_FOUND, a new connection and handoff, the call again
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
    regions = client._pool.regions
    assert regions and all(region in server.shared_memory for region in regions)
    client.close()
    assert not any(region in server.shared_memory for region in regions)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda request: codec.encode_value(torch.full((1024,), 999), request.terms[0].target),
        lambda request: request.terms[0].config.CopyFrom(codec.encode_config({"type": "NoSuchLoss"})),
    ],
    ids=["labels-out-of-range", "unknown-loss"],
)
def test_a_refused_call_keeps_nothing_of_the_segment_once_unregistered(stub, handoff, spoil):
    """A refused call's error held its tensors (views of the caller's segment) through its traceback's
    reference cycle, which only the cycle collector freed: segments stayed mapped after their caller had
    unregistered them, outside every shared-memory bound. The collector is off here, so only letting go
    of them when the call ends passes."""
    before = memfd_mappings()
    segment = shm.Segment.create(1 << 20)
    ours = memfd_mappings() - before
    region = handoff.register(segment)
    servers = memfd_mappings() - before - ours
    assert servers, "the server does not map the segment"
    pred, labels = focal_inputs(1024, seed=50)
    request = filled_request(segment, region, pred, labels)
    spoil(request)
    collecting = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Evaluate(request, timeout=30)
        assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(region=region), timeout=30)
        segment.close()
        assert eventually(lambda: not memfd_mappings() & servers, 5), "the server still maps the segment"
    finally:
        if collecting:
            gc.enable()


def test_no_named_segment_is_ever_created(target, handoff):
    """Nothing of losswire's appears under /dev/shm, not even for a moment (watched with inotify while a
    client call, a handoff by hand and a pool's first lease run): segments are memfds, in no file system."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert watch >= 0
    try:
        assert libc.inotify_add_watch(watch, b"/dev/shm", 0x100 | 0x80) >= 0  # IN_CREATE | IN_MOVED_TO
        client = LossClient(target, timeout=60, shared_memory="on")  # a new pool: its first lease too
        try:
            remote(FOCAL, client, *focal_inputs(seed=48))
        finally:
            client.close()
        handoff.register(shm.Segment.create(1 << 20))
        names = []
        with contextlib.suppress(BlockingIOError):
            data = os.read(watch, 1 << 16)
            while data:
                _, _, _, length = struct.unpack("iIII", data[:16])
                names.append(data[16 : 16 + length].rstrip(b"\0").decode())
                data = data[16 + length :]
    finally:
        os.close(watch)
    assert not [name for name in names if name.startswith("losswire")], names
    assert not [name for name in os.listdir("/dev/shm") if name.startswith("losswire")]


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
            method = evaluate_stream(channel)
            big = threading.Thread(target=lambda: answers.extend(method(held_open(), timeout=60)))
            big.start()
            assert eventually(lambda: server.dataplane.slots.in_use >= 1, 30)
            # by hand: refused at once, busy
            segment = shm.Segment.create(1 << 22)
            try:
                with Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
                    request = shm_request(handoff.register(segment))
                    request.output_shm.region, request.output_shm.offset = request.terms[0].pred.shm.region, 2 << 20
                    request.output_shm.byte_size = 1 << 20
                    with pytest.raises(grpc.RpcError) as caught:
                        handoff.stub.Evaluate(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-stream-calls" in caught.value.details()
                assert ("grpc-retry-pushback-ms", "-1") not in tuple(caught.value.trailing_metadata() or ())
            finally:
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


def test_bad_registrations_are_refused_with_the_field(stub, handoff, segment):
    register = stub.RegisterSharedMemory
    unknown = pb.RegisterSharedMemoryRequest(claim="0" * 32, byte_size=segment.size)
    assert field_of_call(lambda: register(unknown, timeout=30), grpc.StatusCode.NOT_FOUND, "claim") == "claim"
    claim = handoff.claim(segment)
    wrong = pb.RegisterSharedMemoryRequest(claim=claim, byte_size=segment.size + 1)
    assert (
        field_of_call(lambda: register(wrong, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "1048576") == "byte_size"
    )
    # the claim stays pending for a corrected registration (test_a_registration_refused_for_its_byte_size...)


def field_of_call(call, code: grpc.StatusCode, *words: str) -> str | None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details(), caught.value.details()
    return field_of(caught.value)


def test_shared_memory_is_refused_when_off(segment):
    instance = fresh_server(shared_memory=False)
    try:
        with plain_channel(f"127.0.0.1:{instance.port}") as channel:
            stub = pb_grpc.LossServiceStub(channel)
            request = pb.SharedMemoryEndpointRequest()
            expect(lambda: stub.SharedMemoryEndpoint(request, timeout=30), grpc.StatusCode.FAILED_PRECONDITION, "on")
            registration = pb.RegisterSharedMemoryRequest(claim="0" * 32, byte_size=1 << 20)
            expect(lambda: stub.RegisterSharedMemory(registration, timeout=30), grpc.StatusCode.FAILED_PRECONDITION)
    finally:
        instance.stop(grace=1)


def test_unregistering_an_unknown_region_is_not_found(stub):
    request = pb.UnregisterSharedMemoryRequest(region="f" * 32)
    expect(lambda: stub.UnregisterSharedMemory(request, timeout=30), grpc.StatusCode.NOT_FOUND, "no shared-memory")


@pytest.mark.parametrize(
    "make, code, field",
    [
        (lambda r: shm_request("0" * 32), grpc.StatusCode.NOT_FOUND, "terms[0].pred.shm.region"),
        (lambda r: shm_request(r, offset=1 << 20), grpc.StatusCode.INVALID_ARGUMENT, "terms[0].pred.shm.byte_size"),
        (lambda r: shm_request(r, byte_size=100), grpc.StatusCode.INVALID_ARGUMENT, "terms[0].pred.shm.byte_size"),
        (lambda r: shm_request(r, offset=66), grpc.StatusCode.INVALID_ARGUMENT, "terms[0].pred.shm.offset"),
    ],
    ids=["unknown-region", "past-the-end", "wrong-byte-size", "misaligned"],
)
def test_bad_references_name_the_field(stub, handoff, segment, make, code, field):
    region = handoff.register(segment)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(make(region), timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert field_of(caught.value) == field


def test_data_and_a_reference_together_are_refused(stub, handoff, segment):
    request = shm_request(handoff.register(segment))
    request.terms[0].pred.data = b"\0" * (1024 * 80 * 4)
    expect(lambda: stub.Evaluate(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "both data and shm")


# -- the caller's side ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nbytes, size",
    [(1, 1 << 20), (1 << 20, 1 << 20), ((1 << 20) + 1, 5 << 18), (3 << 20, 3 << 20), (9 << 20, 10 << 20)],
)
def test_segment_sizes_round_up_to_a_size_class(nbytes, size):
    assert shm.segment_size(nbytes) == size


def test_a_forked_child_starts_afresh(server, stub):
    """A pool used in a forked child (a DataLoader worker, say) would share the parent's pages and its
    connection: the child starts afresh instead, with its own connection (so the parent's death is still
    noticed while the child lives) and its own segments. Registration stands in for the RPC (gRPC is not
    used across a fork); the handoffs are real."""
    answers = [stub.SharedMemoryEndpoint(pb.SharedMemoryEndpointRequest(), timeout=30) for _ in range(2)]
    connection_keys = [
        (answer.address, answer.connection_key) for answer in answers
    ]  # the parent's, then the child's copy's
    pool = SharedMemoryPool(lambda: connection_keys.pop(0), lambda claim, size: claim, lambda region, wait: None)
    lease = pool.lease(1 << 20)
    parents, parent_address = lease.region, lease.segment.array.ctypes.data
    lease.done()  # idle in the parent
    connections = server.shared_memory.connections
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            fresh = pool._link is None and not pool.regions
            other = pool.lease(1 << 20)
            os.write(write, f"{fresh}|{other.region}|{other.segment.array.ctypes.data}".encode())
            other.done()
        finally:
            os._exit(0)
    os.close(write)
    fresh, childs, child_address = os.read(read, 200).decode().split("|")
    os.close(read)
    os.waitpid(child, 0)
    assert fresh == "True" and childs != parents and int(child_address) != parent_address
    assert eventually(lambda: server.shared_memory.connections == connections)  # the child's closed with it
    again = pool.lease(1 << 20)  # the parent still lends its own, on its own connection
    assert again.region == parents
    again.done()
    pool.close()
