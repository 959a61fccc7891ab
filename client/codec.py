"""The one codec: how tensors, values and loss configs become protobuf and back.

Server and client both use this module and nothing else does this job. It depends on torch,
numpy and protobuf only (never on the loss engine), so the thin client stays thin.

Wire format of a tensor (``losswire.v1.Tensor``): dtype, shape, and the elements as raw
little-endian, C-contiguous bytes. Decoding reads the ``bytes`` field once (protobuf copies a
bytes field on every read) and wraps it with ``torch.frombuffer`` without another copy.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from google.protobuf import json_format, struct_pb2
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("losswire's codec assumes a little-endian host")

# torch warns that a bytes object is not writable; decoded tensors are never written in place.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

DTYPE_TO_TORCH: dict[int, torch.dtype] = {
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT32: torch.float32,
    pb.FLOAT64: torch.float64,
    pb.INT8: torch.int8,
    pb.INT16: torch.int16,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.UINT8: torch.uint8,
    pb.BOOL: torch.bool,
}
TORCH_TO_DTYPE: dict[torch.dtype, int] = {v: k for k, v in DTYPE_TO_TORCH.items()}
MAX_DIMS = 16
INT64_MAX = 2**63 - 1  # torch sizes, strides and element counts are int64


class CodecError(ValueError):
    """A message that cannot be decoded; ``field`` names it (``terms[0].pred.shape``...)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CodecLimitError(CodecError):
    """A tensor larger than the receiver's configured limit (maps to RESOURCE_EXHAUSTED)."""


# -- tensors ------------------------------------------------------------------------------------


def encode_tensor(tensor: Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """A torch tensor (any device, layout or stride) -> ``losswire.v1.Tensor``."""
    if tensor.dtype not in TORCH_TO_DTYPE:
        supported = ", ".join(str(d).removeprefix("torch.") for d in TORCH_TO_DTYPE)
        raise CodecError(f"cannot send a {tensor.dtype} tensor; supported dtypes: {supported}")
    message = pb.Tensor() if out is None else out
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    message.dtype = TORCH_TO_DTYPE[tensor.dtype]
    message.shape[:] = list(tensor.shape)
    # view as bytes: works for every dtype, bfloat16 included (which numpy lacks)
    message.data = flat.view(torch.uint8).numpy().tobytes()
    return message


def check_shape(shape: list[int], field: str, max_dims: int = MAX_DIMS, max_elements: int | None = None) -> int:
    """The element count of a declared ``shape``, refused before anything is allocated.

    A rank over ``max_dims``, a negative size, or a shape whose strides overflow int64 is an
    INVALID_ARGUMENT CodecError (torch cannot make even an empty tensor of ``[0, 2**62, 2**62]``);
    more than ``max_elements`` elements is a CodecLimitError. Only the shape is read, never ``data``.
    """
    if len(shape) > max_dims:
        raise CodecError(
            f"{field}.shape has {len(shape)} dimensions, at most {max_dims} are allowed", field=f"{field}.shape"
        )
    if any(d < 0 for d in shape):
        raise CodecError(f"{field}.shape must hold non-negative sizes, got {shape}", field=f"{field}.shape")
    span = math.prod(max(d, 1) for d in shape)  # what torch's strides multiply up, zero sizes or not
    if span > INT64_MAX:
        raise CodecError(
            f"{field}.shape {shape} is too large: the product of its non-zero sizes must be at most 2**63 - 1, "
            f"got {span}",
            field=f"{field}.shape",
        )
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise CodecLimitError(
            f"{field} has {numel} elements (shape {shape}); this server accepts at most {max_elements} per tensor",
            field=f"{field}.shape",
        )
    return numel


def decode_tensor(
    message: pb.Tensor,
    field: str,
    device: torch.device | str | None = None,
    max_elements: int | None = None,
) -> Tensor:
    """``losswire.v1.Tensor`` -> torch tensor on ``device``; every inconsistency is a CodecError."""
    if message.dtype not in DTYPE_TO_TORCH:
        names = ", ".join(pb.DType.Name(d) for d in DTYPE_TO_TORCH)
        got = pb.DType.Name(message.dtype) if message.dtype in pb.DType.values() else str(message.dtype)
        raise CodecError(f"{field}.dtype must be one of {names}, got {got}", field=f"{field}.dtype")
    dtype = DTYPE_TO_TORCH[message.dtype]
    shape = list(message.shape)
    numel = check_shape(shape, field, max_elements=max_elements)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = message.data  # read once: every read of a bytes field copies it
    if len(data) != numel * itemsize:
        raise CodecError(
            f"{field}.data must hold {numel} x {itemsize} = {numel * itemsize} bytes for dtype "
            f"{pb.DType.Name(message.dtype)} and shape {shape}, got {len(data)} bytes",
            field=f"{field}.data",
        )
    if numel == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(data, dtype=dtype).reshape(shape)
    if device is not None and torch.device(device) != tensor.device:
        tensor = tensor.to(device)
    return tensor


# -- values (forward inputs) ----------------------------------------------------------------------


def encode_value(value: Any, out: pb.Value | None = None) -> pb.Value:
    """A forward argument -> ``losswire.v1.Value``: tensor, tuple/list of tensors, or a plain value."""
    message = pb.Value() if out is None else out
    if isinstance(value, Tensor):
        encode_tensor(value, message.tensor)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        message.tensors.SetInParent()
        for item in value:
            encode_tensor(item, message.tensors.items.add())
    elif isinstance(value, bool):
        message.flag = value
    elif isinstance(value, int):
        message.integer = value
    elif isinstance(value, float):
        message.number = value
    elif isinstance(value, str):
        message.text = value
    else:
        try:
            json_format.ParseDict(_jsonable(value), message.json)
        except (json_format.ParseError, TypeError) as error:
            raise CodecError(f"cannot send a {type(value).__name__} as a forward input: {error}") from None
    return message


def decode_value(
    message: pb.Value, field: str, device: torch.device | str | None = None, max_elements: int | None = None
) -> Any:
    kind = message.WhichOneof("kind")
    if kind == "tensor":
        return decode_tensor(message.tensor, field, device, max_elements)
    if kind == "tensors":
        return tuple(
            decode_tensor(t, f"{field}.tensors.items[{i}]", device, max_elements)
            for i, t in enumerate(message.tensors.items)
        )
    if kind == "json":
        return python_value(message.json)
    if kind is None:
        return None
    return getattr(message, kind)


# -- loss configs ---------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    return value


def encode_config(config: Mapping[str, Any], out: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """An mmdet config dict -> ``google.protobuf.Struct`` (tuples become lists)."""
    message = struct_pb2.Struct() if out is None else out
    try:
        message.update(_jsonable(config))
    except (ValueError, TypeError) as error:
        raise CodecError(f"the loss config must be JSON-compatible: {error}", field="config") from None
    return message


def decode_config(message: struct_pb2.Struct) -> dict[str, Any]:
    """``google.protobuf.Struct`` -> dict; numbers arrive as floats (the engine normalises ints)."""
    return {key: python_value(value) for key, value in message.fields.items()}


def json_value(value: Any) -> struct_pb2.Value:
    """A plain Python value (None, number, str, list...) -> ``google.protobuf.Value``."""
    message = struct_pb2.Value()
    json_format.ParseDict(_jsonable(value), message)
    return message


def python_value(message: struct_pb2.Value) -> Any:
    """``google.protobuf.Value`` -> a plain Python value, read as sent.

    Not ``json_format.MessageToDict``: it refuses NaN and infinite numbers (JSON has none), which a
    binary message carries faithfully, so the loss's own checks decide about them.
    """
    kind = message.WhichOneof("kind")
    if kind == "struct_value":
        return {key: python_value(value) for key, value in message.struct_value.fields.items()}
    if kind == "list_value":
        return [python_value(value) for value in message.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(message, kind)
