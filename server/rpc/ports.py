"""A port whose gRPC server grpcio ended on its own is served again, without the heap corruption grpcio's
own ending left behind.

grpcio's asyncio accept loop decodes the ``:path`` of each call to an unregistered method as UTF-8; one that
is not (a single HEADERS frame, from anyone who can reach the port, before any token is checked) raises
there, and the accept loop ends. Nothing in Python runs before that decode, so the call cannot be refused.

Ending, the accept loop cancels its waiting requests for the next calls (one per method, one for the rest),
and their memory is freed; but gRPC's core still holds those requests and writes each next incoming call
into one (its call, method and metadata): into freed memory. Python objects were found without their
attributes, and the process died of segfaults: in 4 of 16 runs of three connections sending such frames
during streamed calls, and in 4 of 6 runs of one frame as four big calls started on a loaded machine (0 of
4 on a quiet one). ``keep_request_calls`` (the event loop's task factory) makes those requests
uncancellable: they stay alive until core fails them at the server's shutdown, or matches a call. Their
cancellation is the sign that the accept loop is ending: the server's ``PortKeeper`` shuts the server down
then (core takes no new call into them), lets its calls in flight finish, and serves the port again with a
new gRPC server of the same services on the same port; what the server holds (sessions, shared memory,
budgets) lives outside gRPC and stays.

A port ended again soon waits before it is served again (``ServingSpacing``), health NOT_SERVING meanwhile,
so that a caller repeating the frame cannot keep the server busy ending and starting gRPC servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

log = logging.getLogger("losswire.server")

SERVING_CHECK_SECONDS = 1.0  # how often a keeper looks whether its server still serves
# grpcio's coroutines that carry one call each (grpc.aio's Cython server), by qualified name
GRPCIO_CALL_TASKS = frozenset(
    {"_schedule_rpc_coro", "_handle_exceptions", "_handle_cancellation_from_core", "_handle_rpc"}
)
CALLS_UNWIND_SECONDS = 10.0  # the most a port's calls in flight are waited for before its server is destroyed
# grpcio's coroutines that each wait for the next incoming call, and its accept loop, by qualified name
REQUEST_CALLS = frozenset({"AioServer._request_call", "AioServer._request_registered_call"})
ACCEPT_LOOP = "AioServer._server_main_loop"
_KEEPERS: weakref.WeakKeyDictionary[asyncio.Task, PortKeeper] = weakref.WeakKeyDictionary()  # by accept loop


def coroutine_name(task: asyncio.Task) -> str:
    """The qualified name of ``task``'s coroutine (grpcio's are Cython coroutines: no frame to read)."""
    return getattr(task.get_coro(), "__qualname__", "")


class _RequestCall(asyncio.Task):
    """grpcio's request for the next incoming call, which its accept loop cannot cancel (see the module's
    text): gRPC's core writes the next call into it, so it lives until core has matched a call to it or
    failed it. A cancellation tells the keeper of the accept loop that asks for it that the loop is ending."""

    def cancel(self, msg: Any = None) -> bool:
        accept_loop = asyncio.current_task()  # an accept loop cancels its requests as it ends
        keeper = _KEEPERS.get(accept_loop)
        if keeper is None:  # a server no keeper watches: grpcio's way
            return super().cancel(msg)
        keeper.accept_loop_ending(accept_loop)
        return False


def keep_request_calls(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **options: Any) -> asyncio.Task:
    """The task factory of an event loop that runs grpc.aio servers: grpcio's requests for the next call
    are ``_RequestCall`` tasks, every other task is asyncio's (``options``: what the loop passes on, its
    ``context``, and from Python 3.13 on its ``name``)."""
    kind = _RequestCall if getattr(coro, "__qualname__", "") in REQUEST_CALLS else asyncio.Task
    return kind(coro, loop=loop, **options)


class ServingSpacing:
    """How long a port ended again waits before it is served again: none the first time; while a caller
    keeps ending it, ``first`` seconds from its last serving, then twice as long each time up to ``most``;
    a port left alone for ``quiet`` seconds beyond its last wait starts from none again."""

    def __init__(self, first: float = 2.0, most: float = 64.0, quiet: float = 60.0) -> None:
        self.first, self.most, self.quiet = first, most, quiet
        self.spacing = 0.0
        self.last_served = float("-inf")

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until the port ended at ``now`` may be served again (0: at once)."""
        quiet = now - self.last_served > self.spacing + self.quiet
        self.spacing = 0.0 if quiet else min(max(2 * self.spacing, self.first), self.most)
        return max(0.0, self.last_served + self.spacing - now) if self.spacing else 0.0

    def served(self, now: float) -> None:
        self.last_served = now


@dataclass
class PortKeeper:
    """Serves one port again whenever grpcio ends its gRPC server on its own (see the module's text).

    ``current()``: the gRPC server serving the port now. ``serve_again()``: binds a new one there, raising
    where it cannot. ``busy()``: whether calls still run on the port; its ended server is destroyed once
    none do and grpcio's tasks for them have ended, or after ``CALLS_UNWIND_SECONDS``. ``set_health``: the
    whole server's health, NOT_SERVING while the port waits to be served again. ``draining()``: the server
    stops, nothing is served again. Where the port cannot be served again, health stays NOT_SERVING and
    ``failed(why)`` is called (``losswire serve`` then exits 1, for its supervisor to restart it)."""

    name: str  # in log lines: "callers' port", "health port"
    current: Callable[[], grpc.aio.Server]
    serve_again: Callable[[], Awaitable[None]]
    set_health: Callable[[bool], Awaitable[None]]
    draining: Callable[[], bool]
    failed: Callable[[str], None]
    busy: Callable[[], bool] | None = None  # None: the port's calls are not waited for
    served_again: Callable[[], None] = lambda: None  # counts it (a metric)
    spacing: ServingSpacing | None = None
    restarts: int = 0  # times the port was served again
    _ending: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _error: BaseException | None = field(default=None, repr=False)  # what ended the accept loop
    _accept_loop: asyncio.Task | None = field(default=None, repr=False)  # the watched server's

    def __post_init__(self) -> None:
        self.spacing = self.spacing or ServingSpacing()

    async def run(self) -> None:
        while not self.draining():
            server = self.current()
            self.watch(server)
            why = await self._ended(server)
            if self.draining():
                return
            # the first stop begins the shutdown at once: core takes no new call into grpcio's requests and
            # fails them (the accept loop then ends, and this stop raises its error). Once the calls in
            # flight have finished (or after CALLS_UNWIND_SECONDS), the second cancels what is left and
            # destroys the core server (left undestroyed, ~40 KB of the process's memory stayed each time)
            with contextlib.suppress(Exception):
                await server.stop(CALLS_UNWIND_SECONDS)
            if self.busy is not None:
                await self._calls_ended(self.busy, CALLS_UNWIND_SECONDS)
            with contextlib.suppress(Exception):
                await server.stop(None)
            why = self._why() or why
            if not await self._wait_spacing():
                return
            try:
                await self.serve_again()
            except Exception as error:
                await self.set_health(False)
                self.failed(f"the {self.name} stopped accepting calls ({why}) and could not be served again ({error})")
                return
            if self.spacing.spacing:
                await self.set_health(True)
            self.spacing.served(time.monotonic())
            self.restarts += 1
            self.served_again()
            log.error(
                "the %s stopped accepting calls (%s): grpcio's accept loop ended on its own; once its calls in "
                "flight had ended (%g s at most), serving the port again (%d times so far)",
                self.name,
                why,
                CALLS_UNWIND_SECONDS,
                self.restarts,
            )

    def watch(self, server: grpc.aio.Server) -> None:
        """Follow ``server``'s accept loop: its end (``accept_loop_ending``, or its task's end) wakes the
        keeper, and grpcio's own handling of that end (cancel every call at once, leaving the core server
        undestroyed) is removed. Where this grpcio's server has not the shape relied on, grpcio's stays."""
        self._ending.clear()
        self._error, self._accept_loop = None, None
        handler = getattr(getattr(server, "_server", None), "_serving_task_crash_handler", None)
        if handler is None:
            return
        for task in asyncio.all_tasks():
            if coroutine_name(task) == ACCEPT_LOOP and task.remove_done_callback(handler):  # this server's
                _KEEPERS[task] = self
                self._accept_loop = task
                task.add_done_callback(self._accept_loop_ended)
                return

    def accept_loop_ending(self, accept_loop: asyncio.Task) -> None:
        if accept_loop is self._accept_loop and not self.draining():
            self._ending.set()

    def _accept_loop_ended(self, task: asyncio.Task) -> None:
        error = None if task.cancelled() else task.exception()  # retrieved: asyncio logs no "never retrieved"
        if task is self._accept_loop:
            self._error = error
        self.accept_loop_ending(task)

    def _why(self) -> str | None:
        """What ended the accept loop, once its task has ended (its message quotes no caller bytes)."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    async def _ended(self, server: grpc.aio.Server) -> str:
        """Why ``server``'s accept loop ended, once it has (it failed, or the server stopped)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SERVING_CHECK_SECONDS):
                    await self._ending.wait()
            if self._ending.is_set():
                return self._why() or "its accept loop ended"
            try:
                if not await server.wait_for_termination(0):  # False: it has ended
                    return self._why() or "it stopped"
            except Exception as error:  # grpcio's own handling ended it (a server not watched)
                return f"{type(error).__name__}: {error}"

    async def _wait_spacing(self) -> bool:
        """Wait out the spacing, health NOT_SERVING meanwhile; False once the server drains instead."""
        now = time.monotonic()
        seconds = self.spacing.wait(now)
        if not self.spacing.spacing:
            return True
        log.error(
            "the %s was ended again %.1f s after it was last served again: serving it in %g s, health NOT_SERVING "
            "meanwhile",
            self.name,
            now - self.spacing.last_served,
            self.spacing.spacing,
        )
        await self.set_health(False)
        await asyncio.sleep(seconds)
        return not self.draining()

    @staticmethod
    async def _calls_ended(busy: Callable[[], bool], seconds: float) -> None:
        """Wait until no call runs on the port (``busy``) and grpcio's own tasks of that moment for its calls
        have ended, at most ``seconds`` in all: the port is served again by one gRPC server at a time."""
        deadline = time.monotonic() + seconds
        grpcio_tasks = {task for task in asyncio.all_tasks() if coroutine_name(task) in GRPCIO_CALL_TASKS}
        while busy() or any(not task.done() for task in grpcio_tasks):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)  # a condition, polled: calls end on their own time
        await asyncio.sleep(0.05)  # what they left to the loop (generators' closing) runs first
