"""A server restarted under a running client: stateless calls wait for it, sessions report the restart.

A central loss service restarts (deploys, node drains) while training jobs call it. Once a client's
server has answered, a call made while it is away waits for it (gRPC's wait-for-ready) and is sent when
it is back, within the call's deadline; the channel dials again every half second at most, so a server
that is back is noticed at once. A session's state lives in one server process: a call on a session
across the restart is answered from a fresh state, and the client warns or raises
``SessionRestartedError``. A target never reached still fails fast (``tests/client/test_connect.py``).

Before the client waited (same scenario: a server on a fixed port stopped with SIGTERM and started again
1.5 s later, 60 s deadline), a call made during the outage failed after ~1.5 s, 6 of 6, and the first
call after the server said SERVING again failed 3 of 6 (the channel was still backing off).

The slow tests restart ``losswire serve`` subprocesses on a fixed loopback port; the fast ones restart an
in-process server the same way.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.calls import plain_channel
from support.servers import START_TIMEOUT, ServerProcess, serve_cmd, server_env

from losswire.client import LossClient, RemoteLoss, RemoteLossError, SessionRestartedError
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig

DEADLINE = 60.0  # the clients' deadline: far longer than any outage here
GAP = 1.5  # seconds between the old server's exit and the new one's start
REPEATS = 6
SEESAW = dict(type="SeesawLoss", num_classes=4)  # stateful: every call is a session call
# an outage longer than gRPC's retry policy (5 attempts, at most 0.1 + 0.2 + 0.4 + 0.8 s of backoff), which
# rides out a shorter one by itself
RETRIES_OUTLASTED = 2.5


def free_port() -> int:
    """A loopback port nothing listens on now (bound once, then released), for a server to restart on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def l1_batch(elements: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(float(elements)), torch.zeros(elements)


def seesaw_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 6, generator=generator), torch.randint(0, 5, (6,), generator=generator)


def wait_serving(target: str, timeout: float = START_TIMEOUT) -> None:
    """Until the server at ``target`` answers its health check SERVING (a channel of its own)."""
    deadline = time.monotonic() + timeout
    with plain_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            assert time.monotonic() < deadline, f"{target} not SERVING within {timeout} s"
            time.sleep(0.01)


@dataclass
class Outcome:
    """One call: when it started and ended (monotonic seconds) and what it raised (None: it succeeded)."""

    started: float
    ended: float
    error: BaseException | None


def timed(call: Callable[[], object]) -> Outcome:
    started = time.monotonic()
    try:
        call()
    except Exception as error:  # every one is a failure the caller would have seen
        return Outcome(started, time.monotonic(), error)
    return Outcome(started, time.monotonic(), None)


class InBackground:
    """``call`` run in a thread; ``outcome()`` waits for it."""

    def __init__(self, call: Callable[[], object]) -> None:
        self._result: list[Outcome] = []
        self._thread = threading.Thread(target=lambda: self._result.append(timed(call)), daemon=True)
        self._thread.start()

    def outcome(self, timeout: float = DEADLINE + 10) -> Outcome:
        self._thread.join(timeout)
        assert self._result, "the call did not return"
        return self._result[0]


# -- a losswire serve subprocess, restarted in place ---------------------------------------------------


class Restartable:
    """``losswire serve`` on one fixed loopback port, stopped (SIGTERM) and started again with the same
    command line, as a process manager restarts it."""

    def __init__(self, spawn: Callable[[list[str], dict[str, str]], ServerProcess]) -> None:
        self.spawn, self.port = spawn, free_port()
        self.process: ServerProcess | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = serve_cmd("--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--max-workers", "4")
        self.process = self.spawn(argv, server_env()).wait_started()

    def stop(self) -> float:
        """SIGTERM, and the old process's exit (a clean one); returns when it exited."""
        assert self.process is not None
        self.process.proc.send_signal(signal.SIGTERM)
        assert self.process.wait_exit() == 0, self.process.log()
        return time.monotonic()


@pytest.fixture
def server(spawn) -> Iterator[Restartable]:
    instance = Restartable(spawn)
    instance.start()
    yield instance


def client_of(target: str, **options) -> LossClient:
    """A client with the deadline of a training job; shared memory off (this is about the channel)."""
    return LossClient(target, timeout=DEADLINE, shared_memory="off", **options)


@pytest.mark.slow
def test_stateless_calls_made_while_the_server_restarts_succeed_once_it_is_back(server: Restartable):
    """6 restarts: every call made during each outage (unary, streamed, Describe) succeeds once the server
    is back, and so does the first call after it says SERVING, on a busy client and on an idle one."""
    busy = client_of(server.target, stream_threshold=1024)  # an 8 KiB pred goes by EvaluateStream
    idle = client_of(server.target)
    unary, streamed = RemoteLoss(dict(type="L1Loss"), client=busy), RemoteLoss(dict(type="L1Loss"), client=busy)
    first_after = RemoteLoss(dict(type="L1Loss"), client=idle)  # connected (Describe), then idle
    calls: list[Callable[[], object]] = [
        lambda: torch.testing.assert_close(unary(*l1_batch()), torch.tensor(0.5)),
        lambda: torch.testing.assert_close(streamed(*l1_batch(2048)), torch.tensor(1023.5)),
        lambda: busy.describe(dict(type="GIoULoss")),
    ]
    report = []
    try:
        for repeat in range(REPEATS):
            exited = server.stop()
            during = [InBackground(calls[(repeat + i) % len(calls)]) for i in range(2)]
            time.sleep(GAP)
            server.start()
            wait_serving(server.target)
            serving = time.monotonic()
            after = [timed(lambda: first_after(*l1_batch())), timed(calls[repeat % len(calls)])]
            outcomes = [call.outcome() for call in during]
            for outcome in outcomes + after:
                assert outcome.error is None, f"repeat {repeat}: {outcome.error}"
            # the calls of the outage were made while no server listened, and waited for the new one
            assert all(o.started < exited + 0.5 and o.ended > serving - 1.0 for o in outcomes), (repeat, outcomes)
            report.append(
                f"outage {serving - exited:.1f} s, the calls made during it answered "
                + ", ".join(f"{o.ended - exited:.1f}" for o in outcomes)
                + f" s after the exit, the first call after it in {after[0].ended - after[0].started:.2f} s"
            )
    finally:
        busy.close()
        idle.close()
    print("\n" + "\n".join(report))
    assert len(report) == REPEATS  # every call of every repeat succeeded


@pytest.mark.slow
def test_a_session_call_across_a_restart_reports_the_restart(server: Restartable, caplog):
    """A session's state does not survive its server: wait-for-ready sends the call to the new server,
    whose fresh state answers step 1, and the client raises (``on_session_restart='raise'``) or warns."""
    strict = client_of(server.target, on_session_restart="raise")
    lenient = client_of(server.target)  # 'warn', the default
    named = RemoteLoss(SEESAW, client=strict, session="exp/restart")
    private = RemoteLoss(SEESAW, client=lenient)  # a private session of the module's own
    try:
        for seed in (1, 2):
            named(*seesaw_batch(seed))
            private(*seesaw_batch(seed))
        assert named.last_session_step == private.last_session_step == 2
        server.stop()
        with caplog.at_level(logging.WARNING, logger="losswire.client"):
            during = [InBackground(lambda: named(*seesaw_batch(3))), InBackground(lambda: private(*seesaw_batch(3)))]
            time.sleep(GAP)
            server.start()
            raised, warned = (call.outcome() for call in during)
        assert isinstance(raised.error, SessionRestartedError), raised.error
        assert (raised.error.session, raised.error.last_step, raised.error.step) == ("exp/restart", 2, 1)
        assert raised.error.code == grpc.StatusCode.DATA_LOSS and "replica restarted" in raised.error.details
        assert warned.error is None and private.last_session_step == 1
        assert f"session {private.session_name!r} restarted: this client last saw step 2" in caplog.text
        # the session goes on from its fresh state, reported once
        named(*seesaw_batch(4))
        assert named.last_session_step == 2
    finally:
        strict.close()
        lenient.close()


@pytest.mark.slow
def test_a_deadline_shorter_than_the_outage_fails_naming_the_target(server: Restartable):
    """A call waits for its server only until its deadline: then DEADLINE_EXCEEDED, naming the target,
    the deadline, and how to change it. The client uses the server again once it is back."""
    client = client_of(server.target)
    loss = RemoteLoss(dict(type="L1Loss"), client=client)
    short = RemoteLoss(dict(type="L1Loss"), client=client, timeout=1.5, validate=False)
    try:
        loss(*l1_batch())
        server.stop()
        outcome = timed(lambda: short(*l1_batch()))
        error = outcome.error
        assert isinstance(error, RemoteLossError) and error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert 1.4 <= outcome.ended - outcome.started < 5.0, outcome
        assert f"no connection to the losswire server at {server.target} within the call's deadline (1.5 s)" in str(
            error
        )
        assert "waited for it to come back" in error.details and "timeout=" in error.details
        server.start()
        torch.testing.assert_close(short(*l1_batch()), torch.tensor(0.5))
    finally:
        client.close()


# -- the same, with an in-process server (the fast loop) -----------------------------------------------


def serve_in_process(port: int) -> LosswireServer:
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=port, device="cpu", max_workers=2))
    server.start()
    return server


def test_a_call_made_while_an_in_process_server_restarts_is_sent_when_it_is_back():
    port = free_port()
    server = serve_in_process(port)
    client = client_of(f"127.0.0.1:{port}", on_session_restart="raise")
    loss = RemoteLoss(dict(type="L1Loss"), client=client)
    seesaw = RemoteLoss(SEESAW, client=client, session="exp/in-process")
    try:
        loss(*l1_batch())
        seesaw(*seesaw_batch(1))
        server.stop(grace=1)
        during = [InBackground(lambda: loss(*l1_batch())), InBackground(lambda: seesaw(*seesaw_batch(2)))]
        time.sleep(RETRIES_OUTLASTED)
        server = serve_in_process(port)
        stateless, session = (call.outcome() for call in during)
        assert stateless.error is None and stateless.ended - stateless.started >= RETRIES_OUTLASTED - 0.1, stateless
        assert isinstance(session.error, SessionRestartedError), session.error
    finally:
        client.close()
        server.stop(grace=0)


@pytest.mark.slow
def test_a_session_waits_for_its_last_replica_and_moves_off_a_lost_one_at_once():
    """With several replicas, a session's call does not wait for its lost replica: it goes to the next
    one at once. The last one left (here every replica is down) is waited for, within the deadline."""
    ports = [free_port(), free_port()]
    servers = [serve_in_process(port) for port in ports]
    targets = [f"127.0.0.1:{port}" for port in ports]
    client = client_of(targets, on_session_restart="raise")
    seesaw = RemoteLoss(SEESAW, client=client, session="exp/replicas")
    try:
        seesaw(*seesaw_batch(1))
        first = client.replica_for("exp/replicas")
        last = targets[1 - targets.index(first)]
        for instance in servers:
            instance.stop(grace=1)
        during = InBackground(lambda: seesaw(*seesaw_batch(2)))
        time.sleep(2 * RETRIES_OUTLASTED)  # longer than gRPC's retries of both replicas
        servers = [serve_in_process(int(last.rsplit(":", 1)[1]))]  # only the session's second replica returns
        outcome = during.outcome()
        # answered by the replica that came back, from a fresh state: reported
        assert isinstance(outcome.error, SessionRestartedError), outcome.error
        assert 2 * RETRIES_OUTLASTED - 0.1 <= outcome.ended - outcome.started < 15.0, outcome
        assert client.replica_for("exp/replicas") == last  # the lost one is ranked last for a while
    finally:
        client.close()
        for instance in servers:
            instance.stop(grace=0)
