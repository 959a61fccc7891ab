"""Lanes: one streamed call's chunks on several EvaluateStream calls (``EvaluateRequest.lanes``).

One HTTP/2 connection is read by one thread on each side; a link faster than that can carry a call's
stripes on several streams, each on its own connection. The call's own stream (the one with the
request) opens it here under its caller's token and ``StreamLanes.call``; each lane finds it there,
waiting up to the join timeout for a request that has not arrived yet, and copies its chunks into the
same intake. The call evaluates once every lane has ended; whatever ends the call ends its lanes (their
next chunk is refused), and a lane whose chunks are refused fails the call with the same error. A stream
(a lane, or the call's own) that ends while it still owes stripes of the call fails, naming itself and
what it owed, and fails the call with that error: its caller is not told OK for a call it left short.

Bounded: a lane, waiting to join or joined, is an open request stream (``--max-open-streams``) under the
same idle guard as any; a lane waits at most the join timeout for its call, and a call at most that long
(from its request) for all its lanes to join. Only the caller's own lanes join: the key holds its
token's digest, and the call name is 16 or more random bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire.chunks import Stripes, check_call_name

from ..dataplane import StreamIntake
from ..errors import NotFoundError, RequestError, StreamIdleError
from ..evaluation import CallCancelledError
from .streams import within

DEFAULT_JOIN_TIMEOUT_SECONDS = 10.0
Key = tuple[str, bytes]  # (the caller's token digest, StreamLanes.call)


class CallLanes:
    """The lanes of one call being received: which have joined, which have ended (and how)."""

    def __init__(self, lanes: pb.StreamLanes, intake: StreamIntake, join_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.intake, self.join_timeout = intake, join_timeout
        self.joined = [False] * lanes.count
        self.ended: list[asyncio.Future[None]] = [loop.create_future() for _ in range(lanes.count)]
        self.join_by = loop.time() + join_timeout
        self.on_chunk: Callable[[], None] = lambda: None  # wakes the call's reader

    def join(self, lane: int) -> None:
        """Lane ``lane`` joins; a number out of range or taken already is refused, to the lane and to the
        call at once (the call's own wait would only end at the join timeout, missing a lane)."""
        refusal = None
        if not 1 <= lane <= len(self.joined):
            refusal = RequestError(
                f"lane.lane must be 1 to {len(self.joined)} (lanes.count); got {lane}", field="lane.lane"
            )
        elif self.joined[lane - 1]:
            refusal = RequestError(f"lane {lane} of this call has joined already", field="lane.lane")
        if refusal is not None:
            for ended in self.ended:  # all_ended raises the first lane error it finds: this one
                if not ended.done():
                    ended.set_exception(refusal)
            raise refusal
        self.joined[lane - 1] = True

    def add(self, lane: int, chunk: Any) -> None:
        """One chunk of ``lane`` into the call (refused once the call is over: CallCancelledError)."""
        self.intake.add(chunk, lane)
        self.on_chunk()

    def end(self, lane: int, error: BaseException | None) -> None:
        """``lane`` has sent everything (``error`` None) or failed with ``error``."""
        ended = self.ended[lane - 1]
        if not ended.done():
            if error is None:
                ended.set_result(None)
            else:
                ended.set_exception(error)
        self.on_chunk()

    def owing(self, stream: int) -> RequestError | None:
        """The error of ``stream`` (0: the request's, i: lane i), which has ended, if it still owes stripes
        of the call; None if it owes nothing, or the call is over (nothing is owed to it any more)."""
        owed = self.intake.owed(stream)
        return _owing_error(self.intake.stripes, owed, stream) if owed else None

    async def all_ended(self) -> None:
        """Called once the request's own stream has ended: returns once every lane has sent all its chunks;
        raises the first lane's error, then the request stream's own if it still owes stripes, and
        StreamIdleError (field "lanes") when a lane has not joined by the join timeout."""
        loop = asyncio.get_running_loop()
        owing = self.owing(0)  # its stream is over: what it owes never comes, and its lanes need not finish
        while True:
            for ended in self.ended:
                if ended.done() and not ended.cancelled() and ended.exception() is not None:
                    raise ended.exception()
            if owing is not None:
                raise owing
            waiting = [ended for ended in self.ended if not ended.done()]
            if not waiting:
                return
            missing = [lane for lane, joined in enumerate(self.joined, 1) if not joined]
            timeout = None if not missing else self.join_by - loop.time()
            if timeout is not None and timeout <= 0:
                raise StreamIdleError(
                    f"lane {', '.join(map(str, missing))} of {len(self.joined)} did not join within "
                    f"{self.join_timeout:g} s of the request (losswire serve --lane-join-timeout): every lane of a "
                    "call must reach this server; behind a proxy that balances each call, send them all with one "
                    "x-losswire-session header",
                    field="lanes",
                )
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)

    def close(self) -> None:
        """The call is over: errors nobody read are dropped (asyncio would log them)."""
        for ended in self.ended:
            if ended.done() and not ended.cancelled():
                ended.exception()
            else:
                ended.cancel()


def _owing_error(stripes: Stripes, owed: list[tuple[str, int, int]], stream: int) -> RequestError:
    """The error of ``stream``, ended while it owed ``owed`` (``StreamIntake.owed``); its field, the first
    tensor's data."""
    who = "the request's stream ended" if stream == 0 else f"lane {stream} ended its stream"
    path, count, due = owed[0]
    listed = f"of {path} from offset {due} on"
    if len(owed) > 1:  # each one's share: the total alone would not say which tensor is short by what
        listed += f" ({count} bytes) and {_the_rest(owed[1:])}"
    return RequestError(
        f"{who} owing {sum(count for _, count, _ in owed)} bytes: its stripes {listed}; stripe j of "
        f"lanes.stripe_bytes {stripes.stripe_bytes} goes on stream j mod {stripes.streams} (0: the request's "
        "stream, i: lane i)",
        field=f"{path}.data",
    )


def _the_rest(owed: list[tuple[str, int, int]]) -> str:
    """The tensors owed after the first: named if one, else counted (status messages are cut at 300
    characters; the first is the error's field)."""
    if len(owed) == 1:
        path, count, due = owed[0]
        return f"of {path} from offset {due} on ({count} bytes)"
    return f"of {len(owed)} more tensors ({sum(count for _, count, _ in owed)} bytes)"


class _Awaited:
    """A call that lanes wait for: set once its request arrives."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.waiters = 0


class Lanes:
    """The calls open for lanes, by (token digest, call name); lanes waiting for theirs."""

    def __init__(self, join_timeout: float = DEFAULT_JOIN_TIMEOUT_SECONDS) -> None:
        self.join_timeout = join_timeout
        self._open: dict[Key, CallLanes] = {}
        self._opened: dict[Key, _Awaited] = {}  # lanes waiting for their call's request
        self.joined = 0  # lanes that joined their call, since the start

    @property
    def held(self) -> int:
        """Calls open for lanes and calls that lanes wait for: 0 once nothing is kept."""
        return len(self._open) + len(self._opened)

    def open(self, token: str, lanes: pb.StreamLanes, intake: StreamIntake) -> CallLanes:
        """Opens the call of ``lanes`` (its request has arrived); ``close(token, lanes)`` when it is over."""
        key = (token, lanes.call)
        if key in self._open:
            raise RequestError(
                "lanes.call names a call that is open already: draw it at random for each call", field="lanes.call"
            )
        call = self._open[key] = CallLanes(lanes, intake, self.join_timeout)
        if key in self._opened:
            self._opened.pop(key).arrived.set()
        return call

    def close(self, token: str, lanes: pb.StreamLanes) -> None:
        call = self._open.pop((token, lanes.call), None)
        if call is not None:
            call.close()

    async def join(self, token: str, lane: pb.StreamLane) -> CallLanes:
        """The call that ``lane`` names, once its request has arrived (NotFoundError after the join timeout)."""
        check_call_name(lane.call, "lane.call")  # no call has such a name: none is waited for
        key = (token, lane.call)
        if key not in self._open:
            awaited = self._opened.setdefault(key, _Awaited())
            awaited.waiters += 1
            try:
                await within(awaited.arrived.wait(), self.join_timeout)  # never loses the lane's cancellation
            except TimeoutError:
                raise NotFoundError(
                    f"lane.call names no call of this caller open on this server (waited {self.join_timeout:g} s "
                    "for its request, losswire serve --lane-join-timeout): lanes must reach the server of their call",
                    field="lane.call",
                ) from None
            finally:
                awaited.waiters -= 1
                if not awaited.waiters and self._opened.get(key) is awaited:
                    del self._opened[key]  # nobody waits for a call that never came: nothing is kept
        call = self._open.get(key)
        if call is None:  # opened and over already
            raise CallCancelledError("the call this lane belongs to is over")
        call.join(lane.lane)
        self.joined += 1
        return call
