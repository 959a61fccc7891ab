"""Every limit holds for every front door: unary Evaluate, EvaluateStream, tensors in shared memory and the
Open Inference Protocol's ModelInfer are refused alike, with the same status, the same words and the limit's
flag, before a tensor is decoded (one dataplane behind every door).

One server with small limits; each case builds the same over-limit call through each door by hand, the way
a caller in any language would. ModelInfer carries one term, so ``--max-terms`` has no ModelInfer case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from support.calls import evaluate_stream, field_of, plain_channel
from support.oip import DATATYPES, raw
from support.segments import Handoff

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as shm

LIMITS = dict(max_dims=4, max_elements=5000, max_request_elements=8000, max_terms=2, max_message_bytes=48 << 10)
DOORS = ("Evaluate", "EvaluateStream", "shared memory", "ModelInfer")


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2, **LIMITS))
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=1)


# -- the over-limit calls: L1Loss terms of (pred, target) tensors of a shape ------------------------------

Terms = list[tuple[torch.Tensor, torch.Tensor]]


def terms_of(*shapes: tuple[int, ...], count: int = 1, dtype: torch.dtype = torch.float32) -> Terms:
    return [(torch.ones(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for shape in shapes for _ in range(count)]


CASES: dict[str, tuple[Terms, grpc.StatusCode, str]] = {
    "--max-dims": (terms_of((1, 1, 1, 1, 2)), grpc.StatusCode.INVALID_ARGUMENT, "dimensions, at most 4"),
    "--max-elements": (terms_of((6000,)), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 5000 per tensor"),
    "--max-request-elements": (
        terms_of((4500,)),  # pred and target: 9000 in all
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "--max-request-elements",
    ),
    "--max-terms": (terms_of((4,), count=3), grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-terms"),
}


def request_of(terms: Terms, encode: Callable[[torch.Tensor, pb.Tensor, str], None]) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    for index, (pred, target) in enumerate(terms):
        term = request.terms.add(name=f"t{index}" if len(terms) > 1 else "")
        codec.encode_config({"type": "L1Loss"}, term.config)
        encode(pred, term.pred, f"terms[{index}].pred")
        encode(target, term.target.tensor, f"terms[{index}].target")
    return request


def inline(tensor: torch.Tensor, message: pb.Tensor, path: str) -> None:
    codec.encode_tensor(tensor, message)


def call_unary(target: str, terms: Terms) -> None:
    with plain_channel(target) as channel:
        pb_grpc.LossServiceStub(channel).Evaluate(request_of(terms, inline), timeout=30)


def call_stream(target: str, terms: Terms) -> None:
    """The request with every tensor streamed in chunks after it (declared, ``data`` empty)."""
    held: list[tuple[str, bytes]] = []

    def declared(tensor: torch.Tensor, message: pb.Tensor, path: str) -> None:
        codec.encode_tensor(tensor, message)
        held.append((path, message.data))
        message.ClearField("data")

    request = request_of(terms, declared)

    def messages() -> Iterator[pb.EvaluateChunk | bytes]:
        yield pb.EvaluateChunk(request=request)
        for path, data in held:
            yield chunks.chunk_wire_bytes(path, 0, data)

    with plain_channel(target) as channel:
        method = evaluate_stream(channel)
        list(method(messages(), timeout=30))


def call_shared_memory(target: str, terms: Terms) -> None:
    """Every tensor in a registered segment, named by reference."""
    nbytes = sum(shm.align(t.numel() * t.element_size()) for pair in terms for t in pair)
    segment = shm.Segment.create(shm.segment_size(nbytes))
    try:
        with plain_channel(target) as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
            stub = handoff.stub
            region = handoff.register(segment)
            room = shm.SegmentRange(segment, region, 0, segment.size)

            def referenced(tensor: torch.Tensor, message: pb.Tensor, path: str) -> None:
                flat = tensor.contiguous().view(-1).view(torch.uint8)
                region_, offset, destination = room(flat.numel())
                destination.copy_(flat)
                message.dtype, message.shape[:] = codec.TORCH_TO_DTYPE[tensor.dtype], list(tensor.shape)
                message.shm.region, message.shm.offset, message.shm.byte_size = region_, offset, flat.numel()

            stub.Evaluate(request_of(terms, referenced), timeout=30)
    finally:
        segment.close()


def call_model_infer(target: str, terms: Terms) -> None:
    ((pred, label),) = terms
    request = oip.ModelInferRequest(model_name="L1Loss")
    for name, tensor in (("pred", pred), ("target", label)):
        request.inputs.add(name=name, datatype=DATATYPES[tensor.dtype], shape=list(tensor.shape))
        request.raw_input_contents.append(raw(tensor))
    with plain_channel(target) as channel:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


CALLS = {
    "Evaluate": call_unary,
    "EvaluateStream": call_stream,
    "shared memory": call_shared_memory,
    "ModelInfer": call_model_infer,
}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("limit", list(CASES))
def test_every_limit_is_refused_alike_through_every_door(limited, limit, door):
    terms, code, words = CASES[limit]
    if door == "ModelInfer" and len(terms) > 1:
        pytest.skip("ModelInfer carries one term")
    if door == "shared memory" and not shm.supported():
        pytest.skip("needs memfd shared memory")
    with pytest.raises(grpc.RpcError) as refused:
        CALLS[door](limited, terms)
    error = refused.value
    assert error.code() == code, (door, error.details())
    assert words in error.details(), (door, error.details())
    field = field_of(error)
    assert field is not None, (door, error.details())
    if door == "ModelInfer":  # the protocol's own field names
        assert field.startswith(("inputs[", "raw_input_contents[")), field
    else:
        assert field.startswith("terms"), field


@pytest.mark.parametrize("door", ("EvaluateStream", "shared memory", "ModelInfer"))
def test_the_message_size_limit_bounds_bytes_outside_the_message_too(limited, door):
    """``--max-message-bytes`` bounds one message; a request whose tensors travel in chunks or in shared
    memory is bounded by it all the same (48 KiB here: pred and target of 3200 float64 elements each, 50 KiB,
    within every element limit). A ModelInfer message holds its bytes: gRPC's own limit refuses it."""
    if door == "shared memory" and not shm.supported():
        pytest.skip("needs memfd shared memory")
    terms = terms_of((3200,), dtype=torch.float64)
    with pytest.raises(grpc.RpcError) as refused:
        CALLS[door](limited, terms)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    if door != "ModelInfer":
        assert "--max-message-bytes" in refused.value.details()


def test_a_call_within_every_limit_is_answered_through_every_door(limited):
    terms = terms_of((40, 4))
    for door in DOORS:
        CALLS[door](limited, terms)  # raises on a refusal
    assert math.prod((40, 4)) * 2 < LIMITS["max_request_elements"]


def test_a_call_that_can_never_fit_the_memory_budget_is_told_so_at_once():
    """A streamed FocalLoss call on a 16 MiB pred under a 256 MiB budget: its term needs ~240 MiB, its own
    buffers ~16 MiB, each under the budget, together over it. It can never fit, however long it waits:
    RESOURCE_EXHAUSTED saying so, final (no retry). It was answered "retry later", and the client waited
    out its whole deadline. (Through shared memory the same call fits: pred is read where it lies.)"""
    import time

    from losswire.client import LossClient, RemoteLoss, RemoteLossError

    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2, memory_budget=256 << 20)
    server = LosswireServer(config)
    server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        client = LossClient(target, timeout=20, stream_threshold=0, shared_memory="off")
        pred, labels = torch.randn(52428, 80), torch.randint(0, 81, (52428,))
        started = time.monotonic()
        with pytest.raises(RemoteLossError) as refused:
            RemoteLoss({"type": "FocalLoss"}, client=client)(pred, labels)
        client.close()
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert "this call holds already" in refused.value.details and "--memory-budget" in refused.value.details
        assert not refused.value.busy and time.monotonic() - started < 10  # final: not waited out
        assert server.dataplane.budget.held == 0
    finally:
        server.stop(grace=0)
