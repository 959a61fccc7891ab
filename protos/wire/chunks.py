"""Big tensors in chunks (``EvaluateStream``): how a message's big tensors leave it and follow it.

The sender encodes its message with a :class:`StreamSink`, which keeps every big tensor's bytes out
of the message (dtype and shape declared, ``data`` empty), and :func:`stream_chunks` sends the
message and then those bytes in ``TensorChunk``s straight from the tensor's memory. The receiver's
:class:`StreamAssembler` allocates each declared tensor once and copies each chunk into it once;
``codec.decode_tensor(..., streamed=assembler.tensors)`` then takes the assembled tensor for that
field path. Chunks are read and written without protobuf's copies of their bytes
(:func:`parse_chunk`, :func:`chunk_wire_bytes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from google.protobuf.message import Message
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb

from .codec import CodecError, check_shape, tensors_of, wire_dtypes
from .protocol import (
    LANE_CALL_MAX_BYTES,
    LANE_CALL_MIN_BYTES,
    MAX_STREAM_LANES,
    MAX_STRIPE_BYTES,
    STREAM_CHUNK_BYTES,
    STREAM_MIN_TENSOR_BYTES,
    STRIPE_UNIT_BYTES,
)

# reserve(nbytes) -> (region, offset, uint8 destination tensor of nbytes) or None: see StreamSink.place
Reserve = Callable[[int], "tuple[str, int, Tensor] | None"]


class StreamSink:
    """The big tensors of a message being encoded, whose bytes are streamed rather than embedded.

    :func:`encode_tensor` records here every tensor of at least ``min_bytes`` (its message gets dtype
    and shape, no data) with a flat uint8 view of its bytes: nothing is copied until a chunk is cut.
    A device tensor's view stays on its device: ``place`` copies it into shared memory from there, and
    it comes to the host once where its bytes are read (a chunk, ``inline``).
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
        return sum(byte_count(data) for _, data in self.entries)

    def inline(self, placed: bool = True) -> None:
        """Put every held-back tensor's bytes into its message after all (a unary call, a resend),
        and, with ``placed``, those placed in shared memory too; empties the sink (of those)."""
        for message, data in (*self.entries, *(self.placed if placed else ())):
            message.data = _byte_view(data).tobytes()
            message.ClearField("shm")
        self.entries.clear()
        if placed:
            self.placed.clear()

    def withdraw(self, message: pb.Tensor) -> None:
        """Stop holding back ``message``'s tensor (its bytes went already: ``EvaluateResponse.early``);
        its message keeps dtype and shape, without data."""
        self.entries[:] = [(m, data) for m, data in self.entries if m is not message]

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
        """(field path in ``root``, bytes on the host) of every held-back tensor, in ``root``'s order. A
        device tensor is copied to the host here, once, however many streams then cut it into chunks."""
        # the protobuf runtime hands out one Python object per sub-message while it is referenced
        # (the sink holds them), so identity finds each recorded message in the walk
        held = {id(message): data for message, data in self.entries}
        found = [(path, _on_host(held.pop(id(tensor)))) for path, tensor in tensors_of(root) if id(tensor) in held]
        if held:
            raise CodecError(f"{len(held)} streamed tensor(s) are not inside the message being sent")
        return found


def check_call_name(call: bytes, field: str) -> None:
    """A CodecError naming ``field`` unless ``call`` has a call name's size (``StreamLanes.call``): a request's
    own, or the one a lane names to join."""
    if not LANE_CALL_MIN_BYTES <= len(call) <= LANE_CALL_MAX_BYTES:
        raise CodecError(
            f"{field} must be {LANE_CALL_MIN_BYTES} to {LANE_CALL_MAX_BYTES} random bytes; got {len(call)}",
            field=field,
        )


def byte_count(data: Any) -> int:
    """Bytes of a held-back tensor's data (a uint8 tensor or any bytes-like)."""
    return data.numel() if isinstance(data, Tensor) else memoryview(data).nbytes


def _on_host(data: Any) -> Any:
    """A held-back device tensor's bytes copied to the host; anything else as it is."""
    return data.cpu() if isinstance(data, Tensor) and data.device.type != "cpu" else data


def _byte_view(data: Any) -> memoryview:
    if isinstance(data, Tensor):
        data = _on_host(data).numpy()
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
    early_gradients: bool = False,
) -> Iterator[pb.EvaluateChunk | bytes]:
    """The messages of a stream: ``root`` (whose tensors recorded in ``sink`` have no data) as the
    first ``EvaluateChunk``, then every held-back tensor in chunks of ``chunk_bytes``: serialized
    bytes when ``raw`` (for a :func:`serialize_chunk` serializer), else ``EvaluateChunk`` messages.
    ``early_gradients``: a request sent with ``EvaluateRequest.early_gradients`` set (in the message
    sent, not in ``root``), its inputs' rows interleaved."""
    paths = sink.paths(root)
    yield _first_message(root, early_gradients)
    yield from _chunk_messages(_pieces(root, paths, chunk_bytes, early_gradients), paths, raw)


def lane_streams(
    request: pb.EvaluateRequest,
    sink: StreamSink,
    lanes: pb.StreamLanes,
    chunk_bytes: int = STREAM_CHUNK_BYTES,
    early_gradients: bool = False,
) -> list[Iterator[pb.EvaluateChunk | bytes]]:
    """The messages of a request spread over ``lanes`` (``EvaluateRequest.lanes``): the request's own
    stream first (the request, with ``lanes`` set, then its stripes), then each lane's (its
    ``StreamLane``, then its stripes); chunks as serialized bytes, as :func:`stream_chunks` sends them."""
    paths = sink.paths(request)
    first = _first_message(request, early_gradients)
    first.request.lanes.CopyFrom(lanes)
    stripes = Stripes.of(first.request)
    dealt = stripes.split(_pieces(request, paths, chunk_bytes, early_gradients))
    heads = [first] + [pb.EvaluateChunk(lane=pb.StreamLane(call=lanes.call, lane=i)) for i in range(1, stripes.streams)]
    return [_headed(head, _chunk_messages(iter(part), paths, True)) for head, part in zip(heads, dealt, strict=True)]


def _headed(head: pb.EvaluateChunk, rest: Iterator[bytes]) -> Iterator[pb.EvaluateChunk | bytes]:
    yield head
    yield from rest


def _first_message(root: pb.EvaluateRequest | pb.EvaluateResponse, early_gradients: bool) -> pb.EvaluateChunk:
    kind = "request" if isinstance(root, pb.EvaluateRequest) else "response"
    first = pb.EvaluateChunk(**{kind: root})  # a copy of a message without its big data: small
    if early_gradients:
        first.request.early_gradients = True
    return first


def _pieces(
    root: Message, paths: list[tuple[str, Any]], chunk_bytes: int, early_gradients: bool
) -> Iterator[tuple[str, int, int]]:
    """(path, start, stop) of each chunk: tensor after tensor, or rows interleaved (``early_gradients``)."""
    pieces = _row_pieces(root, paths, chunk_bytes) if early_gradients else None
    if pieces is None:
        pieces = (
            (path, offset, min(offset + chunk_bytes, byte_count(data)))
            for path, data in paths
            for offset in range(0, byte_count(data), chunk_bytes)
        )
    return pieces


def _chunk_messages(
    pieces: Iterator[tuple[str, int, int]], paths: list[tuple[str, Any]], raw: bool
) -> Iterator[pb.EvaluateChunk | bytes]:
    views = {path: _byte_view(data) for path, data in paths}
    for path, start, stop in pieces:
        piece = views[path][start:stop]
        if raw:
            yield chunk_wire_bytes(path, start, piece)
        else:
            yield pb.EvaluateChunk(chunk=pb.TensorChunk(tensor=path, offset=start, data=piece.tobytes()))


def _row_pieces(root: Message, paths: list[tuple[str, Any]], chunk_bytes: int) -> Iterator[tuple[str, int, int]] | None:
    """(path, start, stop) of every piece of ``paths``' tensors with the rows of a one-term request's
    inputs interleaved (``EvaluateRequest.early_gradients``): the tensors whose first dimension is
    pred's first go in turn, each with its next rows, about ``chunk_bytes`` of pred at a time, so the
    server holds every input of a block of rows early; the others go first, whole. None where the
    request has no streamed pred to follow."""
    shapes = dict((path, list(message.shape)) for path, message in tensors_of(root))
    sizes = {path: byte_count(data) for path, data in paths}
    pred = "terms[0].pred"
    if len(getattr(root, "terms", ())) != 1 or pred not in sizes or not shapes[pred] or shapes[pred][0] <= 0:
        return None  # no rows to follow (bytes a message declares none of go tensor after tensor, refused there)
    rows = shapes[pred][0]
    aligned = [path for path in sizes if shapes[path] and shapes[path][0] == rows and sizes[path] % rows == 0]
    step = max(1, chunk_bytes // max(1, sizes[pred] // rows))  # rows per turn

    def pieces() -> Iterator[tuple[str, int, int]]:
        for path in sizes:
            if path not in aligned:
                yield from ((path, o, min(o + chunk_bytes, sizes[path])) for o in range(0, sizes[path], chunk_bytes))
        for first in range(0, rows, step):
            last = min(first + step, rows)
            for path in aligned:
                per_row = sizes[path] // rows
                # a tensor's rows may be more than chunk_bytes (a wide one beside a narrow pred): cut again
                for o in range(first * per_row, last * per_row, chunk_bytes):
                    yield path, o, min(o + chunk_bytes, last * per_row)

    return pieces()


def fill_streamed(root: Message, streamed: Mapping[str, Tensor]) -> None:
    """Put the bytes of assembled tensors (by path) back into ``root``'s messages (one copy each)."""
    if streamed:
        for path, message in tensors_of(root):
            if path in streamed:
                message.data = streamed[path].reshape(-1).view(torch.uint8).numpy().tobytes()


def _empty_bytes(nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


@dataclasses.dataclass(frozen=True)
class Stripes:
    """How a streamed request's bytes are spread over its ``streams`` (``EvaluateRequest.lanes``): each
    tensor's data cut in stripes of ``stripe_bytes``, stripe j on stream j mod ``streams`` (0: the
    request's own stream, i: lane i). One stream: everything on it, in one stripe."""

    streams: int = 1
    stripe_bytes: int = 0

    @classmethod
    def of(cls, request: pb.EvaluateRequest) -> Stripes:
        """The stripes ``request.lanes`` declares; a CodecError naming the field that is out of bounds."""
        if not request.HasField("lanes"):
            return cls()
        lanes = request.lanes
        check_call_name(lanes.call, "lanes.call")
        if not 1 <= lanes.count <= MAX_STREAM_LANES:
            raise CodecError(f"lanes.count must be 1 to {MAX_STREAM_LANES}; got {lanes.count}", field="lanes.count")
        size = lanes.stripe_bytes
        if not (0 < size <= MAX_STRIPE_BYTES and size % STRIPE_UNIT_BYTES == 0):
            raise CodecError(
                f"lanes.stripe_bytes must be a multiple of {STRIPE_UNIT_BYTES} up to {MAX_STRIPE_BYTES}; got {size}",
                field="lanes.stripe_bytes",
            )
        return cls(lanes.count + 1, size)

    def stream_of(self, offset: int) -> int:
        """The stream that carries the byte at ``offset`` of any streamed tensor."""
        return offset // self.stripe_bytes % self.streams if self.streams > 1 else 0

    def stripe_end(self, offset: int) -> int | None:
        """The end of the stripe that holds ``offset`` (None: one stream, no stripes)."""
        return (offset // self.stripe_bytes + 1) * self.stripe_bytes if self.streams > 1 else None

    def starts(self, nbytes: int) -> list[int]:
        """Where each stream's first stripe of an ``nbytes`` tensor begins (``nbytes``: it has none)."""
        return [min(stream * self.stripe_bytes, nbytes) for stream in range(self.streams)]

    def next_start(self, end: int, nbytes: int) -> int:
        """Where a stream goes on once its bytes reach ``end``: the same stripe, or its next one."""
        if self.streams > 1 and end % self.stripe_bytes == 0:
            end += (self.streams - 1) * self.stripe_bytes
        return min(end, nbytes)

    def split(self, pieces: Iterator[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
        """``pieces`` (path, start, stop) cut at stripe ends and dealt to the streams that carry them."""
        dealt: list[list[tuple[str, int, int]]] = [[] for _ in range(self.streams)]
        for path, start, stop in pieces:
            while start < stop:
                end = min(stop, self.stripe_end(start) or stop)
                dealt[self.stream_of(start)].append((path, start, end))
                start = end
        return dealt

    def bytes_from(self, due: int, nbytes: int) -> int:
        """Bytes of an ``nbytes`` tensor from ``due`` (inside one of a stream's stripes, or ``nbytes``) to
        its end that travel on the stream of ``due``: the rest of that stripe, then one stripe in every
        ``streams`` (the tensor's last one may be short). Counted, not walked: a tensor has many stripes."""
        if due >= nbytes or self.streams == 1:
            return max(nbytes - due, 0)
        size, cycle = self.stripe_bytes, self.stripe_bytes * self.streams
        start = due - due % size  # of the stripe holding ``due``
        owed = min(start + size, nbytes) - due
        later = (nbytes - 1 - start) // cycle  # the stream's stripes after this one
        if later:
            owed += later * size - max(start + later * cycle + size - nbytes, 0)
        return owed

    def stream_name(self, stream: int) -> str:
        """How an error names a stream of a call with lanes."""
        return "the request's stream" if stream == 0 else f"lane {stream}"


ONE_STREAM = Stripes()  # a call without lanes


class _Pending:
    __slots__ = ("buffer", "dtype", "nbytes", "positions", "received", "shape")

    def __init__(self, nbytes: int, dtype: torch.dtype, shape: list[int], stripes: Stripes) -> None:
        self.buffer: Tensor | None = None  # allocated when the tensor's first chunk arrives
        self.nbytes, self.dtype, self.shape = nbytes, dtype, shape
        self.positions = stripes.starts(nbytes)  # the next byte each stream owes
        self.received = 0  # bytes arrived, on every stream

    @property
    def prefix(self) -> int:
        """Bytes from the start that have all arrived (every stream has passed them)."""
        return min(self.positions)


class StreamAssembler:
    """Reassembles the streamed tensors of a stream's first message from its ``TensorChunk``s.

    Every tensor of ``header`` whose data is empty though its shape has elements is streamed: its
    buffer is allocated when its first chunk arrives (a stream that sends nothing holds nothing), in its
    ``data_dtype`` when narrowed, and each chunk's bytes are copied into it once. Check limits on the
    declared shapes before the chunks come. A chunk naming no streamed tensor, out of order (its offset is
    not the bytes received so far: a gap or an overlap) or past the tensor's end, and a stream that ends
    before a tensor is complete, are CodecErrors naming the field. A chunk without bytes is held to the
    same rule and carries nothing: accepted where its offset is due, a complete tensor's size included.
    ``tensors`` maps each path to its tensor (declared shape, data dtype) for
    ``decode_tensor(..., streamed=...)``. ``allocate(nbytes)``
    gives each buffer, a uint8 tensor (default: fresh memory; ``BufferPool.take``: reused memory).
    ``stripes``: the chunks come on several streams (``Stripes.of(header)``), each tensor's in order on
    each stream, within the stripes that stream carries.
    """

    def __init__(
        self,
        header: Message,
        max_elements: int | None = None,
        allocate: Callable[[int], Tensor] | None = None,
        early: Mapping[str, Tensor] | None = None,
        stripes: Stripes = ONE_STREAM,
    ) -> None:
        self._allocate = allocate or _empty_bytes
        self.stripes = stripes
        self._pending: dict[str, _Pending] = {}
        self.tensors: dict[str, Tensor] = {}
        for path, message in tensors_of(header):
            _, data_dtype = wire_dtypes(message, path)
            shape = list(message.shape)
            numel = check_shape(shape, path, max_elements=max_elements)
            if numel == 0 or len(message.data) > 0 or message.HasField("shm"):
                continue  # inline (decode_tensor checks its length), in shared memory, or empty
            self._pending[path] = _Pending(numel * data_dtype.itemsize, data_dtype, shape, stripes)
        for path, buffer in (early or {}).items():  # complete already: their chunks came before the header
            pending = self._pending.pop(path, None)
            if pending is None or buffer.numel() != pending.nbytes:
                declared = "is not streamed" if pending is None else f"has {pending.nbytes} bytes"
                raise CodecError(f"{path} came early with {buffer.numel()} bytes but {declared}", field=path)
            self.tensors[path] = buffer.view(pending.dtype).reshape(pending.shape)
        self.chunks = 0

    def allocate_all(self) -> dict[str, Tensor]:
        """Allocate every streamed tensor now (not at its first chunk); each one, whole-sized, by path
        (its declared shape and data dtype), bytes not yet arrived included."""
        views = dict(self.tensors)
        for path, pending in self._pending.items():
            if pending.buffer is None:
                pending.buffer = self._allocate(pending.nbytes)
            views[path] = pending.buffer.view(pending.dtype).reshape(pending.shape)
        return views

    def received(self, path: str) -> int | None:
        """Leading bytes of streamed tensor ``path`` that have all arrived (all of it once complete); None:
        not streamed."""
        if path in self._pending:
            return self._pending[path].prefix
        tensor = self.tensors.get(path)
        return None if tensor is None else tensor.numel() * tensor.element_size()

    def owed(self, stream: int) -> list[tuple[str, int, int]]:
        """What ``stream`` still owes, as (path, bytes, offset of its next byte due) for each incomplete
        tensor, in the request's order. Counted when asked (once a stream has ended), never per chunk."""
        owed = []
        for path, pending in self._pending.items():
            due = pending.positions[stream]
            count = self.stripes.bytes_from(due, pending.nbytes)
            if count:
                owed.append((path, count, due))
        return owed

    @property
    def streamed(self) -> list[str]:
        """The paths of every streamed tensor, complete or not."""
        return [*self.tensors, *self._pending]

    @property
    def nbytes(self) -> int:
        """Bytes the stream must still deliver, in all."""
        return sum(p.nbytes - p.received for p in self._pending.values())

    def add(self, chunk: pb.TensorChunk, stream: int = 0) -> None:
        """Copy one chunk, which came on ``stream`` (0: the request's own), into its tensor."""
        self.chunks += 1
        where = f"chunk {self.chunks}" + (f" on {self.stripes.stream_name(stream)}" if self.stripes.streams > 1 else "")
        pending = self._pending.get(chunk.tensor)
        if pending is None:
            complete = self.tensors.get(chunk.tensor)
            if complete is not None and chunk.offset == complete.nbytes and not len(chunk.data):
                return  # in order (its offset is the bytes received) and carries nothing, as anywhere else
            done = ""
            if complete is not None:
                done = f" (it is complete already: all its {complete.nbytes} bytes have arrived)"
            expected = ", ".join(sorted(self._pending)) or "none: every streamed tensor is complete"
            raise CodecError(
                f"{where}.tensor {chunk.tensor!r} names no tensor being streamed{done}; expected one of: {expected}",
                field="chunk.tensor",
            )
        data = chunk.data  # read once: every read of a bytes field copies it
        offset, size = chunk.offset, len(data)
        due = pending.positions[stream]
        if offset != due:
            raise CodecError(self._misplaced(where, chunk.tensor, pending, offset, due), field=f"{chunk.tensor}.data")
        end = offset + size
        if end > pending.nbytes:
            raise CodecError(
                f"{where} for {chunk.tensor} holds bytes [{offset}, {end}) but the tensor has only "
                f"{pending.nbytes} bytes (dtype and shape as declared)",
                field=f"{chunk.tensor}.data",
            )
        stripe_end = self.stripes.stripe_end(offset)
        if stripe_end is not None and end > stripe_end:
            raise CodecError(
                f"{where} for {chunk.tensor} holds bytes [{offset}, {end}), past the end of its stripe at {stripe_end} "
                f"(lanes.stripe_bytes {self.stripes.stripe_bytes}): the next stripe travels on another stream",
                field=f"{chunk.tensor}.data",
            )
        if pending.buffer is None:
            pending.buffer = self._allocate(pending.nbytes)
        if size:
            pending.buffer[offset:end] = torch.frombuffer(data, dtype=torch.uint8)
        pending.received += size
        pending.positions[stream] = self.stripes.next_start(end, pending.nbytes)
        if pending.received == pending.nbytes:
            del self._pending[chunk.tensor]
            self.tensors[chunk.tensor] = pending.buffer.view(pending.dtype).reshape(pending.shape)

    def _misplaced(self, where: str, path: str, pending: _Pending, offset: int, expected: int) -> str:
        """Why a chunk at ``offset`` is out of place where ``expected`` was due."""
        if self.stripes.streams == 1:
            problem = "overlaps bytes already received" if offset < expected else "leaves a gap"
            return (
                f"{where} for {path} starts at offset {offset} but {expected} of its {pending.nbytes} "
                f"bytes have arrived ({problem}): a tensor's chunks come in order, without gaps or overlaps"
            )
        if expected == pending.nbytes:
            owed = "no more bytes of it are due there"
        else:
            owed = f"its next byte due there is at offset {expected}"
        return (
            f"{where} for {path} starts at offset {offset}, but {owed} (stripe j of "
            f"lanes.stripe_bytes {self.stripes.stripe_bytes} travels on stream j mod {self.stripes.streams}, "
            "each stream's stripes in order, without gaps or overlaps)"
        )

    def finish(self) -> dict[str, Tensor]:
        """The assembled tensors, once the stream has ended; a CodecError if one is incomplete."""
        for path, pending in self._pending.items():
            owing = [
                f"{self.stripes.stream_name(stream)} from offset {position}"
                for stream, position in enumerate(pending.positions)
                if self.stripes.streams > 1 and position < pending.nbytes  # one stream: the count says it all
            ]
            raise CodecError(
                f"the stream ended with {path} incomplete: {pending.received} of its {pending.nbytes} bytes arrived"
                + (f"; still due: {', '.join(owing)}" if owing else ""),
                field=f"{path}.data",
            )
        return self.tensors
