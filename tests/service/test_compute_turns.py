"""Callers share the compute threads: no caller can take them all, or keep others waiting behind its queue.

* Calls waiting for a session another call holds wait as coroutines, not on compute threads: many
  calls on one busy session leave the other threads to other calls.
* With tokens on, one token runs calls on at most all compute threads but a quarter; another token's
  call runs meanwhile.
* A thread that comes free goes to the waiting caller that runs fewest calls, not to the oldest waiting
  call: a caller's queue delays another caller by one call, not by the queue.
* A call whose caller went away keeps its thread counted as its caller's until its work has ended, so
  abandoned work never lets one caller run on more threads than its share.
* A ModelInfer whose inputs come as many typed contents values (converted value by value) is converted on
  a compute thread, not on the event loop every caller's calls go through.

The server runs in this process, with the gated test losses of ``tests/plugins/fault_losses.py`` (a
plugin's loss is never quick: its calls always take a compute thread), so that calls are held at a known
point without sleeping.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.calls import plain_channel
from support.in_process import DEVICE, running_server
from support.polling import wait_until

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server.app import LosswireServer
from losswire.server.losses import Registry
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec

WAIT = 30.0  # the most any single wait here may take before the test fails
ANSWERED = 10.0  # the deadline of a call that must not wait behind the held ones
TOKENS = ("token-a-0123456789", "token-b-0123456789")


@pytest.fixture
def gates(faults) -> Iterator[list[str]]:
    """Gates of this test's own (take as many as needed); every one opened at teardown."""
    names: list[str] = []
    yield names
    for name in names:
        faults.open_gate(name)


def new_gate(gates: list[str]) -> str:
    gates.append(f"gate-{uuid.uuid4().hex[:8]}")
    return gates[-1]


def gated(gate: str, session: str = "") -> pb.EvaluateRequest:
    message = pb.LossTerm(session=session)
    codec.encode_config({"type": "GatedL1Loss", "gate": gate}, message.config)
    codec.encode_tensor(torch.ones(4), message.pred)
    codec.encode_value(torch.zeros(4), message.target)
    return pb.EvaluateRequest(terms=[message])


def loss_of(response: pb.EvaluateResponse) -> float:
    return codec.decode_tensor(response.results[0].loss, "loss").item()


@contextlib.contextmanager
def serving(registry: Registry, **settings) -> Iterator[tuple[LosswireServer, grpc.Channel]]:
    """A server of ``settings`` over ``registry``, and a channel to it."""
    with (
        running_server(registry, grace=1, device=DEVICE, **settings) as server,
        plain_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, channel


def separate_channel(server: LosswireServer) -> grpc.Channel:
    """A channel with a connection of its own (gRPC otherwise shares one between equal channels)."""
    options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    return grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options)


def test_calls_waiting_for_a_busy_session_leave_the_threads_to_other_calls(fault_losses, faults, gates):
    """Two compute threads; a call holds session s on one. Three more calls on s wait for it, and a
    call on no session is still answered at once: the waiting calls hold no thread."""
    held, free = new_gate(gates), new_gate(gates)
    faults.open_gate(free)
    with serving(fault_losses[1], max_workers=2) as (server, channel):
        stub = pb_grpc.LossServiceStub(channel)
        session = f"busy/{held}"
        holder = stub.Evaluate.future(gated(held, session), timeout=WAIT)
        faults.wait_started(held, 1)
        waiting = [stub.Evaluate.future(gated(held, session), timeout=WAIT) for _ in range(3)]
        wait_until(lambda: server.compute.sessions.waiting == 3, "three calls waiting for the session")
        assert server.compute.shares.held == 1
        assert loss_of(stub.Evaluate(gated(free), timeout=ANSWERED)) == 1.0
        assert not holder.done() and not any(call.done() for call in waiting)
        faults.open_gate(held)
        steps = sorted(call.result(timeout=WAIT).results[0].session_step for call in [holder, *waiting])
        assert steps == [1, 2, 3, 4]  # one after another, each once
        wait_until(lambda: server.compute.shares.held == 0, "every thread given back")
        assert len(server.compute.sessions) == 0  # no session keeps a turn once nobody uses it


def test_one_token_leaves_other_tokens_a_compute_thread(fault_losses, faults, gates):
    """Tokens on, four compute threads: token a runs at most three calls at once (its fourth waits), and
    token b's call is answered while a's three are held."""
    held, free = new_gate(gates), new_gate(gates)
    faults.open_gate(free)
    as_a = (("authorization", f"Bearer {TOKENS[0]}"),)
    as_b = (("authorization", f"Bearer {TOKENS[1]}"),)
    with serving(fault_losses[1], max_workers=4, auth_tokens=TOKENS) as (server, channel):
        stub = pb_grpc.LossServiceStub(channel)
        calls = [stub.Evaluate.future(gated(held), timeout=WAIT, metadata=as_a) for _ in range(4)]
        faults.wait_started(held, 3)
        wait_until(lambda: server.compute.shares.waiting == 1, "token a's fourth call waiting for a thread")
        assert faults.started(held) == 3
        assert loss_of(stub.Evaluate(gated(free), timeout=ANSWERED, metadata=as_b)) == 1.0
        assert faults.started(held) == 3, "token a's fourth call took the thread left to others"
        faults.open_gate(held)
        assert [loss_of(call.result(timeout=WAIT)) for call in calls] == [1.0] * 4


def test_a_free_thread_goes_to_the_caller_running_fewest_calls(fault_losses, faults, gates):
    """Two compute threads, no tokens (callers are connections). Connection a runs two calls and queues
    two more; connection b's call comes last. When one of a's running calls ends, b's call runs next,
    before a's queued ones."""
    first, second, queued, last = (new_gate(gates) for _ in range(4))
    with (
        running_server(fault_losses[1], grace=1, max_workers=2, device=DEVICE) as server,
        separate_channel(server) as channel_a,
        separate_channel(server) as channel_b,
    ):
        a, b = pb_grpc.LossServiceStub(channel_a), pb_grpc.LossServiceStub(channel_b)
        running = [a.Evaluate.future(gated(gate), timeout=WAIT) for gate in (first, second)]
        faults.wait_started(first, 1)
        faults.wait_started(second, 1)
        waiting = [a.Evaluate.future(gated(queued), timeout=WAIT) for _ in range(2)]
        wait_until(lambda: server.compute.shares.waiting == 2, "a's two calls waiting for a thread")
        late = b.Evaluate.future(gated(last), timeout=WAIT)
        wait_until(lambda: server.compute.shares.waiting == 3, "b's call waiting for a thread")
        faults.open_gate(first)
        assert loss_of(running[0].result(timeout=WAIT)) == 1.0
        faults.wait_started(last, 1, ANSWERED)  # b's call has the thread: a's queued ones still wait
        assert faults.started(queued) == 0, "a's queued call ran before b's"
        for gate in (second, queued, last):
            faults.open_gate(gate)
        assert [loss_of(call.result(timeout=WAIT)) for call in [running[1], *waiting, late]] == [1.0] * 4


def test_a_cancelled_describe_keeps_its_thread_counted_until_its_work_ends(fault_losses, faults, gates):
    """Tokens on, four compute threads. Token a's three Describes build a module that waits for its gate
    (their work cannot stop halfway), and a cancels them: their threads stay a's until the builds end. So
    a's next call waits for a thread (a runs at most three), and token b's call still finds the fourth."""
    held, free = new_gate(gates), new_gate(gates)
    faults.open_gate(free)
    as_a = (("authorization", f"Bearer {TOKENS[0]}"),)
    as_b = (("authorization", f"Bearer {TOKENS[1]}"),)
    describe = pb.DescribeRequest(config=codec.encode_config({"type": "GatedBuildL1Loss", "gate": held}))
    with serving(fault_losses[1], max_workers=4, auth_tokens=TOKENS) as (server, channel):
        stub = pb_grpc.LossServiceStub(channel)
        abandoned = [stub.Describe.future(describe, timeout=WAIT, metadata=as_a) for _ in range(3)]
        faults.wait_started(held, 3)
        for call in abandoned:
            call.cancel()
        later = stub.Evaluate.future(gated(held), timeout=WAIT, metadata=as_a)
        wait_until(lambda: server.compute.shares.waiting == 1, "token a's call waiting for a thread")
        assert server.compute.shares.held == 3, "the cancelled Describes' threads were given back while they work"
        assert loss_of(stub.Evaluate(gated(free), timeout=ANSWERED, metadata=as_b)) == 1.0
        assert faults.started(held) == 3, "token a's call ran on a thread its cancelled Describes still use"
        faults.open_gate(held)
        assert loss_of(later.result(timeout=WAIT)) == 1.0
        wait_until(lambda: server.compute.shares.held == 0, "every thread given back")


def l1_infer(pred: torch.Tensor, target: torch.Tensor, typed: bool) -> oip.ModelInferRequest:
    """L1Loss by ModelInfer, its inputs as raw bytes or as typed contents (fp32_contents)."""
    request = oip.ModelInferRequest(model_name="L1Loss")
    for name, tensor in (("pred", pred), ("target", target)):
        message = request.inputs.add(name=name, datatype="FP32", shape=list(tensor.shape))
        if typed:
            message.contents.fp32_contents.extend(tensor.tolist())
        else:
            request.raw_input_contents.append(tensor.numpy().tobytes())
    return request


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU server has no quick calls: every call takes a compute thread")
def test_a_model_infer_of_many_typed_values_is_converted_on_a_compute_thread(fault_losses, faults, gates):
    """One compute thread, held by a gated call. L1Loss on 20,000 elements is quick: sent raw it is answered
    on the event loop meanwhile. Its 40,000 typed contents values would hold the loop ~2 ms (256,000 held it
    12-16 ms a call): sent so, it waits for the thread, and is answered the same once the gate opens."""
    held = new_gate(gates)
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(20000, generator=generator), torch.randn(20000, generator=generator)
    # no health watchdog: its probe would be a second call waiting for the thread
    with serving(fault_losses[1], max_workers=1, health_bound_seconds=None) as (server, channel):
        stub, infer = pb_grpc.LossServiceStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
        holder = stub.Evaluate.future(gated(held), timeout=WAIT)
        faults.wait_started(held, 1)
        quick = infer.ModelInfer(l1_infer(pred, target, typed=False), timeout=ANSWERED)
        typed = infer.ModelInfer.future(l1_infer(pred, target, typed=True), timeout=WAIT)
        wait_until(lambda: server.compute.shares.waiting == 1, "the typed call waiting for the compute thread")
        assert not typed.done()
        faults.open_gate(held)
        assert typed.result(timeout=WAIT).raw_output_contents == quick.raw_output_contents
        assert loss_of(holder.result(timeout=WAIT)) == 1.0
