"""A port whose gRPC server grpcio ended on its own is served again.

grpcio's asyncio accept loop decodes the ``:path`` of each call to an unregistered method as UTF-8; one that
is not (a single HEADERS frame, from anyone who can reach the port, before any token is checked) raises
there, and grpcio shuts that server down, cancelling its calls: the port closed for good while the process
and its health lived on, SERVING. Nothing in Python runs before that decode, so the call cannot be refused.
``PortKeeper`` serves the port again instead, with a new gRPC server of the same services on the same port;
what the server holds (sessions, shared memory, budgets) lives outside gRPC and stays. The calls in flight
on that port end CANCELLED, which clients retry.

Two findings shape how (both measured under three connections sending such frames while streamed calls
ran): the ended server is destroyed only once its cancelled calls have unwound, and a port ended again
soon waits before it is served again (``ServingSpacing``), health NOT_SERVING meanwhile. Ended and served
again at once, the process crashed (a segfault on the event loop's thread, in grpcio's handlers) in 3 of 4
runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger("losswire.server")

SERVING_CHECK_SECONDS = 1.0  # how often a keeper looks whether its server still serves
# grpcio's coroutines that carry one call each (grpc.aio's Cython server), by qualified name
GRPCIO_CALL_TASKS = frozenset(
    {"_schedule_rpc_coro", "_handle_exceptions", "_handle_cancellation_from_core", "_handle_rpc"}
)
CALLS_UNWIND_SECONDS = 10.0  # the most a port's cancelled calls are waited for before its server is destroyed


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

    def __post_init__(self) -> None:
        self.spacing = self.spacing or ServingSpacing()

    async def run(self) -> None:
        while not self.draining():
            server = self.current()
            why = await self._ended(server)
            if self.draining():
                return
            if self.busy is not None:
                await self._calls_ended(self.busy, CALLS_UNWIND_SECONDS)
            # grpcio's own shutdown of it stopped at the error, before the core server was destroyed: ~40 KB
            # of the process's memory were left behind each time (a caller repeating the frame grew it)
            with contextlib.suppress(Exception):
                await server.stop(None)
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
                "the %s stopped accepting calls (%s): grpcio ended its gRPC server on its own, cancelling the calls "
                "on it; serving the port again (%d times so far)",
                self.name,
                why,
                self.restarts,
            )

    @staticmethod
    async def _ended(server: grpc.aio.Server) -> str:
        """Why ``server`` ended, once it has."""
        try:
            while await server.wait_for_termination(SERVING_CHECK_SECONDS):  # True: timed out, serving
                pass
            return "it stopped"
        except Exception as error:  # what ended grpcio's accept loop (its message quotes no caller bytes)
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
        have ended, at most ``seconds`` in all. A new gRPC server started while the old one's call tasks
        still ran crashed the process now and then (a segfault in a frame of grpcio's handlers), where the
        old server alone never did."""
        deadline = time.monotonic() + seconds
        grpcio_tasks = {
            task for task in asyncio.all_tasks() if getattr(task.get_coro(), "__qualname__", "") in GRPCIO_CALL_TASKS
        }
        while busy() or any(not task.done() for task in grpcio_tasks):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)  # a condition, polled: calls end on their own time
        await asyncio.sleep(0.05)  # what they left to the loop (generators' closing) runs first
