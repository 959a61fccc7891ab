"""Channels: gRPC's retry policy, the client's own backoff, the first connection, restarts, and what a
failure says.

Every channel carries ``RETRY_POLICY`` (gRPC retries UNAVAILABLE and a busy RESOURCE_EXHAUSTED itself)
and ``RECONNECT_OPTIONS`` (a lost server is dialled again every half second at most, so one that comes
back is noticed within a fraction of a second). Balanced channels (URIs, lists of servers) also run
``round_robin`` with client-side health checks: a replica whose health says NOT_SERVING (a stopping
server's ``--shutdown-notice``) gets no new calls.

A :class:`Connection` is one channel as the client uses it:

* before its first call it checks, within ``connect_timeout`` seconds, that the server answers at all
  (one health check): a target that refuses connections is reported at once, one that accepts them and
  stays silent (hung, stopped) within seconds instead of at the call's deadline;
* once the server has answered, calls *wait for it* (gRPC's wait-for-ready): a call made while the
  server restarts (a deploy, a node drain) is sent when it is back, within the call's deadline, instead
  of failing. Sessions are not hidden by this: a restarted server answers a session's call with a fresh
  state, whose step goes backwards, and :mod:`losswire.client.sessions` warns or raises;
* every failure names the target, the deadline and how to change them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks
from losswire.wire.protocol import EVALUATE_STREAM_METHOD, MAX_MESSAGE_BYTES, SERVICE_NAME

from . import targets
from .errors import RemoteLossError, is_busy
from .offload import off_main_thread
from .security import Credentials
from .waiting import WaitingChannel

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
# gRPC keeps a call's request to send it again only while it fits this buffer (its default, 256 KiB,
# would leave every call of a realistic detection batch unretried); bigger calls are sent once.
RETRY_BUFFER_BYTES = 64 << 20
# EvaluateStream goes on a channel of its own (a second connection to the same target) without gRPC's
# retries: the client retries a stream itself, and a channel with retries enabled keeps a copy of the
# chunks it sends in its retry buffer, which slowed a 64 MiB upload by 15-30 % (measured on loopback
# and across a 10 Gbit/s link). Big streams then also no longer share a connection's flow-control
# window with the small calls beside them.
STREAM_CHANNEL_OPTIONS = {"grpc.enable_retries": 0}
# A channel argument of losswire's own: channels that differ in it do not share gRPC's connection, so each
# lane of a big stream (EvaluateRequest.lanes) gets a connection, and a thread on each side, of its own
LANE_CHANNEL_OPTION = "losswire.lane"
# A call the client retries itself (a stream, a busy server) without a deadline gives up after this long:
# big calls wait their turn in the clients, not in server threads that small calls need.
BUSY_PATIENCE_SECONDS = 300.0
# How long the first call on a channel waits for the server to answer gRPC's handshake. A server that
# refuses connections fails at once (gRPC's own retries apply); one that accepts and stays silent is
# reported after this long, not at the call's deadline (300 s by default).
CONNECT_TIMEOUT_SECONDS = 10.0
# gRPC's standard health service, which every losswire server runs: the first call's connection probe
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
# How a channel dials again after losing its server: gRPC's connection backoff (by default 1 s growing
# 1.6x per attempt up to 120 s, so a server back after a few seconds could go unnoticed for several
# more) from 0.1 s up to 0.5 s (with gRPC's 20% jitter): a restarted server is seen within ~0.6 s, at
# the cost of a refused connection attempt every half second while it is away. gRPC's minimum time
# given to one connection attempt (grpc.min_reconnect_backoff_ms, 20 s) stays as it is: it must exceed
# CONNECT_TIMEOUT_SECONDS, or a silent server would be reported as refusing connections.
RECONNECT_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
}


def service_config(balanced: bool) -> str:
    """The channel's service config: the retry policy, plus round_robin and health checks if ``balanced``."""
    config: dict[str, Any] = {
        "methodConfig": [
            {"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY},
            # a stream is retried by the client itself (it still has the tensors; gRPC would buffer
            # up to RETRY_BUFFER_BYTES of chunks and give up beyond), so gRPC does not retry it too
            {"name": [{"service": SERVICE_NAME, "method": "EvaluateStream"}]},
        ]
    }
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
    return json.dumps(config)


SERVICE_CONFIG = service_config(balanced=False)


def make_channel(
    target: targets.Target | None,
    options: Mapping[str, Any] | None = None,
    credentials: Credentials | None = None,
) -> grpc.Channel:
    """A channel for ``target`` (None: ``$LOSSWIRE_TARGET`` or ``localhost:50051``) with the retry policy;
    balanced (round_robin) for URIs and lists.

    ``credentials`` (None: from the ``LOSSWIRE_TLS_*``/``LOSSWIRE_TOKEN*`` variables) make it a TLS
    channel and/or add the bearer token to every call.
    """
    target = targets.normalise_target(target)
    credentials = Credentials.from_env() if credentials is None else credentials
    scheme = targets.scheme_of(target)
    transport = credentials.channel_credentials(loopback=targets.all_loopback(target), uds=scheme == "unix")
    if isinstance(target, tuple):
        address, balanced = targets.address_list_uri(target), True
    else:
        address, balanced = target, targets.is_uri(target)
    settings = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.service_config": service_config(balanced),
        "grpc.enable_retries": 1,
        "grpc.per_rpc_retry_buffer_size": RETRY_BUFFER_BYTES,
        **RECONNECT_OPTIONS,
        **tls_name_option(credentials, lambda: targets.tls_server_name(target)),
        **(options or {}),
    }
    if transport is None:
        channel = grpc.insecure_channel(address, options=list(settings.items()))
    else:
        channel = grpc.secure_channel(address, transport, options=list(settings.items()))
    return credentials.secure(channel)


def tls_name_option(credentials: Credentials, default: Callable[[], str | None]) -> dict[str, str]:
    """gRPC's name override for a TLS channel: the credentials' ``server_name``, else ``default()``."""
    if not credentials.tls:
        return {}
    name = credentials.server_name or default()
    return {"grpc.ssl_target_name_override": name} if name else {}


class Connection:
    """One channel and its stub as the client calls them: a bounded wait for the first connection, waiting
    out a restart once the server has answered, deadlines, and failures that name the target (``label``)
    and the deadline.

    Every call on :attr:`channel` (the stub's, and the streams the transports open on it) waits for the
    server as :meth:`waits` says, unless it sets ``wait_for_ready`` itself. ``wait_for_ready`` False:
    calls never wait for a lost server; ``waiting(False)`` is the same connection with such calls (a
    replica's, for a session that moves to the next replica instead).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        label: str,
        connect_timeout: float | None = CONNECT_TIMEOUT_SECONDS,
        *,
        wait_for_ready: bool = True,
        reached: threading.Event | None = None,
        stream_channel: grpc.Channel | None = None,
        lane_channel: Callable[[int], grpc.Channel] | None = None,
    ):
        self.label = label
        self.connect_timeout = connect_timeout
        self.wait_for_ready = wait_for_ready
        # set once the server answered on this channel (shared with the waiting() view)
        self._reached = threading.Event() if reached is None else reached
        self.channel = WaitingChannel(channel, self.waits)
        # EvaluateStream's (see STREAM_CHANNEL_OPTIONS); None: the same channel (a caller's own)
        self.stream_channel = self.channel if stream_channel is None else WaitingChannel(stream_channel, self.waits)
        # a big stream's lanes (EvaluateRequest.lanes): lane i's channel, its own connection to the same server;
        # None where the channel does not reach one server (balanced, or a caller's own)
        self._lane_channel = lane_channel
        self._lanes: dict[int, WaitingChannel] = {}
        self._lanes_lock = threading.Lock()
        self.stub = pb_grpc.LossServiceStub(self.channel)
        self._other: Connection | None = None  # the same, with the other wait_for_ready

    @property
    def reached(self) -> bool:
        """Whether the server has answered on this channel (the first check, or a call)."""
        return self._reached.is_set()

    def waits(self) -> bool:
        """Whether a call made now waits for the server (gRPC's wait-for-ready) up to its deadline: once
        the server has answered on this channel (or without a first check, ``connect_timeout`` None)."""
        return self.wait_for_ready and (self._reached.is_set() or self.connect_timeout is None)

    def one_of(self, target: Connection) -> Connection:
        """This connection, to one server of ``target`` (a replica), counted as reached once ``target`` is
        and the other way round: once the client has heard from the service, a replica that does not
        answer is restarting or gone, not a wrong address. Returns it."""
        self._reached = target._reached
        if self._other is not None:
            self._other._reached = target._reached
        return self

    def waiting(self, wait: bool = True) -> Connection:
        """This connection (same channel, same knowledge of the server) with calls that wait for a lost
        server (``wait``) or that do not."""
        if self.wait_for_ready == wait:
            return self
        if self._other is None:
            self._other = Connection(
                self.channel,
                self.label,
                self.connect_timeout,
                wait_for_ready=wait,
                reached=self._reached,
                stream_channel=self.stream_channel if self.stream_channel is not self.channel else None,
                lane_channel=self._lane_channel,
            )
            self._other._other = self
            self._other._lanes, self._other._lanes_lock = self._lanes, self._lanes_lock  # one set of connections
        return self._other

    @property
    def has_lanes(self) -> bool:
        """Whether a stream on this connection may spread its chunks over lanes (it reaches one server)."""
        return self._lane_channel is not None

    def evaluate_stream(self, lane: int = 0) -> grpc.StreamStreamMultiCallable:
        """EvaluateStream on the stream channel (``lane`` 0) or on lane ``lane``'s own channel (made at its
        first use, kept until ``close``): chunks go out as bytes already serialized, and come in parsed
        without copying their data (``chunks.serialize_chunk``, ``chunks.parse_chunk``)."""
        channel = self.stream_channel
        if lane:
            with self._lanes_lock:
                if lane not in self._lanes:
                    self._lanes[lane] = WaitingChannel(self._lane_channel(lane), self.waits)
                channel = self._lanes[lane]
        return channel.stream_stream(
            EVALUATE_STREAM_METHOD, request_serializer=chunks.serialize_chunk, response_deserializer=chunks.parse_chunk
        )

    def close(self) -> None:
        self.channel.close()
        if self.stream_channel is not self.channel:
            self.stream_channel.close()
        with self._lanes_lock:
            for channel in self._lanes.values():
                channel.close()
            self._lanes.clear()

    def call(self, method: str, request: Any, timeout: float | None, metadata: Any = None) -> Any:
        """The unary ``method`` of LossService; a RemoteLossError on failure."""
        wait = self.ensure_connected(timeout)
        try:
            response = getattr(self.stub, method)(request, timeout=timeout, metadata=metadata, wait_for_ready=wait)
        except grpc.RpcError as error:
            raise self.failure(error, timeout, waited=wait) from None
        self._reached.set()
        return response

    def ensure_connected(self, timeout: float | None) -> bool:
        """Whether the next call should wait for the server (gRPC's wait-for-ready) up to its deadline.

        Before the server has answered on this channel: one health check (``grpc.health.v1``, answered
        by the server without any work; any answer, UNIMPLEMENTED included, proves a working
        connection) with a deadline of ``connect_timeout`` (or the call's ``timeout`` if shorter). A
        silent server raises (naming the target and the wait); a refused or unresolvable target lets
        the call go on without waiting, to fail at once with gRPC's reason after the retry policy's
        attempts: a target never reached is reported in seconds. Once the server has answered, calls
        wait for it (``wait_for_ready``): it was there, so a failed connection is a restart to ride
        out within the deadline. ``connect_timeout`` None: no probe, every call waits."""
        if self._reached.is_set() or self.connect_timeout is None:
            return self.waits()
        limit = self.connect_timeout if timeout is None else min(self.connect_timeout, timeout)
        probe = self.channel.unary_unary(HEALTH_CHECK_METHOD, request_serializer=bytes, response_deserializer=bytes)
        try:
            probe(b"", timeout=limit, wait_for_ready=False)  # an empty HealthCheckRequest: overall health
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                deadline_first = timeout is not None and timeout <= self.connect_timeout
                raise self._silent(limit, deadline_first) from None
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return False  # never reached: the call fails fast, naming the target
        self._reached.set()
        return self.waits()

    def _silent(self, waited: float, deadline_first: bool) -> RemoteLossError:
        cause = (
            f"the call's deadline (timeout={waited:g} s) passed"
            if deadline_first
            else f"{waited:g} s (connect_timeout)"
        )
        return RemoteLossError(
            grpc.StatusCode.DEADLINE_EXCEEDED if deadline_first else grpc.StatusCode.UNAVAILABLE,
            f"no gRPC connection to the losswire server at {self.label}: it accepted the TCP connection but "
            f"answered nothing (no HTTP/2 handshake, no health check) within {cause}. A hung or stopped server, "
            "a firewall that drops packets or a port that is not a gRPC server looks like this. Check the target "
            "(target=, $LOSSWIRE_TARGET); LossClient(connect_timeout=...) changes this wait, timeout= (RemoteLoss "
            "or LossClient) each call's deadline",
        )

    def failure(self, error: grpc.RpcError, timeout: float | None, waited: bool | None = None) -> RemoteLossError:
        """``error`` as a RemoteLossError; an unreachable or silent server's names target and deadline.
        ``waited``: whether the call waited for the server (None: whether a call made now would)."""
        waited = self.waits() if waited is None else waited
        failed = RemoteLossError.from_rpc_error(error)
        if failed.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return failed
        deadline = "no deadline" if timeout is None else f"{timeout:g} s"
        if failed.code == grpc.StatusCode.DEADLINE_EXCEEDED and waited and not connected_now(self.channel):
            what = f"no connection to the losswire server at {self.label} within the call's deadline ({deadline}): "
            if self._reached.is_set():
                what += (
                    "it answered before, and the call waited for it to come back (a restart), but it did not; "
                    "it is down, restarting slowly or unreachable from here"
                )
            else:
                what += "the call waited for it (connect_timeout=None), but it never answered; check the target "
                what += "(target=, $LOSSWIRE_TARGET)"
        elif failed.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            what = f"no answer from the losswire server at {self.label} within the call's deadline ({deadline})"
        elif self._reached.is_set():
            what = (
                f"the losswire server at {self.label} is unavailable (retried by gRPC; the call's deadline: {deadline})"
            )
        else:
            what = (
                f"the losswire server at {self.label} is unavailable and never answered this client (retried by "
                f"gRPC; the call's deadline: {deadline}); check the target (target=, $LOSSWIRE_TARGET)"
            )
        details = (
            f"{failed.details or failed.code.name}: {what}; timeout= (seconds, on RemoteLoss or LossClient) changes it"
        )
        return RemoteLossError(failed.code, details, failed.field, failed.busy)


def connected_now(channel: grpc.Channel, within: float = 0.2) -> bool:
    """Whether ``channel`` is READY (connected to its server), asked within ``within`` seconds. Asked off
    the main thread: channel_ready_future's condition is shared with the channel's connectivity thread
    (see losswire.client.offload)."""
    return off_main_thread(lambda: _ready_within(channel, within))


def _ready_within(channel: grpc.Channel, within: float) -> bool:
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=within)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        future.cancel()


class Patience:
    """The client's own retries (streams, busy answers): RETRY_POLICY's jittered, growing backoff,
    within ``timeout`` seconds (``BUSY_PATIENCE_SECONDS`` without one). ``clock`` and ``draw``
    (monotonic seconds; a uniform draw in [a, b]) are for tests."""

    def __init__(
        self,
        timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.timeout = timeout
        self._clock, self._draw = clock, draw
        self.deadline = clock() + (BUSY_PATIENCE_SECONDS if timeout is None else timeout)
        self.backoff = seconds(RETRY_POLICY["initialBackoff"])

    def remaining(self) -> float | None:
        """The next attempt's timeout: what is left of the deadline (None without one)."""
        return None if self.timeout is None else max(self.deadline - self._clock(), 0.0)

    def next_pause(self) -> float | None:
        """How long to wait before the next attempt (gRPC's jitter: anywhere up to the current
        backoff, which then grows), or None when that wait would end past the deadline."""
        pause = self._draw(0, self.backoff)
        if self._clock() + pause >= self.deadline:
            return None
        self.backoff = min(self.backoff * RETRY_POLICY["backoffMultiplier"], seconds(RETRY_POLICY["maxBackoff"]))
        return pause


def seconds(duration: str) -> float:
    """A gRPC service-config duration ("0.1s") in seconds."""
    return float(duration.rstrip("s"))


def passing(error: grpc.RpcError) -> bool:
    """A failure a later attempt may not meet: UNAVAILABLE, or a busy server's RESOURCE_EXHAUSTED."""
    code = error.code() if hasattr(error, "code") else None
    return code == grpc.StatusCode.UNAVAILABLE or is_busy(error)
