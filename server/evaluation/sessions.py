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
* A call is atomic (:class:`Transaction`): every session its terms name (to feed or to replay) is locked
  for the whole call, all of them before its first term, in name order, and what the call did to them is
  kept only if every term succeeded. A refused or failed call creates no session and changes no state,
  whichever of its terms failed, and leaves no session locked. A call waiting for a session another call
  holds stops waiting once its caller is gone.
* Sessions belong to an owner (the caller's token when tokens are on; one shared owner otherwise, or
  with sharing turned on): an owner sees, reads, feeds and resets only its own sessions, and two owners
  may each have a session of the same name.
* Idle sessions expire after ``ttl_seconds``; at most ``max_sessions`` live at once, holding at most
  ``max_bytes`` of state (the module's state and its replay snapshots); a token's sessions at most
  ``per_owner`` of each (:class:`OwnerLimits`).

Plain torch and threading, no gRPC: the front doors map the errors below to status codes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import LOSSES, Registry
from .errors import check_cancelled

SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
# A session keeps its config for as long as it lives (twice: as sent, and in its module), and ListSessions
# sends every one back. A stateful loss's config is a few hundred bytes (a class_weight of 1203 classes is
# ~25 KB as JSON); a session's config is at most this many bytes as JSON, and counted against the
# sessions' bytes at CONFIG_COPIES times that (measured: 4.4 MB of memory per session for a 1.9 MB config).
MAX_SESSION_CONFIG_BYTES = 64 << 10
CONFIG_COPIES = 3
# a call waiting for a session another call holds looks this often whether its caller is still there
LOCK_WAIT_SLICE_SECONDS = 0.05


class SessionError(ValueError):
    field = "session"


class EnteringError(Exception):
    """``error`` arose while a call's session ``session`` was entered (before any term ran)."""

    def __init__(self, session: str, error: Exception) -> None:
        super().__init__(str(error))
        self.session, self.error = session, error


class InvalidSessionNameError(SessionError):
    """The name is empty, too long or uses characters outside ``[A-Za-z0-9._:/@+-]``."""


class UnknownSessionError(SessionError):
    """No session of that name (never created, reset, or expired)."""


class SessionConflictError(SessionError):
    """The term's config differs from the one the session was created with."""


class SessionLimitError(SessionError):
    """``max_sessions`` sessions are live already, or a new one would hold more state than is left."""


class ReplayUnavailableError(SessionError):
    """The state before the requested step is no longer kept (or the step never happened)."""

    field = "replay_step"


class SessionConfigError(SessionLimitError):
    """The config is too big to be kept by a session."""

    field = "config"


def check_name(name: str) -> str:
    if not SESSION_NAME.fullmatch(name):
        raise InvalidSessionNameError(
            f"session must be 1-200 characters from [A-Za-z0-9._:/@+-], starting with a letter or digit, got {name!r}"
        )
    return name


def config_bytes(config: Mapping[str, Any]) -> int:
    """``config``'s size as JSON, refused (SessionConfigError) over ``MAX_SESSION_CONFIG_BYTES``."""
    size = len(json.dumps(config, default=repr))
    if size > MAX_SESSION_CONFIG_BYTES:
        raise SessionConfigError(
            f"a session keeps its config for as long as it lives, so it is at most {MAX_SESSION_CONFIG_BYTES} bytes "
            f"as JSON; this one is {size}. Evaluate this config without a session (it keeps no state between "
            "calls unless its loss does)"
        )
    return size


def _unknown(name: str) -> UnknownSessionError:
    return UnknownSessionError(f"no session {name!r} (never created, reset, or expired)")


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclasses.dataclass
class Session:
    name: str
    config: dict[str, Any]  # normalised: every parameter present
    module: nn.Module
    last_used: float
    owner: str = ""  # who may use it: a token's digest, or "" (every caller) without tokens
    nbytes: int = 0  # its state's bytes (once for the module, once per replay snapshot) and its config's
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


@dataclasses.dataclass(frozen=True)
class OwnerLimits:
    """What one token's sessions may hold (None: only the server's totals). They bound owners that are
    tokens (tokens on, sessions not shared), so that one token cannot take every caller's room; without
    tokens every caller is the one anonymous owner, and the totals are its limits."""

    sessions: int | None = None
    bytes: int | None = None


class SessionStore:
    """The live sessions of one server, by owner and name. Thread-safe."""

    def __init__(
        self,
        registry: Registry = LOSSES,
        device: torch.device | str = "cpu",
        ttl_seconds: float = 3600.0,
        max_sessions: int = 1024,
        replay_depth: int = 4,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
        per_owner: OwnerLimits | None = None,
    ) -> None:
        self.registry = registry
        self.device = torch.device(device)
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self.replay_depth = replay_depth
        self.max_bytes = max_bytes
        self.per_owner = per_owner if per_owner is not None else OwnerLimits()
        self.clock = clock
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.Lock()  # guards the dict; each session has its own lock

    # -- evaluation ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(
        self,
        owner: str,
        sessions: Mapping[str, Mapping[str, Any]],
        replayed: Mapping[str, Mapping[str, Any]] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[Transaction]:
        """The sessions a call feeds (``sessions``) and those it only replays (``replayed``; name -> the
        config of its terms), all locked before the call's first term, in name order, for the whole call.
        A call never takes a lock while it holds one of a later name, so two calls never wait for each
        other crosswise. Sessions fed that do not exist yet are created for the call and kept only if the
        call succeeds; on any failure every session is put back as it was before the call. While a session
        is busy with another call, ``cancelled()`` is asked between short waits: a caller gone stops the
        wait (CallCancelledError)."""
        transaction = Transaction(self, owner, cancelled)
        replayed = {name: config for name, config in (replayed or {}).items() if name not in sessions}
        try:
            for name in sorted({*sessions, *replayed}):
                try:
                    if name in sessions:
                        transaction.enter(name, sessions[name])
                    else:
                        transaction.enter_replayed(name, replayed[name])
                except Exception as error:  # the caller names the term that named it
                    raise EnteringError(name, error) from None
            yield transaction
        except BaseException:
            transaction.roll_back()
            raise
        else:
            transaction.commit()
        finally:
            transaction.release()

    @contextlib.contextmanager
    def open(
        self, name: str, config: Mapping[str, Any], replay_step: int | None = None, forward_id: str = ""
    ) -> Iterator[tuple[nn.Module, int]]:
        """One term of session ``name`` in a call of its own (see :meth:`transaction`); the engine's own
        error when it cannot be entered."""
        fed, replayed = ({}, {name: config}) if replay_step is not None else ({name: config}, {})
        try:
            with (
                self.transaction("", fed, replayed) as transaction,
                transaction.open(name, config, replay_step, forward_id) as opened,
            ):
                yield opened
        except EnteringError as entering:  # one term: no other term to tell it from
            raise entering.error from None

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

    def _live(self, owner: str, name: str) -> Session | None:
        """The live session, after dropping expired ones. The caller holds ``_lock``."""
        self._sweep()
        return self._sessions.get((owner, name))

    def _existing(self, owner: str, name: str, normalised: Mapping[str, Any]) -> Session | None:
        """The live session ``name`` of ``owner`` (None if there is none), refused if its config differs."""
        with self._lock:
            session = self._live(owner, name)
        if session is not None and session.config != normalised:
            keys = {*session.config, *normalised}
            changed = sorted(k for k in keys if session.config.get(k) != normalised.get(k))
            raise SessionConflictError(
                f"session {name!r} was created with {session.config['type']} config {session.config}; this term "
                f"sends a different one (differs in: {', '.join(changed)}). Use another session name, or reset it"
            )
        return session

    def _new(self, owner: str, name: str, normalised: dict[str, Any]) -> tuple[Session, bool]:
        """A session for the call that creates it (counted at once against the limits, kept by commit),
        already locked for that call (no other call uses it before that call's end), and True; or the one
        another call created meanwhile (not locked, and perhaps of another config), and False."""
        kept = CONFIG_COPIES * config_bytes(normalised)
        with self._lock:
            self._check_count(owner)
        self._check_room(owner, name, self.registry.estimate(normalised).module_bytes * (1 + self.replay_depth) + kept)
        module = self.registry.build(normalised).to(self.device)  # outside the store's lock: it allocates
        nbytes = _nbytes(module.state_dict()) * (1 + self.replay_depth) + kept
        session = Session(name, normalised, module, last_used=self.clock(), owner=owner, nbytes=nbytes)
        session.lock.acquire()  # a fresh lock: free. Taken before others can find the session
        with self._lock:
            raced = self._live(owner, name)
            if raced is not None:  # another call created it meanwhile: that one is the session
                return raced, False
            self._check_room(owner, name, nbytes, locked=True)
            self._check_count(owner)
            self._sessions[(owner, name)] = session
        return session, True

    def _check_count(self, owner: str) -> None:
        """A SessionLimitError when no new session may live now: the server's count, or the token's (under
        the store's lock)."""
        recover = f"reset finished ones or wait for idle ones to expire after {self.ttl_seconds:g} s"
        if len(self._sessions) >= self.max_sessions:  # how many are others' is not this caller's to know
            raise SessionLimitError(f"the server holds its most sessions (--max-sessions); {recover}")
        limit = self.per_owner.sessions if owner else None
        owned = sum(1 for key in self._sessions if key[0] == owner) if limit is not None else 0
        if limit is not None and owned >= limit:
            raise SessionLimitError(
                f"this token has {owned} live sessions, the server's limit per token (--max-sessions-per-token); "
                f"{recover}"
            )

    def _check_room(self, owner: str, name: str, nbytes: int, locked: bool = False) -> None:
        """A SessionLimitError unless the sessions' state, and the token's, have room for ``nbytes`` more
        (estimated before the module is built, then as built)."""
        limit = self.per_owner.bytes if owner else None
        if self.max_bytes is None and limit is None:
            return
        with contextlib.nullcontext() if locked else self._lock:
            held = sum(s.nbytes for s in self._sessions.values())
            owned = sum(s.nbytes for key, s in self._sessions.items() if key[0] == owner) if limit is not None else 0
        what = (
            f"session {name!r} would hold {nbytes} bytes of state (its module and {self.replay_depth} replay "
            "snapshots, and its config)"
        )
        if self.max_bytes is not None and held + nbytes > self.max_bytes:
            raise SessionLimitError(
                f"{what}; the sessions hold {held} of the server's {self.max_bytes} "
                "(losswire serve --max-session-bytes)"
            )
        if limit is not None and owned + nbytes > limit:
            raise SessionLimitError(
                f"{what}; this token's sessions hold {owned} of the {limit} a token may hold "
                "(losswire serve --max-session-bytes-per-token)"
            )

    def _forget(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get((session.owner, session.name)) is session:
                del self._sessions[(session.owner, session.name)]

    # -- reading and resetting -------------------------------------------------------------------

    def get(self, name: str, owner: str = "") -> Session:
        check_name(name)
        with self._lock:
            session = self._live(owner, name)
        if session is None:
            raise _unknown(name)
        return session

    def reset(self, name: str, owner: str = "", cancelled: Callable[[], bool] | None = None) -> Session:
        """Drop session ``name`` once no call is using it (waited for while ``cancelled()`` is false)."""
        session = self.get(name, owner)
        with holding(session, cancelled):
            self._forget(session)
        return session

    def sessions(self, owner: str | None = None) -> list[Session]:
        """Every live session of ``owner`` (None: of every owner)."""
        with self._lock:
            self._sweep()
            found = [s for s in self._sessions.values() if owner is None or s.owner == owner]
        return sorted(found, key=lambda s: s.name)

    def expires_in(self, session: Session) -> float:
        return max(0.0, self.ttl_seconds - (self.clock() - session.last_used))

    def idle(self, session: Session) -> float:
        return self.clock() - session.last_used

    @property
    def nbytes(self) -> int:
        """Bytes of state the live sessions hold (modules and replay snapshots)."""
        with self._lock:
            return sum(s.nbytes for s in self._sessions.values())

    def _sweep(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if now - s.last_used > self.ttl_seconds]:
            session = self._sessions[key]
            if not session.lock.locked():  # never expire a session in the middle of a call
                del self._sessions[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


@dataclasses.dataclass
class _Touched:
    """A session as one call found it: what to put back if the call fails."""

    session: Session
    created: bool
    state: dict[str, Tensor]
    steps: int
    snapshots: collections.OrderedDict[int, dict[str, Tensor]]
    applied: dict[str, int]


def acquire(session: Session, cancelled: Callable[[], bool] | None) -> None:
    """Take ``session``'s lock, waiting for the call that holds it to end while the waiting caller is there:
    ``cancelled()`` is asked between short waits (CallCancelledError once it is true)."""
    while not session.lock.acquire(timeout=LOCK_WAIT_SLICE_SECONDS):
        check_cancelled(cancelled, f"waiting for session {session.name!r}, which another call holds")


@contextlib.contextmanager
def holding(session: Session, cancelled: Callable[[], bool] | None) -> Iterator[Session]:
    """``session`` locked for the block (see :func:`acquire`)."""
    acquire(session, cancelled)
    try:
        yield session
    finally:
        session.lock.release()


class Transaction:
    """The sessions of one call (see ``SessionStore.transaction``): held locked until the call ends."""

    def __init__(self, store: SessionStore, owner: str, cancelled: Callable[[], bool] | None = None) -> None:
        self.store, self.owner, self.cancelled = store, owner, cancelled
        self._touched: dict[str, _Touched] = {}  # the sessions the call feeds
        self._replayed: dict[str, Session] = {}  # those it only replays (reads)

    def enter(self, name: str, config: Mapping[str, Any]) -> None:
        """Lock session ``name`` for this call to feed, creating it (for this call) when it does not exist."""
        session, created = self._locked(name, config, create=True)
        try:
            touched = _Touched(
                session, created, session.state(), session.steps, session.snapshots.copy(), dict(session.applied)
            )
        except BaseException:  # e.g. out of memory copying its state: the call never had it
            if created:
                self.store._forget(session)
            session.lock.release()
            raise
        self._touched[name] = touched

    def enter_replayed(self, name: str, config: Mapping[str, Any]) -> None:
        """Lock session ``name``, which must exist, for this call to replay (read) its snapshots."""
        session, _ = self._locked(name, config, create=False)
        self._replayed[name] = session

    def _locked(self, name: str, config: Mapping[str, Any], create: bool) -> tuple[Session, bool]:
        """Session ``name`` of this config, locked for this call (created for it when ``create`` and it does
        not exist), and whether this call created it. The lock is held only when this returns: whatever is
        raised after taking it (a config conflict found once it was free) releases it first."""
        check_name(name)
        normalised = self.store.registry.normalise(config)
        while True:
            session = self.store._existing(self.owner, name, normalised)
            if session is None and not create:
                raise _unknown(name)
            if session is None:
                session, created = self.store._new(self.owner, name, normalised)
                if created:  # locked by _new, before any other call could find it
                    return session, True
            acquire(session, self.cancelled)
            try:
                # another call may have created it meanwhile with another config (a conflict), or reset it,
                # or it expired, while this call waited
                current = self.store._existing(self.owner, name, normalised)
            except BaseException:
                session.lock.release()
                raise
            if current is session:
                return session, False
            session.lock.release()  # not the live session any more: take the live one afresh

    @contextlib.contextmanager
    def open(
        self, name: str, config: Mapping[str, Any], replay_step: int | None = None, forward_id: str = ""
    ) -> Iterator[tuple[nn.Module, int]]:
        """The module that evaluates one term of session ``name``, and its step number.

        * A new forward: the session's own module; the step counts when the forward succeeds, and the
          state before it is kept for replays (a refused input leaves the session as it was).
        * ``replay_step``, or a ``forward_id`` the session has applied already (a retried call): a
          throwaway module with the state as it was just before that step. The session is not touched,
          so a recompute or a retry never updates the state twice.
        """
        touched = self._touched.get(name)
        replayed = self._replayed.get(name)
        if touched is None and (replayed is None or replay_step is None):
            # every lock is taken up front, in name order: one taken now could deadlock with another call
            raise RuntimeError(f"session {name!r} was not entered for this call (SessionStore.transaction)")
        session: Session = touched.session if touched is not None else replayed  # type: ignore[assignment]
        if session.config != self.store.registry.normalise(config):  # two terms, one session, two configs
            self.store._existing(self.owner, name, self.store.registry.normalise(config))  # raises the conflict
        if replay_step is None and forward_id and forward_id in session.applied:
            replay_step = session.applied[forward_id]
        if replay_step is not None:
            module = self.store._replay_module(session, replay_step)
            session.last_used = self.store.clock()
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
        while len(session.snapshots) > self.store.replay_depth:
            dropped, _ = session.snapshots.popitem(last=False)
            session.applied = {k: v for k, v in session.applied.items() if v != dropped}

    def commit(self) -> None:
        now = self.store.clock()
        for touched in self._touched.values():
            touched.session.last_used = now

    def roll_back(self) -> None:
        """Every session as the call found it; those the call created are gone."""
        for touched in self._touched.values():
            session = touched.session
            if touched.created:
                self.store._forget(session)
                continue
            session.module.load_state_dict(touched.state)
            session.steps, session.snapshots, session.applied = touched.steps, touched.snapshots, touched.applied

    def release(self) -> None:
        for touched in self._touched.values():
            touched.session.lock.release()
        for session in self._replayed.values():
            session.lock.release()
        self._touched.clear()
        self._replayed.clear()
