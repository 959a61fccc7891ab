"""Faults: what the server does when callers vanish, it is overloaded, or memory runs out.

* A caller that cancels, or whose deadline passes, mid-call frees the server's work: the call stops
  at its next stage (its later terms never run) and a session term that had not started leaves the
  session as it was.
* Beyond ``--max-concurrent-rpcs`` calls are refused with RESOURCE_EXHAUSTED at once, while the
  admitted ones still run; a client whose retry policy covers RESOURCE_EXHAUSTED gets through once
  there is room (a request over a size limit is not retried: ``tests/service/test_fuzz_requests.py``).
* Out of memory (the allocator refusing, or CUDA's ``torch.OutOfMemoryError``) is RESOURCE_EXHAUSTED
  and the next call on the same server succeeds.
* A SeesawLoss session survives its client's crash (SIGKILL between calls or mid-call): the crashed
  call's forward is applied once or not at all, and a new client process resumes from the state the
  engine computes for the batches applied.

SIGTERM draining in-flight calls is tested with a real server process in ``tests/operations/test_server_process.py``
(``test_sigterm_drains_the_call_in_flight_and_refuses_new_ones``).

The servers run in this process so that the gated test losses of ``tests/plugins/fault_losses.py``
can hold calls at a known point without sleeping; nothing here waits on time to decide an outcome.
This file is also the crashing client process (``python tests/service/test_faults.py client ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.calls import RETRYING_RESOURCE_EXHAUSTED, plain_channel
from support.in_process import DEVICE, running_server
from support.logs import LogWatch, watching_server_log
from support.paths import with_tests_on_path
from support.polling import wait_until

from losswire.client import LossClient, RemoteLoss, RemoteLossError, evaluate_terms
from losswire.server.app import LosswireServer
from losswire.server.losses import LOSSES, Registry
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec

WAIT = 30.0  # the most any single wait here may take before the test fails
LIMIT = 2  # --max-concurrent-rpcs of the overload tests
GONE = "the caller cancelled or its deadline passed"
SEESAW = {"type": "SeesawLoss", "num_classes": 6}


def running(registry: Registry, **settings) -> contextlib.AbstractContextManager[LosswireServer]:
    return running_server(registry, grace=1, **{"max_workers": 8, "device": DEVICE, **settings})


@pytest.fixture(scope="module")
def server(fault_losses) -> Iterator[LosswireServer]:
    with running(fault_losses[1]) as instance:
        yield instance


@pytest.fixture(scope="module")
def busy_server(fault_losses) -> Iterator[LosswireServer]:
    """A server that admits ``LIMIT`` calls at once."""
    with running(fault_losses[1], max_concurrent_rpcs=LIMIT) as instance:
        yield instance


def target_of(server: LosswireServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def gate(faults) -> Iterator[str]:
    """A gate of this test's own; opened at teardown, so no server thread stays blocked."""
    name = f"gate-{uuid.uuid4().hex[:8]}"
    yield name
    faults.open_gate(name)


@pytest.fixture
def server_log() -> Iterator[LogWatch]:
    with watching_server_log() as watch:
        yield watch


def metric(server: LosswireServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def calls_ended(server: LosswireServer, code: str) -> float:
    return metric(server, "losswire_requests_total", method="Evaluate", code=code)


def wait_idle(server: LosswireServer) -> None:
    """Until the server serves no call (its in-flight gauge is back to 0)."""
    wait_until(lambda: metric(server, "losswire_in_flight_requests", method="Evaluate") == 0, "in-flight calls end")


def term(cfg: dict, pred: torch.Tensor, target: torch.Tensor, name: str = "", session: str = "") -> pb.LossTerm:
    message = pb.LossTerm(name=name, session=session)
    codec.encode_config(cfg, message.config)
    codec.encode_tensor(pred, message.pred)
    codec.encode_value(target, message.target)
    if session:
        message.forward_id = uuid.uuid4().hex
    return message


def gated(gate: str, name: str = "", session: str = "") -> pb.LossTerm:
    return term({"type": "GatedL1Loss", "gate": gate}, torch.ones(4), torch.zeros(4), name, session)


def l1(size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=g), torch.randn(size, generator=g)


def session_info(target: str, session: str) -> pb.SessionInfo:
    client = LossClient(target, timeout=WAIT)
    try:
        return client.get_session(session)
    finally:
        client.close()


def loss_of(response: pb.EvaluateResponse, index: int = 0) -> torch.Tensor:
    return codec.decode_tensor(response.results[index].loss, "loss")


# -- a caller that goes away ------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", [WAIT, None], ids=["with-a-deadline", "without-a-deadline"])
def test_a_cancelled_call_runs_none_of_its_later_terms(server, faults, gate, server_log, deadline):
    """... and counts CANCELLED, a call without a deadline too (it counted OK: no time remaining to compare)."""
    cancelled_before = calls_ended(server, "CANCELLED")
    request = pb.EvaluateRequest(terms=[gated(gate, "a"), gated(gate, "b"), gated(gate, "c")])
    with plain_channel(target_of(server)) as channel:
        call = pb_grpc.LossServiceStub(channel).Evaluate.future(request, timeout=deadline)
        faults.wait_started(gate, 1)  # term a is in its forward
        mark = server_log.mark()
        call.cancel()
        server_log.wait_for(GONE, mark)  # the server knows before term a may finish
        faults.open_gate(gate)
        wait_idle(server)
    assert call.cancelled()
    assert faults.started(gate) == 1, "terms b and c ran for a caller that was gone"
    assert calls_ended(server, "CANCELLED") == cancelled_before + 1


def test_a_call_past_its_deadline_stops_at_the_next_stage(server, faults, gate, server_log):
    expired_before = calls_ended(server, "DEADLINE_EXCEEDED")
    request = pb.EvaluateRequest(terms=[gated(gate, "a"), gated(gate, "b")])
    mark = server_log.mark()
    with plain_channel(target_of(server)) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=1.0)  # term a holds it past the deadline
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server_log.wait_for(GONE, mark)
    faults.open_gate(gate)
    wait_idle(server)
    assert faults.started(gate) == 1
    assert calls_ended(server, "DEADLINE_EXCEEDED") == expired_before + 1
    server_log.wait_for(r"Evaluate stopped \(DEADLINE_EXCEEDED\): terms\[0\] \(a\): .* skipped the backward", mark)


def test_a_session_term_cancelled_before_its_forward_leaves_the_session_as_it_was(server, faults, gate, server_log):
    session = f"faults/{gate}"
    with plain_channel(target_of(server)) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        holder = stub.Evaluate.future(pb.EvaluateRequest(terms=[gated(gate, session=session)]), timeout=WAIT)
        faults.wait_started(gate, 1)  # in its forward, holding the session's lock
        waiter = stub.Evaluate.future(pb.EvaluateRequest(terms=[gated(gate, session=session)]), timeout=WAIT)
        wait_until(lambda: metric(server, "losswire_in_flight_requests", method="Evaluate") == 2, "both calls in")
        mark = server_log.mark()
        waiter.cancel()
        server_log.wait_for(GONE, mark)
        faults.open_gate(gate)
        assert holder.result().results[0].session_step == 1
        wait_idle(server)
    assert waiter.cancelled()
    assert faults.started(gate) == 1, "the cancelled call's forward ran"
    assert session_info(target_of(server), session).steps == 1


# -- overload -----------------------------------------------------------------------------------------


def test_beyond_the_concurrency_limit_calls_are_refused_while_the_admitted_ones_run(busy_server, faults, gate):
    pred, target = l1()
    with plain_channel(target_of(busy_server)) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        held = [stub.Evaluate.future(pb.EvaluateRequest(terms=[gated(gate)]), timeout=WAIT) for _ in range(LIMIT)]
        faults.wait_started(gate, LIMIT)
        refusals, seconds = [], []
        for _ in range(5):
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Evaluate(pb.EvaluateRequest(terms=[term({"type": "L1Loss"}, pred, target)]), timeout=WAIT)
            seconds.append(time.perf_counter() - started)
            refusals.append(caught.value)
        # answered while the admitted calls were still in their forwards (their gate is shut)
        assert not any(call.done() for call in held)
        assert faults.started(gate) == LIMIT
        assert {e.code() for e in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("--max-concurrent-rpcs" in e.details() for e in refusals), refusals[0].details()
        faults.open_gate(gate)
        for call in held:
            assert loss_of(call.result()).item() == 1.0
        answer = stub.Evaluate(pb.EvaluateRequest(terms=[term({"type": "L1Loss"}, pred, target)]), timeout=WAIT)
    torch.testing.assert_close(loss_of(answer), (pred - target).abs().mean())
    print(f"refusal round trip: median {sorted(seconds)[2] * 1e3:.2f} ms, max {max(seconds) * 1e3:.2f} ms")


def test_one_token_s_calls_leave_other_tokens_room(fault_losses, faults, gate):
    """Tokens on, --max-concurrent-rpcs 4: one token has at most all but a quarter (3) of them at once; its
    fourth call is refused (RESOURCE_EXHAUSTED naming the setting) while its three run, and another token's
    call is answered meanwhile. Without the share, the first token's four calls took every slot."""
    tokens = ("token-a-0123456789", "token-b-0123456789")
    with running(fault_losses[1], auth_tokens=tokens, max_concurrent_rpcs=4) as server:
        as_a = (("authorization", f"Bearer {tokens[0]}"),)
        with plain_channel(target_of(server)) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            request = pb.EvaluateRequest(terms=[gated(gate)])
            held = [stub.Evaluate.future(request, timeout=WAIT, metadata=as_a) for _ in range(3)]
            faults.wait_started(gate, 3)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Evaluate(request, timeout=WAIT, metadata=as_a)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-rpcs-per-token" in refused.value.details()
            pred, target = l1()
            as_b = (("authorization", f"Bearer {tokens[1]}"),)
            answer = stub.Evaluate(
                pb.EvaluateRequest(terms=[term({"type": "L1Loss"}, pred, target)]), metadata=as_b, timeout=WAIT
            )
            torch.testing.assert_close(loss_of(answer), (pred - target).abs().mean())
            assert not any(call.done() for call in held)
            faults.open_gate(gate)
            for call in held:
                assert loss_of(call.result()).item() == 1.0


@pytest.mark.parametrize("size", [64, 2**20], ids=["small", "8MiB"])
def test_a_retrying_client_gets_through_once_the_server_has_room(busy_server, faults, gate, server_log, size):
    """The client's own channel (the library's retry policy) meets a full server, backs off, and is
    answered once the admitted calls finish. A request of several MiB is retried too: gRPC retries a
    call only while its request fits the channel's per-call retry buffer."""
    pred, target = l1(size)
    client = LossClient(target_of(busy_server), timeout=WAIT)
    request = pb.EvaluateRequest(terms=[term({"type": "L1Loss"}, pred, target)])
    mark = server_log.mark()
    with plain_channel(target_of(busy_server)) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        held = [stub.Evaluate.future(pb.EvaluateRequest(terms=[gated(gate)]), timeout=WAIT) for _ in range(LIMIT)]
        faults.wait_started(gate, LIMIT)
        refused = calls_ended(busy_server, "RESOURCE_EXHAUSTED")
        retried = client.stub.Evaluate.future(request, timeout=WAIT)
        # the call's first attempt reached the full server (refused, counted) before the gate opens
        wait_until(lambda: calls_ended(busy_server, "RESOURCE_EXHAUSTED") > refused, "the first attempt refused")
        assert not retried.done() and not any(call.done() for call in held)
        faults.open_gate(gate)
        answer = retried.result()
        for call in held:
            call.result()
    torch.testing.assert_close(loss_of(answer), (pred - target).abs().mean())
    attempt = int(server_log.wait_for(r"Evaluate L1Loss: .*, attempt \d+$", mark).rsplit(" ", 1)[1])
    assert attempt >= 2, "the call was answered at its first attempt: it never met the full server"
    client.close()


def test_calls_with_lanes_wait_out_a_busy_server(fault_losses, faults, gate):
    """A call with lanes that finds every big-call slot held is refused as busy, and its lanes, whose chunks
    then reach a call that is over, are CANCELLED by the server. The client waits the busy refusal out and
    is answered once the slot is free. (When a lane's CANCELLED reached the client before its call's own
    refusal, the client told the CANCELLED, a failure no retry cures: 5 of 48 calls with lanes beside plain
    streamed ones, against a server process on a busy machine. That ordering did not come up against this
    in-process server; this test holds the behaviour, not the race.)"""
    with running(fault_losses[1], max_stream_calls=1) as server:
        target = target_of(server)
        streamed = {"stream_threshold": 0, "shared_memory": "off", "timeout": WAIT}
        holder, with_lanes = LossClient(target, **streamed), LossClient(target, lanes=2, **streamed)
        pred, labels = torch.randn(1 << 20), torch.randn(1 << 20)  # 4 MiB each: stripes for two lanes
        expected = (pred - labels).abs().mean()
        refusals = functools.partial(
            metric, server, "losswire_requests_total", method="EvaluateStream", code="RESOURCE_EXHAUSTED"
        )
        with futures.ThreadPoolExecutor(5) as pool:
            held = pool.submit(lambda: RemoteLoss({"type": "GatedL1Loss", "gate": gate}, client=holder)(pred, labels))
            faults.wait_started(gate, 1)
            before = refusals()
            answers = [
                pool.submit(lambda: RemoteLoss({"type": "L1Loss"}, client=with_lanes)(pred, labels)) for _ in range(4)
            ]
            wait_until(lambda: refusals() >= before + 12, "the calls with lanes are refused as busy, again and again")
            assert not any(answer.done() for answer in answers), [a.exception() for a in answers if a.done()]
            faults.open_gate(gate)
            for answer in answers:
                torch.testing.assert_close(answer.result(), expected)
            torch.testing.assert_close(held.result(), expected)
        holder.close()
        with_lanes.close()


# -- health follows whether a small call can be served ----------------------------------------------


def test_health_says_not_serving_while_every_compute_thread_is_held(fault_losses, faults, gate):
    """One compute thread, held by a gated call: a small call would wait for it, so health (the main port's
    and the health port's alike) says NOT_SERVING; once the gate opens it says SERVING again."""
    with running(fault_losses[1], max_workers=1, health_bound_seconds=0.3, health_port=0) as server:
        ports = (server.port, server.health_port)

        def statuses() -> set[int]:
            found = set()
            for port in ports:
                with plain_channel(f"127.0.0.1:{port}") as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    found.add(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT).status)
            return found

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses() == {serving}
        with plain_channel(target_of(server)) as channel:
            held = pb_grpc.LossServiceStub(channel).Evaluate.future(
                pb.EvaluateRequest(terms=[gated(gate)]), timeout=WAIT
            )
            faults.wait_started(gate, 1)
            wait_until(lambda: statuses() == {not_serving}, "health turns NOT_SERVING")
            faults.open_gate(gate)
            held.result()
        wait_until(lambda: statuses() == {serving}, "health turns SERVING again")


# -- out of memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"type": "HungryL1Loss", "allocate_bytes": 2**60},  # more than any allocator grants: it really fails
        {"type": "HungryL1Loss", "raise_device_oom": True},  # CUDA's out-of-memory class, on any device
    ],
    ids=["allocator-refuses", "cuda-out-of-memory"],
)
def test_out_of_memory_is_resource_exhausted_and_the_next_call_succeeds(server, cfg):
    exhausted_before = calls_ended(server, "RESOURCE_EXHAUSTED")
    pred, target = l1()
    with plain_channel(target_of(server)) as channel:
        client = LossClient(target_of(server), timeout=WAIT, channel=channel)
        with pytest.raises(RemoteLossError) as caught:
            RemoteLoss(cfg, client=client)(pred, target)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details.startswith("terms[0]: out of memory on the server while evaluating: ")
        assert calls_ended(server, "RESOURCE_EXHAUSTED") == exhausted_before + 1
        # the same server, at once: the same loss with what fits, and a built-in one
        fits = RemoteLoss({"type": "HungryL1Loss", "allocate_bytes": 2**20}, client=client)(pred, target)
        torch.testing.assert_close(fits, (pred - target).abs().mean())
        scores, labels = torch.randn(64, 80), torch.randint(0, 81, (64,))
        focal = RemoteLoss({"type": "FocalLoss"}, client=client)(scores, labels)
        torch.testing.assert_close(focal, LOSSES.build({"type": "FocalLoss"})(scores, labels))


@pytest.mark.parametrize(
    ("cfg", "attempts"),
    [
        ({"type": "HungryL1Loss", "allocate_bytes": 2**60}, 3),  # out of memory: may pass later
        ({"type": "L1Loss", "pad": "x" * (1 << 20)}, 1),  # a config over 1 MiB: no retry passes it
    ],
    ids=["out-of-memory-is-retried", "over-a-limit-is-sent-once"],
)
def test_a_retry_policy_retries_the_refusals_a_retry_may_cure(server, cfg, attempts):
    """gRPC's retry policies retry only an answer sent without headers: a refusal the handler returns is
    sent so (not only the call-slot refusal), and one that carries the no-retry pushback is sent once."""
    before = calls_ended(server, "RESOURCE_EXHAUSTED")
    pred, target = l1()
    request = pb.EvaluateRequest(terms=[term(cfg, pred, target)])
    channel = grpc.insecure_channel(target_of(server), options=RETRYING_RESOURCE_EXHAUSTED)
    with channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert "terms[0]" in caught.value.details()
    assert calls_ended(server, "RESOURCE_EXHAUSTED") == before + attempts


@pytest.mark.skipif(torch.device(DEVICE).type != "cuda", reason="needs a GPU: LOSSWIRE_TEST_DEVICE=cuda")
def test_after_a_cuda_out_of_memory_the_cache_is_handed_back(server):
    """The server empties CUDA's cache after an out-of-memory, so the memory the failed call had
    cached goes back to the driver (other processes, a differently shaped next call)."""
    pred, target = l1()
    client = LossClient(target_of(server), timeout=WAIT)
    RemoteLoss({"type": "HungryL1Loss", "allocate_bytes": 2**30}, client=client)(pred, target)
    assert torch.cuda.memory_reserved() >= 2**30  # the freed GiB stays in the caching allocator
    with pytest.raises(RemoteLossError):
        RemoteLoss({"type": "HungryL1Loss", "allocate_bytes": 2**60}, client=client)(pred, target)
    assert torch.cuda.memory_reserved() < 2**30


# -- a stateful session across a client crash --------------------------------------------------------


def seesaw_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of the crash test's training run: [8, C + 2] scores and labels in [0, C]."""
    g = torch.Generator().manual_seed(1000 + index)
    classes = SEESAW["num_classes"]
    return torch.randn(8, classes + 2, generator=g), torch.randint(0, classes + 1, (8,), generator=g)


def client_main(argv: list[str]) -> None:
    """The client process: SeesawLoss steps on a session, one JSON line per answered step; then
    either blocks idle on stdin, or sends one more call that the gate holds in the server."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--batches", type=int, nargs="*", default=[])
    parser.add_argument("--then", choices=["exit", "idle", "gated-first", "session-first"], default="exit")
    parser.add_argument("--gate", default="")
    parser.add_argument("--crash-batch", type=int, default=-1)
    args = parser.parse_args(argv)
    client = LossClient(args.target, timeout=WAIT)
    seesaw = RemoteLoss(SEESAW, client=client, session=args.session)
    for index in args.batches:
        score, labels = seesaw_batch(index)
        score.requires_grad_()
        losses = seesaw(score, labels)
        sum(losses.values()).backward()
        loss = {key: value.item() for key, value in losses.items()}
        print(json.dumps({"batch": index, "step": seesaw.last_session_step, "loss": loss, "grad": score.grad.tolist()}))
        sys.stdout.flush()
    if args.then == "idle":
        print(json.dumps({"idle": True}), flush=True)
        sys.stdin.read()
    elif args.then != "exit":
        gated_loss = RemoteLoss({"type": "GatedL1Loss", "gate": args.gate}, client=client)
        terms = {
            "gated": (gated_loss, (torch.ones(4), torch.zeros(4)), {}),
            "seesaw": (seesaw, seesaw_batch(args.crash_batch), {}),
        }
        order = ["gated", "seesaw"] if args.then == "gated-first" else ["seesaw", "gated"]
        print(json.dumps({"sending": order}), flush=True)
        evaluate_terms({name: terms[name] for name in order})  # the test kills this process meanwhile


class ClientProcess:
    """``client_main`` in a process of its own, read line by line."""

    def __init__(self, *args: str) -> None:
        argv = [sys.executable, __file__, "client", *args]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=with_tests_on_path()
        )
        self._watchdog = threading.Timer(120.0, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()

    def line(self) -> dict:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        assert text, f"the client process ended (rc {self.proc.wait(WAIT)}) before its next line"
        return json.loads(text)

    def finish(self) -> list[dict]:
        out, _ = self.proc.communicate(timeout=WAIT)
        self._watchdog.cancel()
        assert self.proc.returncode == 0, f"the client process failed (rc {self.proc.returncode})"
        return [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=WAIT)
        self._watchdog.cancel()


def engine_run(batches: list[int]) -> tuple[list[dict], torch.Tensor]:
    """What one local SeesawLoss module computes for these batches in this order: the loss parts
    and the gradient of their sum at each step, and ``cum_samples`` at the end."""
    module = LOSSES.build(SEESAW)
    steps = []
    for index in batches:
        score, labels = seesaw_batch(index)
        score.requires_grad_()
        losses = module(score, labels)
        sum(losses.values()).backward()
        steps.append({"loss": {k: v.item() for k, v in losses.items()}, "grad": score.grad})
    return steps, module.cum_samples


def assert_steps_match(got: list[dict], want: list[dict], first_step: int) -> None:
    for offset, (answer, expected) in enumerate(zip(got, want, strict=True)):
        where = f"session step {first_step + offset}"
        assert answer["step"] == first_step + offset, where
        assert answer["loss"].keys() == expected["loss"].keys(), where
        for key, value in expected["loss"].items():
            assert answer["loss"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{where}: {key}"
        torch.testing.assert_close(torch.tensor(answer["grad"]), expected["grad"], rtol=1e-5, atol=1e-6, msg=where)


CRASHES = {
    # how the first client ends -> (what it does after its two steps, whether its last call's forward applied):
    # a call is atomic, so a call its caller left is never applied, even when its session term had run
    "between-calls": ("idle", False),
    "mid-call-before-its-session-term": ("gated-first", False),
    "mid-call-after-its-session-term": ("session-first", False),
}


@pytest.mark.slow
@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_session_survives_its_client_crashing(server, faults, gate, server_log, crash):
    """Client 1 runs two steps, then is SIGKILLed idle or with a call held in the server (its
    session term before or after the held term); client 2, a new process, resumes the session."""
    then, crashed_call_applied = CRASHES[crash]
    session = f"faults/crash/{gate}"
    target = target_of(server)
    options = ["--target", target, "--session", session, "--then", then, "--gate", gate, "--crash-batch", "2"]
    first = ClientProcess(*options, "--batches", "0", "1")
    try:
        first_steps = [first.line(), first.line()]
        assert {"idle", "sending"} & set(first.line())  # idle, or sending the call the gate will hold
        if then != "idle":
            faults.wait_started(gate, 1)
        mark = server_log.mark()
    finally:
        first.kill()
    if then != "idle":
        server_log.wait_for(GONE, mark)  # the dropped connection ended the call in the server
        faults.open_gate(gate)
    wait_idle(server)

    applied = [0, 1, 2] if crashed_call_applied else [0, 1]
    want_steps, want_state = engine_run([*applied, 3, 4])
    assert_steps_match(first_steps, want_steps[:2], first_step=1)
    info = session_info(target, session)
    assert info.steps == len(applied), "the crashed call's forward was applied a wrong number of times"
    state = {key: codec.decode_tensor(value, key) for key, value in info.state.items()}
    torch.testing.assert_close(state["cum_samples"], engine_run(applied)[1])

    second = ClientProcess("--target", target, "--session", session, "--batches", "3", "4")
    assert_steps_match(second.finish(), want_steps[len(applied) :], first_step=len(applied) + 1)
    final = session_info(target, session)
    torch.testing.assert_close(codec.decode_tensor(final.state["cum_samples"], "cum_samples"), want_state)


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:
    client_main(sys.argv[2:])
