"""Generators of fuzzed ``Evaluate`` requests and the property every answer must have.

Shared by ``tests/service/test_fuzz_requests.py`` (a bounded, deterministic run in CI) and
``bench/fuzz.py`` (a by-hand run of thousands). Two generators:

- ``evaluate_requests()``: well-formed protobuf, bad contents. Each term starts from one of the
  recorded MMDetection cases (tests/reference/fixtures: valid inputs for all 30 losses) and is then
  broken by up to four random mutations: random or unknown config parameters of random JSON types,
  another loss's type, reductions x avg_factor x reduction_override, dtypes, shapes (negative, huge,
  overflowing int64, too many dimensions), byte lengths, random bytes, NaN/Inf, wrong targets, extra
  inputs, gradients, upstream gradients, sessions, samplers.
- ``raw_requests()``: bytes that may not parse at all: random bytes, truncated and bit-flipped valid
  messages, fields with wrong or invalid wire types, huge length prefixes, over-long varints.

The property (``check_answer``): the answer is OK, or a status that is neither INTERNAL nor UNKNOWN
and has a message; an OK answer to a term that can be recomputed in process equals the loss
engine's own answer on the same decoded inputs (``engine_parts``).
"""

from __future__ import annotations

import json
import math
import struct
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import torch
from hypothesis import strategies as st

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.server.losses import LOSSES
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec, protocol
from losswire.wire import shared_memory as wire_memory
from support.calls import field_of
from support.mmdet_fixtures import SINGLE_CASES, difference, parts, prepare
from support.oip import set_parameter
from support.segments import register_segment

EVALUATE = "/losswire.v1.LossService/Evaluate"
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
DTYPES = [v for v in pb.DType.values() if v != pb.DTYPE_UNSPECIFIED]
FLOAT_DTYPES = {pb.FLOAT16, pb.BFLOAT16, pb.FLOAT32, pb.FLOAT64}
INPUT_NAMES = sorted({i.name for d in LOSSES.descriptions() for i in d.inputs})
PARAM_NAMES = sorted({p.name for d in LOSSES.descriptions() for p in d.params})
# the built-in losses, fixed at import: tests that register plugins later must not change the draws
LOSS_NAMES = sorted(LOSSES.names())
SAMPLE_LIMIT = 4096  # elements of a generated tensor whose bytes match its shape


# -- seeds: one valid LossTerm per recorded mmdet case ------------------------------------------------


def _encode_named(message: pb.LossTerm, name: str, value: Any, names: list[str]) -> None:
    """Put one forward input where the contract wants it (pred, target, weight, avg_factor...)."""
    if value is None:
        return
    if name == names[0]:
        codec.encode_tensor(value, message.pred)
    elif len(names) > 1 and name == names[1]:
        codec.encode_value(value, message.target)
    elif name == "weight" and isinstance(value, torch.Tensor):
        codec.encode_tensor(value, message.weight)
    elif name == "avg_factor" and isinstance(value, (int, float)) and not isinstance(value, bool):
        message.avg_factor = float(value)
    elif name == "reduction_override" and isinstance(value, str):
        message.reduction_override = value
    else:
        codec.encode_value(value, message.inputs[name])


def seed_term(case: dict) -> pb.LossTerm:
    args, kwargs, _ = prepare(case)
    names = [i.name for i in LOSSES.describe(case["cfg"]["type"]).inputs]
    message = pb.LossTerm()
    codec.encode_config(case["cfg"], message.config)
    for name, value in [*zip(names, args, strict=False), *kwargs.items()]:
        _encode_named(message, name, value, names)
    return message


def _small(case: dict) -> bool:
    total = 0
    for value in [*case["args"], *case["kwargs"].values()]:
        for tensor in value if isinstance(value, list) else [value]:
            total += tensor.numel() if isinstance(tensor, torch.Tensor) else 1
    return total <= SAMPLE_LIMIT


SEEDS: list[bytes] = [
    seed_term(case).SerializeToString(deterministic=True)  # map order fixed: the same bytes every run
    for case in SINGLE_CASES
    if case["error"] is None and difference(case) != "refuse" and _small(case)
]


# -- values ---------------------------------------------------------------------------------------

finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
# integers small, or far too big to allocate: config sizes (num_classes, bins) size buffers, and a
# value in between (2**30) would make the server allocate gigabytes rather than refuse at once
integers = st.integers(-(2**20), 2**20) | st.sampled_from([2**40, 2**53, 2**62, -(2**62)])
json_values = st.recursive(
    st.none() | st.booleans() | integers | finite_or_not | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
# every avg_factor class the pipeline must handle: none, zero, negative, tiny, normal, huge, nan, inf
AVG_FACTORS = [None, 0.0, -0.0, -1.0, -2.5, 1e-30, 1.0, 4.0, 1e308, math.nan, math.inf, -math.inf]
REDUCTIONS = [None, "none", "mean", "sum", "", "avg", "MEAN"]


def random_tensor(draw: Callable, dtype: int, shape: list[int]) -> pb.Tensor:
    """A tensor whose bytes match its shape, filled one of several ways (values in or out of range)."""
    torch_dtype = codec.DTYPE_TO_TORCH[dtype]
    numel = math.prod(shape)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    fill = draw(st.sampled_from(["normal", "labels", "zeros", "bytes", "huge", "nonfinite"]))
    if fill == "bytes":  # any bit pattern: NaNs, denormals, bools that are neither 0 nor 1
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
        return pb.Tensor(dtype=dtype, shape=shape, data=raw.numpy().tobytes())
    if fill == "labels":
        values = torch.randint(-2, 12, (numel,), generator=generator).double()
    elif fill == "zeros":
        values = torch.zeros(numel, dtype=torch.float64)
    elif fill == "huge":
        values = torch.randn(numel, generator=generator, dtype=torch.float64) * 1e300
    else:
        values = torch.randn(numel, generator=generator, dtype=torch.float64) * 3
    if fill == "nonfinite" and numel:
        spots = torch.randint(0, numel, (max(1, numel // 8),), generator=generator)
        values[spots] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[spots % 3]
    if not torch_dtype.is_floating_point and torch_dtype != torch.bool:
        info = torch.iinfo(torch_dtype)
        values = values.nan_to_num(0.0, info.max, info.min).clamp(info.min, info.max)
    tensor = (values != 0) if torch_dtype == torch.bool else values.to(torch_dtype)
    return codec.encode_tensor(tensor.reshape(shape))


@st.composite
def shapes(draw: Callable, like: list[int]) -> list[int]:
    """A shape near ``like`` (reshaped, transposed, one more or less axis), or an abusive one."""
    kind = draw(st.sampled_from(["near", "near", "small", "empty", "negative", "huge", "overflow", "rank"]))
    if kind == "near":
        shape = list(like)
        if shape and draw(st.booleans()):
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 9))
        if draw(st.booleans()):
            shape = shape[::-1]
        if draw(st.booleans()):
            shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 3)))
        elif shape and draw(st.booleans()):
            shape.pop(draw(st.integers(0, len(shape) - 1)))
        return shape
    if kind == "small":
        return draw(st.lists(st.integers(0, 12), max_size=4))
    if kind == "empty":
        return [*draw(st.lists(st.integers(1, 5), max_size=2)), 0]
    if kind == "negative":
        return [draw(st.integers(-(2**63), -1)), *draw(st.lists(st.integers(0, 5), max_size=2))]
    if kind == "huge":
        return draw(st.lists(st.integers(2**20, 2**40), min_size=1, max_size=3))
    if kind == "overflow":  # strides past int64 even with no element at all
        return [0, *draw(st.lists(st.integers(2**31, 2**63 - 1), min_size=2, max_size=3))]
    return [1] * draw(st.integers(7, 24))


# -- mutations of one LossTerm ----------------------------------------------------------------------


def _config(term: pb.LossTerm) -> dict[str, Any]:
    return codec.decode_config(term.config)


def _set_config(term: pb.LossTerm, config: dict[str, Any]) -> None:
    term.ClearField("config")
    codec.encode_config(config, term.config)


def config_value(draw: Callable, term: pb.LossTerm) -> None:
    """A known parameter (of any loss), the type or a new key, set to a random JSON value."""
    config = _config(term)
    key = draw(st.sampled_from(["type", "reduction", "loss_weight", *PARAM_NAMES]) | st.text(max_size=8))
    config[key] = draw(json_values)
    _set_config(term, config)


def config_type(draw: Callable, term: pb.LossTerm) -> None:
    """Another loss's type (the inputs are then wrong for it), a misspelling, or no type."""
    config = _config(term)
    choice = draw(st.sampled_from(LOSS_NAMES) | st.text(max_size=10) | st.none())
    if choice is None:
        config.pop("type", None)
    else:
        config["type"] = choice
    _set_config(term, config)


def reductions(draw: Callable, term: pb.LossTerm) -> None:
    """One point of config.reduction x avg_factor x reduction_override."""
    config = _config(term)
    reduction = draw(st.sampled_from(REDUCTIONS))
    if reduction is None:
        config.pop("reduction", None)
    else:
        config["reduction"] = reduction
    _set_config(term, config)
    term.ClearField("avg_factor")
    term.ClearField("reduction_override")
    avg_factor = draw(st.sampled_from(AVG_FACTORS) | finite_or_not)
    if avg_factor is not None:
        term.avg_factor = avg_factor
    override = draw(st.sampled_from(REDUCTIONS))
    if override is not None:
        term.reduction_override = override


def _fits(shape: list[int]) -> bool:
    """Whether a tensor of this shape can be made here (and is small enough to be worth making).

    Written out rather than asking the codec, so that a codec that lets a bad shape through still
    meets generated requests that have it.
    """
    sane = len(shape) <= protocol.MAX_DIMS and all(d >= 0 for d in shape)
    return sane and math.prod(max(d, 1) for d in shape) < 2**63 and math.prod(shape) <= SAMPLE_LIMIT


def _pick_tensor(draw: Callable, term: pb.LossTerm) -> tuple[str, pb.Tensor] | None:
    found = list(codec.tensors_of(term))
    return draw(st.sampled_from(found)) if found else None


def tensor_dtype(draw: Callable, term: pb.LossTerm) -> None:
    """Another dtype: converted (valid bytes, maybe the wrong kind), relabelled, or not a dtype at all."""
    picked = _pick_tensor(draw, term)
    if picked is None:
        return
    _, tensor = picked
    new = draw(st.sampled_from(DTYPES) | st.sampled_from([pb.DTYPE_UNSPECIFIED, 11, 99, -1, 2**31 - 1]))
    if draw(st.booleans()) and new in codec.DTYPE_TO_TORCH and tensor.dtype in codec.DTYPE_TO_TORCH:
        try:
            value = codec.decode_tensor(tensor, "t").to(codec.DTYPE_TO_TORCH[new])
        except codec.CodecError:
            return
        tensor.CopyFrom(codec.encode_tensor(value))
    else:
        tensor.dtype = new


def tensor_shape(draw: Callable, term: pb.LossTerm) -> None:
    """A new shape; the bytes follow it (the loss sees an odd shape), stay (the lengths disagree) or go
    (no bytes: right for any shape with a zero in it, however large the others)."""
    picked = _pick_tensor(draw, term)
    if picked is None:
        return
    _, tensor = picked
    shape = draw(shapes(list(tensor.shape)))
    data = draw(st.sampled_from(["follow", "stay", "none"]))
    if data == "follow" and _fits(shape) and tensor.dtype in codec.DTYPE_TO_TORCH:
        tensor.CopyFrom(random_tensor(draw, tensor.dtype, shape))
        return
    tensor.shape[:] = shape
    if data == "none":
        tensor.data = b""


def tensor_bytes(draw: Callable, term: pb.LossTerm) -> None:
    """Truncated, extended or random bytes."""
    picked = _pick_tensor(draw, term)
    if picked is None:
        return
    _, tensor = picked
    data = tensor.data
    how = draw(st.sampled_from(["cut", "extend", "random", "empty"]))
    if how == "cut" and data:
        tensor.data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "extend":
        tensor.data = data + draw(st.binary(min_size=1, max_size=16))
    elif how == "random":
        tensor.data = draw(st.binary(min_size=len(data), max_size=len(data))) if len(data) <= 512 else data[::-1]
    else:
        tensor.data = b""


def tensor_values(draw: Callable, term: pb.LossTerm) -> None:
    """New values of the same dtype and shape: NaN/Inf, huge, out-of-range labels, random bits."""
    picked = _pick_tensor(draw, term)
    if picked is None:
        return
    _, tensor = picked
    if tensor.dtype in codec.DTYPE_TO_TORCH and _fits(list(tensor.shape)):
        tensor.CopyFrom(random_tensor(draw, tensor.dtype, list(tensor.shape)))


def big_tensor(draw: Callable, term: pb.LossTerm) -> None:
    """A well-formed tensor over the fuzzed server's element limits (its bytes do match its shape)."""
    picked = _pick_tensor(draw, term)
    if picked is None:
        return
    _, tensor = picked
    rows = draw(st.sampled_from([30_000, 70_000, 130_000]))
    tensor.CopyFrom(codec.encode_tensor(torch.zeros(rows, dtype=torch.float32)))


def wrong_target(draw: Callable, term: pb.LossTerm) -> None:
    """Another case's target, a value of another kind, or an empty Value."""
    term.ClearField("target")
    kind = draw(st.sampled_from(["other", "number", "text", "flag", "json", "tensors", "empty", "missing"]))
    if kind == "other":
        other = pb.LossTerm.FromString(draw(st.sampled_from(SEEDS)))
        if other.HasField("target"):
            term.target.CopyFrom(other.target)
    elif kind == "number":
        term.target.number = draw(finite_or_not)
    elif kind == "text":
        term.target.text = draw(st.text(max_size=8))
    elif kind == "flag":
        term.target.flag = draw(st.booleans())
    elif kind == "json":
        term.target.json.CopyFrom(codec.json_value(draw(json_values)))
    elif kind == "tensors":
        term.target.tensors.SetInParent()
        for _ in range(draw(st.integers(0, 3))):
            shape = draw(st.lists(st.integers(0, 6), max_size=2))
            term.target.tensors.items.append(random_tensor(draw, draw(st.sampled_from(DTYPES)), shape))
    elif kind == "empty":
        term.target.SetInParent()


def extra_input(draw: Callable, term: pb.LossTerm) -> None:
    """An input of any loss (or an unknown name) with a value of any kind."""
    name = draw(st.sampled_from(INPUT_NAMES) | st.text(max_size=8))
    value = term.inputs[name]
    kind = draw(st.sampled_from(["tensor", "integer", "number", "text", "flag", "json", "empty"]))
    if kind == "tensor":
        shape = draw(st.lists(st.integers(0, 8), max_size=3))
        value.tensor.CopyFrom(random_tensor(draw, draw(st.sampled_from(DTYPES)), shape))
    elif kind == "integer":
        value.integer = draw(st.integers(-(2**63), 2**63 - 1))
    elif kind == "number":
        value.number = draw(finite_or_not)
    elif kind == "text":
        value.text = draw(st.text(max_size=8))
    elif kind == "flag":
        value.flag = draw(st.booleans())
    elif kind == "json":
        value.json.CopyFrom(codec.json_value(draw(json_values)))


def drop_field(draw: Callable, term: pb.LossTerm) -> None:
    term.ClearField(draw(st.sampled_from(["pred", "target", "weight", "config", "inputs", "avg_factor"])))


def gradients(draw: Callable, term: pb.LossTerm) -> None:
    choices = st.sampled_from(["pred", "target", "weight", "none", "label", *INPUT_NAMES]) | st.text(max_size=6)
    term.gradients[:] = draw(st.lists(choices, max_size=3))


def upstream(draw: Callable, term: pb.LossTerm) -> None:
    """An upstream gradient (grad_output, or grad_outputs by part) of a random shape and dtype."""
    shape = draw(st.lists(st.integers(0, 8), max_size=3))
    tensor = random_tensor(draw, draw(st.sampled_from(DTYPES)), shape)
    if draw(st.booleans()):
        term.grad_output.CopyFrom(tensor)
    else:
        term.grad_outputs[draw(st.sampled_from(["", "0", "1", "loss_cls_classes"]) | st.text(max_size=4))].CopyFrom(
            tensor
        )


def session(draw: Callable, term: pb.LossTerm) -> None:
    """A session (a few names, so configs clash and the session limit is reached), replays, ids."""
    term.session = draw(st.sampled_from(["s0", "s1", "s2", "s3", "s4", "s5"]) | st.text(max_size=6))
    if draw(st.booleans()):
        term.replay_step = draw(st.integers(-(2**63), 2**63 - 1))
    if draw(st.booleans()):
        term.forward_id = draw(st.sampled_from(["a", "b"]) | st.text(max_size=6))


def sampler(draw: Callable, term: pb.LossTerm) -> None:
    """config.sampler (valid or not), a seed, sample_labels and sample_groups."""
    config = _config(term)
    config["sampler"] = draw(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["RandomSampler", "PseudoSampler", "OHEMSampler"]) | st.text(max_size=5)},
            optional={
                "num": st.integers(-3, 64) | json_values,
                "pos_fraction": st.floats(-1, 2) | json_values,
                "neg_pos_ub": st.integers(-2, 4) | json_values,
                "background_label": st.integers(-2, 12) | json_values,
            },
        )
        | json_values
    )
    _set_config(term, config)
    if draw(st.booleans()):
        term.seed = draw(st.integers(0, 2**64 - 1))
    for field in ("sample_labels", "sample_groups"):
        if draw(st.booleans()):
            shape = draw(st.lists(st.integers(0, 8), max_size=2))
            getattr(term, field).CopyFrom(random_tensor(draw, draw(st.sampled_from(DTYPES)), shape))


MUTATIONS = [
    config_value,
    config_type,
    config_type,
    reductions,
    reductions,
    tensor_dtype,
    tensor_shape,
    tensor_shape,
    tensor_bytes,
    tensor_values,
    tensor_values,
    big_tensor,
    wrong_target,
    extra_input,
    drop_field,
    gradients,
    upstream,
    session,
    sampler,
]


@st.composite
def loss_terms(draw: Callable) -> pb.LossTerm:
    term = pb.LossTerm.FromString(draw(st.sampled_from(SEEDS)))
    for mutate in draw(st.lists(st.sampled_from(MUTATIONS), max_size=4)):
        mutate(draw, term)
    return term


@st.composite
def evaluate_requests(draw: Callable) -> pb.EvaluateRequest:
    """1 to 5 terms (the fuzzed server takes 4), named as a client would, or not."""
    size = draw(st.sampled_from([1, 1, 1, 1, 2, 2, 3, 5]))  # mostly one term; now and then over the limit
    terms = [draw(loss_terms()) for _ in range(size)]
    request = pb.EvaluateRequest(terms=terms)
    if len(terms) > 1 or draw(st.booleans()):
        for index, term in enumerate(request.terms):
            term.name = draw(st.sampled_from([f"loss_{index}", f"loss_{index}", "", "loss_0"]) | st.text(max_size=4))
    return request


# -- raw bytes ------------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


@st.composite
def raw_requests(draw: Callable) -> bytes:
    """Bytes that may or may not parse as an EvaluateRequest."""
    seed = pb.LossTerm.FromString(draw(st.sampled_from(SEEDS)))
    valid = pb.EvaluateRequest(terms=[seed]).SerializeToString(deterministic=True)
    kind = draw(st.sampled_from(["random", "truncated", "bitflip", "wiretype", "length", "varint", "nested", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "bitflip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            bit = draw(st.integers(0, len(data) * 8 - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)
    if kind == "wiretype":  # a known or unknown field with any wire type (6 and 7 do not exist)
        field, wire = draw(st.integers(1, 20)), draw(st.integers(0, 7))
        payload = draw(st.binary(max_size=12))
        return valid + tag(field, wire) + payload if draw(st.booleans()) else tag(field, wire) + payload + valid
    if kind == "length":  # a length prefix far past the end of the message
        length = draw(st.sampled_from([2**31 - 1, 2**31, 2**32 + 5, 2**63 - 1, 2**64 - 1]) | st.integers(1, 2**64 - 1))
        return tag(1, 2) + varint(length) + draw(st.binary(max_size=16))
    if kind == "varint":  # an over-long varint (more than 10 bytes)
        return tag(1, 0) + b"\xff" * draw(st.integers(10, 20)) + b"\x01"
    if kind == "nested":  # a bad field inside terms[0].pred (LossTerm field 3 -> Tensor)
        inner = tag(draw(st.integers(1, 4)), draw(st.integers(0, 7))) + draw(st.binary(max_size=12))
        pred = tag(3, 2) + varint(len(inner)) + inner
        return tag(1, 2) + varint(len(pred)) + pred
    extra = struct.pack("<d", draw(finite_or_not))
    return valid + tag(1, 2) + varint(len(extra) + draw(st.integers(-3, 3)) % 256) + extra


# -- the property ---------------------------------------------------------------------------------------


# refusals that cannot name one field: bytes that do not parse, and the engine's catch-all for a
# torch error raised inside a loss (e.g. binary_cross_entropy's "target should be between 0 and 1")
WITHOUT_FIELD = ("is not a valid", "failed on these inputs")


def check_error(error: grpc.RpcError) -> grpc.StatusCode:
    """A refusal is a clear status: not INTERNAL/UNKNOWN, with a message (and a field when it is the input's)."""
    code = error.code()
    assert code not in NEVER, f"{code.name}: {error.details()}"
    assert error.details(), f"{code.name} without a message"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        unnamed = any(words in error.details() for words in WITHOUT_FIELD)
        assert field_of(error) or unnamed, f"{code.name} names no field: {error.details()}"
    return code


def _decode_term_inputs(term: pb.LossTerm, names: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {names[0]: codec.decode_tensor(term.pred, "pred").clone()}
    if term.HasField("target"):
        kwargs[names[1]] = codec.decode_value(term.target, "target")
    if term.HasField("weight"):
        kwargs["weight"] = codec.decode_tensor(term.weight, "weight")
    if term.HasField("avg_factor"):
        kwargs["avg_factor"] = term.avg_factor
    if term.HasField("reduction_override"):
        kwargs["reduction_override"] = term.reduction_override
    for key, value in term.inputs.items():
        decoded = codec.decode_value(value, key)
        if decoded is not None:  # an empty Value or JSON null is an input not sent, as on the server
            kwargs[key] = decoded
    return kwargs


def engine_parts(term: pb.LossTerm) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
    """The engine's own answer (loss parts, d(sum loss)/d(pred)), computed in process; None where not comparable.

    Terms with a session or a sampler are not recomputed (their answer depends on the server's state
    and draws); a stochastic loss is run, so that it raises where it must, but not compared.
    """
    config = codec.decode_config(term.config)
    if term.session or "sampler" in config:
        return None
    module = LOSSES.build(config)
    names = [i.name for i in LOSSES.describe(config["type"]).inputs]
    kwargs = _decode_term_inputs(term, names)
    pred = kwargs[names[0]]
    wants_grad = (
        pred.is_floating_point() and list(term.gradients) in ([], ["pred"]) and not term.HasField("grad_output")
    )
    with torch.enable_grad():
        pred.requires_grad_(wants_grad)
        output = [t for _, t in parts(module(**kwargs))]
    if LOSSES.describe(config["type"]).stochastic:
        return None
    grad = None
    if wants_grad and len(output) == 1 and output[0].requires_grad:
        (grad,) = torch.autograd.grad(output[0], pred, torch.ones_like(output[0]), allow_unused=True)
        grad = torch.zeros_like(pred) if grad is None else grad
    return [t.detach() for t in output], grad


def check_ok(request: pb.EvaluateRequest, response: pb.EvaluateResponse) -> None:
    """Every term of an OK answer that can be recomputed equals the engine's answer on the same inputs."""
    assert len(response.results) == len(request.terms)
    for index, (term, result) in enumerate(zip(request.terms, response.results, strict=True)):
        expected = engine_parts(term)
        if expected is None:
            continue
        losses, grad = expected
        got = [result.loss] if result.structure == "tensor" else [p.loss for p in result.parts]
        assert len(got) == len(losses), f"terms[{index}]: {len(got)} parts, the engine gives {len(losses)}"
        for sent, want in zip(got, losses, strict=True):
            torch.testing.assert_close(codec.decode_tensor(sent, "loss"), want, equal_nan=True, msg=f"terms[{index}]")
        if grad is not None and "pred" in result.gradients:
            got_grad = codec.decode_tensor(result.gradients["pred"], "grad")
            torch.testing.assert_close(got_grad, grad, equal_nan=True, msg=f"terms[{index}] gradient of pred")


def call(method: Any, request: pb.EvaluateRequest | bytes, timeout: float = 60) -> grpc.StatusCode:
    """Send one request (bytes, or a message) through a raw bytes-in, bytes-out method; check the answer."""
    data = request if isinstance(request, bytes) else request.SerializeToString(deterministic=True)
    try:
        answer = method(data, timeout=timeout)
    except grpc.RpcError as error:
        return check_error(error)
    if not isinstance(request, bytes):
        check_ok(request, pb.EvaluateResponse.FromString(answer))
    return grpc.StatusCode.OK


def good_request() -> tuple[pb.EvaluateRequest, torch.Tensor]:
    """A known-good request and the engine's loss for it."""
    pred, target = torch.randn(8, 5), torch.randint(0, 6, (8,))
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config({"type": "FocalLoss", "gamma": 2.0}, term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(target, term.target)
    return request, LOSSES.build({"type": "FocalLoss", "gamma": 2.0})(pred, target)


def assert_serves_correctly(method: Any) -> None:
    request, want = good_request()
    answer = pb.EvaluateResponse.FromString(method(request.SerializeToString(), timeout=30))
    torch.testing.assert_close(codec.decode_tensor(answer.results[0].loss, "loss"), want.detach())


# -- the other front doors: the same fuzzed requests streamed, in shared memory, and as ModelInfer ------

# "early-...": the same, sent with early_gradients (rows interleaved; the server may compute as they come);
# "lanes-...": the call spread over two lanes (EvaluateRequest.lanes, stripes of 64 KiB), itself or its lanes
# faulty. A fuzzing server should wait little for lanes that never come (--lane-join-timeout).
STREAM_FAULTS = [
    "none",
    "none",
    "none",
    "drop-chunk",
    "duplicate-chunk",
    "shift-offset",
    "extra-bytes",
    "no-header",
    "early-none",
    "early-drop-chunk",
    "early-shift-offset",
    "lanes-none",
    "lanes-missing-lane",
    "lanes-stranger-lane",
    "lanes-bad-header",
    "lanes-chunk-on-lane",
]
LANE_STRIPE = 64 << 10


@st.composite
def stream_faults(draw: Callable) -> str:
    """What goes wrong with a fuzzed request's stream on top of its contents ("none": a valid stream)."""
    return draw(st.sampled_from(STREAM_FAULTS))


def lane_messages(request: pb.EvaluateRequest, fault: str) -> list[list[Any]]:
    """``request`` spread over two lanes: the messages of its own stream, then of each lane, with ``fault``
    ("lanes-...") done to them."""
    request = pb.EvaluateRequest.FromString(request.SerializeToString())
    sink = chunks.StreamSink.take(request, min_bytes=1)
    lanes = pb.StreamLanes(call=uuid.uuid4().bytes, count=2, stripe_bytes=LANE_STRIPE)
    streams = [list(messages) for messages in chunks.lane_streams(request, sink, lanes, chunk_bytes=64)]
    if fault == "lanes-missing-lane":
        del streams[2]
    elif fault == "lanes-stranger-lane":
        streams[1][0] = pb.EvaluateChunk(lane=pb.StreamLane(call=uuid.uuid4().bytes, lane=1))
    elif fault == "lanes-bad-header":
        streams[0][0].request.lanes.stripe_bytes = LANE_STRIPE + 1
    elif fault == "lanes-chunk-on-lane" and len(streams[0]) > 1:
        streams[1].append(streams[0].pop())  # one of the request stream's own stripes
    return streams


def stream_messages(request: pb.EvaluateRequest, fault: str) -> list[Any]:
    """``request`` as EvaluateStream messages: every tensor with bytes streamed in chunks after it (chunks
    of 64 bytes, so that a tensor takes several), with ``fault`` done to the stream."""
    request = pb.EvaluateRequest.FromString(request.SerializeToString())
    sink = chunks.StreamSink.take(request, min_bytes=1)
    early, fault = fault.startswith("early-"), fault.removeprefix("early-")
    messages = list(chunks.stream_chunks(request, sink, raw=False, chunk_bytes=64, early_gradients=early))
    if fault == "no-header":
        return messages[1:] or [pb.EvaluateChunk(chunk=pb.TensorChunk(tensor="terms[0].pred"))]
    pieces = messages[1:]
    if pieces and fault == "drop-chunk":
        del messages[1 + len(pieces) // 2]
    elif pieces and fault == "duplicate-chunk":
        messages.insert(1, messages[1])
    elif pieces and fault == "shift-offset":
        messages[-1].chunk.offset += 1
    elif pieces and fault == "extra-bytes":
        messages[-1].chunk.data += b"\0\0\0\0"
    return messages


def stream_answer(responses: Any) -> pb.EvaluateResponse:
    """A stream's answer with its chunks put back into the response: the chunks that came before it
    (early gradients) count for the paths it lists in ``early`` and are void for any other."""
    early = []
    first = next(responses)
    while first.WhichOneof("kind") == "chunk":
        early.append(first.chunk)
        first = next(responses)
    assembler = chunks.StreamAssembler(first.response)
    for chunk in early:
        if chunk.tensor in first.response.early:
            assembler.add(chunk)
    for message in responses:
        assembler.add(message.chunk)
    chunks.fill_streamed(first.response, assembler.finish())
    return first.response


def call_stream(method: Any, request: pb.EvaluateRequest, fault: str, timeout: float = 60) -> grpc.StatusCode:
    """One fuzzed request through EvaluateStream (and its lanes); an OK answer of a valid stream equals the
    engine's; a lane ends OK, with no message, or with a clear status as any call."""
    lanes: list[Any] = []
    if fault.startswith("lanes-"):
        own, *others = lane_messages(request, fault)
        lanes = [method(iter(messages), timeout=timeout) for messages in others]  # they start sending now
    else:
        own = stream_messages(request, fault)
    try:
        response = stream_answer(method(iter(own), timeout=timeout))
    except grpc.RpcError as error:
        return check_error(error)
    finally:
        for lane in lanes:
            try:
                assert list(lane) == [], "a lane answered with messages"
            except grpc.RpcError as error:
                check_error(error)
    if fault in ("none", "early-none", "lanes-none"):
        check_ok(request, response)
    return grpc.StatusCode.OK


class SharedSegment:
    """A registered shared-memory segment that fuzzed requests put their tensors in."""

    def __init__(self, stub: Any, size: int = 1 << 22) -> None:
        self.segment = wire_memory.Segment.create(size)
        self.region, self.handoff = register_segment(stub, self.segment)

    def place(self, request: pb.EvaluateRequest, misplace: int = 0) -> pb.EvaluateRequest:
        """``request`` with every tensor's bytes in the segment (``misplace`` shifts one reference's offset)
        and the second half of the segment as the output range."""
        request = pb.EvaluateRequest.FromString(request.SerializeToString())
        half = self.segment.size // 2
        room = wire_memory.SegmentRange(self.segment, self.region, 0, half)
        sink = chunks.StreamSink.take(request, min_bytes=1)
        sink.place(room)
        sink.inline(placed=False)  # what did not fit stays inline
        if misplace:
            for _, tensor in codec.tensors_of(request):
                if tensor.HasField("shm"):
                    tensor.shm.offset += misplace
                    break
        request.output_shm.region, request.output_shm.offset, request.output_shm.byte_size = self.region, half, half
        return request

    def answer(self, response: pb.EvaluateResponse) -> pb.EvaluateResponse:
        """``response`` with the tensors it names in the segment read back inline."""
        views = wire_memory.shared_memory_tensors(codec.tensors_of(response), self._resolve)
        chunks.fill_streamed(response, views)
        for _, tensor in codec.tensors_of(response):
            tensor.ClearField("shm")
        return response

    def _resolve(self, ref: pb.SharedMemoryRef, field: str) -> torch.Tensor:
        assert ref.region == self.region, f"{field}: the answer names region {ref.region!r}"
        return self.segment.bytes_at(ref.offset, ref.byte_size)

    def close(self) -> None:
        self.handoff.close()
        self.segment.close()


def call_shared(
    method: Any, segment: SharedSegment, request: pb.EvaluateRequest, misplace: int, timeout: float = 60
) -> grpc.StatusCode:
    """One fuzzed request with its tensors in shared memory; an OK answer equals the engine's."""
    try:
        response = method(segment.place(request, misplace), timeout=timeout)
    except grpc.RpcError as error:
        return check_error(error)
    if not misplace:
        check_ok(request, segment.answer(response))
    return grpc.StatusCode.OK


OIP_DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64", "BYTES", "FP8", ""]
OIP_TYPED = {"BOOL": "bool_contents", "INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents"}


@st.composite
def infer_requests(draw: Callable) -> oip.ModelInferRequest:
    """ModelInfer requests from the recorded cases (pred and target), then mangled: the model, the inputs'
    names, datatypes, shapes and bytes, typed contents, parameters (config JSON among them) and outputs."""
    term = draw(loss_terms())
    config = codec.decode_config(term.config)
    loss = str(config.get("type", ""))
    model = draw(st.sampled_from([loss] * 6 + ["NoSuchLoss", ""]))
    request = oip.ModelInferRequest(model_name=model, model_version=draw(st.sampled_from(["", "", "", "1", "1", "2"])))
    typed = draw(st.booleans())
    for name, tensor in (("pred", term.pred), ("target", term.target.tensor)):
        if not tensor.ListFields():
            continue
        datatype = DTYPE_NAMES.get(tensor.dtype, "FP32")
        if draw(st.integers(0, 9)) == 0:
            datatype = draw(st.sampled_from(OIP_DATATYPES))
        shape = list(tensor.shape)
        if draw(st.integers(0, 9)) == 0:
            shape = draw(shapes(shape))
        entry = request.inputs.add(name=draw(st.sampled_from([name, name, name, "weights", f"{name}[0]"])))
        entry.datatype, entry.shape[:] = datatype, shape
        data = tensor.data
        if typed and datatype in OIP_TYPED:
            dtype = codec.DTYPE_TO_TORCH.get(tensor.dtype, torch.uint8)
            whole = len(data) - len(data) % dtype.itemsize  # a mutated tensor's bytes may not fill an element
            values = torch.frombuffer(bytearray(data[:whole]), dtype=dtype) if whole else []
            kind = {"BOOL": bool, "FP32": float}.get(datatype, _as_int)
            getattr(entry.contents, OIP_TYPED[datatype]).extend([kind(v.item()) for v in values][:SAMPLE_LIMIT])
        elif not typed:
            request.raw_input_contents.append(data if draw(st.integers(0, 9)) else data[: len(data) // 2])
    parameters = {k: v for k, v in config.items() if k != "type"}
    text = json.dumps(parameters)
    choice = draw(st.integers(0, 9))
    if choice == 0:
        text = draw(st.sampled_from(["[" * 1000, '{"gamma": ' + "9" * 400 + "}", "{", "null", '"a"', "{}"]))
    elif choice == 1:
        text = draw(st.text(max_size=20))
    if choice != 2:
        request.parameters["config"].string_param = text
    if draw(st.integers(0, 4)) == 0:
        slot = request.parameters[draw(st.sampled_from(["reduction_override", "avg_factor", "ignore_index", "x"]))]
        set_parameter(slot, draw(st.sampled_from(["mean", "avg", 2.0, -1, True])))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(st.sampled_from(["loss", "grad_pred", "grad_target", "loss_0", "junk"])))
    return request


def _as_int(value: float | int | bool) -> int:
    """A value as the integer a caller would send for it (what does not fit int32 wraps into it)."""
    number = int(value) if math.isfinite(value) else 0
    return (number + 2**31) % 2**32 - 2**31


DTYPE_NAMES = {
    pb.BOOL: "BOOL",
    pb.UINT8: "UINT8",
    pb.INT8: "INT8",
    pb.INT16: "INT16",
    pb.INT32: "INT32",
    pb.INT64: "INT64",
    pb.FLOAT16: "FP16",
    pb.BFLOAT16: "BF16",
    pb.FLOAT32: "FP32",
    pb.FLOAT64: "FP64",
}


def call_infer(method: Any, request: oip.ModelInferRequest, timeout: float = 60) -> grpc.StatusCode:
    """One fuzzed ModelInfer; any answer but a clear status or a well-formed response breaks the property."""
    try:
        answer = method(request, timeout=timeout)
    except grpc.RpcError as error:
        return check_error(error)
    assert len(answer.outputs) == len(answer.raw_output_contents), "outputs without their bytes"
    return grpc.StatusCode.OK
