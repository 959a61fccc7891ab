"""The one codec: how tensors, values and loss configs become protobuf and back.

Server and client both use this module and nothing else does this job. It depends on torch,
numpy and protobuf only (never on the loss engine), so the thin client stays thin.

Wire format of a tensor (``losswire.v1.Tensor``): dtype, shape, and the elements as raw
little-endian, C-contiguous bytes. Decoding reads the ``bytes`` field once (protobuf copies a
bytes field on every read) and wraps it with ``torch.frombuffer`` without another copy.

Big tensors travel in chunks (``EvaluateStream``): the sender encodes its message with a
:class:`StreamSink`, which keeps every big tensor's bytes out of the message (dtype and shape
declared, ``data`` empty), and :func:`stream_chunks` sends the message and then those bytes in
``TensorChunk``s straight from the tensor's memory. The receiver's :class:`StreamAssembler`
allocates each declared tensor once and copies each chunk into it once; ``decode_tensor(...,
streamed=assembler.tensors)`` then takes the assembled tensor for that field path.

``transfer_dtype`` (opt-in, lossy): floating tensors wider than float16/bfloat16 travel as that
dtype (``Tensor.data_dtype``) at half the bytes of float32 and are cast back to their declared dtype
on arrival. The receiver computes in the declared dtype: only the values' precision is lost.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
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
    sink: StreamSink | None = None,
) -> pb.Tensor:
    """A torch tensor (any device, layout or stride) -> ``losswire.v1.Tensor``.

    ``transfer_dtype`` (a DType, see :func:`transfer_dtype_of`): a float32/float64 tensor of at
    least ``NARROW_MIN_ELEMENTS`` elements travels in that dtype. ``sink``: a tensor of at least
    ``sink.min_bytes`` keeps its data out of the message (dtype and shape declared) and is recorded
    in the sink, to be streamed.
    """
    if tensor.dtype not in TORCH_TO_DTYPE:
        supported = ", ".join(str(d).removeprefix("torch.") for d in TORCH_TO_DTYPE)
        raise CodecError(f"cannot send a {tensor.dtype} tensor; supported dtypes: {supported}")
    message = pb.Tensor() if out is None else out
    message.dtype = TORCH_TO_DTYPE[tensor.dtype]
    message.shape[:] = list(tensor.shape)
    flat = tensor.detach()
    if _narrows(tensor.dtype, transfer_dtype) and tensor.numel() >= NARROW_MIN_ELEMENTS:
        flat = flat.to(DTYPE_TO_TORCH[transfer_dtype])
        message.data_dtype = transfer_dtype
    flat = flat.to("cpu").contiguous().reshape(-1).view(torch.uint8)  # bytes: bfloat16 too (numpy lacks it)
    if sink is not None and flat.numel() >= sink.min_bytes:
        sink.add(message, flat)
    else:
        message.data = flat.numpy().tobytes()
    return message


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


def _wire_dtypes(message: pb.Tensor, field: str) -> tuple[torch.dtype, torch.dtype]:
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


def decode_tensor(
    message: pb.Tensor,
    field: str,
    device: torch.device | str | None = None,
    max_elements: int | None = None,
    streamed: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """``losswire.v1.Tensor`` -> torch tensor on ``device``; every inconsistency is a CodecError.

    ``streamed`` (a :class:`StreamAssembler`'s ``tensors``): a tensor whose ``field`` path is in it
    was streamed, and is taken from there instead of ``data``.
    """
    dtype, data_dtype = _wire_dtypes(message, field)
    shape = list(message.shape)
    numel = check_shape(shape, field, max_elements=max_elements)
    if streamed is not None and field in streamed:
        tensor = streamed[field]
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
        tensor = tensor.to(device)
    return tensor.to(dtype)  # a no-op unless the data travelled narrowed (data_dtype)


# -- values (forward inputs) ----------------------------------------------------------------------


def encode_value(
    value: Any, out: pb.Value | None = None, *, transfer_dtype: int = 0, sink: StreamSink | None = None
) -> pb.Value:
    """A forward argument -> ``losswire.v1.Value``: tensor, tuple/list of tensors, or a plain value.

    ``transfer_dtype`` and ``sink``: as :func:`encode_tensor`, for its tensors."""
    message = pb.Value() if out is None else out
    if isinstance(value, Tensor):
        encode_tensor(value, message.tensor, transfer_dtype=transfer_dtype, sink=sink)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        message.tensors.SetInParent()
        for item in value:
            encode_tensor(item, message.tensors.items.add(), transfer_dtype=transfer_dtype, sink=sink)
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
    message: pb.Value,
    field: str,
    device: torch.device | str | None = None,
    max_elements: int | None = None,
    streamed: Mapping[str, Tensor] | None = None,
) -> Any:
    kind = message.WhichOneof("kind")
    if kind == "tensor":
        return decode_tensor(message.tensor, field, device, max_elements, streamed)
    if kind == "tensors":
        return tuple(
            decode_tensor(t, f"{field}.tensors.items[{i}]", device, max_elements, streamed)
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


# -- streaming big tensors (EvaluateStream) --------------------------------------------------------

# Tensors of at least this many bytes leave the first message of a stream and follow in chunks;
# smaller ones ride inline (a chunk per tiny tensor would cost more than it saves).
STREAM_MIN_TENSOR_BYTES = 64 << 10
# Bytes per TensorChunk. gRPC moves a stream of messages of a few MiB far faster than one huge
# message (it reassembles a big message in slices and copies it whole); 4 MiB measured best here.
STREAM_CHUNK_BYTES = 4 << 20
PACKAGE = pb.DESCRIPTOR.package  # "losswire.v1": the only messages that can hold tensors


def tensors_of(message: Message, path: str = "") -> Iterator[tuple[str, pb.Tensor]]:
    """Every ``losswire.v1.Tensor`` inside ``message``, with the field path the codec names it by.

    Walks the message by its descriptor (a tensor field added to the contract later is found
    without touching this code). A ``Value``'s ``tensor`` is named by the Value's own path
    (``terms[0].target``), as :func:`decode_value` names it; map entries as ``gradients[pred]``.
    These paths name streamed tensors, and the server's limits (``server/limits.py``) name the
    tensors they refuse by them.
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


class StreamSink:
    """The big tensors of a message being encoded, whose bytes are streamed rather than embedded.

    :func:`encode_tensor` records here every tensor of at least ``min_bytes`` (its message gets dtype
    and shape, no data) with a flat uint8 view of its bytes: nothing is copied until a chunk is cut.
    """

    def __init__(self, min_bytes: int = STREAM_MIN_TENSOR_BYTES) -> None:
        self.min_bytes = min_bytes
        self.entries: list[tuple[pb.Tensor, Any]] = []  # (message, bytes-like: uint8 tensor, bytes...)
        self.placed: list[tuple[pb.Tensor, Any]] = []  # moved into shared memory by place()

    def add(self, message: pb.Tensor, data: Any) -> None:
        self.entries.append((message, data))

    @property
    def nbytes(self) -> int:
        """Bytes held back for streaming."""
        return sum(_byte_view(data).nbytes for _, data in self.entries)

    def inline(self, placed: bool = True) -> None:
        """Put every held-back tensor's bytes into its message after all (a unary call, a resend),
        and, with ``placed``, those placed in shared memory too; empties the sink (of those)."""
        for message, data in (*self.entries, *(self.placed if placed else ())):
            message.data = _byte_view(data).tobytes()
            message.ClearField("shm")
        self.entries.clear()
        if placed:
            self.placed.clear()

    def place(self, reserve: Reserve) -> None:
        """Move held-back tensors into shared memory: ``reserve(nbytes)`` gives (region, offset, a
        uint8 destination of nbytes) or None when there is no room (the tensor stays held back).
        Each placed tensor's bytes are copied once and its message names them (``Tensor.shm``)."""
        kept = []
        for message, data in self.entries:
            flat = data if isinstance(data, Tensor) else torch.frombuffer(_byte_view(data), dtype=torch.uint8)
            spot = reserve(flat.numel())
            if spot is None:
                kept.append((message, data))
                continue
            region, offset, destination = spot
            destination.copy_(flat)
            message.shm.region, message.shm.offset, message.shm.byte_size = region, offset, flat.numel()
            self.placed.append((message, data))
        self.entries[:] = kept

    @classmethod
    def take(cls, message: Message, min_bytes: int = STREAM_MIN_TENSOR_BYTES) -> StreamSink:
        """Move the data of every tensor of ``message`` with at least ``min_bytes`` into a new sink
        (for a message encoded without one; one copy per tensor). ``inline()`` puts them back."""
        sink = cls(min_bytes)
        for _, tensor in tensors_of(message):
            if tensor.ByteSize() >= min_bytes:  # ByteSize does not copy the data
                data = tensor.data
                if len(data) >= min_bytes:
                    tensor.ClearField("data")
                    sink.add(tensor, data)
        return sink

    def paths(self, root: Message) -> list[tuple[str, Any]]:
        """(field path in ``root``, bytes) of every held-back tensor, in ``root``'s order."""
        # the protobuf runtime hands out one Python object per sub-message while it is referenced
        # (the sink holds them), so identity finds each recorded message in the walk
        held = {id(message): data for message, data in self.entries}
        found = [(path, held.pop(id(tensor))) for path, tensor in tensors_of(root) if id(tensor) in held]
        if held:
            raise CodecError(f"{len(held)} streamed tensor(s) are not inside the message being sent")
        return found


def byte_count(data: Any) -> int:
    """Bytes of a held-back tensor's data (a uint8 tensor or any bytes-like)."""
    return data.numel() if isinstance(data, Tensor) else memoryview(data).nbytes


def _byte_view(data: Any) -> memoryview:
    if isinstance(data, Tensor):
        data = data.numpy()
    return memoryview(data).cast("B")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_wire_bytes(path: str, offset: int, data: Any) -> bytes:
    """The serialized ``EvaluateChunk{chunk: TensorChunk{tensor, offset, data}}``, built directly.

    The same bytes protobuf would produce, but ``data`` (a bytes-like slice of the tensor's memory)
    is copied once, into the result, instead of into a message and again by its serialization.
    """
    name = path.encode()
    size = memoryview(data).nbytes
    inner = b"\x0a" + _varint(len(name)) + name + b"\x10" + _varint(offset) + b"\x1a" + _varint(size)
    return b"".join((b"\x1a", _varint(len(inner) + size), inner, data))


class RawChunk:
    """A ``TensorChunk`` read straight from the bytes of its ``EvaluateChunk``: ``data`` is a
    memoryview of those bytes (no copy). Answers ``WhichOneof`` and ``chunk`` as the message does."""

    __slots__ = ("data", "offset", "tensor")

    def __init__(self, tensor: str, offset: int, data: memoryview) -> None:
        self.tensor, self.offset, self.data = tensor, offset, data

    def WhichOneof(self, group: str) -> str:  # noqa: N802 - protobuf's name
        return "chunk"

    @property
    def chunk(self) -> RawChunk:
        return self


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _raw_chunk(view: memoryview) -> RawChunk | None:
    """The chunk in ``view`` when it is an ``EvaluateChunk.chunk`` holding only TensorChunk's three
    fields (as every protobuf serializer writes them); None for anything else."""
    if len(view) < 2 or view[0] != 0x1A:
        return None
    size, pos = _read_varint(view, 1)
    if pos + size != len(view):
        return None
    tensor, offset, data = "", 0, view[0:0]
    while pos < len(view):
        tag = view[pos]
        if tag == 0x10:
            offset, pos = _read_varint(view, pos + 1)
        elif tag in (0x0A, 0x1A):
            length, start = _read_varint(view, pos + 1)
            pos = start + length
            if pos > len(view):
                return None
            if tag == 0x0A:
                tensor = bytes(view[start:pos]).decode()
            else:
                data = view[start:pos]
        else:
            return None
    return RawChunk(tensor, offset, data)


def parse_chunk(data: bytes) -> pb.EvaluateChunk | RawChunk:
    """Deserializer of EvaluateStream's messages: a chunk without copying its data (protobuf's
    parser copies a bytes field into the message and again on every read: two copies of each 4 MiB);
    the first message, and anything that is not a plain chunk, through protobuf."""
    try:
        chunk = _raw_chunk(memoryview(data))
    except (IndexError, ValueError):  # truncated or odd bytes: protobuf says what is wrong with them
        chunk = None
    return chunk if chunk is not None else pb.EvaluateChunk.FromString(data)


def serialize_chunk(message: pb.EvaluateChunk | bytes) -> bytes:
    """Request serializer of a stream: a message, or bytes already serialized (:func:`chunk_wire_bytes`)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def stream_chunks(
    root: pb.EvaluateRequest | pb.EvaluateResponse,
    sink: StreamSink,
    raw: bool = True,
    chunk_bytes: int = STREAM_CHUNK_BYTES,
) -> Iterator[pb.EvaluateChunk | bytes]:
    """The messages of a stream: ``root`` (whose tensors recorded in ``sink`` have no data) as the
    first ``EvaluateChunk``, then every held-back tensor in chunks of ``chunk_bytes``: serialized
    bytes when ``raw`` (for a :func:`serialize_chunk` serializer), else ``EvaluateChunk`` messages."""
    paths = sink.paths(root)
    kind = "request" if isinstance(root, pb.EvaluateRequest) else "response"
    yield pb.EvaluateChunk(**{kind: root})  # a copy of a message without its big data: small
    for path, data in paths:
        view = _byte_view(data)
        for offset in range(0, view.nbytes, chunk_bytes):
            piece = view[offset : offset + chunk_bytes]
            if raw:
                yield chunk_wire_bytes(path, offset, piece)
            else:
                yield pb.EvaluateChunk(chunk=pb.TensorChunk(tensor=path, offset=offset, data=piece.tobytes()))


# reserve(nbytes) -> (region, offset, uint8 destination tensor of nbytes) or None: see StreamSink.place
Reserve = Callable[[int], "tuple[str, int, Tensor] | None"]
# resolve(ref, field) -> a uint8 tensor viewing ref's bytes (checked against the region's bounds)
Resolve = Callable[[pb.SharedMemoryRef, str], Tensor]


def shared_memory_tensors(
    tensors: Iterable[tuple[str, pb.Tensor]], resolve: Resolve, max_elements: int | None = None
) -> dict[str, Tensor]:
    """Those of ``tensors`` (a message's ``tensors_of``: field path, Tensor) that lie in shared memory
    (``Tensor.shm``), by field path, viewed in place (declared shape, data dtype) for
    ``decode_tensor(..., streamed=...)``.

    The reference must agree with the declared dtype and shape: ``byte_size`` the tensor's bytes,
    the offset a multiple of the item size, and ``data`` empty; otherwise a CodecError names it.
    """
    found: dict[str, Tensor] = {}
    for path, message in tensors:
        if not message.HasField("shm"):
            continue
        ref, field = message.shm, f"{path}.shm"
        _, data_dtype = _wire_dtypes(message, path)
        shape = list(message.shape)
        numel = check_shape(shape, path, max_elements=max_elements)
        if message.data:
            raise CodecError(f"{path} has both data and shm; send its bytes one way", field=f"{path}.data")
        expected = numel * data_dtype.itemsize
        if ref.byte_size != expected:
            raise CodecError(
                f"{field}.byte_size must be {numel} x {data_dtype.itemsize} = {expected} for shape {shape}, "
                f"got {ref.byte_size}",
                field=f"{field}.byte_size",
            )
        if ref.offset % data_dtype.itemsize:
            raise CodecError(
                f"{field}.offset must be a multiple of {data_dtype.itemsize} (the item size), got {ref.offset}",
                field=f"{field}.offset",
            )
        data = resolve(ref, field)
        found[path] = data.view(data_dtype).reshape(shape) if numel else torch.empty(shape, dtype=data_dtype)
    return found


def fill_streamed(root: Message, streamed: Mapping[str, Tensor]) -> None:
    """Put the bytes of assembled tensors (by path) back into ``root``'s messages (one copy each)."""
    if streamed:
        for path, message in tensors_of(root):
            if path in streamed:
                message.data = streamed[path].reshape(-1).view(torch.uint8).numpy().tobytes()


def _empty_bytes(nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class _Pending:
    __slots__ = ("buffer", "dtype", "nbytes", "received", "shape")

    def __init__(self, buffer: Tensor, dtype: torch.dtype, shape: list[int]) -> None:
        self.buffer, self.dtype, self.shape = buffer, dtype, shape
        self.nbytes = buffer.numel()
        self.received = 0


class StreamAssembler:
    """Reassembles the streamed tensors of a stream's first message from its ``TensorChunk``s.

    Every tensor of ``header`` whose data is empty though its shape has elements is streamed: its
    buffer is allocated here once (in its ``data_dtype`` when narrowed) and each chunk's bytes are
    copied into it once. Check limits on the declared shapes *before* making the assembler: this
    allocates. A chunk naming no streamed tensor, out of order (its offset is not the bytes received
    so far: a gap or an overlap) or past the tensor's end, and a stream that ends before a tensor is
    complete, are CodecErrors naming the field. ``tensors`` maps each path to its tensor (declared
    shape, data dtype) for ``decode_tensor(..., streamed=...)``. ``allocate(nbytes)`` gives each
    buffer, a uint8 tensor (default: fresh memory; ``BufferPool.take``: reused memory).
    """

    def __init__(
        self, header: Message, max_elements: int | None = None, allocate: Callable[[int], Tensor] | None = None
    ) -> None:
        allocate = allocate or _empty_bytes
        self._pending: dict[str, _Pending] = {}
        for path, message in tensors_of(header):
            _, data_dtype = _wire_dtypes(message, path)
            shape = list(message.shape)
            numel = check_shape(shape, path, max_elements=max_elements)
            if numel == 0 or len(message.data) > 0 or message.HasField("shm"):
                continue  # inline (decode_tensor checks its length), in shared memory, or empty
            buffer = allocate(numel * data_dtype.itemsize)
            self._pending[path] = _Pending(buffer, data_dtype, shape)
        self.tensors: dict[str, Tensor] = {}
        self.chunks = 0

    @property
    def nbytes(self) -> int:
        """Bytes the stream must still deliver, in all."""
        return sum(p.nbytes - p.received for p in self._pending.values())

    def add(self, chunk: pb.TensorChunk) -> None:
        """Copy one chunk into its tensor."""
        self.chunks += 1
        where = f"chunk {self.chunks}"
        pending = self._pending.get(chunk.tensor)
        if pending is None:
            done = " (it is complete already)" if chunk.tensor in self.tensors else ""
            expected = ", ".join(sorted(self._pending)) or "none: every streamed tensor is complete"
            raise CodecError(
                f"{where}.tensor {chunk.tensor!r} names no tensor being streamed{done}; expected one of: {expected}",
                field="chunk.tensor",
            )
        data = chunk.data  # read once: every read of a bytes field copies it
        offset, size = chunk.offset, len(data)
        if offset != pending.received:
            problem = "overlaps bytes already received" if offset < pending.received else "leaves a gap"
            raise CodecError(
                f"{where} for {chunk.tensor} starts at offset {offset} but {pending.received} of its {pending.nbytes} "
                f"bytes have arrived ({problem}): a tensor's chunks come in order, without gaps or overlaps",
                field=f"{chunk.tensor}.data",
            )
        if offset + size > pending.nbytes:
            raise CodecError(
                f"{where} for {chunk.tensor} holds bytes [{offset}, {offset + size}) but the tensor has only "
                f"{pending.nbytes} bytes (dtype and shape as declared)",
                field=f"{chunk.tensor}.data",
            )
        if size:
            pending.buffer[offset : offset + size] = torch.frombuffer(data, dtype=torch.uint8)
        pending.received += size
        if pending.received == pending.nbytes:
            del self._pending[chunk.tensor]
            self.tensors[chunk.tensor] = pending.buffer.view(pending.dtype).reshape(pending.shape)

    def finish(self) -> dict[str, Tensor]:
        """The assembled tensors, once the stream has ended; a CodecError if one is incomplete."""
        for path, pending in self._pending.items():
            raise CodecError(
                f"the stream ended with {path} incomplete: {pending.received} of its {pending.nbytes} bytes arrived",
                field=f"{path}.data",
            )
        return self.tensors
