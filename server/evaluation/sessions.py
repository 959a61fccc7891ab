"""Named sessions: loss modules whose state lives on the server across calls.

SeesawLoss (``cum_samples``), EQLV2Loss (gradient statistics) and GHMC/GHMR with momentum update
buffers on every forward. In a distributed experiment each worker would otherwise hold its own
copy; a session holds one module for everybody, so the state is the one a single process would
have after seeing every batch, in the order the server received them.

* A term naming a session is evaluated under that session's lock: concurrent workers are
  serialised, and each forward sees the state left by the previous one.
* Before each forward the module's state is snapshotted (a few steps deep) so that the exact
  recompute of a non-separable loss (``replay_step``) and a retried call (a ``forward_id`` seen
  before) run against the state their forward saw, on a throwaway copy: the state is never
  updated twice for one batch.
* Idle sessions expire after ``ttl_seconds``; at most ``max_sessions`` live at once.

Plain torch and threading, no gRPC: ``status.py`` maps the errors below to status codes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import LOSSES, Registry

SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")


class SessionError(ValueError):
    field = "session"


class InvalidSessionNameError(SessionError):
    """The name is empty, too long or uses characters outside ``[A-Za-z0-9._:/@+-]``."""


class UnknownSessionError(SessionError):
    """No session of that name (never created, reset, or expired)."""


class SessionConflictError(SessionError):
    """The term's config differs from the one the session was created with."""


class SessionLimitError(SessionError):
    """``max_sessions`` sessions are live already."""


class ReplayUnavailableError(SessionError):
    """The state before the requested step is no longer kept (or the step never happened)."""

    field = "replay_step"


def check_name(name: str) -> str:
    if not SESSION_NAME.fullmatch(name):
        raise InvalidSessionNameError(
            f"session must be 1-200 characters from [A-Za-z0-9._:/@+-], starting with a letter or digit, got {name!r}"
        )
    return name


def _unknown(name: str) -> UnknownSessionError:
    return UnknownSessionError(f"no session {name!r} (never created, reset, or expired)")


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclasses.dataclass
class Session:
    name: str
    config: dict[str, Any]  # normalised: every parameter present
    module: nn.Module
    last_used: float
    steps: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # step number -> the module's state just before that forward
    snapshots: collections.OrderedDict[int, dict[str, Tensor]] = dataclasses.field(
        default_factory=collections.OrderedDict
    )
    # forward_id -> step, for the steps still in ``snapshots``: a retried call is recognised
    applied: dict[str, int] = dataclasses.field(default_factory=dict)

    def state(self) -> dict[str, Tensor]:
        return _state(self.module)


class SessionStore:
    """The live sessions of one server. Thread-safe."""

    def __init__(
        self,
        registry: Registry = LOSSES,
        device: torch.device | str = "cpu",
        ttl_seconds: float = 3600.0,
        max_sessions: int = 1024,
        replay_depth: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.device = torch.device(device)
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self.replay_depth = replay_depth
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards the dict; each session has its own lock

    # -- evaluation ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(
        self, name: str, config: Mapping[str, Any], replay_step: int | None = None, forward_id: str = ""
    ) -> Iterator[tuple[nn.Module, int]]:
        """The module that evaluates one term of session ``name``, and its step number.

        * A new forward: the session's own module, held under its lock; the state it leaves is kept
          and the step counts only when the forward succeeds (a refused input leaves the session
          as it was).
        * ``replay_step``, or a ``forward_id`` the session has applied already (a retried call): a
          throwaway module with the state as it was just before that step. The session is not
          touched, so a recompute or a retry never updates the state twice.
        """
        session = self._session_for(name, config, create=replay_step is None)
        with session.lock:
            if replay_step is None and forward_id and forward_id in session.applied:
                replay_step = session.applied[forward_id]
            if replay_step is not None:
                module = self._replay_module(session, replay_step)
                session.last_used = self.clock()
                yield module, replay_step
                return
            before = session.state()
            step = session.steps + 1
            try:
                yield session.module, step
            except BaseException:
                session.module.load_state_dict(before)  # no half-updated state after a failure
                raise
            session.steps = step
            session.snapshots[step] = before
            if forward_id:
                session.applied[forward_id] = step
            while len(session.snapshots) > self.replay_depth:
                dropped, _ = session.snapshots.popitem(last=False)
                session.applied = {k: v for k, v in session.applied.items() if v != dropped}
            session.last_used = self.clock()

    def _replay_module(self, session: Session, step: int) -> nn.Module:
        snapshot = session.snapshots.get(step)
        if snapshot is None:
            kept = list(session.snapshots)
            raise ReplayUnavailableError(
                f"session {session.name!r} keeps the state before steps {kept or 'none'} (it has run "
                f"{session.steps} forwards); step {step} cannot be replayed"
            )
        module = self.registry.build(session.config).to(self.device)
        module.load_state_dict(snapshot)
        return module

    def _live(self, name: str) -> Session | None:
        """The live session of that name, after dropping expired ones. The caller holds ``_lock``."""
        self._sweep()
        return self._sessions.get(name)

    def _session_for(self, name: str, config: Mapping[str, Any], create: bool = True) -> Session:
        check_name(name)
        normalised = self.registry.normalise(config)
        with self._lock:
            session = self._live(name)
            if session is None:
                if not create:
                    raise _unknown(name)
                if len(self._sessions) >= self.max_sessions:
                    raise SessionLimitError(
                        f"{len(self._sessions)} sessions are live, the server's limit (--max-sessions); reset "
                        f"finished ones or wait for idle ones to expire after {self.ttl_seconds:g} s"
                    )
                module = self.registry.build(normalised).to(self.device)
                session = Session(name, normalised, module, last_used=self.clock())
                self._sessions[name] = session
            elif session.config != normalised:
                keys = {*session.config, *normalised}
                changed = sorted(k for k in keys if session.config.get(k) != normalised.get(k))
                raise SessionConflictError(
                    f"session {name!r} was created with {session.config['type']} config {session.config}; this term "
                    f"sends a different one (differs in: {', '.join(changed)}). Use another session name, or reset it"
                )
            session.last_used = self.clock()
            return session

    # -- reading and resetting -------------------------------------------------------------------

    def get(self, name: str) -> Session:
        check_name(name)
        with self._lock:
            session = self._live(name)
        if session is None:
            raise _unknown(name)
        return session

    def reset(self, name: str) -> Session:
        session = self.get(name)
        with session.lock, self._lock:  # waits for a forward in progress on that session
            self._sessions.pop(name, None)
        return session

    def sessions(self) -> list[Session]:
        with self._lock:
            self._sweep()
            return sorted(self._sessions.values(), key=lambda s: s.name)

    def expires_in(self, session: Session) -> float:
        return max(0.0, self.ttl_seconds - (self.clock() - session.last_used))

    def idle(self, session: Session) -> float:
        return self.clock() - session.last_used

    def _sweep(self) -> None:
        now = self.clock()
        for name in [n for n, s in self._sessions.items() if now - s.last_used > self.ttl_seconds]:
            session = self._sessions[name]
            if not session.lock.locked():  # never expire a session in the middle of a forward
                del self._sessions[name]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
