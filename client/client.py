"""``LossClient``: one connection to a losswire target, shared by every RemoteLoss that talks to it.

It composes the pieces a call goes through, each in a module of its own:
:mod:`~losswire.client.targets` (what to dial), :mod:`~losswire.client.channels` (channels, retries,
the first connection, deadlines), :mod:`~losswire.client.replicas` (which replica holds a session),
:mod:`~losswire.client.sessions` (restarted sessions) and :mod:`~losswire.client.transports` (unary,
EvaluateStream or shared memory).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

import grpc
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as wire_memory
from losswire.wire.buffers import DEFAULT_IDLE_BYTES, BufferPool
from losswire.wire.protocol import MAX_STREAM_LANES, SESSION_HEADER

from . import shared_memory as shm
from . import targets
from .channels import (
    CONNECT_TIMEOUT_SECONDS,
    LANE_CHANNEL_OPTION,
    STREAM_CHANNEL_OPTIONS,
    Connection,
    make_channel,
    tls_name_option,
)
from .configs import plain_config
from .errors import RemoteLossError
from .loss_shapes import Descriptions
from .replicas import ReplicaSet, SessionRouter, replica_set
from .security import Credentials
from .sessions import SessionSteps
from .transports import STREAM_THRESHOLD_BYTES, Transports

SHARED_MEMORY_MODES = ("auto", "on", "off")
SHARED_MEMORY_ENV = "LOSSWIRE_CLIENT_SHARED_MEMORY"  # the server's LOSSWIRE_SHARED_MEMORY is on/off
BUFFER_POOL_ENV = "LOSSWIRE_CLIENT_BUFFER_POOL"  # bytes of idle receive buffers kept (0: none)
LANES_ENV = "LOSSWIRE_CLIENT_LANES"  # more streams per big call (0: one stream)
DEFAULT_TIMEOUT_SECONDS = 300.0

log = logging.getLogger("losswire.client")


class LossClient:
    """A connection to one losswire server, or to several replicas behind one balanced target.

    ``target``: ``host:port``, a gRPC URI (``dns:///losswire:50051``) or several servers (see
    :mod:`losswire.client.targets`); None dials ``$LOSSWIRE_TARGET``, else ``localhost:50051``.
    ``LossClient.shared(target)`` returns the same client for the same target (a list and its
    comma-separated string are the same target), so every module reuses one channel.

    Each call has a deadline of ``timeout`` seconds (None: no deadline). Before its first call a
    channel waits at most ``connect_timeout`` seconds for the server's handshake, so a server that
    accepts connections and never answers is reported within seconds, naming the target (one that
    refuses them, at once). Once the server has answered, a call made while it is away (restarting: a
    deploy, a node drain) waits for it and is sent when it is back, within the call's deadline; a
    session's call then meets a fresh state, reported as below. ``connect_timeout`` None: no first
    check, every call waits for the server up to its deadline (a job started before its server).
    ``on_session_restart``: what to do when a session's state started afresh behind this client's back
    (see :class:`SessionRestartedError`): ``"warn"`` logs a warning on ``losswire.client`` and carries
    on, ``"raise"`` raises. ``credentials`` (TLS, mutual TLS, a bearer token:
    :class:`~losswire.client.security.Credentials`) apply to every channel the client opens, the
    per-replica ones included; None reads them from the ``LOSSWIRE_TLS_*`` / ``LOSSWIRE_TOKEN*``
    environment variables.

    Big requests: one whose tensors hold at least ``stream_threshold`` bytes (default
    ``STREAM_THRESHOLD_BYTES``; None: never) goes by ``EvaluateStream``, tensors in chunks, and its
    response comes back the same way. A stream is retried by the client (not by gRPC's policy) on
    UNAVAILABLE and on a RESOURCE_EXHAUSTED that may pass (the server's streamed calls are all busy),
    up to ``RETRY_POLICY``'s attempts and backoff, within the deadline, as long as no answer has
    arrived: the tensors are sent again. ``transfer_dtype`` (``'float16'``/``'bfloat16'``): the
    default of every ``RemoteLoss`` on this client (see ``RemoteLoss``). ``overlap`` (default True): a
    streamed request sends its inputs' rows interleaved and lets the server compute each block of rows
    as it arrives and send pred's gradient rows back as they are done (FocalLoss, QualityFocalLoss on a CPU server with
    ``--overlap-transfer`` on; see docs/performance.md), so a big call's compute overlaps its transfer;
    the answer is the same bit for bit. False: the server starts once everything has arrived. ``lanes``
    (None reads ``LOSSWIRE_CLIENT_LANES``, default 0): a streamed request's chunks also travel on this
    many more streams, each on a connection of its own to the same server (``EvaluateRequest.lanes``),
    for a link that one connection cannot fill; only where the target is one server (not a list or a
    balanced name, whose calls may reach different replicas; a replica of a session is one server). The
    same answer, bit for bit.

    Same host: with ``shared_memory`` ``"auto"`` (the default; None reads ``LOSSWIRE_CLIENT_SHARED_MEMORY``)
    and a target on this machine (a loopback address, ``localhost`` or ``unix:``), a request whose big
    tensors hold at least ``SHARED_MEMORY_THRESHOLD_BYTES`` travels through shared memory: its tensors
    are copied once into a sealed memfd handed to the server over a Unix socket (``SharedMemoryEndpoint``,
    ``RegisterSharedMemory``), and the answer's big tensors are read where the server wrote them.
    ``"on"``: for any target (one that resolves to this machine); ``"off"``: never. A server that cannot
    share memory with this process (another host or network namespace, another user, ``--shared-memory
    off``, an older server) is noticed on the first try, logged, and the client sends tensors over gRPC
    from then on.

    ``buffer_pool_bytes`` (None reads ``LOSSWIRE_CLIENT_BUFFER_POOL``, default 1 GiB): idle receive
    buffers kept so that a streamed answer lands in memory a freed earlier answer used (see
    :mod:`losswire.wire.buffers`); 0: fresh memory every call.
    """

    _shared: dict[tuple[targets.Normalised, Credentials], LossClient] = {}
    _lock = threading.Lock()

    def __init__(
        self,
        target: targets.Target | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        channel: grpc.Channel | None = None,
        *,
        on_session_restart: Literal["warn", "raise"] = "warn",
        credentials: Credentials | None = None,
        stream_threshold: int | None = STREAM_THRESHOLD_BYTES,
        transfer_dtype: str | None = None,
        shared_memory: Literal["auto", "on", "off"] | None = None,
        buffer_pool_bytes: int | None = None,
        connect_timeout: float | None = CONNECT_TIMEOUT_SECONDS,
        overlap: bool = True,
        lanes: int | None = None,
    ):
        lanes = _lanes(lanes)
        self.steps = SessionSteps(on_session_restart)
        self.target = targets.normalise_target(target)
        self.timeout = timeout
        codec.transfer_dtype_of(transfer_dtype)  # a ValueError now for a bad name
        self.transfer_dtype = transfer_dtype
        # given ones travel with a pickled RemoteLoss; the environment's are read again where it lands
        self.credentials_from_env = credentials is None
        self.credentials = Credentials.from_env() if credentials is None else credentials
        self.connect_timeout = connect_timeout
        own_channel = channel is None
        streams = lane_channels = None
        if own_channel:
            channel = make_channel(self.target, credentials=self.credentials)
            streams = make_channel(self.target, STREAM_CHANNEL_OPTIONS, credentials=self.credentials)
            if not targets.balanced(self.target):  # lanes must reach the server of their call
                lane_channels = self._lane_channels(self.target, {})
        self.connection = Connection(
            channel, targets.label(self.target), connect_timeout, stream_channel=streams, lane_channel=lane_channels
        )
        # with a channel of the caller's, sessions ride on it (header only): its servers are unknown here
        replicas = replica_set(self.target) if own_channel else None
        self.router = SessionRouter(self.connection, replicas, self._connect_replica)
        self.shared_memory = _shared_memory_mode(shared_memory)
        usable = self.shared_memory == "on" or (
            self.shared_memory == "auto" and own_channel and targets.all_loopback(self.target)
        )
        if buffer_pool_bytes is None:
            buffer_pool_bytes = _env_bytes(BUFFER_POOL_ENV, DEFAULT_IDLE_BYTES)
        # the losses this client was told of (Describe, ListLosses, its modules'): every answer's losses are
        # checked against the shapes their descriptions imply (``loss_shapes``)
        self.descriptions = Descriptions()
        self.transports = Transports(
            self.connection,
            self.router,
            self.steps,
            stream_threshold=stream_threshold,
            shared_memory=usable and replicas is None and wire_memory.supported(),
            # streamed answers are reassembled into buffers reused once the last call's are freed
            buffers=BufferPool(buffer_pool_bytes),
            timeout=timeout,
            overlap=overlap,
            lanes=lanes,
            descriptions=self.descriptions,
        )

    @classmethod
    def shared(cls, target: targets.Target | None = None, credentials: Credentials | None = None) -> LossClient:
        """The one client for ``target`` (None: ``$LOSSWIRE_TARGET`` or ``localhost:50051``) and these
        credentials (None: the environment's)."""
        target = targets.normalise_target(target)
        key = (target, Credentials.from_env() if credentials is None else credentials)
        with cls._lock:
            # a shared client somebody closed (loss.client.close()) is replaced: the next module on this target
            # would otherwise inherit "the losswire client was closed" on its every call
            if key not in cls._shared or cls._shared[key].connection.channel.closed:
                cls._shared[key] = cls(target, credentials=credentials)
            return cls._shared[key]

    # -- what the transports and modules read -------------------------------------------------------

    @property
    def channel(self) -> grpc.Channel:
        return self.connection.channel

    @property
    def stub(self) -> pb_grpc.LossServiceStub:
        """The target's ``LossServiceStub`` (no deadline, no connection wait: for direct calls)."""
        return self.connection.stub

    @property
    def replicas(self) -> ReplicaSet | None:
        """The target's replica set when the client pins sessions (a balanced target), else None."""
        return self.router.replicas

    @property
    def on_session_restart(self) -> str:
        return self.steps.on_restart

    @property
    def stream_threshold(self) -> int | None:
        return self.transports.stream_threshold

    @property
    def shared_memory_threshold(self) -> int | None:
        """Bytes of big tensors from which a call goes through shared memory; None: it does not."""
        return self.transports.shared_memory_threshold

    @property
    def buffers(self) -> BufferPool:
        return self.transports.buffers

    @property
    def _pool(self) -> shm.SharedMemoryPool | None:
        """The shared-memory pool once made (the shared-memory tests read its regions here)."""
        return self.transports.pool

    def replica_for(self, session: str) -> str | None:
        """The replica address this client sends ``session``'s calls to now (None: not pinned here)."""
        return self.router.replica_for(session)

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
        return self.transports.evaluate(request, self._deadline(timeout), sink)

    def describe(self, config: Mapping[str, Any], timeout: float | None = None) -> pb.DescribeResponse:
        """The server's description of ``config`` (validated), with its statefulness and provenance."""
        request = pb.DescribeRequest(config=codec.encode_config(plain_config(config)))
        response = self.connection.call("Describe", request, self._deadline(timeout))
        if response.loss.name == config.get("type"):
            self.descriptions.note(response.loss)
        return response

    def list_losses(self, timeout: float | None = None) -> pb.ListLossesResponse:
        response = self.connection.call("ListLosses", pb.ListLossesRequest(), self._deadline(timeout))
        for info in response.losses:
            self.descriptions.note(info)
        return response

    def get_session(self, session: str, timeout: float | None = None) -> pb.SessionInfo:
        return self._session_call(session, "GetSession", timeout)

    def reset_session(self, session: str, timeout: float | None = None) -> pb.SessionInfo:
        try:
            return self._session_call(session, "ResetSession", timeout)
        finally:
            self.steps.forget(session)  # a reset of our own is no restart

    def _session_call(self, session: str, method: str, timeout: float | None) -> pb.SessionInfo:
        request, metadata = pb.SessionRequest(session=session), [(SESSION_HEADER, session)]
        deadline = self._deadline(timeout)
        return self.router.call(session, lambda connection: connection.call(method, request, deadline, metadata))

    def list_sessions(self, timeout: float | None = None) -> pb.ListSessionsResponse:
        """Every live session; with several replicas, of every replica that answers (sorted by name)."""
        deadline = self._deadline(timeout)
        if self.router.replicas is None:
            return self.connection.call("ListSessions", pb.ListSessionsRequest(), deadline)
        found: list[pb.SessionInfo] = []
        for address in self.router.replicas.addresses():
            try:
                answer = self.router.connection(address).call("ListSessions", pb.ListSessionsRequest(), deadline)
            except RemoteLossError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("losswire replica %s is unavailable (%s): its sessions are not listed", address, error)
                continue
            found.extend(answer.sessions)
        return pb.ListSessionsResponse(sessions=sorted(found, key=lambda info: info.session))

    def close(self) -> None:
        self.transports.close()  # unregister shared memory while the channel is open
        self.connection.close()
        self.router.close()

    # -- helpers -------------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        """A call's deadline in seconds: ``timeout``, else the client's (None: none)."""
        return self.timeout if timeout is None else timeout

    def _connect_replica(self, address: str) -> Connection:
        """A connection to one replica, dialled by its address; TLS checks the target's name."""
        options = tls_name_option(self.credentials, self._replica_tls_name)
        channel = make_channel(address, options, credentials=self.credentials)
        streams = make_channel(address, {**options, **STREAM_CHANNEL_OPTIONS}, credentials=self.credentials)
        lane_channels = self._lane_channels(address, options)
        return Connection(channel, address, self.connect_timeout, stream_channel=streams, lane_channel=lane_channels)

    def _lane_channels(self, target: targets.Target, options: dict[str, Any]) -> Callable[[int], grpc.Channel]:
        """Lane i's channel to ``target``: a stream channel with an option of its own, so its own connection."""

        def lane_channel(lane: int) -> grpc.Channel:
            settings = {**options, **STREAM_CHANNEL_OPTIONS, LANE_CHANNEL_OPTION: lane}
            return make_channel(target, settings, credentials=self.credentials)

        return lane_channel

    def _replica_tls_name(self) -> str | None:
        scheme = targets.scheme_of(self.target)
        if scheme == "dns":
            return (targets.target_hosts(self.target) or [None])[0]
        return targets.tls_server_name(self.target) if scheme in ("ipv4", "ipv6") else None


def _shared_memory_mode(mode: str | None) -> str:
    mode = mode if mode is not None else os.environ.get(SHARED_MEMORY_ENV, "auto")
    if mode not in SHARED_MEMORY_MODES:
        raise ValueError(f"shared_memory ({SHARED_MEMORY_ENV}) must be auto, on or off, got {mode!r}")
    return mode


def _lanes(lanes: int | None) -> int:
    """``lanes``, else ``$LOSSWIRE_CLIENT_LANES`` (unset or empty: 0); a ValueError outside 0 to 8."""
    if lanes is None:
        text = os.environ.get(LANES_ENV, "").strip() or "0"
        if not text.isdigit():
            raise ValueError(f"{LANES_ENV} must be 0 to {MAX_STREAM_LANES}, got {text!r}")
        lanes = int(text)
    if not 0 <= lanes <= MAX_STREAM_LANES:
        raise ValueError(f"lanes ({LANES_ENV}) must be 0 to {MAX_STREAM_LANES}; got {lanes}")
    return lanes


def _env_bytes(name: str, default: int) -> int:
    """A byte count from the environment variable ``name`` (unset or empty: ``default``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise ValueError(f"{name} must be a number of bytes (0 or more), got {text!r}")
    return int(text)
