"""The one codec: how tensors, values and loss configs become protobuf and back.

Server and client both use this package and nothing else does this job. It depends on torch,
numpy and protobuf only (never on the loss engine or gRPC), so the thin client stays thin.

Wire format of a tensor (``losswire.v1.Tensor``): dtype, shape, and the elements as raw
little-endian, C-contiguous bytes. Decoding reads the ``bytes`` field once (protobuf copies a
bytes field on every read) and wraps it with ``torch.frombuffer`` without another copy. Big
tensors may instead travel in chunks after the message (:mod:`losswire.wire.chunks`) or lie in
shared memory (:mod:`losswire.wire.shared_memory`); ``decode_tensor(..., streamed=...)`` takes
those from where they arrived.

``transfer_dtype`` (opt-in, lossy): floating tensors wider than float16/bfloat16 travel as that
dtype (``Tensor.data_dtype``) at half the bytes of float32 and are cast back to their declared dtype
on arrival. The receiver computes in the declared dtype: only the values' precision is lost.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb

from .protocol import MAX_DIMS, PACKAGE

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
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # torch sizes, strides and element counts are int64; so is Value.integer
# Lists and objects nested in a config or a JSON forward input, at most. Real configs nest a few levels;
# protobuf refuses to parse a Struct nested ~49 deep (its 100-message limit), and the codec's walk recurses.
MAX_JSON_DEPTH = 32


class Sink(Protocol):
    """Where an encoder holds back big tensors' bytes instead of embedding them (``chunks.StreamSink``):
    a uint8 tensor on the host, or on a device (copied to the host only where the bytes are read)."""

    min_bytes: int

    def add(self, message: pb.Tensor, data: Any) -> None: ...


class Stage(Protocol):
    """How tensors cross between the host and a device (``staging.Staging``: through pinned buffers);
    without one, ``Tensor.to``."""

    def to_device(self, tensor: Tensor, device: torch.device) -> Tensor: ...

    def to_host(self, tensor: Tensor) -> AbstractContextManager[tuple[Tensor, bool]]:
        """(the tensor on the host, whether that memory is only lent for the ``with``)"""
        ...


# nbytes -> a uint8 CPU tensor of that many bytes, ideally memory written before (``buffers.BufferPool.take``):
# where a cast between the transfer dtype and the tensor's own lands. Casting into fresh memory costs a
# page fault per 4 KiB, which made a narrowed transfer slower than the float32 bytes it halves.
Allocate = Callable[[int], Tensor]


def _cast(tensor: Tensor, dtype: torch.dtype, allocate: Allocate | None) -> Tensor:
    """``tensor.to(dtype)``; on the CPU into ``allocate``'s memory when given (one vectorised pass)."""
    if allocate is None or tensor.device.type != "cpu" or tensor.dtype == dtype:
        return tensor.to(dtype)
    out = allocate(tensor.numel() * dtype.itemsize).view(dtype).view(tensor.shape)
    return out.copy_(tensor)


class CodecError(ValueError):
    """A message that cannot be decoded; ``field`` names it (``terms[0].pred.shape``...)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CodecLimitError(CodecError):
    """A tensor larger than the receiver's configured limit (maps to RESOURCE_EXHAUSTED)."""


# -- tensors ------------------------------------------------------------------------------------


TRANSFER_DTYPES: dict[str, int] = {"float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}


def transfer_dtype_of(name: str | int | None) -> int:
    """``'float16'`` / ``'bfloat16'`` / a DType value / None -> the wire DType (0: none)."""
    if name is None or name == 0:
        return pb.DTYPE_UNSPECIFIED
    if isinstance(name, str) and name.removeprefix("torch.") in TRANSFER_DTYPES:
        return TRANSFER_DTYPES[name.removeprefix("torch.")]
    if name in TRANSFER_DTYPES.values():
        return int(name)  # type: ignore[arg-type]
    raise ValueError(f"transfer_dtype must be None, 'float16' or 'bfloat16', got {name!r}")


# Tensors under this many elements keep their precision under a transfer_dtype: halving a scalar loss
# or a few boxes saves nothing worth its rounding.
NARROW_MIN_ELEMENTS = 4096


def _narrows(dtype: torch.dtype, transfer: int) -> bool:
    """Whether a ``dtype`` tensor may travel as the ``transfer`` DType: floating and wider than it."""
    return bool(transfer) and dtype.is_floating_point and dtype.itemsize > 2


def encode_tensor(
    tensor: Tensor,
    out: pb.Tensor | None = None,
    *,
    transfer_dtype: int = 0,
    sink: Sink | None = None,
    allocate: Allocate | None = None,
    stage: Stage | None = None,
) -> pb.Tensor:
    """A torch tensor (any device, layout or stride) -> ``losswire.v1.Tensor``.

    ``transfer_dtype`` (a DType, see :func:`transfer_dtype_of`): a float32/float64 tensor of at
    least ``NARROW_MIN_ELEMENTS`` elements travels in that dtype. ``sink``: a tensor of at least
    ``sink.min_bytes`` keeps its data out of the message (dtype and shape declared) and is recorded
    in the sink, to be streamed. ``allocate``: where a narrowed copy goes (see :data:`Allocate`), and
    a staged one the sink keeps. ``stage``: how a device tensor comes to the host (see :class:`Stage`).
    """
    if tensor.dtype not in TORCH_TO_DTYPE:
        supported = ", ".join(str(d).removeprefix("torch.") for d in TORCH_TO_DTYPE)
        raise CodecError(f"cannot send a {tensor.dtype} tensor; supported dtypes: {supported}")
    message = pb.Tensor() if out is None else out
    message.dtype = TORCH_TO_DTYPE[tensor.dtype]
    message.shape[:] = list(tensor.shape)
    flat = tensor.detach()
    if _narrows(tensor.dtype, transfer_dtype) and tensor.numel() >= NARROW_MIN_ELEMENTS:
        flat = _cast(flat, DTYPE_TO_TORCH[transfer_dtype], allocate)
        message.data_dtype = transfer_dtype
    if stage is not None and flat.device.type != "cpu":
        with stage.to_host(flat.contiguous()) as (host, lent):
            _fill(message, _bytes_of(host), sink, allocate if lent else None, lent)
        return message
    # bytes (bfloat16 too), where they are: a device tensor the sink holds back stays there, and is copied
    # once to where it goes (a shared-memory segment, straight from the device), not first into fresh host
    # memory (a CUDA pred of 64 MiB cost 55 ms more than a CPU one, on an H200 host, against some 15 ms for
    # the copies themselves)
    _fill(message, _bytes_of(flat), sink)
    return message


def _bytes_of(tensor: Tensor) -> Tensor:
    """``tensor``'s bytes, uint8, in order (a copy only where it is not contiguous). A tensor of one element
    or none may be "contiguous" with stride 0 (``torch.tensor(1.).expand(1)``), which ``view`` refuses:
    its one element is laid out as a stride-1 vector first."""
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() <= 1 and flat.stride(0) != 1:
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


def _fill(
    message: pb.Tensor, data: Tensor, sink: Sink | None, allocate: Allocate | None = None, lent: bool = False
) -> None:
    """``data`` (a tensor's bytes, uint8, on the host or a device) into ``message``, or held back in ``sink``
    where it is. ``lent``: the memory goes back to its pool after this, so what the sink keeps (to send
    later, at its caller's pace) is copied out first, into ``allocate``'s memory when given."""
    if sink is not None and data.numel() >= sink.min_bytes:
        if lent:
            data = (torch.empty_like(data) if allocate is None else allocate(data.numel())).copy_(data)
        sink.add(message, data)
    else:
        message.data = data.cpu().numpy().tobytes()  # numpy: torch has no bytes of its own (bfloat16 as uint8)


def encode_shared(tensor: Tensor, out: pb.Tensor, region: str, offset: int) -> pb.Tensor:
    """A contiguous CPU tensor that already lies at ``offset`` of shared region ``region`` (an
    answer written in place) -> its dtype, shape and reference, no bytes copied."""
    out.dtype = TORCH_TO_DTYPE[tensor.dtype]
    out.shape[:] = list(tensor.shape)
    out.shm.region, out.shm.offset, out.shm.byte_size = region, offset, tensor.numel() * tensor.element_size()
    return out


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


def wire_dtypes(message: pb.Tensor, field: str) -> tuple[torch.dtype, torch.dtype]:
    """(declared dtype, dtype of ``data``): they differ under a ``data_dtype``; CodecError if invalid."""
    if message.dtype not in DTYPE_TO_TORCH:
        names = ", ".join(pb.DType.Name(d) for d in DTYPE_TO_TORCH)
        got = pb.DType.Name(message.dtype) if message.dtype in pb.DType.values() else str(message.dtype)
        raise CodecError(f"{field}.dtype must be one of {names}, got {got}", field=f"{field}.dtype")
    dtype = DTYPE_TO_TORCH[message.dtype]
    if message.data_dtype == pb.DTYPE_UNSPECIFIED:
        return dtype, dtype
    if message.data_dtype not in TRANSFER_DTYPES.values() or not _narrows(dtype, message.data_dtype):
        got = pb.DType.Name(message.data_dtype) if message.data_dtype in pb.DType.values() else str(message.data_dtype)
        raise CodecError(
            f"{field}.data_dtype must be unset, or FLOAT16 or BFLOAT16 for a FLOAT32/FLOAT64 dtype; got {got} "
            f"for dtype {pb.DType.Name(message.dtype)}",
            field=f"{field}.data_dtype",
        )
    return dtype, DTYPE_TO_TORCH[message.data_dtype]


def wire_itemsize(message: pb.Tensor, field: str) -> int:
    """Bytes per element of ``message``'s data as it travels (its ``data_dtype`` when narrowed);
    a CodecError naming the field for an invalid dtype."""
    return wire_dtypes(message, field)[1].itemsize


def decode_tensor(
    message: pb.Tensor,
    field: str,
    device: torch.device | str | None = None,
    max_elements: int | None = None,
    streamed: Mapping[str, Tensor] | None = None,
    allocate: Allocate | None = None,
    stage: Stage | None = None,
) -> Tensor:
    """``losswire.v1.Tensor`` -> torch tensor on ``device``; every inconsistency is a CodecError.

    ``streamed`` (a :class:`StreamAssembler`'s ``tensors``): a tensor whose ``field`` path is in it
    was streamed, and is taken from there instead of ``data``. ``allocate``: where a tensor that
    travelled narrowed is widened back on the CPU (see :data:`Allocate`). ``stage``: how it goes to
    ``device`` (see :class:`Stage`).
    """
    dtype, data_dtype = wire_dtypes(message, field)
    shape = list(message.shape)
    numel = check_shape(shape, field, max_elements=max_elements)
    if streamed is not None and field in streamed:
        tensor = streamed[field]
        if tensor.numel() != numel or tensor.dtype != data_dtype:  # bytes arrived for another declaration
            raise CodecError(
                f"{field} declares {numel} elements of {data_dtype}, but {tensor.numel()} of {tensor.dtype} "
                "arrived for it",
                field=field,
            )
    else:
        itemsize = data_dtype.itemsize
        data = message.data  # read once: every read of a bytes field copies it
        if len(data) != numel * itemsize:
            raise CodecError(
                f"{field}.data must hold {numel} x {itemsize} = {numel * itemsize} bytes for dtype "
                f"{pb.DType.Name(message.data_dtype or message.dtype)} and shape {shape}, got {len(data)} bytes",
                field=f"{field}.data",
            )
        if numel == 0:
            tensor = torch.empty(shape, dtype=data_dtype)
        else:
            tensor = torch.frombuffer(data, dtype=data_dtype).reshape(shape)
    if device is not None and torch.device(device) != tensor.device:
        tensor = tensor.to(device) if stage is None else stage.to_device(tensor, torch.device(device))
    return _cast(tensor, dtype, allocate)  # a no-op unless the data travelled narrowed (data_dtype)


# -- values (forward inputs) ----------------------------------------------------------------------


def encode_value(
    value: Any,
    out: pb.Value | None = None,
    *,
    transfer_dtype: int = 0,
    sink: Sink | None = None,
    allocate: Allocate | None = None,
) -> pb.Value:
    """A forward argument -> ``losswire.v1.Value``: tensor, tuple/list of tensors, or a plain value.

    ``transfer_dtype``, ``sink`` and ``allocate``: as :func:`encode_tensor`, for its tensors."""
    message = pb.Value() if out is None else out
    options = {"transfer_dtype": transfer_dtype, "sink": sink, "allocate": allocate}
    if isinstance(value, Tensor):
        encode_tensor(value, message.tensor, **options)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        message.tensors.SetInParent()
        for item in value:
            encode_tensor(item, message.tensors.items.add(), **options)
    elif isinstance(value, bool):
        message.flag = value
    elif isinstance(value, int):
        message.integer = _int64(value)
    elif isinstance(value, float):
        message.number = value
    elif isinstance(value, str):
        message.text = value
    elif isinstance(value, np.integer):  # an index read from an array (np.int64): the int it holds
        message.integer = _int64(int(value))
    elif isinstance(value, np.floating):
        message.number = float(value)
    else:
        try:
            json_format.ParseDict(_jsonable(value), message.json)
        except (json_format.ParseError, TypeError, OverflowError) as error:  # OverflowError: an int beyond a double
            raise CodecError(f"cannot send a {type(value).__name__} as a forward input: {error}") from None
    return message


def decode_value(
    message: pb.Value,
    field: str,
    device: torch.device | str | None = None,
    max_elements: int | None = None,
    streamed: Mapping[str, Tensor] | None = None,
    allocate: Allocate | None = None,
    stage: Stage | None = None,
) -> Any:
    kind = message.WhichOneof("kind")
    if kind == "tensor":
        return decode_tensor(message.tensor, field, device, max_elements, streamed, allocate, stage)
    if kind == "tensors":
        return tuple(
            decode_tensor(t, f"{field}.tensors.items[{i}]", device, max_elements, streamed, allocate, stage)
            for i, t in enumerate(message.tensors.items)
        )
    if kind == "json":
        return python_value(message.json)
    if kind is None:
        return None
    return getattr(message, kind)


# -- loss configs ---------------------------------------------------------------------------------


def _int64(value: int) -> int:
    """``value`` if ``Value.integer`` (an int64) holds it; protobuf's own refusal is a bare ValueError."""
    if INT64_MIN <= value <= INT64_MAX:
        return value
    # no str(value): Python refuses to print an int of over 4300 digits
    raise CodecError(f"cannot send an integer of {value.bit_length()} bits as a forward input: it must fit int64")


def _jsonable(value: Any, depth: int = 1) -> Any:
    """``value`` as plain JSON types; CodecError past ``MAX_JSON_DEPTH`` nested levels, before Python's
    recursion limit (a RecursionError) or protobuf's nesting limit is reached."""
    if isinstance(value, (Mapping, tuple, list)) and depth > MAX_JSON_DEPTH:
        raise CodecError(f"a JSON value nested deeper than {MAX_JSON_DEPTH} levels cannot be sent")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    return value


def encode_config(config: Mapping[str, Any], out: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """An mmdet config dict -> ``google.protobuf.Struct`` (tuples become lists)."""
    message = struct_pb2.Struct() if out is None else out
    try:
        message.update(_jsonable(config))
    except (ValueError, TypeError, OverflowError) as error:  # an integer beyond a double's range too
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


# A list of this many values or more is first read as numbers from its wire form (``_numbers``)
MANY_NUMBERS = 64
# One number of a ListValue on the wire: field 1 (a Value, 9 bytes long) holding field 2, number_value, fixed64
_NUMBER_ITEM = np.dtype([("head", "V3"), ("number", "<f8")])
_NUMBER_HEAD = np.void(b"\x0a\x09\x11")


def _numbers(message: struct_pb2.ListValue) -> list[float] | None:
    """``message``'s values as floats when every one is a number, read from its wire form by numpy in one
    pass (value by value, a class_weight of 13,000 numbers took ~10 ms of Python a call); else None."""
    data = message.SerializeToString()
    if len(data) != _NUMBER_ITEM.itemsize * len(message.values):
        return None
    items = np.frombuffer(data, dtype=_NUMBER_ITEM)
    if not (items["head"] == _NUMBER_HEAD).all():
        return None
    return items["number"].tolist()


def python_value(message: struct_pb2.Value) -> Any:
    """``google.protobuf.Value`` -> a plain Python value, read as sent.

    Not ``json_format.MessageToDict``: it refuses NaN and infinite numbers (JSON has none), which a
    binary message carries faithfully, so the loss's own checks decide about them.
    """
    kind = message.WhichOneof("kind")
    if kind == "struct_value":
        return {key: python_value(value) for key, value in message.struct_value.fields.items()}
    if kind == "list_value":
        values = message.list_value.values
        numbers = _numbers(message.list_value) if len(values) >= MANY_NUMBERS else None
        return numbers if numbers is not None else [python_value(value) for value in values]
    if kind is None or kind == "null_value":
        return None
    return getattr(message, kind)


# -- walking a message's tensors ----------------------------------------------------------------------


def tensors_of(message: Message, path: str = "") -> Iterator[tuple[str, pb.Tensor]]:
    """Every ``losswire.v1.Tensor`` inside ``message``, with the field path the codec names it by.

    Walks the message by its descriptor (a tensor field added to the contract later is found
    without touching this code). A ``Value``'s ``tensor`` is named by the Value's own path
    (``terms[0].target``), as :func:`decode_value` names it; map entries as ``gradients[pred]``.
    These paths name streamed tensors, and the server's limits name the tensors they refuse by them.
    """
    if isinstance(message, pb.Tensor):
        yield path, message
        return
    for field, value in message.ListFields():
        walk = _WALKS.get(field)
        if walk is None:
            walk = _WALKS[field] = _walk_of(field, message)
        if walk == _SKIP:
            continue  # scalars, and google.protobuf's Struct/Value (configs, JSON inputs): no tensors
        if walk == _ALIAS:
            child = path
        else:
            child = f"{path}.{field.name}" if path else field.name
        if walk == _MAP:
            for key, item in value.items():
                if isinstance(item, Message):
                    yield from tensors_of(item, f"{child}[{key}]")
        elif walk == _REPEATED:
            for index, item in enumerate(value):
                yield from tensors_of(item, f"{child}[{index}]")
        else:
            yield from tensors_of(value, child)


# How tensors_of walks each field, decided once per field descriptor (reading descriptors and their
# options on every call cost more than the walk itself on a small request).
_SKIP, _ALIAS, _MAP, _REPEATED, _SINGLE = range(5)
_WALKS: dict[Any, int] = {}


def _walk_of(field: Any, message: Message) -> int:
    kind = field.message_type
    if kind is None or not kind.full_name.startswith(PACKAGE + "."):
        return _SKIP
    if isinstance(message, pb.Value) and field.name == "tensor":
        return _ALIAS  # a Value's tensor is named by the Value's own path
    if kind.GetOptions().map_entry:
        return _MAP
    return _REPEATED if field.is_repeated else _SINGLE
