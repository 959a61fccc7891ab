"""The server's shared-memory regions (see ``losswire.wire.shared_memory`` and client/shared_memory.py).

A caller on the server's host asks ``SharedMemoryEndpoint`` for the Unix socket of :mod:`.handoff` and a
connection key, connects and sends the connection key first (it makes the connection its token's), then hands a sealed
memfd over and gets a one-time claim; ``RegisterSharedMemory(claim)`` turns it into a region, named by a
random handle.
Requests then name tensors by (region, offset, byte_size): the inputs a loss reads only as values (each
term's pred; a box loss's target and weight: ``LossDescription.value_inputs``) are viewed in place, every
other input copied once (see ``SharedMemoryRegistry.inputs``), and the answer's big tensors are written into
the caller's output range.

**A region belongs to the caller that registered it** (:class:`Caller`: its token's digest and its gRPC
connection). Any other caller naming its handle is answered NOT_FOUND, word for word as for a handle
that does not exist; handles and claims never appear in logs or in another caller's answers.

**Bounded** (:class:`SharedMemoryLimits`): regions and bytes per caller, regions and bytes in total
(handoffs not yet registered count too, and so do those being adopted: a handoff reserves its room
before its adoption begins, so handoffs adopted side by side never pass a bound together),
connections, unused connection keys (a new one beyond them forgets the oldest), and handoffs waiting per
connection. With tokens on, one token's regions, handoffs, connections and unused connection keys take at most
all but a quarter of the server's (``_share``), however many gRPC connections and processes it uses:
one token never takes it all. A region costs the server no descriptor (it is mapped, then its
descriptor closed).

**Released** on UnregisterSharedMemory, when the connection it was handed over on closes (its process
exited or died: every region it handed over is dropped at once), when a claim is not registered within
``PENDING_SECONDS`` (a connection key not used by then is forgotten too), and when the server stops. A dropped
region's mapping lives on while a running call still views it, and is unmapped with that call's last view.

Safety: the server maps a segment only once it is sealed against shrinking and growing, every page
allocated, and then seals it against hole punching itself (``Segment.adopt``): a caller cannot make the
server fault. A caller can still change its own segment while its call runs: the inputs read in place
are then whatever it wrote (its own numbers change, nothing else), while its labels and indices are
those the server checked (copied before the checks).
``losswire serve --shared-memory off`` turns shared memory off.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import shared_memory as wire_memory
from losswire.wire.shared_memory import Segment, SegmentRange, SegmentRefusedError

from ..errors import LimitExceededError, NotAvailableError, NotFoundError, RequestError
from ..losses import LossError, Registry
from .handoff import HandoffListener, Peer

log = logging.getLogger("losswire.server")
PENDING_SECONDS = 60.0  # a claim not registered by then is dropped with its segment; so is an unused connection key
MAX_PENDING_PER_CONNECTION = 8  # handoffs one connection may have answered and not yet registered


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a call comes from, as far as shared memory is concerned: a digest of its bearer token ("" without
    one) and its gRPC connection (the peer address). Regions answer only the caller that registered them."""

    token: str = ""
    connection: str = ""


@dataclasses.dataclass(frozen=True)
class SharedMemoryLimits:
    """What callers may hold (None: unbounded): per caller, regions and bytes; in total, regions and bytes
    (pending handoffs included); and callers connected to the handoff socket at once."""

    regions_per_caller: int | None = 64
    bytes_per_caller: int | None = 16 << 30
    regions: int | None = 1024
    bytes: int | None = 64 << 30
    connections: int = 256


@dataclasses.dataclass
class _Room:
    """Segments and bytes reserved by handoffs being adopted (counted against the bounds until then)."""

    regions: int = 0
    bytes: int = 0


@dataclasses.dataclass(frozen=True)
class _ConnectionKey:
    """A pass for one connection to the handoff socket, given to a token by ``SharedMemoryEndpoint``."""

    token: str
    since: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _Held:
    """A segment the server mapped: registered (``caller`` set) or pending its registration."""

    segment: Segment
    peer: Peer  # the connection it was handed over on
    caller: Caller | None = None
    since: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _Dropped:
    """A region unregistered (or whose connection closed) that a call may still read: mapped until the last
    view of it goes (``Segment``'s array, which every view keeps: ``bytes_at``)."""

    array: weakref.ref
    size: int
    caller: Caller | None


# allocate(nbytes, field path) -> uint8 memory for the copy of that input
Allocate = Callable[[int, str], torch.Tensor]


def values_read_in_place(terms: Sequence[pb.LossTerm], registry: Registry) -> frozenset[str]:
    """The field paths of the inputs that ``terms`` read only as values, viewed in place in a caller's
    segment: each term's pred and upstream gradients, and the inputs its loss declares
    (``LossDescription.value_inputs``, by the field that carries each: target, weight or inputs[name]).
    Only pred and those for a term with a sampler, which draws its samples from the target's labels."""
    paths: set[str] = set()
    for index, term in enumerate(terms):
        prefix = f"terms[{index}]."
        paths.update((f"{prefix}pred", f"{prefix}grad_output"))
        paths.update(f"{prefix}grad_outputs[{key}]" for key in term.grad_outputs)
        fields = term.config.fields
        if "sampler" in fields or "type" not in fields:
            continue
        try:
            description = registry.describe(fields["type"].string_value)
        except LossError:
            continue  # decoding the term names what is wrong with it
        names = [spec.name for spec in description.inputs]
        for name in description.value_inputs[1:]:
            paths.add(f"{prefix}inputs[{name}]")
            if name == names[1]:
                paths.add(f"{prefix}target")
            if name == "weight":
                paths.add(f"{prefix}weight")
    return frozenset(paths)


def _copied(view: torch.Tensor, path: str, allocate: Allocate) -> torch.Tensor:
    if not view.numel():  # an empty input is not a view of the segment (shared_memory_tensors)
        return view
    return allocate(view.nbytes, path).view(view.dtype).reshape(view.shape).copy_(view)


def _size_mismatch(fd: int, byte_size: int) -> str | None:
    """Why the descriptor handed over cannot be the ``byte_size`` bytes its handoff declares (None: its
    size agrees, or it cannot be told here and adopting it tells)."""
    try:
        size = os.fstat(fd).st_size
    except OSError:
        return None
    return wire_memory.size_mismatch(size, byte_size) if byte_size > 0 else None


def _adopted(peer: Peer, fd: int, byte_size: int) -> Segment | tuple[int, str]:
    """``fd`` adopted (the slow part: every page is checked allocated), or the refusal. Closes ``fd``."""
    try:
        return Segment.adopt(fd, byte_size)
    except SegmentRefusedError as error:
        log.info("shared memory: refused a segment of pid %d: %s", peer.pid, error)
        status = wire_memory.RESOURCE_EXHAUSTED if error.exhausted else wire_memory.INVALID_ARGUMENT
        return status, f"shared memory: {error}"
    except OSError as error:  # mmap: out of address space or memory
        return wire_memory.RESOURCE_EXHAUSTED, f"shared memory: cannot map {byte_size} bytes: {error.strerror}"


def _read_on(viewed: int) -> str:
    """The clause a refusal adds for regions dropped that calls in flight still read (they still count)."""
    return f" ({viewed} of them unregistered, still read by calls in flight)" if viewed else ""


def _over(limit: int | None, value: int) -> bool:
    return limit is not None and value > limit


def _share(limit: int | None) -> int | None:
    """One token's share of a server-wide ``limit``: all but a quarter of it (at least one)."""
    return None if limit is None else max(1, limit - limit // 4)


class SharedMemoryRegistry:
    """Regions by handle. ``enabled`` False: every shared-memory RPC and reference is FAILED_PRECONDITION."""

    def __init__(self, enabled: bool = True, limits: SharedMemoryLimits | None = None) -> None:
        self.enabled = enabled
        self.limits = limits if limits is not None else SharedMemoryLimits()
        self._regions: dict[str, _Held] = {}  # by handle
        self._pending: dict[str, _Held] = {}  # by claim
        # dropped regions calls still read: they stay mapped, so they count against the bounds until let go
        self._dropped: list[_Dropped] = []
        self._adopting: dict[str, _Room] = {}  # by token: reserved by handoffs being adopted (side by side)
        self._connection_keys: dict[int, _ConnectionKey] = {}  # given, not yet used by a connection
        self._lock = threading.Lock()
        self._listener = (
            HandoffListener(self._admit, self._handoff, self._closed, self._expire, self.limits.connections)
            if enabled
            else None
        )
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._listener is not None and not self._started:
            self._listener.start()
            self._started = True

    def stop(self) -> None:
        """Close the socket and every connection; drop every region and handoff (an adoption under way
        ends first: returns once no handoff worker runs)."""
        if self._listener is not None and self._started:
            self._listener.stop()
        with self._lock:
            self._regions.clear()
            self._pending.clear()
            self._connection_keys.clear()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise NotAvailableError(
                "shared memory is off on this server (losswire serve --shared-memory on); send tensors inline"
            )

    def endpoint(self) -> str:
        """The Unix socket address that takes segments (``@name``: abstract)."""
        self._check_enabled()
        if not self._started:
            raise NotAvailableError("shared memory is not running on this server yet; send tensors inline")
        return self._listener.address

    def connection_key(self, caller: Caller) -> int:
        """A pass for one connection of ``caller``'s token to the handoff socket (one use, within
        ``PENDING_SECONDS``). Never refused: unused connection keys are at most as many as the connections the
        server takes, and with tokens on one token's at most all but a quarter of them; a new one beyond
        either forgets the oldest unused one of the token's (of anyone's, where the token has none), since
        a connection key is used within moments of being given, and one whose connection was refused never is."""
        self.endpoint()
        with self._lock:
            own = [number for number, given in self._connection_keys.items() if given.token == caller.token]
            token_full = caller.token and _over(_share(self.limits.connections), len(own) + 1)
            if token_full or len(self._connection_keys) >= self.limits.connections:
                del self._connection_keys[
                    own[0] if own else next(iter(self._connection_keys))
                ]  # given in order: oldest first
            connection_key = secrets.randbits(64)
            while connection_key in self._connection_keys:
                connection_key = secrets.randbits(64)
            self._connection_keys[connection_key] = _ConnectionKey(caller.token)
        return connection_key

    # -- the handoff socket's side (its thread for connection keys; its workers, side by side, for handoffs) ---

    def _admit(self, peer: Peer, connection_key: int) -> tuple[int, str]:
        """``peer``'s connection key taken (the connection is its token's from now on), or the refusal. On the
        socket's thread, which alone changes its peers."""
        with self._lock:
            given = self._connection_keys.pop(connection_key, None)
        if given is None or time.monotonic() - given.since > PENDING_SECONDS:
            return wire_memory.PERMISSION_DENIED, (
                "shared memory: the connection key is none this server gave, or was used already or expired (a "
                f"connection key from SharedMemoryEndpoint is good for one connection, within {PENDING_SECONDS:.0f} s)"
            )
        connected = sum(other.token == given.token for other in self._listener.peers.values())
        if given.token and _over(_share(self.limits.connections), connected + 1):
            return wire_memory.RESOURCE_EXHAUSTED, (
                f"shared memory: this token has {connected} connections to the server's socket, its most (all but a "
                "quarter of losswire serve --max-shared-memory-connections, which leaves other tokens room)"
            )
        peer.token = given.token
        return wire_memory.OK, ""

    def _handoff(self, peer: Peer, byte_size: int, fd: int | None) -> tuple[int, str]:
        """A segment handed over: a claim, or a refusal (status, message). Owns ``fd``."""
        if fd is None:
            return wire_memory.INVALID_ARGUMENT, "a handoff carries one descriptor (SCM_RIGHTS); none came with it"
        with self._lock:  # checked and reserved at once: another worker's handoff sees this one's room taken
            refusal = self._no_room(peer, byte_size)
            if refusal is None:
                self._reserve(peer, byte_size, 1)
        if refusal is not None:  # no room for what it declares; but if it holds less, the caller is wrong
            mismatch = _size_mismatch(fd, byte_size)
            os.close(fd)
            if mismatch is not None:
                return wire_memory.INVALID_ARGUMENT, mismatch
            return wire_memory.RESOURCE_EXHAUSTED, refusal
        adopted: Segment | tuple[int, str] | None = None
        claim = secrets.token_hex(16)
        try:
            adopted = _adopted(peer, fd, byte_size)
        finally:  # the reservation becomes the pending handoff, or is given back (refused, or failed)
            with self._lock:
                self._reserve(peer, byte_size, -1)
                if isinstance(adopted, Segment):
                    self._pending[claim] = _Held(adopted, peer)
                    peer.pending += 1
        return (wire_memory.OK, claim) if isinstance(adopted, Segment) else adopted

    def _reserve(self, peer: Peer, byte_size: int, count: int) -> None:
        """Take (count 1) or give back (-1) the room of a handoff being adopted. Under the lock."""
        room = self._adopting.setdefault(peer.token, _Room())
        room.regions += count
        room.bytes += count * byte_size
        if not room.regions:
            del self._adopting[peer.token]
        peer.pending += count  # a connection's handoff counts against its pending handoffs from the start

    def _no_room(self, peer: Peer, byte_size: int) -> str | None:
        """Why a handoff of ``byte_size`` bytes from ``peer`` does not fit (None: it does), counting the
        room reserved by handoffs being adopted. Under the lock."""
        if peer.pending >= MAX_PENDING_PER_CONNECTION:
            return (
                f"shared memory: this connection holds {peer.pending} handoffs not yet registered, its most; "
                "register them (RegisterSharedMemory) before handing more over"
            )
        segments, mapped, _ = self._holds(lambda token: True)
        if _over(self.limits.regions, segments + 1):
            return (
                f"shared memory: this server holds {segments} segments, its most (losswire serve "
                "--max-shared-memory-total-regions); unregister some, or send tensors inline"
            )
        if _over(self.limits.bytes, mapped + byte_size):
            return (
                f"shared memory: {byte_size} more bytes would map {mapped + byte_size} bytes; this server maps at "
                f"most {self.limits.bytes} (losswire serve --max-shared-memory)"
            )
        return self._over_token_share(peer.token, byte_size)

    def _holds(self, whose: Callable[[str | None], bool]) -> tuple[int, int, int]:
        """The segments and bytes the server holds for the tokens ``whose`` accepts (regions registered,
        handoffs pending or being adopted, dropped regions calls still read), and how many of them are
        dropped regions calls still read. Under the lock."""
        held = [h for h in self._regions.values() if whose(h.caller.token)]
        held += [h for h in self._pending.values() if whose(h.peer.token)]
        viewed = [d for d in self._still_viewed() if whose(d.caller.token if d.caller is not None else None)]
        adopting = [room for token, room in self._adopting.items() if whose(token)]
        segments = len(held) + len(viewed) + sum(room.regions for room in adopting)
        nbytes = sum(h.segment.size for h in held) + sum(d.size for d in viewed) + sum(r.bytes for r in adopting)
        return segments, nbytes, len(viewed)

    def _closed(self, peer: Peer) -> None:
        """``peer``'s connection closed (its process exited or died): drop everything it handed over."""
        with self._lock:
            gone = [h for h, held in self._regions.items() if held.peer is peer]
            regions = [self._regions.pop(h) for h in gone]
            for held in regions:
                self._drop(held)
            claims = [t for t, held in self._pending.items() if held.peer is peer]
            for claim in claims:
                del self._pending[claim]
        if regions or claims:
            nbytes = sum(held.segment.size for held in regions)
            log.info(
                "shared memory: pid %d disconnected; its %d regions (%d bytes) and %d unregistered handoffs dropped",
                peer.pid,
                len(regions),
                nbytes,
                len(claims),
            )

    def _expire(self) -> None:
        """Drop handoffs whose claims were not registered, and forget connection keys not used, within
        ``PENDING_SECONDS``."""
        now = time.monotonic()
        with self._lock:
            old = [t for t, held in self._pending.items() if now - held.since > PENDING_SECONDS]
            for claim in old:
                self._pending.pop(claim).peer.pending -= 1
            for connection_key in [
                t for t, given in self._connection_keys.items() if now - given.since > PENDING_SECONDS
            ]:
                del self._connection_keys[connection_key]

    # -- the RPCs --------------------------------------------------------------------------------

    def register(self, caller: Caller, claim: str, byte_size: int) -> str:
        """The segment a pending ``claim`` stands for, as a region of ``caller``'s: its handle. A wrong
        ``byte_size`` leaves the claim pending, to be registered again corrected until it expires (the memory
        is sealed by now and could never be handed over again); a refusal by the caller's limits drops it,
        as the pending memory would count against the very limits the caller must first get under. A claim
        answers only the token whose connection key opened its connection; that token's share was checked at the
        handoff, since when the claim counts against it."""
        self._check_enabled()
        with self._lock:
            held = self._pending.get(claim)
            if held is None or held.peer.token != caller.token:  # another token's claim reads as no claim
                raise NotFoundError(
                    "claim names no pending shared-memory handoff on this server: a claim registers once, within "
                    f"{PENDING_SECONDS:.0f} s of its handoff, while the connection it came over is open",
                    field="claim",
                )
            size = held.segment.size
            if byte_size != size:
                raise RequestError(f"byte_size must be the segment's {size} bytes, got {byte_size}", field="byte_size")
            del self._pending[claim]
            held.peer.pending -= 1
            own = [h for h in self._regions.values() if h.caller == caller]
            viewed = [d for d in self._still_viewed() if d.caller == caller]
            read_on = _read_on(len(viewed))
            if _over(self.limits.regions_per_caller, len(own) + len(viewed) + 1):
                raise LimitExceededError(
                    f"this caller holds {len(own) + len(viewed)} shared-memory regions{read_on}, its most "
                    "(losswire serve --max-shared-memory-regions); unregister some first",
                    field="claim",
                )
            mine = sum(h.segment.size for h in own) + sum(d.size for d in viewed)
            if _over(self.limits.bytes_per_caller, mine + size):
                raise LimitExceededError(
                    f"{size} more bytes would give this caller {mine + size} bytes of shared memory{read_on}; "
                    f"a caller may register at most {self.limits.bytes_per_caller} (losswire serve "
                    "--max-shared-memory-per-caller)",
                    field="byte_size",
                )
            handle = secrets.token_hex(16)
            own.append(held)
            held.caller = caller
            self._regions[handle] = held
        log.info("shared memory: %d bytes registered by pid %d (its caller's region %d)", size, held.peer.pid, len(own))
        return handle

    def _over_token_share(self, token: str | None, size: int) -> str | None:
        """With tokens, why a handoff of ``size`` bytes would pass ``token``'s share (None: it would not).
        One token's segments (regions registered over whatever connections, handoffs pending or being
        adopted, regions calls still read) hold at most all but a quarter of the server's segments and
        bytes, so that one token never takes them all; the per-caller and per-connection bounds
        count connections, which one token may open many of. Under the lock."""
        if not token:
            return None
        segments, nbytes, viewed = self._holds(lambda other: other == token)
        if _over(_share(self.limits.regions), segments + 1):
            return (
                f"shared memory: this token holds {segments} shared-memory regions and handoffs{_read_on(viewed)}, "
                "its most (all but a quarter of losswire serve --max-shared-memory-total-regions, which leaves other "
                "tokens room); unregister some, or register the handoffs first"
            )
        if _over(_share(self.limits.bytes), nbytes + size):
            return (
                f"shared memory: {size} more bytes would give this token {nbytes + size} bytes of shared memory"
                f"{_read_on(viewed)}; one token may hold at most {_share(self.limits.bytes)} (all but a quarter of "
                "losswire serve --max-shared-memory, which leaves other tokens room)"
            )
        return None

    def unregister(self, caller: Caller, region: str) -> None:
        self._check_enabled()
        with self._lock:
            held = self._regions.get(region)
            if held is None or held.caller != caller:
                raise NotFoundError("region names no shared-memory region of this caller's on this server", "region")
            del self._regions[region]
            self._drop(held)

    def _drop(self, held: _Held) -> None:
        """``held`` is no region any more; while a call still reads it, it stays mapped and counted. Under
        the lock."""
        self._dropped.append(_Dropped(weakref.ref(held.segment.array), held.segment.size, held.caller))

    def _still_viewed(self) -> list[_Dropped]:
        """The dropped regions some call still reads (the others are forgotten here). Under the lock."""
        self._dropped = [dropped for dropped in self._dropped if dropped.array() is not None]
        return self._dropped

    # -- requests --------------------------------------------------------------------------------

    def _segment(self, caller: Caller | None, ref: pb.SharedMemoryRef, field: str) -> Segment:
        self._check_enabled()
        with self._lock:
            held = self._regions.get(ref.region)
        if held is None or held.caller != caller:  # another caller's region reads exactly as no region
            raise NotFoundError(
                f"{field}.region names no shared-memory region of this caller's on this server (it restarted, the "
                "region was unregistered, or the process that handed it over exited); register the segment again",
                field=f"{field}.region",
            )
        segment = held.segment
        if ref.offset + ref.byte_size > segment.size:
            raise RequestError(
                f"{field} covers bytes [{ref.offset}, {ref.offset + ref.byte_size}) but its region has "
                f"{segment.size} bytes",
                field=f"{field}.byte_size",
            )
        return segment

    def resolve(self, caller: Caller | None, ref: pb.SharedMemoryRef, field: str) -> torch.Tensor:
        """A uint8 view of the referenced bytes (``wire_memory.shared_memory_tensors``'s ``resolve``)."""
        return self._segment(caller, ref, field).bytes_at(ref.offset, ref.byte_size)

    def inputs(
        self,
        caller: Caller | None,
        tensors: Iterable[tuple[str, pb.Tensor]],
        max_elements: int | None,
        allocate: Allocate,
        in_place: Callable[[], frozenset[str]],
    ) -> dict[str, torch.Tensor]:
        """Those of a request's tensors (``codec.tensors_of``) that lie in ``caller``'s shared memory, by
        field path: the paths ``in_place()`` names (``values_read_in_place``) viewed in place, every
        other input copied out of the segment.

        Why the copies: a loss checks its labels and indices once and then trusts them (a kernel indexes
        pred's classes with the labels it checked). A caller writing into its segment while its call
        runs could otherwise slip an out-of-range label in between the check and the use, and the
        kernel's index error would be answered as the server's own fault. The inputs read in place are
        those a loss uses only as numbers (pred, a box loss's target and weight): a rewrite of one changes
        that caller's own numbers and nothing else, and they are the big ones (a regression target is
        pred's size), while labels are small next to pred (1/40 of a [N, 80] pred's bytes).
        ``allocate(nbytes, path)``: where the copies go (the dataplane's reused buffers: fresh memory
        faults in every page)."""
        views = wire_memory.shared_memory_tensors(
            tensors, lambda ref, field: self.resolve(caller, ref, field), max_elements
        )
        if views:
            viewed = in_place()
            for path, view in views.items():
                if path not in viewed:
                    views[path] = _copied(view, path, allocate)
        return views

    def output_range(self, caller: Caller | None, ref: pb.SharedMemoryRef) -> SegmentRange:
        """A ``StreamSink.place`` reserve that fills ``ref``'s range front to back, 64-byte aligned."""
        segment = self._segment(caller, ref, "output_shm")
        return SegmentRange(segment, ref.region, ref.offset, ref.offset + ref.byte_size)

    # -- what tests and metrics read --------------------------------------------------------------

    @property
    def regions(self) -> int:
        with self._lock:
            return len(self._regions)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def mapped_bytes(self) -> int:
        with self._lock:
            held = sum(h.segment.size for h in (*self._regions.values(), *self._pending.values()))
            return held + sum(dropped.size for dropped in self._still_viewed())

    @property
    def still_viewed(self) -> int:
        """Regions dropped (unregistered, or their connection closed) that calls in flight still read."""
        with self._lock:
            return len(self._still_viewed())

    @property
    def connections(self) -> int:
        return len(self._listener.peers) if self._listener is not None else 0

    def __contains__(self, region: object) -> bool:
        with self._lock:
            return region in self._regions
