"""Assembles the gRPC server: LossService, standard health checking and server reflection,
message-size limits, concurrency, and a graceful stop."""

from __future__ import annotations

import importlib
import logging
import time
from concurrent import futures

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from losswire.wire.buffers import BufferPool
from losswire.wire.protocol import SERVICE_NAME

from . import __version__
from .auth import TokenAuthInterceptor, TokenSet
from .config import ServerConfig
from .inference import add_inference_service
from .limits import RequestLimits
from .losses import LOSSES, Registry
from .malformed import MalformedRequestInterceptor
from .metrics import ServerMetrics
from .service import LossService, add_to_server
from .sessions import SessionStore
from .shared_memory import SharedMemoryRegistry
from .tls import ServerTLS, tls_files

log = logging.getLogger("losswire.server")



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
    """A running losswire server. ``start()`` binds and returns the port; ``stop()`` drains."""

    def __init__(self, config: ServerConfig, registry: Registry = LOSSES) -> None:
        self.config = config
        self.registry = registry
        # checked first: a TLS or token mistake stops the server before anything else happens
        tls = tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
        self.tls = ServerTLS(tls) if tls else None
        tokens = config.auth_tokens_file is not None or bool(config.auth_tokens)
        self.tokens = TokenSet(config.auth_tokens, config.auth_tokens_file) if tokens else None
        load_plugins(config.plugins)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = resolve_device(config.device)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self.sessions = SessionStore(
            registry,
            self.device,
            ttl_seconds=config.session_ttl_seconds,
            max_sessions=config.max_sessions,
            replay_depth=config.session_replay_depth,
        )
        # counted whether or not the endpoint is served: tests and embedders read .metrics.registry
        self.metrics = ServerMetrics(self.device, __version__, registry.names, lambda: len(self.sessions))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="losswire"),
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            # outermost first: unparsable bytes get INVALID_ARGUMENT (not grpcio's INTERNAL), counted as such
            # token checks after metrics, so that refused calls are counted as UNAUTHENTICATED
            interceptors=[
                MalformedRequestInterceptor(self._count_malformed),
                self.metrics.interceptor(),
                *([TokenAuthInterceptor(self.tokens)] if self.tokens else []),
            ],
        )
        limits = RequestLimits(config.max_elements, config.max_request_elements, config.max_terms, config.max_dims)
        stream_calls = max(1, min(config.max_stream_calls, config.max_workers - 1))
        self.shared_memory = SharedMemoryRegistry(config.shared_memory, config.max_shared_memory)
        self.service = LossService(
            self.device,
            registry,
            config.max_elements,
            self.sessions,
            limits,
            stream_calls,
            config.fused_kernels,
            self.shared_memory,
            BufferPool(config.buffer_pool_bytes),
        )
        add_to_server(self.service, self.server)
        # the Open Inference Protocol (KServe v2 / Triton) over the same evaluator, on the same port
        self.draining = False  # set by stop(): readiness answers (health, OIP ServerReady) turn false
        inference = add_inference_service(self.server, self.service, ready=lambda: not self.draining)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, inference, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.Server | None = None

    def _count_malformed(self, method: str) -> None:
        self.metrics.requests.labels(method, grpc.StatusCode.INVALID_ARGUMENT.name).inc()

    def _address(self, port: int) -> str:
        if ":" in self.config.host and not self.config.host.startswith("["):
            return f"[{self.config.host}]:{port}"
        return f"{self.config.host}:{port}"

    def start(self) -> int:
        address = self._address(self.config.port)
        if self.tls is not None:
            self.port = self.server.add_secure_port(address, self.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.server.start()
        self.shared_memory.start()
        self._log_security()
        if self.config.health_port is not None:
            self._start_health_port()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics_port = self.metrics.serve(host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "losswire %s listening on %s:%d, device %s, %d losses: %s",
            __version__,
            self.config.host,
            self.port,
            self.device,
            len(self.registry),
            ", ".join(self.registry.names()),
        )
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, new calls are refused, in-flight calls finish (up to grace)."""
        grace = self.config.grace_seconds if grace is None else grace
        notice = self.config.shutdown_notice_seconds
        self.draining = True
        self.health.enter_graceful_shutdown()
        if notice > 0:
            log.info("stopping: health NOT_SERVING; still serving for %.1f s of notice", notice)
            time.sleep(notice)
        log.info("stopping: health NOT_SERVING, draining in-flight calls for up to %.0f s", grace)
        self.server.stop(grace).wait()
        if self._health_server is not None:  # probes see NOT_SERVING until the very end
            self._health_server.stop(0).wait()
        self.metrics.stop()
        self.shared_memory.stop()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)

    def _log_security(self) -> None:
        transport = self.tls.describe() if self.tls is not None else "plaintext (no TLS)"
        who = f"bearer tokens required ({len(self.tokens)} configured)" if self.tokens else "no authentication"
        log.info("security: %s, %s; grpc.health.v1 open to probes", transport, who)
        if self.tokens and self.tls is None:
            log.warning(
                "bearer tokens travel in plaintext without TLS: anyone on the network path can read and reuse "
                "them; give --tls-cert and --tls-key"
            )

    def _start_health_port(self) -> None:
        """A plaintext port with only the health service (the same servicer: it drains with the server),
        for probes that cannot do TLS or present client certificates (Kubernetes gRPC probes)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="losswire-health"))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = self._address(self.config.health_port or 0)
        self.health_port = server.add_insecure_port(address)
        if self.health_port == 0:
            raise OSError(f"could not bind the health port {address}")
        server.start()
        self._health_server = server
        log.info("health (grpc.health.v1 only, plaintext) on %s:%d", self.config.host, self.health_port)
