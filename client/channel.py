"""Channels and stubs: one client per target, shared by every RemoteLoss that talks to it.

A target is one of

* one server, ``"host:port"``: one channel with gRPC's default policy (pick_first);
* a gRPC URI, ``"dns:///losswire-headless.ml.svc.cluster.local:50051"`` (or ``ipv4:``, ``ipv6:``, ``xds:``...):
  one channel balanced ``round_robin`` over every address the name resolves to. gRPC's default,
  pick_first, would send every call of a worker to the first pod of a headless Service;
* several servers, ``["gpu1:50051", "gpu2:50051"]`` or ``"gpu1:50051,gpu2:50051"``: one channel balanced
  ``round_robin`` over all of them.

Balanced channels also check health on the client side (``grpc.health.v1`` Watch on
``losswire.v1.LossService``): a replica whose health says NOT_SERVING, as a stopping server's does for
its ``--shutdown-notice``, gets no new calls while it drains. The retry policy covers the rest: a call
that meets an UNAVAILABLE replica is tried again and the balancer picks a live one.

**Sessions** (server-held state of stateful losses) live in one server process, so every call of a
session must reach the same replica from every worker. A balanced client pins each session by
rendezvous hashing (:func:`rendezvous_rank`) of its name over the replica addresses: the listed
servers, the addresses of an ``ipv4:``/``ipv6:`` URI, or what a ``dns:///`` name resolves to now
(a headless Service: one address per ready pod; re-resolved every ``REPLICA_REFRESH_SECONDS``). Every
process ranks the same set the same way, so workers meet on one replica without talking to each
other. A session's calls (Evaluate terms, GetSession, ResetSession) go to a channel for that one
replica; everything else stays round_robin. When the replica set changes, only the sessions of the
changed replica move, and a moved session starts from a fresh state on its new replica: the client
notices (``session_step`` goes backwards) and warns, or raises with ``on_session_restart="raise"``.
Targets the client cannot enumerate (``xds:``, a ``dns://server/`` name) send sessions over the
balanced channel with the ``x-losswire-session`` header, for a proxy that hashes on it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import grpc
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as wire_memory
from losswire.wire.buffers import DEFAULT_IDLE_BYTES, BufferPool
from losswire.wire.protocol import (
    DEFAULT_PORT,
    EVALUATE_STREAM_METHOD,
    MAX_MESSAGE_BYTES,
    SERVICE_NAME,
    SESSION_HEADER,
)

from . import shared_memory as shm
from .errors import RemoteLossError, is_busy
from .security import Credentials

log = logging.getLogger("losswire.client")

DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"
# A DNS name's replica set is resolved again after this long (and at once after a replica failed), so
# workers that started at different times agree on it again within this window.
REPLICA_REFRESH_SECONDS = 30.0
# A replica that answered a session call UNAVAILABLE is ranked last for this long: its sessions go to
# their next replica at once instead of waiting out the retry backoff on every call.
REPLICA_DOWN_SECONDS = 30.0
# Schemes gRPC resolves itself; anything else with a port ("gpu1:50051") is a host.
URI_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})

Target = str | Sequence[str]  # "host:port", a gRPC URI, or several "host:port" (a list or "h1:p1,h2:p2")

# gRPC's own retry policy: a call that met an UNAVAILABLE server (restarting, a replica going away)
# or an overloaded one (RESOURCE_EXHAUSTED: beyond its --max-concurrent-rpcs, or out of device memory
# for now) is tried again with exponential backoff and jitter; on a balanced channel the retry picks a
# replica again. A RESOURCE_EXHAUSTED that no retry can cure (a request over a size limit, the session
# limit) carries the server's pushback "-1", which tells gRPC not to retry it. Every call is
# idempotent: stateless terms trivially, and a session term carries a forward_id, so a retried forward
# is answered without updating state twice.
RETRY_POLICY = {
    "maxAttempts": 5,  # gRPC's ceiling
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}
# A request whose tensors hold at least this many bytes goes by EvaluateStream, its big tensors in
# chunks (``LossClient(stream_threshold=...)``; None: never). On a 2-core loopback a unary call moves
# ~0.2-0.4 GB/s and a stream ~1-2 GB/s; below a few MiB the stream's extra messages cost more than
# they save (see the report in tests/service/test_streaming.py's module docstring).
STREAM_THRESHOLD_BYTES = 8 << 20
# A request whose held-back (big) tensors hold at least this many bytes goes through shared memory
# when the client uses it (LossClient(shared_memory=...)): below, one unary call costs less than the
# registration bookkeeping saves.
SHARED_MEMORY_THRESHOLD_BYTES = 1 << 20
SHARED_MEMORY_MODES = ("auto", "on", "off")
SHARED_MEMORY_ENV = "LOSSWIRE_CLIENT_SHARED_MEMORY"  # the server's LOSSWIRE_SHARED_MEMORY is on/off
BUFFER_POOL_ENV = "LOSSWIRE_CLIENT_BUFFER_POOL"  # bytes of idle receive buffers kept (0: none)
# gRPC keeps a call's request to send it again only while it fits this buffer (its default, 256 KiB,
# would leave every call of a realistic detection batch unretried); bigger calls are sent once.
RETRY_BUFFER_BYTES = 64 << 20
# A streamed (big) call that the server refuses as busy (all its --max-stream-calls slots taken) is
# sent again until its deadline, or for this long without one: big calls wait their turn in the
# clients, not in server threads that small calls need.
BUSY_PATIENCE_SECONDS = 300.0


def service_config(balanced: bool) -> str:
    """The channel's service config: the retry policy, plus round_robin and health checks if ``balanced``."""
    config: dict[str, Any] = {
        "methodConfig": [
            {"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY},
            # a stream is retried by LossClient itself (it still has the tensors; gRPC would buffer
            # up to RETRY_BUFFER_BYTES of chunks and give up beyond), so gRPC does not retry it too
            {"name": [{"service": SERVICE_NAME, "method": "EvaluateStream"}]},
        ]
    }
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
    return json.dumps(config)


SERVICE_CONFIG = service_config(balanced=False)


# -- targets -----------------------------------------------------------------------------------------


def is_uri(target: str) -> bool:
    """``dns:///name:port``, ``ipv4:...`` and the like, as opposed to ``host:port``."""
    scheme, colon, _ = target.partition(":")
    return "://" in target or (bool(colon) and scheme.lower() in URI_SCHEMES)


def split_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[ipv6]:port"`` -> (host, port)."""
    host, colon, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not colon or not host or not port.isdigit() or (":" in host and not bracketed):
        raise ValueError(f"expected 'host:port' (IPv6: '[address]:port'), got {address!r}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalise_target(target: Target) -> str | tuple[str, ...]:
    """One server or a URI stays a string; several servers become a tuple of ``host:port``.

    ``"h1:p1,h2:p2"``, ``["h1:p1", "h2:p2"]`` and ``("h1:p1", "h2:p2")`` give the same tuple (so the
    same shared client); one listed server gives its string.
    """
    if isinstance(target, str):
        target = target.strip()
        if is_uri(target):
            if target.lower().startswith("dns:") and "," in target:
                raise ValueError(f"{target!r}: a dns: URI names one host; list several servers as 'h1:p1,h2:p2'")
            return target
        parts: Sequence[Any] = target.split(",")
    else:
        parts = list(target)
    addresses = tuple(dict.fromkeys(str(part).strip() for part in parts if str(part).strip()))
    if not addresses:
        raise ValueError("target names no server: expected 'host:port', several of them, or a gRPC URI")
    for address in addresses:
        if is_uri(address) and len(addresses) > 1:
            raise ValueError(f"{address!r} in a list of servers: list host:port addresses, or pass one gRPC URI alone")
        if not is_uri(address):
            split_host_port(address)
    return addresses[0] if len(addresses) == 1 else addresses


def _ips(host: str, port: int) -> list[str]:
    """``host`` as IP addresses: itself if it is one, else what the system resolver says."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ValueError(f"cannot resolve {host!r}: {error}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_list_uri(addresses: Sequence[str]) -> str:
    """One ``ipv4:``/``ipv6:`` URI for several ``host:port``: the channel target that balances over them.

    Why a URI of resolved addresses: gRPC's round_robin then does the balancing, the health checks,
    the reconnects and the retry onto another replica, all in its core. grpcio has no static resolver
    for several host names, and a round robin of our own over one channel per server would have to
    track each channel's health and retry across channels itself (a channel's retry policy only
    retries on that channel, i.e. on the same dead server). The price: host names are resolved once,
    when the client is made. For a replica set that changes (pods), use a ``dns:///`` name.

    A host with IPv4 addresses contributes those, else its IPv6 ones; one URI holds one family only.
    """
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for address in addresses:
        host, port = split_host_port(address)
        ips = [ipaddress.ip_address(ip.split("%")[0]) for ip in _ips(host, port)]
        family = 4 if any(ip.version == 4 for ip in ips) else 6
        by_family[family] += [join_host_port(str(ip), port) for ip in ips if ip.version == family]
    if by_family[4] and by_family[6]:
        raise ValueError(
            f"servers {list(addresses)} resolve to IPv4 and IPv6-only addresses ({by_family[4]}, {by_family[6]}); "
            "one balanced gRPC channel takes one family: name them by addresses of one family, or use a dns:/// name"
        )
    family = 4 if by_family[4] else 6
    return f"ipv{family}:" + ",".join(dict.fromkeys(by_family[family]))


def make_channel(
    target: Target, options: Mapping[str, Any] | None = None, credentials: Credentials | None = None
) -> grpc.Channel:
    """A channel for ``target`` with the retry policy; balanced (round_robin) for URIs and lists.

    ``credentials`` (None: from the ``LOSSWIRE_TLS_*``/``LOSSWIRE_TOKEN*`` variables) make it a TLS
    channel and/or add the bearer token to every call.
    """
    target = normalise_target(target)
    credentials = Credentials.from_env() if credentials is None else credentials
    transport = credentials.channel_credentials(loopback=_all_loopback(target), uds=_scheme(target) == "unix")
    if isinstance(target, tuple):
        address, balanced = address_list_uri(target), True
    else:
        address, balanced = target, is_uri(target)
    settings = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.service_config": service_config(balanced),
        "grpc.enable_retries": 1,
        "grpc.per_rpc_retry_buffer_size": RETRY_BUFFER_BYTES,
        **_tls_name_option(credentials, lambda: tls_server_name(target)),
        **(options or {}),
    }
    if transport is None:
        channel = grpc.insecure_channel(address, options=list(settings.items()))
    else:
        channel = grpc.secure_channel(address, transport, options=list(settings.items()))
    return credentials.secure(channel)


# -- TLS names and loopback ----------------------------------------------------------------------------

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def _scheme(target: str | tuple[str, ...]) -> str:
    return "" if isinstance(target, tuple) or not is_uri(target) else target.partition(":")[0].lower()


def target_hosts(target: str | tuple[str, ...]) -> list[str] | None:
    """The hosts a (normalised) target names; None when the client cannot tell (``xds:``, ``unix:``...)."""
    if isinstance(target, tuple):
        return [split_host_port(address)[0] for address in target]
    scheme, _, rest = target.partition(":")
    if not is_uri(target):
        return [split_host_port(target)[0]]
    if scheme.lower() in ("ipv4", "ipv6"):
        return [split_host_port(address.strip())[0] for address in rest.split(",") if address.strip()]
    if scheme.lower() == "dns":
        name = rest[2:].partition("/")[2] if rest.startswith("//") else rest
        return [split_host_port(name)[0] if re.search(r":\d+$", name) else name.strip("[]")]
    return None


def _all_loopback(target: str | tuple[str, ...]) -> bool:
    """Every address is this machine's (by name or literal, never by a DNS answer that could change)."""
    if _scheme(target) == "unix":
        return True
    hosts = target_hosts(target)
    return bool(hosts) and all(_is_loopback(host) for host in hosts)  # type: ignore[union-attr]


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def tls_server_name(target: str | tuple[str, ...]) -> str | None:
    """The name a TLS channel checks the server's certificate against, where gRPC's default does not do.

    gRPC checks the target's host; but a balanced channel over listed servers or an ``ipv4:``/``ipv6:``
    URI has the address list as its authority, so the name must be given: the one host they all share,
    else ``Credentials(server_name=...)`` (``LOSSWIRE_TLS_SERVER_NAME``), a name every replica's
    certificate carries. None: gRPC's default (one ``host:port``, a ``dns:///`` name).
    """
    if not (isinstance(target, tuple) or _scheme(target) in ("ipv4", "ipv6")):
        return None
    hosts = sorted(set(target_hosts(target) or ()))
    if len(hosts) == 1:
        return hosts[0]
    raise ValueError(
        f"TLS to several servers ({', '.join(hosts)}) over one balanced channel checks every certificate against one "
        "name: give Credentials(server_name=...) or LOSSWIRE_TLS_SERVER_NAME, a name each server's certificate carries"
    )


def _tls_name_option(credentials: Credentials, default: Callable[[], str | None]) -> dict[str, str]:
    """gRPC's name override for a TLS channel: the credentials' ``server_name``, else ``default()``."""
    if not credentials.tls:
        return {}
    name = credentials.server_name or default()
    return {"grpc.ssl_target_name_override": name} if name else {}


# -- replicas and sessions ---------------------------------------------------------------------------


def rendezvous_rank(key: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` in order of preference for ``key``: highest random weight (rendezvous) hashing.

    The weight is a hash of (replica, key) with blake2b, not Python's per-process salted ``hash``, so
    every process ranks the same set the same way, whatever the order it lists them in. Removing a
    replica moves only the keys it ranked first for, each to its second choice; adding one takes
    about 1/n of the keys and moves no others.
    """

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{replica}\n{key}".encode(), digest_size=8).digest()

    return sorted(dict.fromkeys(replicas), key=lambda replica: (weight(replica), replica), reverse=True)


class ReplicaSet:
    """The replica addresses of a balanced target, resolved again every ``refresh_seconds`` (None: fixed)."""

    def __init__(
        self,
        lookup: Callable[[], Sequence[str]],
        refresh_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._addresses: tuple[str, ...] = ()
        self._resolved_at: float | None = None
        self._lock = threading.Lock()

    def addresses(self) -> tuple[str, ...]:
        """The replicas, sorted. A failed lookup keeps the last set it had (and raises without one)."""
        with self._lock:
            now = self._clock()
            stale = self._resolved_at is None or (
                self.refresh_seconds is not None and now - self._resolved_at >= self.refresh_seconds
            )
            if stale:
                try:
                    found = tuple(sorted(dict.fromkeys(self._lookup())))
                except ValueError as error:
                    if not self._addresses:
                        raise RemoteLossError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
                    log.warning("keeping replicas %s: %s", ", ".join(self._addresses), error)
                else:
                    if not found:
                        raise RemoteLossError(grpc.StatusCode.UNAVAILABLE, "the target resolves to no address")
                    self._addresses = found
                self._resolved_at = now
            return self._addresses

    def invalidate(self) -> None:
        """Resolve again on the next call (a replica failed: the set may have changed)."""
        if self.refresh_seconds is not None:
            with self._lock:
                self._resolved_at = None


def _resolve_dns_name(host: str, port: int) -> list[str]:
    return [join_host_port(ip, port) for ip in _ips(host, port)]


def _dns_replicas(uri: str) -> ReplicaSet:
    """The replicas of ``dns:[//authority/]host[:port]``, resolved with the system resolver, as gRPC's is."""
    rest = uri[len("dns:") :]
    authority = ""
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
    host, port = split_host_port(rest if re.search(r":\d+$", rest) else f"{rest}:443")  # gRPC's default port
    if authority:
        return _UnresolvableReplicas(
            f"{uri!r} names its own DNS server ({authority}); the client pins sessions by resolving the name "
            "with the system resolver, which cannot ask that server. Use dns:///name:port for sessions, or route "
            f"them by the {SESSION_HEADER} header in a proxy"
        )
    return ReplicaSet(lambda: _resolve_dns_name(host, port), REPLICA_REFRESH_SECONDS)


class _UnresolvableReplicas(ReplicaSet):
    """A balanced target whose replicas the client cannot list: session calls fail with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(lambda: ())
        self.reason = reason

    def addresses(self) -> tuple[str, ...]:
        raise ValueError(self.reason)


def replica_set(target: str | tuple[str, ...]) -> ReplicaSet | None:
    """Where sessions of ``target`` can be pinned; None when the client cannot enumerate its servers
    (one ``host:port``: one server; ``xds:``, ``unix:``...: the proxy or control plane routes)."""
    if isinstance(target, tuple):
        return ReplicaSet(lambda: target)
    scheme, _, rest = target.partition(":")
    scheme = scheme.lower()
    if scheme in ("ipv4", "ipv6"):
        addresses = [a.strip() for a in rest.split(",") if a.strip()]
        return ReplicaSet(lambda: addresses) if len(addresses) > 1 else None
    if scheme == "dns":
        return _dns_replicas(target)
    return None


class SessionRestartedError(RemoteLossError):
    """A session's state started afresh behind this client's back: its ``session_step`` went backwards.

    The session was reset by another client, expired after the server's ``--session-ttl``, or its
    replica restarted or changed (the replica set of a balanced target changed). The call that found
    out was evaluated with the fresh state.
    """

    def __init__(self, session: str, last_step: int, step: int) -> None:
        super().__init__(
            grpc.StatusCode.DATA_LOSS,
            f"session {session!r} restarted: this client last saw step {last_step}, the server answered step {step}. "
            "Its state (e.g. SeesawLoss's cum_samples) started afresh: it was reset by another client, expired "
            "(--session-ttl), or its replica restarted or changed",
            "session",
        )
        self.session, self.last_step, self.step = session, last_step, step


class LossClient:
    """A connection to one losswire server, or to several replicas behind one balanced target.

    ``LossClient.shared(target)`` returns the same client for the same target (a list and its
    comma-separated string are the same target), so every module reuses one channel. Each call has a
    deadline of ``timeout`` seconds (None: no deadline). ``on_session_restart``: what to do when a
    session's state started afresh behind this client's back (see :class:`SessionRestartedError`):
    ``"warn"`` logs a warning on ``losswire.client`` and carries on, ``"raise"`` raises.
    ``credentials`` (TLS, mutual TLS, a bearer token: :class:`~losswire.client.security.Credentials`)
    apply to every channel the client opens, the per-replica ones included; None reads them from the
    ``LOSSWIRE_TLS_*`` / ``LOSSWIRE_TOKEN*`` environment variables.

    Big requests: one whose tensors hold at least ``stream_threshold`` bytes (default
    ``STREAM_THRESHOLD_BYTES``; None: never) goes by ``EvaluateStream``, tensors in chunks, and its
    response comes back the same way. A stream is retried by the client (not by gRPC's policy) on
    UNAVAILABLE and on a RESOURCE_EXHAUSTED that may pass (the server's streamed calls are all busy),
    up to ``RETRY_POLICY``'s attempts and backoff, within the deadline, as long as no answer has
    arrived: the tensors are sent again. ``transfer_dtype`` (``'float16'``/``'bfloat16'``): the
    default of every ``RemoteLoss`` on this client (see ``RemoteLoss``).

    Same host: with ``shared_memory`` ``"auto"`` (the default; None reads ``LOSSWIRE_CLIENT_SHARED_MEMORY``) and a
    target on this machine (a loopback address, ``localhost`` or ``unix:``), a request whose big
    tensors hold at least ``SHARED_MEMORY_THRESHOLD_BYTES`` travels through shared memory
    (``RegisterSharedMemory``): its tensors are copied once into a segment both processes map, and
    the answer's big tensors are read where the server wrote them. ``"on"``: for any target (one
    that resolves to this machine); ``"off"``: never. A server that cannot share memory with this
    process (another host or container, another user, ``--shared-memory off``, an older server)
    is noticed on the first try, logged, and the client sends tensors over gRPC from then on.

    ``buffer_pool_bytes`` (None reads ``LOSSWIRE_CLIENT_BUFFER_POOL``, default 1 GiB): idle receive
    buffers kept so that a streamed answer lands in memory a freed earlier answer used (see
    :mod:`losswire.client.buffers`); 0: fresh memory every call.
    """

    _shared: dict[tuple[str | tuple[str, ...], Credentials], LossClient] = {}
    _lock = threading.Lock()

    def __init__(
        self,
        target: Target = DEFAULT_TARGET,
        timeout: float | None = 300.0,
        channel: grpc.Channel | None = None,
        *,
        on_session_restart: Literal["warn", "raise"] = "warn",
        credentials: Credentials | None = None,
        stream_threshold: int | None = STREAM_THRESHOLD_BYTES,
        transfer_dtype: str | None = None,
        shared_memory: Literal["auto", "on", "off"] | None = None,
        buffer_pool_bytes: int | None = None,
    ):
        if on_session_restart not in ("warn", "raise"):
            raise ValueError(f"on_session_restart must be 'warn' or 'raise', got {on_session_restart!r}")
        self.target = normalise_target(target)
        self.timeout = timeout
        self.on_session_restart = on_session_restart
        self.stream_threshold = stream_threshold
        codec.transfer_dtype_of(transfer_dtype)  # a ValueError now for a bad name
        self.transfer_dtype = transfer_dtype
        # given ones travel with a pickled RemoteLoss; the environment's are read again where it lands
        self.credentials_from_env = credentials is None
        self.credentials = Credentials.from_env() if credentials is None else credentials
        self.channel = channel if channel is not None else make_channel(self.target, credentials=self.credentials)
        self.stub = pb_grpc.LossServiceStub(self.channel)
        # with a channel of the caller's, sessions ride on it (header only): its servers are unknown here
        self.replicas = replica_set(self.target) if channel is None else None
        self._pinned: dict[str, tuple[grpc.Channel, pb_grpc.LossServiceStub]] = {}
        self._down_until: dict[str, float] = {}
        # session -> (highest step this client saw answered, that term's forward_id)
        self._steps: dict[str, tuple[int, str]] = {}
        self._state_lock = threading.Lock()
        mode = shared_memory if shared_memory is not None else os.environ.get(SHARED_MEMORY_ENV, "auto")
        if mode not in SHARED_MEMORY_MODES:
            raise ValueError(f"shared_memory ({SHARED_MEMORY_ENV}) must be auto, on or off, got {mode!r}")
        self.shared_memory = mode
        usable = mode == "on" or (mode == "auto" and channel is None and _all_loopback(self.target))
        # lazily made on the first big call; None once shared memory turned out not to work here
        self._shared_memory_usable = usable and self.replicas is None and wire_memory.supported()
        self._pool: shm.SharedMemoryPool | None = None
        if buffer_pool_bytes is None:
            buffer_pool_bytes = _env_bytes(BUFFER_POOL_ENV, DEFAULT_IDLE_BYTES)
        # streamed answers are reassembled into buffers reused once the last call's are freed
        self.buffers = BufferPool(buffer_pool_bytes)

    @classmethod
    def shared(cls, target: Target = DEFAULT_TARGET, credentials: Credentials | None = None) -> LossClient:
        """The one client for ``target`` and these credentials (None: the environment's)."""
        target = normalise_target(target)
        key = (target, Credentials.from_env() if credentials is None else credentials)
        with cls._lock:
            if key not in cls._shared:
                cls._shared[key] = cls(target, credentials=credentials)
            return cls._shared[key]

    def _call(self, method: Any, request: Any, timeout: float | None, metadata: Any = None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise RemoteLossError.from_rpc_error(error) from None

    # -- pinning -----------------------------------------------------------------------------------

    def replica_for(self, session: str) -> str | None:
        """The replica address this client sends ``session``'s calls to now (None: not pinned here)."""
        if self.replicas is None:
            return None
        return self._ranked(session)[0]

    def _ranked(self, session: str) -> list[str]:
        """The session's rendezvous order, replicas that failed recently last."""
        ranking = rendezvous_rank(session, self.replicas.addresses())
        now = time.monotonic()
        with self._state_lock:
            down = {a for a in ranking if self._down_until.get(a, 0.0) > now}
        return [a for a in ranking if a not in down] + [a for a in ranking if a in down]

    def _replica(self, address: str) -> tuple[grpc.Channel, pb_grpc.LossServiceStub]:
        with self._state_lock:
            if address not in self._pinned:
                channel = make_channel(address, self._replica_tls_options(), credentials=self.credentials)
                self._pinned[address] = (channel, pb_grpc.LossServiceStub(channel))
            return self._pinned[address]

    def _replica_stub(self, address: str) -> pb_grpc.LossServiceStub:
        return self._replica(address)[1]

    def _replica_tls_options(self) -> dict[str, str]:
        """A replica is dialled by its address; TLS checks the certificate against the target's name."""

        def default() -> str | None:
            scheme = _scheme(self.target)
            if scheme == "dns":
                return (target_hosts(self.target) or [None])[0]
            return tls_server_name(self.target) if scheme in ("ipv4", "ipv6") else None

        return _tls_name_option(self.credentials, default)

    def _session_call(
        self, session: str, method: str | Callable[..., Any], request: Any, timeout: float | None, metadata: Any
    ) -> Any:
        """Call ``method`` on the session's replica; if it is UNAVAILABLE (gone), on its next one.

        ``method``: a stub method's name, or ``method(channel, request, timeout, metadata)``."""
        if self.replicas is None:
            return self._invoke(self.channel, self.stub, method, request, timeout, metadata)
        failure: RemoteLossError | None = None
        for address in self._ranked(session):
            try:
                channel, stub = self._replica(address)
                return self._invoke(channel, stub, method, request, timeout, metadata)
            except RemoteLossError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                failure = error
                self._mark_down(address, session, error)
        assert failure is not None
        raise failure

    def _invoke(
        self,
        channel: grpc.Channel,
        stub: pb_grpc.LossServiceStub,
        method: str | Callable[..., Any],
        request: Any,
        timeout: float | None,
        metadata: Any,
    ) -> Any:
        if callable(method):
            return method(channel, request, timeout, metadata)
        return self._call(getattr(stub, method), request, timeout, metadata)

    def _mark_down(self, address: str, session: str, error: RemoteLossError) -> None:
        with self._state_lock:
            self._down_until[address] = time.monotonic() + REPLICA_DOWN_SECONDS
        self.replicas.invalidate()
        log.warning(
            "losswire replica %s is unavailable (%s); session %r and the others it held move to their next "
            "replica (rendezvous order) for %.0f s",
            address,
            error.details,
            session,
            REPLICA_DOWN_SECONDS,
        )

    # -- calls ---------------------------------------------------------------------------------------

    def evaluate(self, request: pb.EvaluateRequest, timeout: float | None = None) -> pb.EvaluateResponse:
        """One Evaluate round trip; by EvaluateStream when the request's tensors reach ``stream_threshold``.

        The response is complete either way (streamed tensors' bytes are put back into it, one copy
        each); :meth:`evaluate_tensors` saves that copy.
        """
        response, streamed = self.evaluate_tensors(request, timeout)
        chunks.fill_streamed(response, streamed)
        return response

    def evaluate_tensors(
        self,
        request: pb.EvaluateRequest,
        timeout: float | None = None,
        *,
        sink: chunks.StreamSink | None = None,
    ) -> tuple[pb.EvaluateResponse, dict[str, Tensor]]:
        """Evaluate, streaming when the request is big; returns (response, streamed tensors).

        ``sink``: the big tensors ``request`` was encoded without (``codec.encode_tensor(...,
        sink=sink)``: no copy of theirs is made before the wire); without one, a request over the
        threshold has its big tensors' bytes moved out of it for the call (and back afterwards).
        The second value maps the field paths of the response tensors that came in chunks
        (``results[0].gradients[pred]``) to their tensors (in their data dtype); their messages have
        no data: decode them with ``codec.decode_tensor(message, path, streamed=...)``.
        """
        threshold = self.stream_threshold
        held_back = [t for t in (threshold, self.shared_memory_threshold) if t is not None]
        taken = False
        if sink is None and held_back and request.ByteSize() >= min(held_back):
            sink, taken = chunks.StreamSink.take(request), True
        try:
            shared = self.shared_memory_threshold
            if sink is not None and sink.entries and shared is not None and sink.nbytes >= shared:
                answer = self._evaluate_shared(request, sink, timeout)
                if answer is not None:
                    return answer
            if sink is not None and (threshold is None or sink.nbytes < threshold):
                sink.inline()  # small after all: one unary call
            if sink is None or not sink.entries:
                return self._evaluate_unary(request, timeout), {}
            return self._evaluate_stream(request, sink, timeout)
        finally:
            if taken:
                sink.inline()  # the caller's request as it was

    @property
    def shared_memory_threshold(self) -> int | None:
        """Bytes of big tensors from which a call goes through shared memory; None: it does not."""
        return SHARED_MEMORY_THRESHOLD_BYTES if self._shared_memory_usable else None

    def _shared_memory_pool(self) -> shm.SharedMemoryPool:
        with self._state_lock:
            if self._pool is None:

                def register(name: str, byte_size: int, nonce: bytes) -> str:
                    request = pb.RegisterSharedMemoryRequest(name=name, byte_size=byte_size, nonce=nonce)
                    return self._call(self.stub.RegisterSharedMemory, request, None).region

                def unregister(region: str) -> None:
                    self._call(self.stub.UnregisterSharedMemory, pb.UnregisterSharedMemoryRequest(region=region), 5.0)

                self._pool = shm.SharedMemoryPool(register, unregister)
            return self._pool

    def _evaluate_shared(
        self, request: pb.EvaluateRequest, sink: chunks.StreamSink, timeout: float | None
    ) -> tuple[pb.EvaluateResponse, dict[str, Tensor]] | None:
        """Evaluate with the sink's tensors in a shared segment; None when shared memory does not work
        with this server (then it is off for this client, and the caller sends them over gRPC).

        The segment holds the inputs, then an output range as large as them (gradients have their
        inputs' sizes); answers that do not fit come inline. The answer's tensors are views of the
        segment, which returns to the pool once they are all freed."""
        inputs = sum(wire_memory.align(chunks.byte_count(data)) for _, data in sink.entries)
        for attempt in (1, 2):
            try:
                lease = self._shared_memory_pool().lease(wire_memory.align(wire_memory.NONCE_BYTES) + 2 * inputs)
            except (RemoteLossError, OSError) as error:
                self._shared_memory_failed(error)
                return None
            try:
                sink.place(lease.reserve)
                offset, size = lease.reserve_outputs()
                request.output_shm.region, request.output_shm.offset, request.output_shm.byte_size = (
                    lease.region,
                    offset,
                    size,
                )
                response = self._waiting_out_busy(lambda remaining: self._evaluate_unary(request, remaining), timeout)
                try:
                    views = wire_memory.shared_memory_tensors(codec.tensors_of(response), lease.output_bytes)
                except (codec.CodecError, ValueError) as error:
                    message = f"a malformed shared-memory answer: {error}"
                    raise RemoteLossError(grpc.StatusCode.DATA_LOSS, message) from None
                return response, views
            except RemoteLossError as error:
                if not _region_forgotten(error) or attempt == 2:
                    raise
                # the server no longer knows our segments (it restarted): register new ones, once
                log.info("losswire server forgot this client's shared memory (%s); registering again", error.details)
                self._pool.reset()
                sink.entries[:0] = sink.placed
                sink.placed.clear()
            finally:
                request.ClearField("output_shm")
                lease.done()
        return None  # unreachable: the second attempt returns or raises

    def _waiting_out_busy(self, call: Callable[[float | None], Any], timeout: float | None) -> Any:
        """``call(timeout)``, again after a busy answer (a RESOURCE_EXHAUSTED that passes: the server's
        big-call slots are taken) with RETRY_POLICY's backoff, until the deadline (or
        ``BUSY_PATIENCE_SECONDS`` without one): big calls wait their turn here, not in server threads."""
        patience = _Patience(self.timeout if timeout is None else timeout)
        while True:
            try:
                return call(patience.remaining())
            except RemoteLossError as error:
                pause = patience.next_pause() if error.busy else None
                if pause is None:
                    raise
                log.debug("busy server (%s); again in %.2f s", error.details, pause)
                time.sleep(pause)

    def _shared_memory_failed(self, error: BaseException) -> None:
        self._shared_memory_usable = False
        detail = error.details if isinstance(error, RemoteLossError) else str(error)
        log.info("losswire: shared memory with %s does not work (%s); tensors go over gRPC", self.target, detail)

    def _evaluate_unary(self, request: pb.EvaluateRequest, timeout: float | None) -> pb.EvaluateResponse:
        sessions = list(dict.fromkeys(term.session for term in request.terms if term.session))
        baselines = self._baselines(sessions)
        if not sessions:
            response = self._call(self.stub.Evaluate, request, timeout)
        elif len(sessions) == 1 or self.replicas is None:
            # the header lets a proxy route by session (consistent hashing on x-losswire-session)
            metadata = [(SESSION_HEADER, ",".join(sorted(sessions)))]
            response = self._session_call(sessions[0], "Evaluate", request, timeout, metadata)
        else:
            response = self._evaluate_per_session(request, sessions, timeout)
        if sessions:  # only session terms can have restarted
            self._check_restarts(request, response, baselines)
        return response

    def _evaluate_stream(
        self, request: pb.EvaluateRequest, sink: chunks.StreamSink, timeout: float | None
    ) -> tuple[pb.EvaluateResponse, dict[str, Tensor]]:
        sessions = list(dict.fromkeys(term.session for term in request.terms if term.session))
        if len(sessions) > 1 and self.replicas is not None:
            # terms of several sessions may live on several replicas: split, as unary calls
            sink.inline()
            return self._evaluate_unary(request, timeout), {}
        baselines = self._baselines(sessions)

        def call(channel: grpc.Channel, request: Any, timeout: float | None, metadata: Any) -> Any:
            return self._stream_call(channel, request, sink, timeout, metadata)

        if not sessions:
            response, streamed = call(self.channel, request, timeout, None)
        else:
            metadata = [(SESSION_HEADER, ",".join(sorted(sessions)))]
            response, streamed = self._session_call(sessions[0], call, request, timeout, metadata)
        self._check_restarts(request, response, baselines)
        return response, streamed

    def _stream_call(
        self,
        channel: grpc.Channel,
        request: pb.EvaluateRequest,
        sink: chunks.StreamSink,
        timeout: float | None,
        metadata: Any,
    ) -> tuple[pb.EvaluateResponse, dict[str, Tensor]]:
        """One EvaluateStream, sent again (fresh chunks from the same tensors) after UNAVAILABLE or a
        passing RESOURCE_EXHAUSTED, with RETRY_POLICY's backoff, while no answer has arrived."""
        method = channel.stream_stream(
            EVALUATE_STREAM_METHOD, request_serializer=chunks.serialize_chunk, response_deserializer=chunks.parse_chunk
        )
        patience = _Patience(self.timeout if timeout is None else timeout)
        failures = 0  # UNAVAILABLE answers: RETRY_POLICY's attempts; a busy server is waited out instead
        while True:
            answered = False
            try:
                responses = method(chunks.stream_chunks(request, sink), timeout=patience.remaining(), metadata=metadata)
                first = next(responses)
                answered = True
                return _receive_stream(first, responses, self.buffers)
            except grpc.RpcError as error:
                failures += error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                retry = not answered and _passing(error) and failures < RETRY_POLICY["maxAttempts"]
                pause = patience.next_pause() if retry else None
                if pause is None:
                    raise RemoteLossError.from_rpc_error(error) from None
                log.debug("EvaluateStream: %s; again in %.2f s", error.code().name, pause)
                time.sleep(pause)

    def _evaluate_per_session(
        self, request: pb.EvaluateRequest, sessions: list[str], timeout: float | None
    ) -> pb.EvaluateResponse:
        """Terms of several sessions, which may live on different replicas: one request per session
        (stateless terms ride with the first), answered in the original order."""
        groups: dict[str, list[int]] = {session: [] for session in sessions}
        for index, term in enumerate(request.terms):
            groups[term.session or sessions[0]].append(index)
        merged = pb.EvaluateResponse()
        results: dict[int, pb.TermResult] = {}
        for session, indices in groups.items():
            part = pb.EvaluateRequest(terms=[request.terms[i] for i in indices])
            try:
                answer = self._session_call(session, "Evaluate", part, timeout, [(SESSION_HEADER, session)])
            except RemoteLossError as error:
                raise _renumbered(error, indices) from None
            results.update(zip(indices, answer.results, strict=True))
            merged.device = merged.device or answer.device
            merged.timings.decode_ms += answer.timings.decode_ms
            merged.timings.compute_ms += answer.timings.compute_ms
            merged.timings.encode_ms += answer.timings.encode_ms
        merged.results.extend(results[i] for i in range(len(request.terms)))
        return merged

    def _baselines(self, sessions: Sequence[str]) -> dict[str, tuple[int, str]]:
        """What this client had seen of each session when the request left: a call in flight at the
        same time may be answered an earlier step, which is no restart."""
        with self._state_lock:
            return {session: self._steps[session] for session in sessions if session in self._steps}

    def _check_restarts(
        self, request: pb.EvaluateRequest, response: pb.EvaluateResponse, baselines: Mapping[str, tuple[int, str]]
    ) -> None:
        restarts: dict[str, tuple[int, int]] = {}
        with self._state_lock:
            for term, result in zip(request.terms, response.results, strict=True):
                if not term.session or term.HasField("replay_step") or not result.session_step:
                    continue  # a recompute answers the step it replays
                step = result.session_step
                last_step, last_id = baselines.get(term.session, (0, ""))
                # the same step again is a retry of that very forward (same forward_id), nothing else
                restarted = step < last_step or (step == last_step and term.forward_id != last_id)
                if restarted:
                    restarts.setdefault(term.session, (last_step, step))
                if restarted or step >= self._steps.get(term.session, (0, ""))[0]:
                    self._steps[term.session] = (step, term.forward_id)
        for session, (last_step, step) in restarts.items():
            error = SessionRestartedError(session, last_step, step)
            if self.on_session_restart == "raise":
                raise error
            log.warning("losswire %s", error.details)

    def describe(self, config: Mapping[str, Any], timeout: float | None = None) -> pb.DescribeResponse:
        return self._call(self.stub.Describe, pb.DescribeRequest(config=codec.encode_config(config)), timeout)

    def list_losses(self, timeout: float | None = None) -> pb.ListLossesResponse:
        return self._call(self.stub.ListLosses, pb.ListLossesRequest(), timeout)

    def get_session(self, session: str, timeout: float | None = None) -> pb.SessionInfo:
        request = pb.SessionRequest(session=session)
        return self._session_call(session, "GetSession", request, timeout, [(SESSION_HEADER, session)])

    def reset_session(self, session: str, timeout: float | None = None) -> pb.SessionInfo:
        request = pb.SessionRequest(session=session)
        try:
            return self._session_call(session, "ResetSession", request, timeout, [(SESSION_HEADER, session)])
        finally:
            with self._state_lock:  # a reset of our own is no restart
                self._steps.pop(session, None)

    def list_sessions(self, timeout: float | None = None) -> pb.ListSessionsResponse:
        """Every live session; with several replicas, of every replica that answers (sorted by name)."""
        if self.replicas is None:
            return self._call(self.stub.ListSessions, pb.ListSessionsRequest(), timeout)
        found: list[pb.SessionInfo] = []
        for address in self.replicas.addresses():
            try:
                answer = self._call(self._replica_stub(address).ListSessions, pb.ListSessionsRequest(), timeout)
            except RemoteLossError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("losswire replica %s is unavailable (%s): its sessions are not listed", address, error)
                continue
            found.extend(answer.sessions)
        return pb.ListSessionsResponse(sessions=sorted(found, key=lambda info: info.session))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()  # unregister while the channel is open
        self.channel.close()
        with self._state_lock:
            pinned, self._pinned = list(self._pinned.values()), {}
        for channel, _ in pinned:
            channel.close()


class _Patience:
    """The client's own retries (streams, busy answers): RETRY_POLICY's jittered, growing backoff,
    within ``timeout`` seconds (``BUSY_PATIENCE_SECONDS`` without one)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + (BUSY_PATIENCE_SECONDS if timeout is None else timeout)
        self.backoff = _seconds(RETRY_POLICY["initialBackoff"])

    def remaining(self) -> float | None:
        """The next attempt's timeout: what is left of the deadline (None without one)."""
        return None if self.timeout is None else max(self.deadline - time.monotonic(), 0.0)

    def next_pause(self) -> float | None:
        """How long to wait before the next attempt (gRPC's jitter: anywhere up to the current
        backoff, which then grows), or None when that wait would end past the deadline."""
        pause = random.uniform(0, self.backoff)
        if time.monotonic() + pause >= self.deadline:
            return None
        self.backoff = min(self.backoff * RETRY_POLICY["backoffMultiplier"], _seconds(RETRY_POLICY["maxBackoff"]))
        return pause


def _seconds(duration: str) -> float:
    """A gRPC service-config duration ("0.1s") in seconds."""
    return float(duration.rstrip("s"))


def _passing(error: grpc.RpcError) -> bool:
    """A failure a later attempt may not meet: UNAVAILABLE, or a busy server's RESOURCE_EXHAUSTED."""
    code = error.code() if hasattr(error, "code") else None
    return code == grpc.StatusCode.UNAVAILABLE or is_busy(error)


def _region_forgotten(error: RemoteLossError) -> bool:
    """The server answered that a shared-memory region it was given is not registered there."""
    return error.code == grpc.StatusCode.NOT_FOUND and (error.field or "").endswith("shm.region")


def _env_bytes(name: str, default: int) -> int:
    """A byte count from the environment variable ``name`` (unset or empty: ``default``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise ValueError(f"{name} must be a number of bytes (0 or more), got {text!r}")
    return int(text)


def _receive_stream(
    first: pb.EvaluateChunk, responses: Any, buffers: BufferPool
) -> tuple[pb.EvaluateResponse, dict[str, Tensor]]:
    """The response of an EvaluateStream: its first message, then the chunks of its big tensors."""
    try:
        if first.WhichOneof("kind") != "response":
            raise codec.CodecError(f"the first message carries {first.WhichOneof('kind')}, not the response")
        assembler = chunks.StreamAssembler(first.response, allocate=buffers.take)
        for message in responses:
            if message.WhichOneof("kind") != "chunk":
                raise codec.CodecError(f"a later message carries {message.WhichOneof('kind')}, not a chunk")
            assembler.add(message.chunk)
        return first.response, assembler.finish()
    except codec.CodecError as error:
        responses.cancel()
        raise RemoteLossError(grpc.StatusCode.DATA_LOSS, f"a malformed EvaluateStream answer: {error}") from None


def _renumbered(error: RemoteLossError, indices: Sequence[int]) -> RemoteLossError:
    """An error about ``terms[i]`` of a per-session request, about the caller's ``terms[indices[i]]``
    (in the field path and in the message)."""

    def renumber(text: str) -> str:
        return re.sub(
            r"\bterms\[(\d+)\]",
            lambda m: f"terms[{indices[int(m[1])]}]" if int(m[1]) < len(indices) else m[0],
            text,
        )

    field = None if error.field is None else renumber(error.field)
    return RemoteLossError(error.code, renumber(error.details), field)
