"""Calls racing for sessions: none of them leaves a session locked, deadlocks, or keeps a caller that left.

* Two calls creating one new session with different configs: one creates it, the other is refused
  FAILED_PRECONDITION, and the session stays usable (its lock is not leaked). Through the server such
  calls take their turns on the session before either starts; the session store, which other code
  uses directly, is raced in threads of the test's own.
* Two calls that each feed one session and replay the other both finish (a call takes every session
  lock it needs up front, in one order).
* A call waiting for a session another call holds waits as a coroutine, on no compute thread, and stops
  waiting when its caller cancels or its deadline passes, answered CANCELLED / DEADLINE_EXCEEDED; the
  session is left as the holder leaves it.
* A ``forward_id`` (kept by the session for retries) longer than 128 characters is refused.

The server runs in this process so that test losses can hold calls at a known point (gates, and a
rendezvous of two module builds) without sleeping. A regression here would leave compute threads blocked
on a session's lock for good: every test ends by checking that no session stays locked, releasing any
that does so that those threads end and the run fails instead of hanging.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterator
from types import ModuleType

import grpc
import pytest
import torch
from support.calls import field_of, plain_channel
from support.faults import load_fault_losses
from support.in_process import DEVICE, running_server
from support.logs import LogWatch, watching_server_log
from support.polling import wait_until
from torch import Tensor

from losswire.server.app import LosswireServer
from losswire.server.evaluation.sessions import Session, SessionStore
from losswire.server.losses import Registry, WeightedLoss
from losswire.server.losses.pipeline import AvgFactor, Reduction, ReductionOverride
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec

WAIT = 30.0  # the most any single wait here may take before the test fails
SHORT = 5.0  # the deadline of a call that must not wait for a session lock at all
EXPIRING = 2.0  # the deadline of a call that is meant to expire while it waits for a session
SETTLE = 5.0  # how long a test's calls may take to release their sessions once it has ended


# -- a loss whose builds meet: two calls creating one session, both past "it does not exist yet" -----

_meetings = threading.Condition()
_builds: collections.Counter[str] = collections.Counter()


class MeetingL1Loss(WeightedLoss):
    """L1 loss ``|pred - target|`` whose construction waits until a second module of the same ``meeting``
    is being built (a test loss). Two calls that create one session build its module once each: when
    both builds have begun, both calls have found that the session does not exist yet.

    Args:
        meeting: the name of the rendezvous; every build after the second passes at once.
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")

    def __init__(self, meeting: str = "default", reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.meeting = meeting
        with _meetings:
            _builds[meeting] += 1
            _meetings.notify_all()
            if not _meetings.wait_for(lambda: _builds[meeting] >= 2, WAIT):
                raise AssertionError(f"only one module of meeting {meeting!r} was built within {WAIT} s")

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        return self.finish((pred - target).abs(), weight, reduction, avg_factor)


# -- the server, its log, and what its threads are doing ----------------------------------------------


@pytest.fixture(scope="module")
def fault_losses() -> tuple[ModuleType, Registry]:
    faults, registry = load_fault_losses()
    registry.register_module(module=MeetingL1Loss)
    return faults, registry


@pytest.fixture(scope="module")
def faults(fault_losses) -> ModuleType:
    return fault_losses[0]


@pytest.fixture(scope="module")
def server(fault_losses) -> Iterator[LosswireServer]:
    with running_server(fault_losses[1], grace=1, max_workers=8, device=DEVICE) as instance:
        yield instance


@pytest.fixture
def stub(server) -> Iterator[pb_grpc.LossServiceStub]:
    with plain_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.fixture
def gate(faults) -> Iterator[str]:
    """A gate of this test's own; opened at teardown, so no server thread stays blocked on it."""
    name = f"gate-{uuid.uuid4().hex[:8]}"
    yield name
    faults.open_gate(name)


@pytest.fixture(autouse=True)
def no_session_left_locked(server) -> Iterator[None]:
    """After the test (its gates opened: this fixture is torn down last) no session stays locked. One
    that does would block every later call naming it, and the compute threads blocked on it would keep
    the interpreter from exiting: its lock is released so that they end, and the test errors."""
    yield
    settled = time.monotonic() + SETTLE
    while locked_sessions(server) and time.monotonic() < settled:
        time.sleep(0.05)  # calls the test has left behind end on their own
    forced: set[str] = set()
    for _ in range(100):  # a deadlocked pair relocks what it is given: unwind it lock by lock
        stuck = locked_sessions(server)
        if not stuck:
            break
        for session in stuck:
            if session.lock.locked():
                session.lock.release()
                forced.add(session.name)
        time.sleep(0.05)  # the threads blocked on it take it, finish, and let it go
    assert not forced, f"sessions {sorted(forced)} stayed locked after the test's calls ended"


def locked_sessions(server: LosswireServer) -> list[Session]:
    return [session for session in server.sessions.sessions() if session.lock.locked()]


def session_locked(server: LosswireServer, name: str) -> bool:
    return any(session.name == name for session in locked_sessions(server))


def calls_waiting_for_sessions(server: LosswireServer) -> int:
    """Calls waiting for their turn on a session another call holds (as coroutines, before a thread)."""
    return server.compute.sessions.waiting


def compute_threads_held(server: LosswireServer) -> int:
    return server.compute.shares.held


@pytest.fixture
def server_log() -> Iterator[LogWatch]:
    with watching_server_log() as watch:
        yield watch


# -- requests ------------------------------------------------------------------------------------------


def term(config: dict, name: str = "", session: str = "", **fields) -> pb.LossTerm:
    message = pb.LossTerm(name=name, session=session, **fields)
    codec.encode_config(config, message.config)
    codec.encode_tensor(torch.ones(4), message.pred)
    codec.encode_value(torch.zeros(4), message.target)
    return message


def l1(name: str = "", session: str = "", **fields) -> pb.LossTerm:
    return term({"type": "L1Loss"}, name, session, **fields)


def gated(gate: str, name: str = "", session: str = "") -> pb.LossTerm:
    return term({"type": "GatedL1Loss", "gate": gate}, name, session)


def status_of(call: grpc.Future) -> grpc.StatusCode:
    """How ``call`` ended (its deadline is below ``WAIT``: a call stuck on the server ends expired)."""
    error = call.exception(timeout=WAIT)
    return grpc.StatusCode.OK if error is None else error.code()


def steps_of(stub: pb_grpc.LossServiceStub, session: str) -> int:
    """The session's step count, by GetSession, which waits for the session's lock."""
    try:
        return stub.GetSession(pb.SessionRequest(session=session), timeout=SHORT).steps
    except grpc.RpcError as error:
        raise AssertionError(f"GetSession({session!r}) answered {error.code().name}: {error.details()}") from None


# -- 1. two calls creating one session with different configs -----------------------------------------


def test_two_calls_creating_one_session_with_different_configs_leave_it_usable(fault_losses):
    """Two threads enter one new session of a store at once, each past "it does not exist yet" (their
    module builds meet): one creates it, the other finds the conflict, and neither keeps its lock."""
    store = SessionStore(fault_losses[1], torch.device(DEVICE))
    session, meeting = f"race/{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    configs = [{"type": "MeetingL1Loss", "meeting": meeting, "loss_weight": weight} for weight in (0.5, 0.75)]
    outcomes: list[BaseException | None] = [None, None]

    def create(index: int) -> None:
        try:
            with store.open(session, configs[index]) as (module, _):
                module(torch.ones(4), torch.zeros(4))
        except BaseException as error:
            outcomes[index] = error

    threads = [threading.Thread(target=create, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads), "the two creations deadlocked"
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["NoneType", "SessionConflictError"]
    # the refused creation found the session its rival created: it must not keep that session's lock
    (created,) = [s for s in store.sessions() if s.name == session]
    assert not created.lock.locked()
    assert created.steps == 1
    with store.open(session, configs[outcomes.index(None)]) as (_, step):
        assert step == 2


def test_calls_creating_one_session_through_the_server_take_turns(server, stub):
    """Through the server the same two calls never race: the second waits for the first, then finds
    the session it created (with another config)."""
    session = f"turns/{uuid.uuid4().hex[:8]}"
    configs = [{"type": "L1Loss", "loss_weight": weight} for weight in (0.5, 0.75)]
    requests = [pb.EvaluateRequest(terms=[term(config, session=session)]) for config in configs]
    calls = [stub.Evaluate.future(request, timeout=WAIT - 5) for request in requests]
    statuses = [status_of(call) for call in calls]
    assert sorted(status.name for status in statuses) == ["FAILED_PRECONDITION", "OK"]
    assert steps_of(stub, session) == 1


# -- 2. two calls each feeding one session and replaying the other ------------------------------------


def test_two_calls_each_feeding_one_session_and_replaying_the_other_both_finish(server, stub, faults, gate):
    first, second = f"{gate}/a", f"{gate}/b"
    for session in (first, second):  # step 1 of each, replayable
        stub.Evaluate(pb.EvaluateRequest(terms=[l1(session=session)]), timeout=SHORT)
    crosswise = [
        pb.EvaluateRequest(terms=[gated(gate, "hold"), l1("feed", fed), l1("replay", replayed, replay_step=1)])
        for fed, replayed in ((second, first), (first, second))
    ]
    calls = [stub.Evaluate.future(request, timeout=WAIT - 5) for request in crosswise]

    # both calls are held at their first term until both sessions are locked and the second call is in
    # (in its first term too, or waiting for a lock): calls that hold one session each deadlock from there
    def both_calls_in() -> bool:
        both_locked = session_locked(server, first) and session_locked(server, second)
        return both_locked and (faults.started(gate) == 2 or calls_waiting_for_sessions(server) >= 1)

    wait_until(both_calls_in, "both calls holding or waiting for the sessions")
    faults.open_gate(gate)
    assert [status_of(call) for call in calls] == [grpc.StatusCode.OK] * 2, "the crosswise calls deadlocked"
    for call in calls:
        results = call.result().results
        assert (results[1].session_step, results[2].session_step) == (2, 1)
    assert (steps_of(stub, first), steps_of(stub, second)) == (2, 2)


# -- 3. a call waiting for a busy session, whose caller leaves ----------------------------------------


@pytest.mark.parametrize("leaving", ["cancels", "expires"])
def test_a_call_waiting_for_a_busy_session_stops_when_its_caller_leaves(
    server, stub, faults, gate, server_log, leaving
):
    session = f"busy/{gate}"
    holder = stub.Evaluate.future(pb.EvaluateRequest(terms=[gated(gate, session=session)]), timeout=WAIT)
    faults.wait_started(gate, 1, WAIT)  # in its forward, holding the session's lock
    mark = server_log.mark()
    deadline = WAIT if leaving == "cancels" else EXPIRING
    waiter = stub.Evaluate.future(pb.EvaluateRequest(terms=[gated(gate, session=session)]), timeout=deadline)
    wait_until(lambda: calls_waiting_for_sessions(server) >= 1 or waiter.done(), "the second call waits")
    assert compute_threads_held(server) == 1, "the waiting call holds a compute thread"
    if leaving == "cancels":
        waiter.cancel()
    code = "CANCELLED" if leaving == "cancels" else "DEADLINE_EXCEEDED"
    # logged once the waiting call's work has ended: while the holder still holds the session
    server_log.wait_for(rf"Evaluate stopped \({code}\): waiting for session", mark, WAIT - 10)
    assert faults.started(gate) == 1, "the waiting call ran its forward"
    faults.open_gate(gate)
    assert holder.result(timeout=WAIT).results[0].session_step == 1
    assert steps_of(stub, session) == 1


@pytest.mark.parametrize("method", ["GetSession", "ResetSession"])
def test_reading_or_resetting_a_busy_session_stops_waiting_when_the_deadline_passes(
    server, stub, faults, gate, server_log, method
):
    """GetSession and ResetSession wait for the call using the session (a consistent state), as
    coroutines: past their deadline they stop waiting, while the holder still runs."""
    session = f"read/{gate}"
    holder = stub.Evaluate.future(pb.EvaluateRequest(terms=[gated(gate, session=session)]), timeout=WAIT)
    faults.wait_started(gate, 1, WAIT)  # in its forward, holding the session's lock
    mark = server_log.mark()
    with pytest.raises(grpc.RpcError) as expired:
        getattr(stub, method)(pb.SessionRequest(session=session), timeout=EXPIRING)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server_log.wait_for(rf"{method} stopped \(DEADLINE_EXCEEDED\): .*waiting for session", mark, WAIT - 10)
    assert not holder.done()
    faults.open_gate(gate)
    assert holder.result(timeout=WAIT).results[0].session_step == 1
    assert steps_of(stub, session) == 1  # and the session is there: the reset that gave up did nothing


# -- 4. forward_id's length --------------------------------------------------------------------------


def test_a_forward_id_over_128_characters_is_refused(server, stub):
    session = f"ids/{uuid.uuid4().hex[:8]}"
    request = pb.EvaluateRequest(terms=[l1("a", session), l1("b", session + "-2", forward_id="f" * 129)])
    with pytest.raises(grpc.RpcError) as refused:
        stub.Evaluate(request, timeout=SHORT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(refused.value) == "terms[1].forward_id"
    assert "at most 128 characters" in refused.value.details() and "129" in refused.value.details()
    assert not [s for s in server.sessions.sessions() if s.name.startswith(session)], "a refused call made a session"
    accepted = stub.Evaluate(pb.EvaluateRequest(terms=[l1(session=session, forward_id="f" * 128)]), timeout=SHORT)
    assert accepted.results[0].session_step == 1
