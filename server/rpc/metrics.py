"""Prometheus metrics: what operators scrape from ``--metrics-port``.

One ``ServerMetrics`` per server, on its own ``CollectorRegistry`` (two servers in one process, as
in the tests, never share counters). The numbers come from a gRPC server interceptor, so the
servicers stay free of bookkeeping:

- ``losswire_requests_total{method, code}``: every unary call and EvaluateStream by method and gRPC
  status code;
- ``losswire_loss_terms_total{loss, code}``: every ``Evaluate``/``EvaluateStream`` term (and
  ``ModelInfer`` call) by loss type and status (a type that is not registered counts as
  ``loss="unregistered"``: labels never take arbitrary client strings, so a fuzzer cannot blow up
  the series count);
- ``losswire_request_duration_seconds{method}`` and
  ``losswire_evaluate_stage_seconds{stage=decode|compute|encode}``: latency histograms;
- ``losswire_received_bytes_total`` / ``losswire_sent_bytes_total{method}``: protobuf bytes (a
  stream's chunks by their data);
- ``losswire_in_flight_requests{method}``, ``losswire_sessions`` (live sessions);
- ``losswire_bound_used{bound}`` / ``losswire_bound_limit{bound}``: what each shared bound (calls,
  request streams, big calls, the memory budget, the request rooms, health Watch streams) holds, and
  its limit;
- ``losswire_ports_served_again_total{port}``: times grpcio ended the gRPC server of a port on its own (a
  call whose ``:path`` is not UTF-8) and the server served the port again: a caller sending such frames;
- ``losswire_pinned_staging_bytes{state=held|lent}`` and ``losswire_staged_copies_total{path=pinned|pageable}``:
  the pinned host memory a CUDA server stages big tensors in, and the copies that went through it or, the
  bound reached, the pageable way (zero on a CPU device: nothing is staged);
- ``losswire_fused_terms_total{loss, kernel=family|compiled|by hand}`` and ``losswire_gpu_kernel_off{loss}``:
  terms each fused kernel answered, by its torch ops, its compiled closed form or its hand-written GPU
  kernel, and (1) where a loss's GPU kernel failed and is off for the process; one series per fused
  kernel, from the start;
- ``losswire_device_memory_bytes{device, kind}``: CUDA allocated / reserved / peak, or on the CPU
  the process's resident memory (host memory is where the CPU's losses live);
- the standard ``process_*`` and ``python_*`` collectors, and ``losswire_build_info``.

The endpoint is prometheus_client's WSGI app on a server of our own (``MetricsHTTPServer``): its own
server gives every connection a thread and waits on it for ever, so idle connections to the metrics port
took a thread and a descriptor each until the process ran out of descriptors and the gRPC ports stopped
accepting connections. At most ``METRICS_CONNECTIONS`` are served at once (beyond, a connection is
closed at once) and one that sends nothing for ``METRICS_IDLE_SECONDS`` is closed. Scrapes are answered
one at a time and paced (``PacedScrapes``), so a flood of them cannot take the GIL from the loss calls.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
import torch
from google.protobuf.message import Message
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .calls import code_of
from .status import gone_code
from .streams import message_bytes

log = logging.getLogger("losswire.server")

# 0.5 ms (a tiny call's floor on loopback) up to a minute (a 1 GiB tensor on a loaded CPU)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UNREGISTERED = "unregistered"


class DeviceMemoryCollector(Collector):
    """Reads the device's memory at scrape time (nothing to update on the request path)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "losswire_device_memory_bytes",
            "Memory of the device the losses run on (CUDA: allocated/reserved/peak; CPU: process resident)",
            labels=["device", "kind"],
        )
        name = str(self.device)
        if self.device.type == "cuda":
            family.add_metric([name, "allocated"], torch.cuda.memory_allocated(self.device))
            family.add_metric([name, "reserved"], torch.cuda.memory_reserved(self.device))
            family.add_metric([name, "peak_allocated"], torch.cuda.max_memory_allocated(self.device))
        else:
            family.add_metric([name, "resident"], _resident_bytes())
        yield family


Bound = tuple[str, float, "float | None"]  # (name, what it holds now, its limit; None: unbounded)


class BoundsCollector(Collector):
    """Reads what each of the server's shared bounds holds, and its limit, at scrape time: which bound a
    RESOURCE_EXHAUSTED came from, and how close the others are."""

    def __init__(self, read: Callable[[], Iterable[Bound]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        used = GaugeMetricFamily(
            "losswire_bound_used",
            "What each shared bound of the server holds now (calls, streams, bytes)",
            labels=["bound"],
        )
        limit = GaugeMetricFamily(
            "losswire_bound_limit", "Each shared bound's limit (absent: unbounded)", labels=["bound"]
        )
        for name, held, most in self.read():
            used.add_metric([name], held)
            if most is not None:
                limit.add_metric([name], most)
        yield used
        yield limit


class StagingCounts(Protocol):
    """What ``StagingCollector`` reads: ``losswire.wire.staging.PinnedPool``'s counts."""

    held_bytes: int
    lent_bytes: int
    staged: int
    refused: int


class StagingCollector(Collector):
    """Reads the pinned staging pool's counts at scrape time: the copies count themselves in the pool, so
    the request path and the interceptor do nothing more."""

    def __init__(self, read: Callable[[], StagingCounts | None]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        pool = self.read()
        held = GaugeMetricFamily(
            "losswire_pinned_staging_bytes",
            "Pinned host memory held to stage tensors to and from a CUDA device (held: all; lent: in a copy now)",
            labels=["state"],
        )
        copies = CounterMetricFamily(
            "losswire_staged_copies",
            "Big tensors copied between the host and a CUDA device through pinned memory, or the pageable way "
            "where the pinned bound was reached",
            labels=["path"],
        )
        held.add_metric(["held"], pool.held_bytes if pool else 0)
        held.add_metric(["lent"], pool.lent_bytes if pool else 0)
        copies.add_metric(["pinned"], pool.staged if pool else 0)
        copies.add_metric(["pageable"], pool.refused if pool else 0)
        yield held
        yield copies


class KernelsCollector(Collector):
    """Reads the evaluator's fused-kernel counts at scrape time (``Evaluator.fused_answers`` and
    ``gpu_kernels_off``): whether a GPU server's kernels answer, or have switched themselves off."""

    def __init__(self, read: Callable[[], tuple[Mapping[tuple[str, str], int], Iterable[str]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        answers, off = self.read()
        terms = CounterMetricFamily(
            "losswire_fused_terms",
            "Terms a fused kernel answered, by loss and kernel: its torch ops (family), its closed form "
            "compiled (compiled) or its hand-written GPU kernel (by hand)",
            labels=["loss", "kernel"],
        )
        disabled = GaugeMetricFamily(
            "losswire_gpu_kernel_off",
            "1 where a loss's GPU kernel (hand-written or compiled) failed (no C compiler, a compiler error) and "
            "is off for the process",
            labels=["loss"],
        )
        off = set(off)
        for (loss, kernel), count in answers.items():
            terms.add_metric([loss, kernel], count)
        for loss in sorted({loss for loss, _ in answers}):
            disabled.add_metric([loss], int(loss in off))
        yield terms
        yield disabled


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


METRICS_CONNECTIONS = 64  # connections served at once (Prometheus keeps one per target)
METRICS_IDLE_SECONDS = 10.0  # a connection silent this long is closed
# Scrapes are answered one at a time, at most one per this interval (20 a second; Prometheus scrapes a target
# every 15 s or so). Each takes ~1 ms of Python on the server (rendering 0.66 ms): eight threads scraping back
# to back took 300 a second and made a small call 55 times slower, its event loop waiting for the GIL.
METRICS_SCRAPE_INTERVAL_SECONDS = 0.05


class PacedScrapes:
    """The exposition app (WSGI), answering one scrape at a time and at most one per ``interval`` seconds:
    scrapers beyond wait their turn, asleep (holding no GIL), on connections the server bounds."""

    def __init__(self, app: Callable[..., Iterable[bytes]], interval: float = METRICS_SCRAPE_INTERVAL_SECONDS) -> None:
        self.app, self.interval = app, interval
        self._turn = threading.Lock()
        self._last = -interval

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self._turn:
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            return list(self.app(environ, start_response))  # rendered within the turn


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_IDLE_SECONDS  # the connection's socket timeout: a silent scraper is let go

    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


class MetricsHTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``METRICS_CONNECTIONS`` of them: beyond, closed at once."""

    daemon_threads = True
    request_queue_size = 128  # connections the kernel holds until accepted (and, beyond the bound, closed)

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ServerMetrics:
    """The server's metrics and the HTTP endpoint that exposes them."""

    def __init__(
        self,
        device: torch.device,
        version: str,
        known_losses: Callable[[], Iterable[str]],
        live_sessions: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        self.known_losses = known_losses
        r = self.registry
        self.requests = Counter("losswire_requests", "gRPC calls by method and status", ["method", "code"], registry=r)
        self.terms = Counter(
            "losswire_loss_terms", "Evaluate terms by loss type and status", ["loss", "code"], registry=r
        )
        self.duration = Histogram(
            "losswire_request_duration_seconds", "Whole-call latency", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stages = Histogram(
            "losswire_evaluate_stage_seconds",
            "Evaluate latency by stage: decode (bytes to tensors), compute (loss and gradients), encode",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.received = Counter("losswire_received_bytes", "Request bytes (protobuf)", ["method"], registry=r)
        self.sent = Counter("losswire_sent_bytes", "Response bytes (protobuf)", ["method"], registry=r)
        self.in_flight = Gauge("losswire_in_flight_requests", "Calls being served now", ["method"], registry=r)
        self.served_again = Counter(
            "losswire_ports_served_again",
            "Times grpcio ended a port's gRPC server on its own (a :path not UTF-8) and it was served again",
            ["port"],
            registry=r,
        )
        for port in ("callers", "health"):  # at 0 from the start, so that an alert on its rate has a series
            self.served_again.labels(port)
        sessions = Gauge("losswire_sessions", "Live sessions (server-held loss state)", registry=r)
        sessions.set_function(live_sessions)
        Info("losswire_build", "losswire version and device", registry=r).info(
            {"version": version, "device": str(device)}
        )
        r.register(DeviceMemoryCollector(device))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._http: Any = None

    def watch_bounds(self, read: Callable[[], Iterable[Bound]]) -> None:
        """Expose ``read()``'s bounds (``losswire_bound_used``, ``losswire_bound_limit``) at every scrape."""
        self.registry.register(BoundsCollector(read))

    def watch_staging(self, read: Callable[[], StagingCounts | None]) -> None:
        """Expose ``read()``'s pinned staging counts at every scrape (None: no staging, zeros)."""
        self.registry.register(StagingCollector(read))

    def watch_kernels(self, read: Callable[[], tuple[Mapping[tuple[str, str], int], Iterable[str]]]) -> None:
        """Expose ``read()``'s fused-kernel answers and GPU kernels off at every scrape."""
        self.registry.register(KernelsCollector(read))

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (``/metrics``); returns the bound port (``0`` picks a free one)."""
        app = PacedScrapes(make_wsgi_app(self.registry))
        self._http = make_server(host, port, app, MetricsHTTPServer, _QuietHandler)
        threading.Thread(target=self._http.serve_forever, name="losswire-metrics", daemon=True).start()
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def loss_label(self, loss_type: str) -> str:
        return loss_type if loss_type in self.known_losses() else UNREGISTERED


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every unary-unary call and EvaluateStream; the other streaming calls (health
    Watch, reflection) pass untouched."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        # labelled children, looked up once per method / (loss, code): ``labels()`` takes the metric's
        # lock and builds its key on every call, ~5 us each, eight times per call otherwise
        self._methods: dict[str, _MethodSeries] = {}
        self._terms: dict[tuple[str, str], Any] = {}
        m = metrics
        self._stages = [(f"{stage}_ms", m.stages.labels(stage)) for stage in ("decode", "compute", "encode")]

    def _series(self, method: str) -> _MethodSeries:
        series = self._methods.get(method)
        if series is None:  # a race makes two equal entries, both bound to the same children
            series = self._methods[method] = _MethodSeries(self.metrics, method)
        return series

    def _term_counter(self, loss: str, code: str) -> Any:
        key = (loss, code)
        counter = self._terms.get(key)
        if counter is None:
            m = self.metrics
            label = m.loss_label(loss)
            if label == UNREGISTERED:  # client strings never become keys here either
                return m.terms.labels(label, code)
            counter = self._terms[key] = m.terms.labels(label, code)
        return counter

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.stream_stream is not None and method == "EvaluateStream":
            # an async generator function (a partial of one): grpc.aio tells streaming handlers by that
            observed_stream = functools.partial(self._observe_stream, method, handler.stream_stream)
            return grpc.stream_stream_rpc_method_handler(
                observed_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._observe(method, behaviour, request, context)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _observe(self, method: str, behaviour: Callable, request: Any, context: grpc.aio.ServicerContext) -> Any:
        series = self._series(method)
        started = time.perf_counter()
        series.in_flight.inc()
        series.received.inc(message_bytes(request))
        code = grpc.StatusCode.OK
        try:
            response = await behaviour(request, context)
            if response is None:  # the handler set a failure's status (see calls.fail)
                code = code_of(context)
                return response
            series.sent.inc(response.ByteSize())
            if method == "Evaluate":
                self._observe_stages(response)
            return response
        except asyncio.CancelledError:  # the caller went away
            code = gone_code(context.time_remaining())
            raise
        except Exception:
            # abort() raises after setting the status; anything else is gRPC's UNKNOWN
            code = code_of(context)
            raise
        finally:
            self._record(series, started, code, _loss_types(method, request))

    async def _observe_stream(
        self, method: str, behaviour: Callable, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """EvaluateStream as one call: its messages' bytes both ways, its terms (from the first
        message's request), the stages of its answer, its status and duration."""
        series = self._series(method)
        started = time.perf_counter()
        series.in_flight.inc()
        tally = _StreamTally(requests, series.received)
        code = grpc.StatusCode.OK
        try:
            async for message in behaviour(tally, context):
                series.sent.inc(message_bytes(message))
                if isinstance(message, Message) and message.WhichOneof("kind") == "response":
                    self._observe_stages(message.response)
                yield message
            code = code_of(context, default=grpc.StatusCode.OK)
        except (GeneratorExit, asyncio.CancelledError):  # the caller went away
            code = gone_code(context.time_remaining())
            raise
        except Exception:
            code = code_of(context)
            raise
        finally:
            self._record(series, started, code, tally.losses)

    def _record(self, series: _MethodSeries, started: float, code: grpc.StatusCode, losses: list[str]) -> None:
        """A call has ended with ``code``: out of flight, its duration, its status, its terms'."""
        series.in_flight.dec()
        series.duration.observe(time.perf_counter() - started)
        series.requests(code.name).inc()
        for loss in losses:
            self._term_counter(loss, code.name).inc()

    def _observe_stages(self, response: Any) -> None:
        timings = response.timings
        for field, histogram in self._stages:
            histogram.observe(getattr(timings, field) / 1e3)


class _MethodSeries:
    """One method's labelled children of the server's metrics."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.in_flight = metrics.in_flight.labels(method)
        self.received = metrics.received.labels(method)
        self.sent = metrics.sent.labels(method)
        self.duration = metrics.duration.labels(method)
        self._requests = metrics.requests
        self._method = method
        self._codes: dict[str, Any] = {}

    def requests(self, code: str) -> Any:
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._requests.labels(self._method, code)
        return counter


class _StreamTally:
    """The request messages of a stream, passed through: counts their bytes, and reads the loss
    types of the first one's request."""

    def __init__(self, messages: AsyncIterator[Any], received: Any) -> None:
        self._source, self._received = messages, received
        self._messages: AsyncIterator[Any] | None = None
        self.losses: list[str] = []
        self._first = True

    def __aiter__(self) -> _StreamTally:
        return self

    async def __anext__(self) -> Any:
        # gRPC's reader makes its async generator at the first aiter(): made here, before the stream guard
        # or the token check had refused the call, it was collected unstarted, and Cython's generator then
        # printed "coroutine ... was never awaited" on stderr, outside the log. Made at the first read only.
        if self._messages is None:
            self._messages = aiter(self._source)
        message = await anext(self._messages)
        self._received.inc(message_bytes(message))
        if self._first:
            self._first = False
            if isinstance(message, Message) and message.WhichOneof("kind") == "request":
                self.losses = _loss_types("Evaluate", message.request)
        return message


def _loss_types(method: str, request: Any) -> list[str]:
    """The loss of each term: LossService's Evaluate terms, or the Open Inference Protocol's model."""
    if method == "Evaluate":
        return [t.config.fields["type"].string_value if "type" in t.config.fields else "" for t in request.terms]
    if method == "ModelInfer":
        return [request.model_name]
    return []
