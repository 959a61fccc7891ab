"""Replicas: which server of a balanced target holds a session, found the same way by every worker.

**Sessions** (server-held state of stateful losses) live in one server process, so every call of a
session must reach the same replica from every worker. A balanced client pins each session by
rendezvous hashing (:func:`rendezvous_rank`) of its name over the replica addresses: the listed
servers, the addresses of an ``ipv4:``/``ipv6:`` URI, or what a ``dns:///`` name resolves to now
(a headless Service: one address per ready pod; re-resolved every ``REPLICA_REFRESH_SECONDS``). Every
process ranks the same set the same way, so workers meet on one replica without talking to each
other. A session's calls (Evaluate terms, GetSession, ResetSession) go to a connection for that one
replica (:class:`SessionRouter`); everything else stays round_robin. When the replica set changes,
only the sessions of the changed replica move, and a moved session starts from a fresh state on its
new replica (see :mod:`losswire.client.sessions`). Targets the client cannot enumerate (``xds:``, a
``dns://server/`` name) send sessions over the balanced channel with the ``x-losswire-session``
header, for a proxy that hashes on it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from losswire.wire.protocol import SESSION_HEADER

from . import targets
from .channels import Connection
from .errors import RemoteLossError

log = logging.getLogger("losswire.client")

# A DNS name's replica set is resolved again after this long (and at once after a replica failed), so
# workers that started at different times agree on it again within this window.
REPLICA_REFRESH_SECONDS = 30.0
# A replica that answered a session call UNAVAILABLE is ranked last for this long: its sessions go to
# their next replica at once instead of waiting out the retry backoff on every call.
REPLICA_DOWN_SECONDS = 30.0

T = TypeVar("T")


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


class _UnresolvableReplicas(ReplicaSet):
    """A balanced target whose replicas the client cannot list: session calls fail with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(lambda: ())
        self.reason = reason

    def addresses(self) -> tuple[str, ...]:
        raise ValueError(self.reason)


def _dns_replicas(uri: str) -> ReplicaSet:
    """The replicas of ``dns:[//authority/]host[:port]``, resolved with the system resolver, as gRPC's is."""
    rest = uri[len("dns:") :]
    authority = ""
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
    host, port = targets.split_host_port(rest if re.search(r":\d+$", rest) else f"{rest}:443")  # gRPC's default port
    if authority:
        return _UnresolvableReplicas(
            f"{uri!r} names its own DNS server ({authority}); the client pins sessions by resolving the name "
            "with the system resolver, which cannot ask that server. Use dns:///name:port for sessions, or route "
            f"them by the {SESSION_HEADER} header in a proxy"
        )

    def resolve() -> list[str]:
        return [targets.join_host_port(ip, port) for ip in targets.resolve_ips(host, port)]

    return ReplicaSet(resolve, REPLICA_REFRESH_SECONDS)


def replica_set(target: targets.Normalised) -> ReplicaSet | None:
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


class SessionRouter:
    """Sends a session's calls to its replica: the target's own connection when the client cannot pin
    (``replicas`` None), else one connection per replica, made by ``connect(address)`` on first use."""

    def __init__(self, main: Connection, replicas: ReplicaSet | None, connect: Callable[[str], Connection]) -> None:
        self.main, self.replicas = main, replicas
        self._connect = connect
        self._pinned: dict[str, Connection] = {}
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def replica_for(self, session: str) -> str | None:
        """The replica address ``session``'s calls go to now (None: not pinned by this client)."""
        return None if self.replicas is None else self.ranked(session)[0]

    def ranked(self, session: str) -> list[str]:
        """The session's rendezvous order, replicas that failed recently last."""
        ranking = rendezvous_rank(session, self.replicas.addresses())
        now = time.monotonic()
        with self._lock:
            down = {a for a in ranking if self._down_until.get(a, 0.0) > now}
        return [a for a in ranking if a not in down] + [a for a in ranking if a in down]

    def connection(self, address: str) -> Connection:
        with self._lock:
            if address not in self._pinned:
                self._pinned[address] = self._connect(address).one_of(self.main)
            return self._pinned[address]

    def call(self, session: str, call: Callable[[Connection], T]) -> T:
        """``call`` on the session's replica; if that one is UNAVAILABLE (gone), on its next one.

        The call does not wait for a lost replica (the session moves on at once, and the answer's step
        reports the fresh state) unless it is the last in the ranking, the only one left (one replica,
        or all the others down): that one is waited for up to the deadline, as the target's own
        connection waits for its server."""
        if self.replicas is None:
            return call(self.main)
        failure: RemoteLossError | None = None
        ranking = self.ranked(session)
        for index, address in enumerate(ranking):
            try:
                return call(self.connection(address).waiting(index == len(ranking) - 1))
            except RemoteLossError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                failure = error
                self._mark_down(address, session, error)
        assert failure is not None
        raise failure

    def _mark_down(self, address: str, session: str, error: RemoteLossError) -> None:
        with self._lock:
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

    def close(self) -> None:
        with self._lock:
            pinned, self._pinned = list(self._pinned.values()), {}
        for connection in pinned:
            connection.close()
