"""One dataplane behind every front door: the same call gets the same answer through every door.

A call may come as a unary ``Evaluate``, an ``EvaluateStream`` of chunks (plain; with ``early_gradients``,
the overlapped path; spread over ``lanes``), with its tensors in a registered shared-memory segment, or as
the Open Inference Protocol's ``ModelInfer``. Each door converts it to one ``losswire.v1.EvaluateRequest``
and the dataplane checks and runs it (``server/dataplane/calls.py``), so:

- a good call gets the same loss and gradients, bit for bit, through every door (the same dtypes);
- a bad call gets the same status code through every door, with a field that names the place (in the
  protocol's own words for ModelInfer: ``inputs[1]``, ``parameters[avg_factor]``, ``config.gamma``);
- no door answers INTERNAL or UNKNOWN, and none hangs.

Every call here is built by hand from the contract's messages, the way a caller in any language builds
it, and sent to a real server on loopback: ``Call`` is the call, each ``door`` function sends it one way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from support.calls import evaluate_stream, field_of, plain_channel
from support.in_process import nothing_held, running_server
from support.oip import DATATYPES, outputs_of, raw, set_parameter
from support.segments import Handoff
from torch import Tensor

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as shm

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)  # a bug, whatever the input
TIMEOUT = 60.0
STRIPE = 64 << 10  # the smallest lanes.stripe_bytes: a call of a few hundred KiB uses every lane
DOORS = ("Evaluate", "EvaluateStream", "early_gradients", "lanes", "shared memory", "ModelInfer", "ModelInfer contents")
LOSS_SERVICE_DOORS = DOORS[:5]
OIP_DATATYPES = {**DATATYPES, torch.int8: "INT8", torch.int16: "INT16", torch.uint8: "UINT8"}


# -- the call ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    """One loss term as every door carries it. ``tamper`` breaks the encoded term (every LossService door
    then carries the broken term its own way: inline, in chunks, in shared memory); ``tamper_oip`` breaks
    the ModelInferRequest the same way (None: the protocol has no way to say it, and ModelInfer is skipped)."""

    config: dict[str, Any]
    pred: Tensor | None
    target: Tensor | tuple[Tensor, ...] | None = None
    weight: Tensor | None = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # other forward inputs, by name
    avg_factor: float | None = None
    reduction_override: str | None = None
    gradients: tuple[str, ...] = ()
    transfer_dtype: int = 0
    tamper: Callable[[pb.EvaluateRequest], None] | None = None
    tamper_oip: Callable[[oip.ModelInferRequest], None] | None = None
    oip: bool = True  # whether ModelInfer can carry this call at all


@dataclasses.dataclass
class Outcome:
    """What a door answered: a status code, its details and field; when OK, every output by the name
    ModelInfer gives it (``loss``, ``grad_pred``, ``grad_target[1]``; with parts ``loss_0``, ``grad_pred_0``)."""

    code: grpc.StatusCode
    details: str = ""
    field: str | None = None
    outputs: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        if self.code == OK:
            return "OK " + ", ".join(f"{name} {list(t.shape)} {t.dtype}" for name, t in self.outputs.items())
        return f"{self.code.name} [{self.field}] {self.details[:160]}"


def bits(tensor: Tensor) -> tuple[torch.dtype, list[int], bytes]:
    """What bit-for-bit equality compares: dtype, shape and bytes (a NaN equals the same NaN)."""
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype).copy_(tensor.reshape(-1))
    return tensor.dtype, list(tensor.shape), flat.view(torch.uint8).numpy().tobytes()


def same_bits(one: Outcome, other: Outcome) -> bool:
    return one.outputs.keys() == other.outputs.keys() and all(
        bits(one.outputs[name]) == bits(other.outputs[name]) for name in one.outputs
    )


def request_of(call: Call) -> pb.EvaluateRequest:
    """The call as an EvaluateRequest, every tensor inline."""
    request = pb.EvaluateRequest(transfer_dtype=call.transfer_dtype)
    term = request.terms.add()
    codec.encode_config(call.config, term.config)
    if call.pred is not None:
        codec.encode_tensor(call.pred, term.pred)
    if call.target is not None:
        codec.encode_value(call.target, term.target)
    if call.weight is not None:
        codec.encode_tensor(call.weight, term.weight)
    for name, value in call.inputs.items():
        codec.encode_value(value, term.inputs[name])
    if call.avg_factor is not None:
        term.avg_factor = call.avg_factor
    if call.reduction_override is not None:
        term.reduction_override = call.reduction_override
    term.gradients.extend(call.gradients)
    if call.tamper is not None:
        call.tamper(request)
    return request


def refused(error: grpc.RpcError) -> Outcome:
    return Outcome(error.code(), error.details() or "", field_of(error))


def answered(response: pb.EvaluateResponse, tensors: dict[str, Tensor] | None = None) -> Outcome:
    """The first result's outputs (``tensors``: those that came apart from the message), named as ModelInfer
    names them."""
    result = response.results[0]

    def decoded(message: pb.Tensor, path: str) -> Tensor:
        return codec.decode_tensor(message, path, streamed=tensors).clone()  # not a view of a call's buffer

    outputs: dict[str, Tensor] = {}
    prefix = "results[0]"
    if not result.parts:
        outputs["loss"] = decoded(result.loss, f"{prefix}.loss")
        for key, message in result.gradients.items():
            outputs[f"grad_{key}"] = decoded(message, f"{prefix}.gradients[{key}]")
    for index, part in enumerate(result.parts):
        outputs[f"loss_{part.key}"] = decoded(part.loss, f"{prefix}.parts[{index}].loss")
        for key, message in part.gradients.items():
            outputs[f"grad_{key}_{part.key}"] = decoded(message, f"{prefix}.parts[{index}].gradients[{key}]")
    return Outcome(OK, outputs=outputs)


# -- the doors -----------------------------------------------------------------------------------------


def unary(target: str, call: Call) -> Outcome:
    with plain_channel(target) as channel:
        try:
            return answered(pb_grpc.LossServiceStub(channel).Evaluate(request_of(call), timeout=TIMEOUT))
        except grpc.RpcError as error:
            return refused(error)


def _received(messages: Iterator[pb.EvaluateChunk], early: bool) -> Outcome:
    """An EvaluateStream's answer: early chunks of pred's gradient, the response, then its chunks."""
    ahead: dict[str, bytearray] = {}
    first = next(messages, None)
    while first is not None and first.WhichOneof("kind") == "chunk":
        assert early, "a chunk came before the response of a call that did not ask for early gradients"
        piece = ahead.setdefault(first.chunk.tensor, bytearray())
        assert first.chunk.offset == len(piece)
        piece += first.chunk.data
        first = next(messages, None)
    assert first is not None and first.WhichOneof("kind") == "response", first
    response = first.response
    inline = [path for path, tensor in codec.tensors_of(response) if path in response.early and len(tensor.data)]
    assert not inline, f"the response lists {inline} as sent early but carries their bytes too"
    flat = {path: torch.frombuffer(ahead[path], dtype=torch.uint8) for path in response.early}
    assembler = chunks.StreamAssembler(response, early=flat)
    for message in messages:
        assembler.add(message.chunk)
    return answered(response, assembler.finish())


def stream(target: str, call: Call, early: bool = False) -> Outcome:
    """Every tensor that has bytes streamed in chunks after the request (``early``: rows interleaved, and
    ``early_gradients`` set)."""
    request = request_of(call)
    sink = chunks.StreamSink.take(request, min_bytes=1)
    with plain_channel(target) as channel:
        try:
            messages = evaluate_stream(channel)(
                chunks.stream_chunks(request, sink, early_gradients=early), timeout=TIMEOUT
            )
            return _received(messages, early)
        except grpc.RpcError as error:
            return refused(error)


def early_gradients(target: str, call: Call) -> Outcome:
    return stream(target, call, early=True)


def lanes(target: str, call: Call, count: int = 2) -> Outcome:
    """The streamed call spread over ``count`` lanes (each an EvaluateStream on a connection of its own,
    opened first: they wait for their call), with ``early_gradients``, as the Python client sends a big call.
    A call that fails has its lanes cancelled, as the client does (they would wait for ``--lane-join-timeout``)."""
    request = request_of(call)
    sink = chunks.StreamSink.take(request, min_bytes=1)
    spread = pb.StreamLanes(call=os.urandom(16), count=count, stripe_bytes=STRIPE)
    streams = [list(messages) for messages in chunks.lane_streams(request, sink, spread, early_gradients=True)]
    lane_calls: list[Any] = []
    outcome: Outcome | Exception
    with contextlib.ExitStack() as stack:
        for messages in streams[1:]:  # the lanes first: they wait for their call
            channel = stack.enter_context(plain_channel(target))
            lane_calls.append(evaluate_stream(channel)(iter(messages), timeout=TIMEOUT))
        channel = stack.enter_context(plain_channel(target))
        try:
            outcome = _received(evaluate_stream(channel)(iter(streams[0]), timeout=TIMEOUT), True)
        except grpc.RpcError as error:
            outcome = refused(error)
        except Exception as error:
            outcome = error
        for lane in lane_calls:
            if not (isinstance(outcome, Outcome) and outcome.code == OK):
                lane.cancel()
            with contextlib.suppress(grpc.RpcError):
                assert list(lane) == [], "a lane ends with no message"
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def shared_memory(target: str, call: Call) -> Outcome:
    """Every tensor that has bytes in a registered segment, named by reference; the answer's big tensors
    into an output range of the same segment."""
    request = request_of(call)
    placed = [(path, tensor, tensor.data) for path, tensor in codec.tensors_of(request) if len(tensor.data)]
    inputs = sum(shm.align(len(data)) for _, _, data in placed)
    segment = shm.Segment.create(shm.segment_size(3 * inputs + (64 << 10)))
    try:
        with plain_channel(target) as channel, Handoff(pb_grpc.LossServiceStub(channel)) as handoff:
            region = handoff.register(segment)
            room = shm.SegmentRange(segment, region, 0, segment.size)
            for _, tensor, data in placed:
                _, offset, destination = room(len(data))
                destination.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                tensor.ClearField("data")
                tensor.shm.region, tensor.shm.offset, tensor.shm.byte_size = region, offset, len(data)
            start = room.cursor
            request.output_shm.region, request.output_shm.offset = region, start
            request.output_shm.byte_size = segment.size - start
            try:
                response = handoff.stub.Evaluate(request, timeout=TIMEOUT)
            except grpc.RpcError as error:
                return refused(error)
            views = shm.shared_memory_tensors(
                codec.tensors_of(response), lambda ref, field: segment.bytes_at(ref.offset, ref.byte_size)
            )
            return answered(response, views)
    finally:
        segment.close()


def infer_request(call: Call) -> oip.ModelInferRequest:
    """The call as a ModelInferRequest, as tritonclient builds one (raw_input_contents in input order)."""
    config = {key: value for key, value in call.config.items() if key != "type"}
    request = oip.ModelInferRequest(model_name=str(call.config.get("type", "")), id="door")
    if config:
        request.parameters["config"].string_param = json.dumps(config)

    def add(name: str, tensor: Tensor) -> None:
        request.inputs.add(name=name, datatype=OIP_DATATYPES[tensor.dtype], shape=list(tensor.shape))
        request.raw_input_contents.append(raw(tensor))

    if call.pred is not None:
        add("pred", call.pred)
    if isinstance(call.target, tuple):
        for index, member in enumerate(call.target):
            add(f"target[{index}]", member)
    elif call.target is not None:
        add("target", call.target)
    if call.weight is not None:
        add("weight", call.weight)
    for name, value in call.inputs.items():
        if isinstance(value, Tensor):
            add(name, value)
        else:
            set_parameter(
                request.parameters[name], value if isinstance(value, (str, bool, int, float)) else json.dumps(value)
            )
    if call.avg_factor is not None:
        request.parameters["avg_factor"].double_param = call.avg_factor
    if call.reduction_override is not None:
        request.parameters["reduction_override"].string_param = call.reduction_override
    if call.gradients and tuple(call.gradients) != ("pred",):
        names = ["loss"]
        for gradient in call.gradients:
            value = call.target if gradient == "target" else None
            if isinstance(value, tuple):  # a tuple's float members: grad_target[1]
                names += [f"grad_target[{i}]" for i, member in enumerate(value) if member.is_floating_point()]
            elif gradient != "none":
                names.append(f"grad_{gradient}")
        for name in names:
            request.outputs.add(name=name)
    if call.tamper_oip is not None:
        call.tamper_oip(request)
    return request


# typed ``contents``: the field holding each datatype's values, and their type (FP16 and BF16 travel raw only)
CONTENTS = {
    "BOOL": ("bool_contents", "bool"),
    "UINT8": ("uint_contents", "uint8"),
    "INT8": ("int_contents", "int8"),
    "INT16": ("int_contents", "int16"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "<i8"),
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
}


def typed(request: oip.ModelInferRequest) -> oip.ModelInferRequest | None:
    """``request`` with every input's values in its typed ``contents`` instead of raw_input_contents (None:
    an input's datatype travels raw only)."""
    if any(tensor.datatype not in CONTENTS for tensor in request.inputs):
        return None
    out = oip.ModelInferRequest()
    out.CopyFrom(request)
    out.ClearField("raw_input_contents")
    for tensor, data in zip(out.inputs, request.raw_input_contents, strict=True):
        field, numpy_type = CONTENTS[tensor.datatype]
        itemsize = np.dtype(numpy_type).itemsize
        whole = len(data) // itemsize * itemsize  # bytes cut mid-element: the whole elements
        getattr(tensor.contents, field).extend(np.frombuffer(data[:whole], dtype=numpy_type).tolist())
    return out


def model_infer(target: str, call: Call, contents: bool = False) -> Outcome | None:
    request = infer_request(call)
    if contents:
        request = typed(request)
        if request is None:
            return None
    with plain_channel(target) as channel:
        try:
            response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
        except grpc.RpcError as error:
            return refused(error)
    return Outcome(OK, outputs=outputs_of(response))


SENDERS: dict[str, Callable[[str, Call], Outcome]] = {
    "Evaluate": unary,
    "EvaluateStream": stream,
    "early_gradients": early_gradients,
    "lanes": lanes,
    "shared memory": shared_memory,
    "ModelInfer": model_infer,
    "ModelInfer contents": lambda target, call: model_infer(target, call, contents=True),
}


def through(door: str, target: str, call: Call) -> Outcome | None:
    """``call`` sent through ``door``; None where the door cannot carry it."""
    if door == "shared memory" and not shm.supported():
        pytest.skip("needs memfd shared memory")
    if door.startswith("ModelInfer") and (not call.oip or (call.tamper is not None and call.tamper_oip is None)):
        return None
    return SENDERS[door](target, call)


# -- servers ---------------------------------------------------------------------------------------------

LIMITS = dict(max_dims=4, max_elements=5000, max_request_elements=8000, max_message_bytes=48 << 10)


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """The address of a server of this module's own (every door open: shared memory, overlap, lanes)."""
    with running_server(max_workers=2) as server:
        yield f"127.0.0.1:{server.port}"
        assert nothing_held(server), "a door left memory, a big-call slot or a lane held"


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    """The address of a server with small limits (``LIMITS``)."""
    with running_server(max_workers=2, **LIMITS) as server:
        yield f"127.0.0.1:{server.port}"
        assert nothing_held(server), "a door left memory, a big-call slot or a lane held"


# -- inputs ----------------------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(rows: int = 64, classes: int = 80, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(rows, classes, generator=generator(seed)).to(dtype)


def labels(rows: int = 64, classes: int = 80, seed: int = 1, dtype: torch.dtype = torch.int64) -> Tensor:
    """Class indices in [0, classes], ``classes`` being the background."""
    return torch.randint(0, classes + 1, (rows,), generator=generator(seed)).to(dtype)


def boxes(rows: int, seed: int) -> Tensor:
    corner = torch.rand(rows, 2, generator=generator(seed)) * 100
    return torch.cat([corner, corner + 1 + torch.rand(rows, 2, generator=generator(seed + 100)) * 50], dim=1)


def uniform(*shape: int, seed: int) -> Tensor:
    return torch.rand(*shape, generator=generator(seed))


def normal(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=generator(seed)).to(dtype)


FOCAL = dict(type="FocalLoss", gamma=2.0, alpha=0.25)
ROWS = 2048  # [2048, 80] float32 logits: 640 KiB, ten stripes of 64 KiB over a call's lanes


def focal(rows: int = ROWS, **fields: Any) -> Call:
    return Call(config=dict(FOCAL, **fields.pop("config", {})), pred=logits(rows), target=labels(rows), **fields)


def tensor_at(request: pb.EvaluateRequest, path: str) -> pb.Tensor:
    return next(tensor for found, tensor in codec.tensors_of(request) if found == path)


def declared(path: str, **fields: Any) -> Callable[[pb.EvaluateRequest], None]:
    """Declare the tensor at ``path`` otherwise (``dtype``, ``shape``, ``data_dtype``), its bytes unchanged."""

    def tamper(request: pb.EvaluateRequest) -> None:
        tensor = tensor_at(request, path)
        for name, value in fields.items():
            if name == "shape":
                tensor.shape[:] = value
            else:
                setattr(tensor, name, value)

    return tamper


def declared_oip(index: int, **fields: Any) -> Callable[[oip.ModelInferRequest], None]:
    def tamper(request: oip.ModelInferRequest) -> None:
        if "datatype" in fields:
            request.inputs[index].datatype = fields["datatype"]
        if "shape" in fields:
            request.inputs[index].shape[:] = fields["shape"]

    return tamper


def resized(path: str, by: int) -> Callable[[pb.EvaluateRequest], None]:
    """The bytes of the tensor at ``path`` cut by ``by`` (negative: ``-by`` zero bytes more)."""

    def tamper(request: pb.EvaluateRequest) -> None:
        tensor = tensor_at(request, path)
        tensor.data = tensor.data[:-by] if by > 0 else tensor.data + bytes(-by)

    return tamper


def resized_oip(index: int, by: int) -> Callable[[oip.ModelInferRequest], None]:
    def tamper(request: oip.ModelInferRequest) -> None:
        data = request.raw_input_contents[index]
        request.raw_input_contents[index] = data[:-by] if by > 0 else data + bytes(-by)

    return tamper


def narrowed(path: str, dtype: int) -> Callable[[pb.EvaluateRequest], None]:
    """The float tensor at ``path`` travelling narrowed (``data_dtype``), as a ``transfer_dtype`` caller sends it."""

    def tamper(request: pb.EvaluateRequest) -> None:
        tensor = tensor_at(request, path)
        value = codec.decode_tensor(tensor, path).to(codec.DTYPE_TO_TORCH[dtype])
        tensor.data_dtype, tensor.data = dtype, value.view(torch.int16).numpy().tobytes()

    return tamper


# -- good calls: the same bits through every door ---------------------------------------------------------

GOOD: dict[str, Callable[[], Call]] = {
    "FocalLoss mean avg_factor": lambda: focal(avg_factor=10.0),
    "FocalLoss none weight[N] float64": lambda: Call(
        config=dict(FOCAL, reduction="none"),
        pred=logits(512, dtype=torch.float64),
        target=labels(512),
        weight=uniform(512, seed=3).double(),
    ),
    "FocalLoss int32 labels, reduction_override sum, loss_weight": lambda: Call(
        config=dict(FOCAL, loss_weight=2.0),
        pred=logits(ROWS),
        target=labels(ROWS, dtype=torch.int32),
        reduction_override="sum",
    ),
    "FocalLoss weight [N*C] gamma 1.5 (autograd)": lambda: focal(
        config=dict(gamma=1.5), weight=uniform(ROWS * 80, seed=4)
    ),
    "FocalLoss NaN in a late row (falls back)": lambda: Call(
        config=dict(FOCAL), pred=logits(ROWS).index_fill(0, torch.tensor([ROWS - 5]), math.nan), target=labels(ROWS)
    ),
    "QualityFocalLoss (label, score) weight avg_factor": lambda: Call(
        config=dict(type="QualityFocalLoss", beta=2.0),
        pred=logits(ROWS, 20),
        target=(labels(ROWS, 20), uniform(ROWS, seed=11)),
        weight=uniform(ROWS, seed=12),
        avg_factor=33.0,
    ),
    "CrossEntropyLoss class_weight ignore_index": lambda: Call(
        config=dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 0.5, 1.5, 3.0], ignore_index=2),
        pred=logits(32, 5),
        target=torch.tensor([0, 1, 2, 3, 4, 2, 4, 1] * 4),
        avg_factor=20.0,
    ),
    "CrossEntropyLoss forward ignore_index, weight": lambda: Call(
        config=dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 0.5, 1.5, 3.0]),
        pred=logits(32, 5),
        target=torch.tensor([0, 1, 2, 3, 4, 2, 4, 1] * 4),
        weight=uniform(32, seed=5),
        inputs={"ignore_index": 4},
    ),
    "CrossEntropyLoss sigmoid avg_non_ignore": lambda: Call(
        config=dict(type="CrossEntropyLoss", use_sigmoid=True, avg_non_ignore=True),
        pred=logits(32, 5),
        target=torch.tensor([0, 1, 2, 3, 4, 5, -100, 1] * 4),
    ),
    "GIoULoss pred and target gradients": lambda: Call(
        config=dict(type="GIoULoss", loss_weight=2.0),
        pred=boxes(20000, 1),
        target=boxes(20000, 2),
        weight=uniform(20000, seed=6),
        gradients=("pred", "target"),
    ),
    "GIoULoss none weight [N, 4]": lambda: Call(
        config=dict(type="GIoULoss", reduction="none"),
        pred=boxes(50, 1),
        target=boxes(50, 2),
        weight=uniform(50, 4, seed=4),
    ),
    "SmoothL1Loss weight avg_factor": lambda: Call(
        config=dict(type="SmoothL1Loss", beta=0.5, loss_weight=1.5),
        pred=normal(20000, 4, seed=5),
        target=normal(20000, 4, seed=6),
        weight=uniform(20000, 4, seed=7),
        avg_factor=7.0,
    ),
    "L1Loss none float64": lambda: Call(
        config=dict(type="L1Loss", reduction="none"),
        pred=normal(30, 4, seed=8, dtype=torch.float64),
        target=normal(30, 4, seed=9, dtype=torch.float64),
    ),
    "L1Loss bfloat16": lambda: Call(
        config=dict(type="L1Loss"),
        pred=normal(30, 4, seed=8, dtype=torch.bfloat16),
        target=normal(30, 4, seed=9, dtype=torch.bfloat16),
    ),
    "MSELoss none float16": lambda: Call(
        config=dict(type="MSELoss", reduction="none"),
        pred=normal(30, 4, seed=8, dtype=torch.float16),
        target=normal(30, 4, seed=9, dtype=torch.float16),
    ),
    "FocalLoss empty batch": lambda: Call(
        config=dict(FOCAL), pred=torch.empty(0, 80), target=torch.empty(0, dtype=torch.int64)
    ),
    "GIoULoss empty batch, target gradient": lambda: Call(
        config=dict(type="GIoULoss"), pred=torch.empty(0, 4), target=torch.empty(0, 4), gradients=("pred", "target")
    ),
    "SmoothL1Loss none, empty batch": lambda: Call(
        config=dict(type="SmoothL1Loss", reduction="none"), pred=torch.empty(0, 4), target=torch.empty(0, 4)
    ),
    "L1Loss 0-d": lambda: Call(config=dict(type="L1Loss"), pred=torch.tensor(0.7), target=torch.tensor(0.2)),
    "MSELoss none 0-d": lambda: Call(
        config=dict(type="MSELoss", reduction="none"), pred=torch.tensor(0.7), target=torch.tensor(0.2)
    ),
    "SmoothL1Loss avg_factor 0": lambda: Call(
        config=dict(type="SmoothL1Loss"), pred=normal(8, 4, seed=1), target=normal(8, 4, seed=2), avg_factor=0.0
    ),
    "SmoothL1Loss avg_factor negative": lambda: Call(
        config=dict(type="SmoothL1Loss"), pred=normal(8, 4, seed=1), target=normal(8, 4, seed=2), avg_factor=-3.0
    ),
    "SmoothL1Loss avg_factor NaN": lambda: Call(
        config=dict(type="SmoothL1Loss"), pred=normal(8, 4, seed=1), target=normal(8, 4, seed=2), avg_factor=math.nan
    ),
    "AssociativeEmbeddingLoss (pull, push) parts": lambda: Call(
        config=dict(type="AssociativeEmbeddingLoss"),
        pred=uniform(2, 1, 8, 8, seed=31),
        target=uniform(2, 1, 8, 8, seed=32),
        inputs={"match": [[[[1, 2], [3, 4]], [[5, 6], [7, 7]]], [[[0, 0], [1, 1]]]]},
    ),
    "SeesawLoss dict parts": lambda: Call(
        config=dict(type="SeesawLoss", num_classes=4, return_dict=True), pred=logits(16, 6), target=labels(16, 4)
    ),
    "transfer_dtype FLOAT16 answer": lambda: Call(
        config=dict(type="L1Loss", reduction="none"),
        pred=normal(2048, 4, seed=12),
        target=normal(2048, 4, seed=13),
        transfer_dtype=pb.FLOAT16,
        oip=False,
    ),
    "transfer_dtype BFLOAT16, FocalLoss (not overlapped)": lambda: focal(transfer_dtype=pb.BFLOAT16, oip=False),
    "FocalLoss float16 (not overlapped)": lambda: Call(
        config=dict(FOCAL), pred=logits(ROWS, dtype=torch.float16), target=labels(ROWS)
    ),
    "pred sent narrowed (data_dtype BFLOAT16)": lambda: Call(
        config=dict(type="L1Loss", reduction="none"),
        pred=normal(2048, 4, seed=12),
        target=normal(2048, 4, seed=13),
        tamper=narrowed("terms[0].pred", pb.BFLOAT16),
    ),
}
ANSWERS: dict[tuple[str, str], Outcome] = {}  # (target, case) -> Evaluate's answer, each asked once


def unary_answer(target: str, case: str) -> Outcome:
    if (target, case) not in ANSWERS:
        ANSWERS[target, case] = unary(target, GOOD[case]())
    answer = ANSWERS[target, case]
    assert answer.code == OK, answer
    return answer


@pytest.mark.parametrize("door", DOORS[1:])
@pytest.mark.parametrize("case", list(GOOD))
def test_a_good_call_gets_the_unary_answer_bit_for_bit_through_every_door(served, case, door):
    outcome = through(door, served, GOOD[case]())
    if outcome is None:
        pytest.skip(f"{door} cannot carry this call")
    expected = unary_answer(served, case)
    assert outcome.code == OK, outcome
    assert outcome.outputs.keys() == expected.outputs.keys()
    for name, tensor in expected.outputs.items():
        assert bits(outcome.outputs[name]) == bits(tensor), name


# -- bad calls: the same status code through every door, naming the field in the door's words ---------------


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What every door answers: ``code``, a field that starts with ``field`` (``oip_field`` for ModelInfer;
    several prefixes where doors name different parts of one tensor: its bytes, its chunks, its reference),
    and a message that holds ``words`` (when given)."""

    code: grpc.StatusCode
    field: str | tuple[str, ...]
    oip_field: str | tuple[str, ...] | None = None
    words: str | None = None


BYTES = ("terms[0].pred.data", "terms[0].pred.shm.byte_size")
OIP_BYTES = ("raw_input_contents[0]", "inputs[0].contents")
BAD: dict[str, tuple[Callable[[], Call], Refusal]] = {
    "unknown loss type": (
        lambda: Call(config=dict(type="FocalLos"), pred=logits(), target=labels()),
        Refusal(
            NOT_FOUND, "terms[0].config.type", "model_name", "unknown loss type 'FocalLos'; did you mean FocalLoss"
        ),
    ),
    "config: unknown parameter": (
        lambda: focal(64, config=dict(gama=2)),
        Refusal(INVALID, "terms[0].config.gama", "config.gama", "FocalLoss has no parameter 'gama'"),
    ),
    "config: ill-typed value": (
        lambda: focal(64, config=dict(gamma="high")),
        Refusal(INVALID, "terms[0].config.gamma", "config.gamma", "FocalLoss.gamma must be a float, got str 'high'"),
    ),
    "config: value out of range": (
        lambda: focal(64, config=dict(gamma=-1.0)),
        Refusal(INVALID, "terms[0].config.gamma", "config.gamma", "FocalLoss.gamma must be >= 0, got -1.0"),
    ),
    "config: NaN": (
        lambda: focal(64, config=dict(gamma=math.nan)),
        Refusal(INVALID, "terms[0].config.gamma", "config.gamma", "FocalLoss.gamma must be finite, got float nan"),
    ),
    "config: inf": (
        lambda: focal(64, config=dict(loss_weight=math.inf)),
        Refusal(INVALID, "terms[0].config.loss_weight", "config.loss_weight", "must be finite, got float inf"),
    ),
    "config: unknown reduction": (
        lambda: focal(64, config=dict(reduction="avg")),
        Refusal(INVALID, "terms[0].config.reduction", "config.reduction", "got 'avg'"),
    ),
    "reduction_override unknown": (
        lambda: focal(64, reduction_override="bogus"),
        Refusal(INVALID, "terms[0].reduction_override", "reduction_override", "got 'bogus'"),
    ),
    "avg_factor with sum": (
        lambda: focal(64, avg_factor=3.0, reduction_override="sum"),
        Refusal(INVALID, "terms[0].avg_factor", "avg_factor", "avg_factor can not be used with reduction='sum'"),
    ),
    "pred of integers": (
        lambda: Call(config=dict(FOCAL), pred=torch.ones(64, 80, dtype=torch.int64), target=labels()),
        Refusal(INVALID, "terms[0].gradients", "gradients", "holds no floating-point tensor (torch.int64)"),
    ),
    "labels of floats for class indices": (
        lambda: Call(config=dict(type="CrossEntropyLoss"), pred=logits(32, 5), target=uniform(32, seed=2)),
        Refusal(INVALID, "terms[0].label", "label", "label must hold integer class indices"),
    ),
    "labels of another length": (
        lambda: Call(config=dict(FOCAL), pred=logits(), target=labels(63)),
        Refusal(INVALID, "terms[0].target", "target", "must have shape [N] = [64] for pred [64, 80], got [63]"),
    ),
    "labels out of range": (
        lambda: Call(config=dict(FOCAL), pred=logits(), target=labels().index_fill(0, torch.tensor([7]), 81)),
        Refusal(INVALID, "terms[0].target", "target", "target values must lie in [0, 80]"),
    ),
    "a negative label": (
        lambda: Call(config=dict(FOCAL), pred=logits(), target=labels().index_fill(0, torch.tensor([7]), -1)),
        Refusal(INVALID, "terms[0].target", "target", "target values must lie in [0, 80]"),
    ),
    "a label out of range in a late row (overlapped)": (
        lambda: Call(
            config=dict(FOCAL), pred=logits(ROWS), target=labels(ROWS).index_fill(0, torch.tensor([2000]), 200)
        ),
        Refusal(INVALID, "terms[0].target", "target", "got values in [0, 200]"),
    ),
    "CrossEntropyLoss label out of range": (
        lambda: Call(
            config=dict(type="CrossEntropyLoss"), pred=logits(32, 5), target=torch.tensor([0, 1, 2, 3, 4, 5, 1, 1] * 4)
        ),
        Refusal(INVALID, "terms[0].label", "label", "label values must be class indices in [0, 4]"),
    ),
    "pred and target of other shapes": (
        lambda: Call(config=dict(type="L1Loss"), pred=torch.ones(2, 3), target=torch.ones(3, 2)),
        Refusal(INVALID, "terms[0].target", "target", "target must have the shape of pred [2, 3], got [3, 2]"),
    ),
    "weight that does not broadcast": (
        lambda: Call(
            config=dict(type="SmoothL1Loss"), pred=torch.ones(10, 4), target=torch.zeros(10, 4), weight=torch.ones(7)
        ),
        Refusal(INVALID, "terms[0].weight", "weight", "weight of shape [7] does not broadcast"),
    ),
    "class_weight of another length": (
        lambda: Call(
            config=dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0]), pred=logits(32, 5), target=labels(32, 4)
        ),
        Refusal(INVALID, "terms[0].class_weight", "class_weight", "must have one entry per class (5), got 2"),
    ),
    "missing target": (
        lambda: Call(config=dict(FOCAL), pred=logits()),
        Refusal(INVALID, "terms[0].target", "target", "FocalLoss needs input 'target'"),
    ),
    "missing third input": (
        lambda: Call(
            config=dict(type="GHMC", bins=10, momentum=0.0), pred=logits(64, 8), target=uniform(64, 8, seed=2).round()
        ),
        Refusal(INVALID, "terms[0].label_weight", "label_weight", "GHMC needs input 'label_weight'"),
    ),
    "missing pred": (
        lambda: Call(config=dict(FOCAL), pred=None, target=labels()),
        Refusal(INVALID, "terms[0].pred", "pred", None),
    ),
    "an unknown input": (
        lambda: focal(64, inputs={"bogus": torch.ones(3)}),
        Refusal(INVALID, "terms[0].bogus", "inputs[2].name", "FocalLoss has no input"),
    ),
    "the gradient of integer labels": (
        lambda: focal(64, gradients=("pred", "target")),
        Refusal(INVALID, "terms[0].gradients", "outputs[2].name", None),
    ),
    "bytes one short": (
        lambda: focal(64, tamper=resized("terms[0].pred", 1), tamper_oip=resized_oip(0, 1)),
        Refusal(INVALID, BYTES, OIP_BYTES),
    ),
    "bytes one element short": (
        lambda: focal(64, tamper=resized("terms[0].pred", 4), tamper_oip=resized_oip(0, 4)),
        Refusal(INVALID, BYTES, OIP_BYTES),
    ),
    "bytes one element too many": (
        lambda: focal(64, tamper=resized("terms[0].pred", -4), tamper_oip=resized_oip(0, -4)),
        Refusal(INVALID, BYTES, OIP_BYTES),
    ),
    "label bytes short": (
        lambda: focal(64, tamper=resized("terms[0].target", 8), tamper_oip=resized_oip(1, 8)),
        Refusal(
            INVALID,
            ("terms[0].target.data", "terms[0].target.shm.byte_size"),
            ("raw_input_contents[1]", "inputs[1].contents"),
        ),
    ),
    "declared FLOAT64, bytes of FLOAT32": (
        lambda: focal(
            64, tamper=declared("terms[0].pred", dtype=pb.FLOAT64), tamper_oip=declared_oip(0, datatype="FP64")
        ),
        Refusal(INVALID, BYTES, OIP_BYTES),
    ),
    "dtype unspecified": (
        lambda: focal(
            64, tamper=declared("terms[0].pred", dtype=pb.DTYPE_UNSPECIFIED), tamper_oip=declared_oip(0, datatype="")
        ),
        Refusal(INVALID, "terms[0].pred.dtype", "inputs[0].datatype"),
    ),
    "dtype unknown": (
        lambda: focal(64, tamper=declared("terms[0].pred", dtype=99), tamper_oip=declared_oip(0, datatype="BYTES")),
        Refusal(INVALID, "terms[0].pred.dtype", "inputs[0].datatype"),
    ),
    "negative size": (
        lambda: focal(64, tamper=declared("terms[0].pred", shape=[-1, 80]), tamper_oip=declared_oip(0, shape=[-1, 80])),
        Refusal(INVALID, "terms[0].pred.shape", "inputs[0].shape", "must hold non-negative sizes, got [-1, 80]"),
    ),
    "rank over the default --max-dims": (
        lambda: Call(config=dict(type="L1Loss"), pred=torch.ones([1] * 8 + [2]), target=torch.zeros([1] * 8 + [2])),
        Refusal(INVALID, "terms[0].pred.shape", "inputs[0].shape", "has 9 dimensions, at most 8 are allowed"),
    ),
    "a shape beyond int64": (
        lambda: focal(
            64, tamper=declared("terms[0].pred", shape=[2**40, 2**40]), tamper_oip=declared_oip(0, shape=[2**40, 2**40])
        ),
        Refusal(INVALID, "terms[0].pred.shape", ("inputs[0].shape", *OIP_BYTES)),
    ),
    "data_dtype on integer labels": (
        lambda: focal(64, tamper=declared("terms[0].target", data_dtype=pb.FLOAT16)),
        Refusal(INVALID, "terms[0].target.data_dtype", None, "got FLOAT16 for dtype INT64"),
    ),
    "data_dtype FLOAT32": (
        lambda: focal(64, tamper=declared("terms[0].pred", data_dtype=pb.FLOAT32)),
        Refusal(INVALID, "terms[0].pred.data_dtype", None, "got FLOAT32 for dtype FLOAT32"),
    ),
    "transfer_dtype FLOAT32": (
        lambda: focal(64, transfer_dtype=pb.FLOAT32, oip=False),
        Refusal(INVALID, "transfer_dtype", None, "transfer_dtype must be unset, FLOAT16 or BFLOAT16, got FLOAT32"),
    ),
    "transfer_dtype unknown": (
        lambda: focal(64, transfer_dtype=99, oip=False),
        Refusal(INVALID, "transfer_dtype", None, "got 99"),
    ),
}


def check_refusal(door: str, outcome: Outcome, expected: Refusal) -> None:
    assert outcome.code not in NEVER, outcome
    assert outcome.code == expected.code, (door, str(outcome))
    prefixes = expected.oip_field if door.startswith("ModelInfer") else expected.field
    assert outcome.field is not None and outcome.field.startswith(prefixes), (door, str(outcome))
    if expected.words is not None:
        assert expected.words in outcome.details, (door, str(outcome))


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_call_gets_the_same_status_through_every_door(served, case, door):
    make, expected = BAD[case]
    outcome = through(door, served, make())
    if outcome is None:
        pytest.skip(f"{door} cannot carry this call")
    check_refusal(door, outcome, expected)


LIMITED: dict[str, tuple[Callable[[], Call], Refusal]] = {
    "--max-elements": (
        lambda: Call(config=dict(type="L1Loss"), pred=torch.ones(6000), target=torch.zeros(6000)),
        Refusal(EXHAUSTED, "terms[0].pred.shape", "inputs[0].shape", "at most 5000 per tensor"),
    ),
    "--max-elements, labels only": (
        lambda: Call(config=dict(FOCAL), pred=normal(50, 80, seed=3), target=torch.zeros(6000, dtype=torch.int8)),
        Refusal(EXHAUSTED, "terms[0].target.shape", "inputs[1].shape", "at most 5000 per tensor"),
    ),
    "--max-request-elements": (
        lambda: Call(config=dict(type="L1Loss"), pred=torch.ones(4500), target=torch.zeros(4500)),
        Refusal(EXHAUSTED, "terms[0].pred.shape", "inputs[0].shape", "--max-request-elements"),
    ),
    "--max-dims": (
        lambda: Call(config=dict(type="L1Loss"), pred=torch.ones(1, 1, 1, 1, 2), target=torch.zeros(1, 1, 1, 1, 2)),
        Refusal(INVALID, "terms[0].pred.shape", "inputs[0].shape", "has 5 dimensions, at most 4 are allowed"),
    ),
}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("case", list(LIMITED))
def test_a_call_over_a_limit_gets_the_same_status_through_every_door(limited, case, door):
    make, expected = LIMITED[case]
    outcome = through(door, limited, make())
    check_refusal(door, outcome, expected)


# -- where the doors once disagreed: each test names the old answer in its docstring


SMALL_OVERLAPPED: dict[str, Callable[[], Call]] = {
    "FocalLoss [64, 80]": lambda: focal(64, avg_factor=10.0),
    "FocalLoss none [100, 80] float64": lambda: Call(
        config=dict(FOCAL, reduction="none"), pred=logits(100, dtype=torch.float64), target=labels(100)
    ),
    "QualityFocalLoss [64, 20]": lambda: Call(
        config=dict(type="QualityFocalLoss"), pred=logits(64, 20), target=(labels(64, 20), uniform(64, seed=11))
    ),
}


@pytest.mark.parametrize(
    "door",
    [
        "EvaluateStream",
        "early_gradients",
        "lanes",
        "shared memory",
        "ModelInfer",
    ],
)
@pytest.mark.parametrize("case", list(SMALL_OVERLAPPED))
def test_a_small_overlapped_call_declares_its_early_gradient_without_data(served, case, door):
    """A hand-made stream may stream a small pred (small tensors *may* keep their data inline): the overlapped
    answer must still declare the early gradient without data (docs/protocol.md), and equal the unary one.
    (A gradient under 64 KiB was listed as early and carried inline too: the caller got its bytes twice, and
    the Python client's reader refused the answer.)"""
    expected = unary(served, SMALL_OVERLAPPED[case]())
    outcome = through(door, served, SMALL_OVERLAPPED[case]())  # _received checks the early tensors' declarations
    assert expected.code == OK and outcome.code == OK, outcome
    assert same_bits(outcome, expected)


@pytest.mark.parametrize(
    "door",
    [*LOSS_SERVICE_DOORS, "ModelInfer", "ModelInfer contents"],
)
def test_a_shape_over_max_elements_is_refused_for_its_size_whatever_bytes_came(limited, door):
    """A declared shape over a limit is refused as such, before its bytes are looked at. (ModelInfer's
    converter counted an input's bytes first: INVALID_ARGUMENT where every other door said RESOURCE_EXHAUSTED.)"""
    call = Call(
        config=dict(type="L1Loss"),
        pred=torch.ones(50),
        target=torch.zeros(50),
        tamper=declared("terms[0].pred", shape=[6000]),
        tamper_oip=declared_oip(0, shape=[6000]),
    )
    expected = Refusal(EXHAUSTED, "terms[0].pred.shape", "inputs[0].shape", "at most 5000 per tensor")
    check_refusal(door, through(door, limited, call), expected)


@pytest.mark.parametrize(
    "door",
    [
        "Evaluate",
        *LOSS_SERVICE_DOORS[1:],
        "ModelInfer",
        "ModelInfer contents",
    ],
)
def test_a_shape_over_max_message_bytes_is_refused_for_its_size_whatever_bytes_came(served, door):
    """pred declared [2**20, 2**20] float32 (4 TiB) with 20 KiB of bytes: streamed or in shared memory it is
    refused for the bytes it declares, before any arrive; inline it is too. (A unary call's inline tensors
    were not counted: refused for its bytes, INVALID_ARGUMENT, not its size.)"""
    shape = [2**20, 2**20]
    call = focal(64, tamper=declared("terms[0].pred", shape=shape), tamper_oip=declared_oip(0, shape=shape))
    expected = Refusal(EXHAUSTED, "terms[0].pred.shape", "inputs[0].shape", "--max-message-bytes")
    check_refusal(door, through(door, served, call), expected)


OTHER_GRADIENTS: dict[str, Callable[[], Call]] = {
    "FocalLoss weight": lambda: focal(64, weight=uniform(64, seed=21), gradients=("pred", "weight")),
    "SmoothL1Loss target and weight": lambda: Call(
        config=dict(type="SmoothL1Loss"),
        pred=normal(10, 4, seed=1),
        target=normal(10, 4, seed=2),
        weight=uniform(10, 4, seed=3),
        gradients=("pred", "target", "weight"),
    ),
    "BoundedIoULoss target": lambda: Call(
        config=dict(type="BoundedIoULoss"), pred=boxes(10, 1), target=boxes(10, 2), gradients=("pred", "target")
    ),
    "GHMC label_weight": lambda: Call(
        config=dict(type="GHMC", bins=10, momentum=0.0),
        pred=logits(64, 8),
        target=uniform(64, 8, seed=2).round(),
        inputs={"label_weight": uniform(64, 8, seed=3)},
        gradients=("pred", "label_weight"),
    ),
}


@pytest.mark.parametrize("door", [*DOORS[1:5], "ModelInfer", "ModelInfer contents"])
@pytest.mark.parametrize("case", list(OTHER_GRADIENTS))
def test_the_gradient_of_any_float_input_is_answered_through_every_door(served, case, door):
    """One rule for which inputs have gradients (``LossDescription.gradient_inputs``). (ModelInfer answered
    those a loss declares differentiable only, and refused a weight's that every other door answers.)"""
    expected = unary(served, OTHER_GRADIENTS[case]())
    outcome = through(door, served, OTHER_GRADIENTS[case]())
    assert expected.code == OK and outcome.code == OK, outcome
    assert same_bits(outcome, expected)
