"""Assembles the server: the dataplane, its gRPC front doors (LossService, the Open Inference Protocol),
health checking, reflection, interceptors (malformed requests, metrics, tokens), TLS, and a graceful stop.

The gRPC server is asyncio's (``grpc.aio``), on an event loop of its own in a background thread, so
``LosswireServer`` is used like any blocking server: ``start()`` returns the bound port, ``stop()``
drains. A call that waits for its caller is a suspended coroutine; losses run in ``max_workers``
compute threads (``rpc.compute.Compute``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import os
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from losswire.wire.buffers import BufferPool
from losswire.wire.protocol import EVALUATE_STREAM_METHOD, SERVICE_NAME
from losswire.wire.staging import PinnedPool, Staging

from . import __version__
from .auth import TokenSet
from .config import ServerConfig
from .dataplane import Dataplane, RequestLimits, SharedMemoryLimits, SharedMemoryRegistry
from .dataplane.budget import MemoryBudget
from .dataplane.costs import TermCosts
from .evaluation import OwnerLimits, SessionStore
from .host_limits import cpu_limit, memory_limit
from .log_lines import bound_repeated_lines
from .losses import LOSSES, Registry
from .rpc.authentication import SessionOwners, TokenAuthInterceptor, token_digest
from .rpc.compute import Compute, connection_of, thread_share
from .rpc.grpc_logs import grpc_task_errors, quiet_caller_lines
from .rpc.health import HEALTH_WATCH, BoundedHealthServicer
from .rpc.health import PER_CONNECTION as WATCHES_PER_CONNECTION
from .rpc.inference import InferenceService, add_inference_service
from .rpc.intake import CallSlots, IntakeInterceptor, Place, RequestRoom, SmallRequests, unary_read_seconds
from .rpc.lanes import Lanes
from .rpc.loss_service import LossService, add_to_server
from .rpc.malformed import MalformedRequestInterceptor
from .rpc.metrics import Bound, ServerMetrics
from .rpc.ports import PortKeeper, keep_request_calls
from .rpc.streams import StreamGuardInterceptor
from .rpc.tls import ServerTLS, tls_files

log = logging.getLogger("losswire.server")

HANDSHAKE_TIMEOUT_MS = 10_000
MAX_STREAMS_PER_CONNECTION = 100
# a health check's request (a few bytes) comes right behind its headers: a call waits this long at most for
# room in the open room, then for its request, so that silent calls hold that room briefly and a probe
# (Kubernetes waits 1 s by default) is not kept waiting behind them for the 9 s a big request may take
HEALTH_READ_SECONDS = 2.0
HEALTH_REQUEST_BYTES = 4096  # a HealthCheckRequest names one service: the health port takes no more
# a reflection request names one symbol or file; its answer quotes it whole, and answers left unread stay
# in memory no budget counts (a 10 MB name held ~200 MB per stream)
REFLECTION_REQUEST_BYTES = 64 << 10
# Health checks without a token (all of them with tokens off) in flight at once on the main port: they take
# none of --max-concurrent-rpcs, so that a flood of silent ones cannot keep callers out (11 connections did)
OPEN_CALLS = 64
# The health port: calls open on one connection (its Watch streams and two checks), and connections at once.
# A silent check holds its call until its caller's deadline (gRPC reads the request before any handler), so
# calls are bounded per connection and the port admits that many on every connection it accepts: a flood
# of silent checks (42 connections took every call before) must then take every connection to keep a probe
# out, which a network policy letting only the kubelet in prevents
HEALTH_PORT_STREAMS_PER_CONNECTION = WATCHES_PER_CONNECTION + 2
HEALTH_PORT_CONNECTIONS = 1024
OWN_FILES = 512  # descriptors kept from connections for the server's own use at least (handoffs, files, logs)


def open_files() -> int:
    """The process's open-files limit (the soft one: what it may open now)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_bound(max_connections: int | None, files: int) -> int:
    """Connections the server accepts at once: ``max_connections`` (None: no bound of its own), never more
    than ``files`` less a quarter of them (at least ``OWN_FILES``), which the server keeps for its own
    descriptors: connections that take every descriptor leave it unable to take a handoff or open a file."""
    by_files = max(1, files - max(OWN_FILES, files // 4))
    return by_files if max_connections is None else min(max_connections, by_files)


Result = TypeVar("Result")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_plugins(modules: tuple[str, ...]) -> None:
    """Import modules that register extra losses. Only from the server's own configuration."""
    for module in modules:
        before = set(LOSSES.names())
        importlib.import_module(module)
        added = sorted(set(LOSSES.names()) - before)
        log.info("plugin %s registered %s", module, ", ".join(added) or "no new losses")


class LosswireServer:
    """A losswire server. ``start()`` binds and returns the port; ``stop()`` drains."""

    def __init__(self, config: ServerConfig, registry: Registry = LOSSES) -> None:
        self.config = config
        self.registry = registry
        # checked first: a TLS or token mistake stops the server before anything else happens
        tls = tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
        self.tls = ServerTLS(tls) if tls else None
        tokens = config.auth_tokens_file is not None or bool(config.auth_tokens)
        self.tokens = TokenSet(config.auth_tokens, config.auth_tokens_file) if tokens else None
        self.auth = TokenAuthInterceptor(self.tokens) if self.tokens else None
        # unary requests received and held at once; with tokens, one token holds all of it but one request
        self.request_room = RequestRoom(self._request_room(), per_caller=self._request_room_per_token())
        # health calls (without a token, where tokens are on) read in a room of their own, with call slots of
        # their own: whatever holds the request room or the calls, probes are still read (one connection has at
        # most one being received there), and a flood of them leaves callers their slots
        self.open_room = RequestRoom(
            8 * self._largest_request_message(),
            per_connection=1,
            small=SmallRequests("health check", HEALTH_READ_SECONDS),
            slots=CallSlots(OPEN_CALLS, what=("health checks without a token", "probes: losswire serve --health-port")),
        )
        load_plugins(config.plugins)
        # torch's default is a thread per core of the host; under a CPU quota (a container's limit) the
        # threads beyond it only wait out each period's end, so the quota, rounded up, is the default
        self.cpu_quota = cpu_limit()
        threads = config.torch_threads or (self.cpu_quota.threads if self.cpu_quota else None)
        if threads and (config.torch_threads or threads < torch.get_num_threads()):
            torch.set_num_threads(threads)
        self.device = resolve_device(config.device)
        self.sessions = SessionStore(
            registry,
            self.device,
            ttl_seconds=config.session_ttl_seconds,
            max_sessions=config.max_sessions,
            replay_depth=config.session_replay_depth,
            max_bytes=config.max_session_bytes,
            per_owner=OwnerLimits(config.max_sessions_per_token, config.max_session_bytes_per_token),
        )
        self.shared_memory = SharedMemoryRegistry(
            config.shared_memory,
            SharedMemoryLimits(
                regions_per_caller=config.max_shared_memory_regions,
                bytes_per_caller=config.max_shared_memory_per_caller,
                regions=config.max_shared_memory_total_regions,
                bytes=config.max_shared_memory,
                connections=config.max_shared_memory_connections,
            ),
        )
        self.staging = self._staging()
        limits = RequestLimits(
            config.max_elements,
            config.max_request_elements,
            config.max_terms,
            config.max_dims,
            config.max_message_bytes,
        )
        self.dataplane = Dataplane(
            self.device,
            registry,
            self.sessions,
            limits,
            slots=self._big_call_slots(),
            slots_per_token=self._big_call_slots_per_token(tokens),
            shared_memory=self.shared_memory,
            buffers=BufferPool(config.buffer_pool_bytes),
            fused=config.fused_kernels,
            gpu_kernels=config.gpu_kernels,
            overlap=config.overlap_transfer,
            budget=MemoryBudget(config.memory_budget, config.max_term_memory),
            costs=TermCosts(registry, config.max_module_bytes, config.term_memory_ratio),
            stage=self.staging,
        )
        # counted whether or not the endpoint is served: tests and embedders read .metrics.registry
        self.metrics = ServerMetrics(self.device, __version__, registry.names, lambda: len(self.sessions))
        self.metrics.watch_staging(lambda: None if self.staging is None else self.staging.pool)
        evaluator = self.dataplane.evaluator
        self.metrics.watch_kernels(lambda: (evaluator.fused_answers(), evaluator.gpu_kernels_off()))
        self.call_slots = CallSlots(config.max_concurrent_rpcs, self._calls_per_token())
        self.stream_guard = StreamGuardInterceptor(
            self._open_streams_bound(),
            config.stream_idle_seconds,
            config.stream_min_rate,
            paced=frozenset({"EvaluateStream"}),  # the streams that hold big calls
            per_caller=self._open_streams_per_token(),
            # reflection answers each request with a copy of it: its requests (symbol and file names) are small
            largest={"ServerReflectionInfo": REFLECTION_REQUEST_BYTES},
        )
        self.metrics.watch_bounds(self._bounds)
        # compute threads in turn, fairly: by token, each leaving other tokens a quarter; else by connection
        threads = config.max_workers
        if self.tokens is not None:
            self.compute = Compute(threads, token_digest, per_caller=thread_share(threads))
        else:
            self.compute = Compute(threads, connection_of)
        self.draining = False  # set by stop(): readiness answers (health, OIP ServerReady) turn false
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.server: grpc.aio.Server | None = None
        self.health: Any = None
        self.lanes: Lanes | None = None
        self._health_server: grpc.aio.Server | None = None
        # set once a port grpcio ended could not be served again (why, in words): losswire serve exits 1
        self.failure: str | None = None
        self.failed = threading.Event()
        self._keepers: list[PortKeeper] = []  # one a port: grpcio may end its gRPC server on its own
        self._keeping: list[asyncio.Future] = []
        self._health_watch: asyncio.Future | None = None
        self._loop = asyncio.new_event_loop()
        self._loop.set_task_factory(keep_request_calls)  # grpcio's requests for calls outlive its accept loop
        self._loop.set_exception_handler(
            lambda loop, context: grpc_task_errors(loop, context, loop.default_exception_handler)
        )
        self._thread = threading.Thread(target=self._loop.run_forever, name="losswire-loop", daemon=True)

    # -- the event loop ---------------------------------------------------------------------------

    def _on_loop(self, work: Coroutine[Any, Any, Result], timeout: float | None = None) -> Result:
        """Run ``work`` on the server's event loop and wait for its result here."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def _build(self) -> grpc.aio.Server:
        """The gRPC server with every service; called on the event loop (grpc.aio binds to it)."""
        options = [
            ("grpc.max_receive_message_length", self._largest_request_message()),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            *self._connection_options(),
        ]
        server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=self._calls_at_once(),
            # outermost first: a call is admitted (--max-concurrent-rpcs) and its unary request read only with
            # room for it (the handlers within see unary calls); unparsable bytes get INVALID_ARGUMENT (not
            # grpcio's INTERNAL), counted as such; token checks after metrics, so that refused calls are
            # counted as UNAUTHENTICATED
            interceptors=[
                IntakeInterceptor(
                    self._room_of,
                    self._largest_request_message(),
                    self._request_read_seconds(),
                    self.call_slots,
                    uncounted=frozenset({HEALTH_WATCH}),  # bounded by the health service itself
                    on_refused=self._count_refused,
                    answer_seconds=self.config.stream_idle_seconds,
                    answer_min_rate=self.config.stream_min_rate,
                    # a streamed call's request may carry tensors inline, and the call holds it to its end
                    roomed_streams=frozenset({EVALUATE_STREAM_METHOD}),
                ),
                MalformedRequestInterceptor(self._count_malformed),
                self.metrics.interceptor(),
                *([self.auth] if self.auth is not None else []),
                self.stream_guard,
            ],
        )
        owners = SessionOwners(private=self.tokens is not None and not self.config.share_sessions)
        # built once: a port served again (rpc.ports) keeps the lanes waiting and health as they stand
        if self.lanes is None:
            self.lanes = Lanes(self.config.lane_join_seconds)  # streamed calls' chunks on several streams
        if self.health is None:
            self.health = BoundedHealthServicer(self.config.max_health_watches)
        add_to_server(LossService(self.dataplane, self.compute, owners, lanes=self.lanes), server)
        inference = add_inference_service(server, InferenceService(self.dataplane, self.compute, self._ready))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, inference, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    def _connection_options(
        self, streams: int = MAX_STREAMS_PER_CONNECTION, connections: int | None = None
    ) -> list[tuple[str, int]]:
        """What a connection may do, on every port of the server: ``streams`` calls open on one connection,
        ``connections`` at once (None: the server's bound)."""
        if connections is None:
            connections = connection_bound(self.config.max_connections, open_files())
        return [
            ("grpc.so_reuseport", int(self.config.reuse_port)),
            # a connection that has not finished its TLS and HTTP/2 handshake by then is closed (gRPC's
            # default waits 60-120 s: thousands of silent sockets held descriptors that long)
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
            # calls open at once on one connection; more wait in the client. One connection could hold
            # every one of --max-concurrent-rpcs, and a burst of streams reset at once costs less
            ("grpc.max_concurrent_streams", streams),
            # connections at once: an idle one stays open, and each holds a descriptor and ~15 KiB
            ("grpc.max_allowed_incoming_connections", connections),
            # identity only: a compressed message would let a few bytes on the wire count as many against
            # the stream pace (and inflate to the receive limit); neither losswire's client nor its server
            # compresses
            ("grpc.compression_enabled_algorithms_bitset", 1),
        ]

    def _calls_at_once(self) -> int | None:
        """gRPC's own bound on calls at once, behind the intake's: --max-concurrent-rpcs, and besides health
        Watch streams and health checks without a token (bounds of their own: they take no call's place)."""
        calls = self.config.max_concurrent_rpcs
        return None if calls is None else calls + self.config.max_health_watches + OPEN_CALLS

    def _calls_per_token(self) -> int | None:
        """Calls one token may have at once (None without tokens, or without a bound on calls): by default
        all but a quarter of --max-concurrent-rpcs, so that one token always leaves others room."""
        calls = self.config.max_concurrent_rpcs
        if self.tokens is None or calls is None:
            return None
        chosen = self.config.max_concurrent_rpcs_per_token
        return chosen if chosen is not None else max(1, calls - calls // 4)

    def _big_call_slots(self) -> int:
        """Big calls at once, below the compute threads so that small calls always find one."""
        return max(1, min(self.config.max_stream_calls, self.config.max_workers - 1))

    def _big_call_slots_per_token(self, tokens: bool) -> int | None:
        """Big calls one token may have (None without tokens: callers cannot be told apart); by default all
        but one of the slots, so that one token always leaves another room."""
        if not tokens:
            return None
        chosen = self.config.max_stream_calls_per_token
        return chosen if chosen is not None else max(1, self._big_call_slots() - 1)

    def _open_streams_bound(self) -> int:
        """``max_open_streams``, kept below the concurrent calls so that silent streams leave room."""
        calls = self.config.max_concurrent_rpcs
        return self.config.max_open_streams if calls is None else max(1, min(self.config.max_open_streams, calls // 2))

    def _open_streams_per_token(self) -> tuple[int, Callable[[grpc.aio.ServicerContext], str]] | None:
        """Request streams one token may have open (None without tokens): all but a quarter of them, so that
        one token's silent streams always leave others room; and who a stream's caller is."""
        if self.tokens is None:
            return None
        bound = self._open_streams_bound()
        return max(1, bound - bound // 4), token_digest

    def _staging(self) -> Staging | None:
        """Pinned staging for a CUDA device (nothing pinned until a big tensor crosses); None on the CPU,
        where nothing crosses, or with --pinned-staging-bytes 0."""
        if self.device.type != "cuda" or self.config.pinned_staging_bytes <= 0:
            return None
        return Staging(PinnedPool(self.config.pinned_staging_bytes))

    def _bounds(self) -> Iterator[Bound]:
        """What each shared bound holds now, and its limit (read at each metrics scrape, off the loop: the
        figures are a moment's, not a consistent snapshot)."""
        dataplane = self.dataplane
        yield "calls", self.call_slots.open, self.call_slots.limit
        open_calls = self.open_room.slots
        if open_calls is not None:
            yield "open_calls", open_calls.open, open_calls.limit
        yield "request_streams", self.stream_guard.open, self.stream_guard.max_open
        yield "big_calls", dataplane.slots.in_use, dataplane.slots.slots
        yield "compute_threads", self.compute.shares.held, self.compute.threads
        yield "compute_waiting", self.compute.shares.waiting, None
        yield "session_waiting", self.compute.sessions.waiting, None
        yield "memory_budget_bytes", dataplane.budget.held, dataplane.budget.total
        if self.staging is not None:
            yield "pinned_staging_bytes", self.staging.pool.held_bytes, self.staging.pool.max_bytes
        for name, room in (("request_room", self.request_room), ("health_request_room", self.open_room)):
            yield f"{name}_bytes", room.held, room.capacity
            yield f"{name}_waiting", room.waiting, None
        if self.health is not None:
            yield "health_watches", self.health.watching, self.health.max_watches

    def _ready(self) -> bool:
        return not self.draining

    def _largest_request_message(self) -> int:
        return min(self.config.max_request_message_bytes, self.config.max_message_bytes)

    def _request_room(self) -> int:
        """Bytes of unary requests received and held at once: an eighth of the memory budget, and room for
        four of the largest at least (sixteen without a budget)."""
        largest, budget = self._largest_request_message(), self.config.memory_budget
        return 16 * largest if budget is None else max(4 * largest, budget // 8)

    def _request_read_seconds(self) -> float | None:
        """How long a unary request may take to arrive once asked for (None with the idle timeout off)."""
        if self.config.stream_idle_seconds is None:
            return None
        return unary_read_seconds(self._largest_request_message())

    def _request_room_per_token(self) -> int | None:
        """Bytes of the request room one token may hold (None without tokens: callers cannot be told apart,
        and one connection has at most four requests being received): all but room for one request, so
        that one token always leaves another room."""
        return None if self.tokens is None else self._request_room() - self._largest_request_message()

    def _room_of(self, call: grpc.HandlerCallDetails) -> Place | None:
        """Where a unary call's request is read, and for whom (None: refused by the token check, never read).
        A token holder's calls all read in the request room, as its token's; the others' health calls in the
        open room, as their connection's."""
        if self.auth is not None:
            token = self.auth.token_of(call)
            if token is not None:
                return self.request_room, token
        if TokenAuthInterceptor.open(call):
            return self.open_room, None
        return (self.request_room, None) if self.auth is None else None

    def _count_refused(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels(method, code.name).inc()

    def _count_malformed(self, method: str) -> None:
        self.metrics.requests.labels(method, grpc.StatusCode.INVALID_ARGUMENT.name).inc()

    def _address(self, port: int) -> str:
        if ":" in self.config.host and not self.config.host.startswith("["):
            return f"[{self.config.host}]:{port}"
        return f"{self.config.host}:{port}"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> int:
        quiet_caller_lines()  # no caller's bytes in gRPC's own log lines
        bound_repeated_lines()  # nor a line a call in the server's own
        self._thread.start()
        self.shared_memory.start()  # its socket first: the endpoint answers from the first call on
        try:
            self.port = self._on_loop(self._start())
        except BaseException:
            self.shared_memory.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._log_security()
        self._log_resources()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics_port = self.metrics.serve(host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        log.info(
            "losswire %s listening on %s:%d, device %s, %d losses: %s",
            __version__,
            self.config.host,
            self.port,
            self.device,
            len(self.registry),
            ", ".join(self.registry.names()),
        )
        if self.device.type == "cpu":
            log.info(
                "--overlap-transfer %s: streamed calls that ask for early gradients are computed %s",
                "on" if self.dataplane.overlap else "off",
                "as their rows arrive" if self.dataplane.overlap else "once every chunk is in",
            )
        if self.config.shared_memory:
            log.info(
                "shared memory: segments handed over on unix socket %s (callers running as uid %d)",
                self.shared_memory.endpoint(),
                os.geteuid(),
            )
        return self.port

    async def _start(self) -> int:
        self.server = self._build()
        address = self._address(self.config.port)
        credentials = self.tls.credentials() if self.tls is not None else None
        port = _bind(self.server, address, credentials, self.config.reuse_port)
        await self.server.start()
        self._keep(CALLERS_PORT, self._serve_callers_again, busy=self._calls_running)
        if self.config.health_port is not None:
            await self._start_health_port(self.config.health_port or 0)
            self._keep(HEALTH_PORT, self._serve_health_again, busy=None)
        await self._set_health(serving=True)
        if self.config.health_bound_seconds is not None:
            self._health_watch = asyncio.ensure_future(self._watch_compute(self.config.health_bound_seconds))
        return port

    def _keep(self, name: str, serve_again: Callable[[], Awaitable[None]], busy: Callable[[], bool] | None) -> None:
        """Serve port ``name`` again whenever grpcio ends its gRPC server on its own (``rpc.ports``)."""
        label = "callers" if name == CALLERS_PORT else "health"
        keeper = PortKeeper(
            name,
            current=(lambda: self.server) if name == CALLERS_PORT else (lambda: self._health_server),
            serve_again=serve_again,
            set_health=self._set_health,
            draining=lambda: self.draining,
            failed=self._port_lost,
            busy=busy,
            served_again=self.metrics.served_again.labels(label).inc,
        )
        self._keepers.append(keeper)
        self._keeping.append(asyncio.ensure_future(keeper.run()))

    @property
    def restarts(self) -> int:
        """Ports served again after grpcio ended their gRPC server on its own."""
        return sum(keeper.restarts for keeper in self._keepers)

    def _calls_running(self) -> bool:
        """Whether a call is admitted, streaming or holding a big-call slot on the callers' port."""
        return bool(self.call_slots.open or self.stream_guard.open or self.dataplane.slots.in_use)

    async def _serve_callers_again(self) -> None:
        server = self._build()
        credentials = self.tls.credentials() if self.tls is not None else None
        _bind(server, self._address(self.port), credentials, self.config.reuse_port)
        await server.start()
        self.server = server

    async def _serve_health_again(self) -> None:
        await self._start_health_port(self.health_port)

    def _port_lost(self, why: str) -> None:
        """A port could not be served again: ``losswire serve`` exits 1, for its supervisor to restart it."""
        self.failure = why
        log.critical("%s; health turns NOT_SERVING and the server stops", why)
        self.failed.set()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _watch_compute(self, bound: float) -> None:
        """Health follows whether a small call would be served within ``bound`` seconds: a trivial task
        through the compute threads every ``bound / 4`` seconds; NOT_SERVING while one waits longer
        (every thread busy: balancers then send calls elsewhere), SERVING again once one gets through."""
        serving = True
        while not self.draining:
            probe = asyncio.ensure_future(self.compute(None, time.perf_counter))
            done, _ = await asyncio.wait([probe], timeout=bound)
            if not done and serving and not self.draining:
                serving = False
                log.warning("health NOT_SERVING: a small call would wait more than %.1f s for a compute thread", bound)
                await self._set_health(serving=False)
            with contextlib.suppress(Exception):
                await probe
            if not serving and not self.draining:
                serving = True
                log.info("health SERVING again: compute threads answer within %.1f s", bound)
                await self._set_health(serving=True)
            await asyncio.sleep(bound / 4)

    def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, new calls are refused, in-flight calls finish (up to grace)."""
        grace = self.config.grace_seconds if grace is None else grace
        notice = self.config.shutdown_notice_seconds
        self.draining = True
        if self.server is not None:
            self._on_loop(self.health.enter_graceful_shutdown())
            if notice > 0:
                log.info("stopping: health NOT_SERVING; still serving for %.1f s of notice", notice)
                time.sleep(notice)
            log.info("stopping: health NOT_SERVING, draining in-flight calls for up to %.0f s", grace)
            self._on_loop(self._stop(grace))
        self.metrics.stop()
        self.shared_memory.stop()
        self.compute.shutdown()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        log.info("stopped")

    async def _stop(self, grace: float) -> None:
        if self._health_watch is not None:
            self._health_watch.cancel()
        for keeping in self._keeping:
            keeping.cancel()
        await self.server.stop(grace)
        if self._health_server is not None:  # probes see NOT_SERVING until the very end
            await self._health_server.stop(0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` seconds passed (False)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _log_resources(self) -> None:
        """The memory budget and torch's threads, and the limits they were taken from: an operator whose
        container limit was not seen (an unknown control-group layout) reads it here."""
        limit, budget = memory_limit(), self.config.memory_budget
        seen = (
            "no memory limit found" if limit is None else f"this process may use {_gib(limit.bytes)} ({limit.source})"
        )
        held = "unbounded" if budget is None else _gib(budget)
        log.info(
            "memory budget for calls in flight: %s; idle buffers %s; %s",
            held,
            _gib(self.config.buffer_pool_bytes),
            seen,
        )
        quota = self.cpu_quota
        log.info(
            "torch threads: %d (%s)",
            torch.get_num_threads(),
            "--torch-threads"
            if self.config.torch_threads
            else "torch's default: no CPU quota found"
            if quota is None
            else f"a CPU quota of {quota.cpus:g} CPUs, {quota.source}",
        )

    def _log_security(self) -> None:
        transport = self.tls.describe() if self.tls is not None else "plaintext (no TLS)"
        who = f"bearer tokens required ({len(self.tokens)} configured)" if self.tokens else "no authentication"
        log.info("security: %s, %s; grpc.health.v1 open to probes", transport, who)
        if self.tokens and self.tls is None:
            log.warning(
                "bearer tokens travel in plaintext without TLS: anyone on the network path can read and reuse "
                "them; give --tls-cert and --tls-key"
            )

    async def _start_health_port(self, port: int) -> None:
        """A plaintext port with only the health service (the same servicer: it drains with the server),
        for probes that cannot do TLS or present client certificates (Kubernetes gRPC probes)."""
        connections = min(HEALTH_PORT_CONNECTIONS, connection_bound(self.config.max_connections, open_files()))
        options = [
            ("grpc.max_receive_message_length", HEALTH_REQUEST_BYTES),
            *self._connection_options(HEALTH_PORT_STREAMS_PER_CONNECTION, connections),
        ]
        calls = HEALTH_PORT_STREAMS_PER_CONNECTION * connections
        malformed = [MalformedRequestInterceptor(self._count_malformed)]  # INVALID_ARGUMENT, not UNKNOWN
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=calls, interceptors=malformed)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = _bind(server, self._address(port), None, self.config.reuse_port)
        await server.start()
        self._health_server = server
        log.info("health (grpc.health.v1 only, plaintext) on %s:%d", self.config.host, self.health_port)


CALLERS_PORT, HEALTH_PORT = "callers' port", "health port"


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, reuse: bool) -> int:
    """Bind ``address``; an OSError naming it when another process holds the port (SO_REUSEPORT is off
    unless ``--reuse-port``: two servers on one port would split its callers, and their sessions)."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc.aio's way to say the bind failed
        port = 0
    if port == 0:
        shared = "" if reuse else "; several servers on one port need --reuse-port on each"
        raise OSError(
            errno.EADDRINUSE,
            f"cannot bind {address}: another process listens there (`ss -ltnp` names it); --port picks another{shared}",
        )
    return port


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"
