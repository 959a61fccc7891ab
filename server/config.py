"""The server's settings: one dataclass, read by the command line (``cli.py``) and the assembly (``app.py``).

Importing it costs nothing (no torch, no gRPC), so ``losswire serve --help`` and ``losswire health``
start fast.
"""

from __future__ import annotations

import dataclasses
import functools

from losswire.server.host_limits import memory_limit
from losswire.wire.protocol import DEFAULT_MAX_DIMS, DEFAULT_PORT, MAX_MESSAGE_BYTES

IDLE_BUFFER_BYTES = 1 << 30  # losswire.wire.buffers.DEFAULT_IDLE_BYTES (which imports torch)
PINNED_STAGING_BYTES = 512 << 20


@functools.cache
def usable_memory() -> int | None:
    """The memory this process may use: the host's, or its container's limit where that is lower (None
    where nothing says: unbounded). Read once: the defaults below are taken at start."""
    limit = memory_limit()
    return None if limit is None else limit.bytes


def half_of_usable_memory() -> int | None:
    usable = usable_memory()
    return None if usable is None else usable // 2


def pinned_staging_default() -> int:
    """512 MiB of pinned staging, or a sixteenth of the usable memory where that is less: pinned pages
    cannot be swapped out. On an H200 host a staged copy ran 3.7-4.4x the pageable one to the device and
    1.9-2.2x back (bench/staging.py, 64 and 256 MiB)."""
    usable = usable_memory()
    return PINNED_STAGING_BYTES if usable is None else min(PINNED_STAGING_BYTES, usable // 16)


def idle_buffers_default() -> int:
    """1 GiB of idle buffers, or an eighth of the usable memory where that is less (a small container)."""
    usable = usable_memory()
    return IDLE_BUFFER_BYTES if usable is None else min(IDLE_BUFFER_BYTES, usable // 8)


@dataclasses.dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # several servers on one port (SO_REUSEPORT: the kernel splits connections between them); off, a
    # second server on a port in use fails to start instead of silently sharing it (and its sessions)
    reuse_port: bool = False
    device: str = "auto"  # "auto": cuda when available, else cpu
    max_workers: int = 8  # threads serving RPCs
    # calls admitted at once, computing, waiting for a compute thread or for their caller's bytes; beyond,
    # RESOURCE_EXHAUSTED at once rather than a queue without bound. A waiting call is a coroutine, not a
    # thread: the bound is on memory, and on callers that hold calls open (health Watch streams included)
    max_concurrent_rpcs: int | None = 1024
    # calls one token may have at once (tokens on); None: all but a quarter of max_concurrent_rpcs, so that
    # one token's flood of calls always leaves other tokens room
    max_concurrent_rpcs_per_token: int | None = None
    # health Watch streams open at once (a client that balances over replicas keeps one per connection); they
    # take no call's place in max_concurrent_rpcs, and one connection has at most 4
    max_health_watches: int = 4096
    # connections open at once (each costs a descriptor and ~15 KiB while idle, and an idle one stays open);
    # beyond, a new connection is closed at once (its caller retries). Also kept below the open-files limit,
    # so that connections never take the descriptors the server needs for itself. None: that limit only
    max_connections: int | None = 10_000
    # calls that stream their requests (EvaluateStream, reflection) open at once; beyond, RESOURCE_EXHAUSTED
    # (a client waits it out). Below max_concurrent_rpcs, so silent streams never take every call's room;
    # with tokens on, one token has at most all but a quarter of them.
    max_open_streams: int = 32
    # a request stream whose caller sends nothing for this long is ended (DEADLINE_EXCEEDED); None: never
    stream_idle_seconds: float | None = 60.0
    # a streamed call's caller must send its request, and read its answer, at this many bytes per second
    # on average once it has kept the call waiting stream_idle_seconds (beyond, the call ends): a big call
    # holds a slot and memory, which a caller trickling bytes would otherwise hold as long as it likes.
    # None: no pace
    stream_min_rate: int | None = 1 << 20
    # how long the lanes of a streamed call (EvaluateRequest.lanes) and the call may wait for each other
    lane_join_seconds: float = 10.0
    max_stream_calls: int = 2  # big calls (streamed or shared memory) at once (capped at max_workers - 1)
    # big calls one token may have at once (tokens on); None: all but one of max_stream_calls (at least 1)
    max_stream_calls_per_token: int | None = None
    fused_kernels: bool = True  # loss and gradient in one analytic pass where a kernel exists (losses/fused.py)
    gpu_kernels: bool = True  # on a GPU, closed forms compiled into one pass (losses/fused/compiled.py)
    # compute a streamed call's rows as they arrive when its caller asks (EvaluateRequest.early_gradients)
    overlap_transfer: bool = True
    # same-host callers may hand over shared-memory segments (sealed memfds, over a Unix socket) and pass
    # tensors by reference
    shared_memory: bool = True
    max_shared_memory: int | None = 64 << 30  # bytes mapped for all callers together; None: unbounded
    max_shared_memory_total_regions: int | None = 1024  # segments mapped for all callers together
    # what one caller (a token on one gRPC connection) may hold registered: regions, bytes; None: unbounded
    max_shared_memory_regions: int | None = 64
    max_shared_memory_per_caller: int | None = 16 << 30
    max_shared_memory_connections: int = 256  # caller processes connected to the handoff socket at once
    # bytes the calls in flight may hold at once (streamed tensors' buffers, terms' working memory as their
    # losses estimate it), reserved before they are allocated; beyond, RESOURCE_EXHAUSTED. None: unbounded.
    # By default half the memory the server may use: the host's, or its control group's limit (a
    # container's) where that is lower.
    memory_budget: int | None = dataclasses.field(default_factory=lambda: half_of_usable_memory())
    # the most one term's working memory may take (None: the whole budget)
    max_term_memory: int | None = None
    # what building one loss module may allocate, by its loss's estimate (GHM's bins, per-class buffers);
    # real configs need kilobytes; None: unbounded
    max_module_bytes: int | None = 64 << 20
    # a term's estimated working memory may be at most this many times its inputs' bytes, plus 256 MiB
    # (losses cost a few times their inputs; C x C or B x B tables of a tiny request do not); None: unbounded
    term_memory_ratio: int | None = 64
    # idle buffers kept for reuse by big calls (streamed tensors, their answers); 0: fresh memory each call.
    # Outside the memory budget, so in a small container it takes an eighth of the usable memory at most
    buffer_pool_bytes: int = dataclasses.field(default_factory=idle_buffers_default)
    # pinned host memory kept to stage tensors of 1 MiB or more between the host and a CUDA device (a copy
    # from or to pageable memory runs at a fraction of the bus's speed); beyond it, the pageable copy. A CPU
    # device never uses it and pins nothing; 0: off
    pinned_staging_bytes: int = dataclasses.field(default_factory=pinned_staging_default)  # losswire.wire.staging
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # the largest message a caller may send: a whole unary request (Evaluate, ModelInfer...), or one message
    # of a stream. gRPC refuses a bigger one from its length prefix, before reading it; unary requests are
    # received only with room for this many bytes (rpc/intake.py). Bigger requests stream (EvaluateStream)
    max_request_message_bytes: int = 64 << 20
    max_elements: int | None = None  # per tensor; larger tensors are refused before allocation
    # summed over every tensor of a request; None: bounded by max_message_bytes alone (every element
    # of a well-formed tensor takes at least one byte of the message)
    max_request_elements: int | None = None
    max_terms: int | None = 256  # terms per request: DETR-style heads send ~40, one per loss and layer
    max_dims: int = DEFAULT_MAX_DIMS  # tensor rank; detection tensors have at most 5 ([N, C, D, H, W])
    torch_threads: int | None = None  # torch intra-op threads; None: torch's default, or a CPU quota's worth
    grace_seconds: float = 30.0  # how long in-flight calls may run on after a stop request
    # after a stop request, keep serving this long while health already says NOT_SERVING, so that
    # health-checking balancers and probes stop sending calls before the port closes
    shutdown_notice_seconds: float = 0.0
    plugins: tuple[str, ...] = ()
    session_ttl_seconds: float = 3600.0  # an idle session's state is dropped after this long
    max_sessions: int = 1024  # live sessions at once; beyond, RESOURCE_EXHAUSTED
    # bytes of state the live sessions hold together (each: its module's state and replay snapshots)
    max_session_bytes: int | None = 4 << 30
    # what one token's sessions may hold (tokens on, sessions not shared): a token cannot take every room
    max_sessions_per_token: int | None = 256
    max_session_bytes_per_token: int | None = 1 << 30
    # with tokens on, a token uses only its own sessions; True: every token shares every session
    share_sessions: bool = False
    session_replay_depth: int = 4  # forwards per session whose prior state is kept for recomputes
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 picks one); None: no endpoint
    metrics_host: str | None = None  # None: the gRPC host
    # TLS (PEM files): the server's certificate and key; with a client CA, mutual TLS
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # bearer tokens every call but health must carry: a file (re-read when it changes) and/or tokens
    # given directly (LOSSWIRE_AUTH_TOKENS); neither: no authentication. Never printed (repr=False).
    auth_tokens_file: str | None = None
    auth_tokens: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    # a second, plaintext port serving only grpc.health.v1, for probes that cannot speak TLS
    health_port: int | None = None
    # health (on every port) says NOT_SERVING while a small call would wait longer than this for a
    # compute thread (every thread busy with long calls); None: health follows only start and stop
    health_bound_seconds: float | None = 10.0
