"""Sessions on the client's side: noticing a state that restarted, and the private sessions of modules.

A named session (``RemoteLoss(..., session='exp42/roi_head')``) is shared by every module and worker
naming it. A stateful loss without a name gets a **private session**: a unique name of its module's
own, so that its state lives on the server for the life of that module, as a local module's buffers
would. It is dropped (``ResetSession``) when the module is garbage-collected or the process exits,
best effort; the server's ``--session-ttl`` expires whatever a crashed process left behind.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import grpc

from losswire.v1 import loss_service_pb2 as pb

from .errors import RemoteLossError

log = logging.getLogger("losswire.client")

# Private session names: "private/" and 32 hex digits, inside the server's session name pattern
# ([A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199})
PRIVATE_PREFIX = "private/"
# How long a dropped module's ResetSession may take (in the background; at exit, each of them)
DROP_TIMEOUT_SECONDS = 2.0


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


def sessions_of(request: pb.EvaluateRequest) -> list[str]:
    """The sessions a request's terms name, each once, in order."""
    return list(dict.fromkeys(term.session for term in request.terms if term.session))


class SessionSteps:
    """The highest step this client saw answered for each session, to notice a session that restarted.

    ``on_restart``: ``"warn"`` logs a warning on ``losswire.client``, ``"raise"`` raises
    :class:`SessionRestartedError`."""

    def __init__(self, on_restart: Literal["warn", "raise"] = "warn") -> None:
        if on_restart not in ("warn", "raise"):
            raise ValueError(f"on_session_restart must be 'warn' or 'raise', got {on_restart!r}")
        self.on_restart = on_restart
        self._steps: dict[str, tuple[int, str]] = {}  # session -> (step, that term's forward_id)
        self._lock = threading.Lock()

    def baselines(self, sessions: Sequence[str]) -> dict[str, tuple[int, str]]:
        """What this client had seen of each session when the request left: a call in flight at the
        same time may be answered an earlier step, which is no restart."""
        with self._lock:
            return {session: self._steps[session] for session in sessions if session in self._steps}

    def check(
        self, request: pb.EvaluateRequest, response: pb.EvaluateResponse, baselines: Mapping[str, tuple[int, str]]
    ) -> None:
        """Record the answered steps; warn or raise for each session whose step went backwards."""
        restarts: dict[str, tuple[int, int]] = {}
        with self._lock:
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
            if self.on_restart == "raise":
                raise error
            log.warning("losswire %s", error.details)

    def forget(self, session: str) -> None:
        """A reset of our own: the next step 1 is no restart."""
        with self._lock:
            self._steps.pop(session, None)


# -- private sessions ------------------------------------------------------------------------------------


class _Resetter(Protocol):
    def reset_session(self, session: str, timeout: float | None = None) -> Any: ...


class PrivateSession:
    """The session of one module's own: a unique name, and whether a term has named it yet (only then
    does the server hold it). ``client`` drops it on the server (its ``reset_session``)."""

    def __init__(self, client: _Resetter, config: bytes) -> None:
        self.name = f"{PRIVATE_PREFIX}{uuid.uuid4().hex}"
        self.config = config  # the encoded loss config it was created for: another config, another session
        self.client = client
        self.used = False
        self.dropped = False
        self._pid = os.getpid()  # a forked child does not drop its parent's sessions
        _LIVE.add(self)

    def drop(self, timeout: float = DROP_TIMEOUT_SECONDS) -> None:
        """ResetSession now, once, best effort (a server that is gone forgets it anyway)."""
        _LIVE.discard(self)
        if not self._claim():
            return
        try:
            self.client.reset_session(self.name, timeout)
        except (RemoteLossError, ValueError) as error:
            log.debug("losswire: private session %s was not dropped (%s)", self.name, error)

    def drop_later(self) -> None:
        """Drop it from the background thread: a module's finalizer may run on any thread, inside a
        lock or a gRPC callback, where a blocking call could deadlock."""
        if self.used and not self.dropped:
            _DROPPER.put(self)
        else:
            _LIVE.discard(self)

    def _claim(self) -> bool:
        """Whether this process should drop the session now (used, not dropped, its own); marks it dropped."""
        if self.dropped or not self.used or os.getpid() != self._pid:
            return False
        self.dropped = True
        return True


class _LiveSessions:
    """Every private session not dropped yet, for the exit handler (a set with a lock)."""

    def __init__(self) -> None:
        self._sessions: set[PrivateSession] = set()
        self._lock = threading.Lock()

    def add(self, session: PrivateSession) -> None:
        with self._lock:
            self._sessions.add(session)

    def discard(self, session: PrivateSession) -> None:
        with self._lock:
            self._sessions.discard(session)

    def take_all(self) -> list[PrivateSession]:
        with self._lock:
            sessions, self._sessions = list(self._sessions), set()
        return sessions


class _Dropper:
    """One daemon thread that drops the private sessions of collected modules, started on first use."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[PrivateSession] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, session: PrivateSession) -> None:
        self._queue.put(session)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="losswire-session-drop", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._queue.get().drop()


_LIVE = _LiveSessions()
_DROPPER = _Dropper()


@atexit.register
def _drop_at_exit() -> None:
    """At exit, drop what live modules still hold (finalizers do not run then). A server that cannot be
    reached skips the rest of its sessions, so a dead server costs one timeout, not one per module."""
    unreachable: set[int] = set()
    for session in _LIVE.take_all():
        if id(session.client) in unreachable or not session._claim():
            continue
        try:
            session.client.reset_session(session.name, DROP_TIMEOUT_SECONDS)
        except RemoteLossError as error:
            if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                unreachable.add(id(session.client))
        except ValueError:
            pass
