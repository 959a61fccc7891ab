"""Quick calls: small stateless calls are answered on the event loop, everything else on a compute thread.

A quick call's answer must equal the compute thread's bit for bit; a call that is not quick must be told so
(``NotQuick``) before anything of it is held, built or changed, so that the front door can evaluate it on
a compute thread as if the first try had never happened; and a slow loss on small tensors (a plugin's, whose
cost nobody calibrated) must never stall the event loop.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.calls import plain_channel
from support.servers import CALL_TIMEOUT, ServerProcess, module_cmd, server_env

from losswire.client import LossClient
from losswire.server.dataplane import Dataplane, NotQuick
from losswire.server.dataplane.calls import QUICK_MAX_JSON_BYTES
from losswire.server.losses import LOSSES, WeightedLoss
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec


def request_of(config: dict[str, Any], pred: torch.Tensor, target: Any, **fields: Any) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config(config, term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(target, term.target)
    if "weight" in fields:
        codec.encode_tensor(fields.pop("weight"), term.weight)
    for name, value in fields.items():
        setattr(term, name, value)
    return request


def labels(rows: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes + 1, (rows,), generator=torch.Generator().manual_seed(rows))


def boxes(rows: int, seed: int) -> torch.Tensor:
    corner = torch.rand(rows, 2, generator=torch.Generator().manual_seed(seed)) * 50
    return torch.cat([corner, corner + 1 + torch.rand(rows, 2, generator=torch.Generator().manual_seed(seed + 1))], 1)


SMALL_CALLS = {
    "FocalLoss": lambda: request_of({"type": "FocalLoss", "gamma": 2.0}, torch.randn(256, 80), labels(256, 80)),
    "FocalLoss weight avg_factor": lambda: request_of(
        {"type": "FocalLoss"}, torch.randn(64, 8), labels(64, 8), weight=torch.rand(64), avg_factor=17.5
    ),
    "CrossEntropyLoss none": lambda: request_of(
        {"type": "CrossEntropyLoss", "reduction": "none"}, torch.randn(32, 5), labels(32, 4)
    ),
    "GIoULoss": lambda: request_of({"type": "GIoULoss"}, boxes(128, 1), boxes(128, 3)),
    "SmoothL1Loss": lambda: request_of({"type": "SmoothL1Loss", "beta": 0.5}, torch.randn(40, 4), torch.randn(40, 4)),
}


def results_of(response: pb.EvaluateResponse) -> bytes:
    """The response without its timings (the only part two evaluations of one request may differ in)."""
    response = pb.EvaluateResponse.FromString(response.SerializeToString())
    response.ClearField("timings")
    return response.SerializeToString(deterministic=True)


@pytest.mark.parametrize("name", SMALL_CALLS)
def test_a_quick_answer_equals_the_compute_threads_bit_for_bit(name: str):
    dataplane = Dataplane(torch.device("cpu"))
    request = SMALL_CALLS[name]()
    quick = dataplane.evaluate(request, lambda: False, quick=True)
    on_thread: list[pb.EvaluateResponse] = []
    worker = threading.Thread(target=lambda: on_thread.append(dataplane.evaluate(request, lambda: False).response))
    worker.start()
    worker.join()
    assert results_of(quick.response) == results_of(on_thread[0])
    assert quick.response.results[0].loss.ByteSize() > 0


class SleepyLoss(WeightedLoss):
    """A plugin's loss (defined outside losswire): its cost is unknown, so it is never quick."""

    differentiable = ("pred",)

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        return self.finish((pred - target).abs(), weight, self.resolve_reduction(reduction_override), avg_factor)


def plugin_dataplane() -> Dataplane:
    registry = LOSSES.copy("quick-test")
    registry.register_module()(SleepyLoss)
    return Dataplane(torch.device("cpu"), registry=registry)


NOT_QUICK = {
    "a session": lambda: request_of(
        {"type": "FocalLoss"}, torch.randn(8, 4), labels(8, 4), session="quick-test-session"
    ),
    "a sampler": lambda: request_of(
        {"type": "FocalLoss", "sampler": {"type": "RandomSampler", "num": 4}}, torch.randn(8, 4), labels(8, 4)
    ),
    "a plugin's loss": lambda: request_of({"type": "SleepyLoss"}, torch.randn(8, 4), torch.randn(8, 4)),
    "a quadratic loss on 2000 samples": lambda: request_of(
        {"type": "TripletLoss"}, torch.randn(2000, 1), torch.randint(0, 5, (2000,))
    ),
}


@pytest.mark.parametrize("case", NOT_QUICK)
def test_a_call_that_is_not_quick_is_told_so_before_it_holds_or_changes_anything(case: str):
    dataplane = plugin_dataplane()
    request = NOT_QUICK[case]()
    with pytest.raises(NotQuick):
        dataplane.evaluate(request, lambda: False, quick=True)
    assert dataplane.budget.held == 0
    assert len(dataplane.sessions) == 0  # the session was neither created nor stepped
    assert dataplane.slots.in_use == 0


def test_a_request_naming_shared_memory_is_not_quick_and_touches_no_region():
    dataplane = Dataplane(torch.device("cpu"))
    request = request_of({"type": "FocalLoss"}, torch.randn(8, 4), labels(8, 4))
    tensor = request.terms[0].pred
    tensor.ClearField("data")
    tensor.shm.region = "nobody-registered-this"
    tensor.shm.byte_size = 8 * 4 * 4
    with pytest.raises(NotQuick):
        dataplane.evaluate(request, lambda: False, quick=True)  # a region lookup would refuse it: NOT_FOUND


def test_no_call_is_quick_on_a_gpu():
    """On a GPU a call copies to the device and waits for it (behind another call's kernels), and a loss's
    first compiled kernel takes seconds: a small call there goes to a compute thread, told before anything
    of it is decoded (the dataplane below has no GPU to decode to)."""
    dataplane = Dataplane(torch.device("cuda"))
    request = request_of({"type": "FocalLoss"}, torch.randn(8, 4), torch.randint(0, 5, (8,)))
    with pytest.raises(NotQuick):
        dataplane.evaluate(request, lambda: False, quick=True)
    assert dataplane.budget.held == 0 and dataplane.slots.in_use == 0


@pytest.mark.parametrize("where", ["config", "a JSON input"])
def test_a_request_with_a_big_config_or_json_input_is_not_quick_before_any_of_it_is_converted(where: str):
    """Configs and JSON inputs become Python values in Python (~5 us a value): one over QUICK_MAX_JSON_BYTES is
    sent to a compute thread before it is converted, so an unknown loss there is not refused on the event loop
    (a caller's 1 MiB of nested values held the loop 0.4 s a call, and small calls were 216x slower)."""
    junk = [[index, str(index)] for index in range(QUICK_MAX_JSON_BYTES // 8)]
    request = request_of({"type": "NoSuchLoss"}, torch.randn(8, 4), labels(8, 4))
    if where == "config":
        codec.encode_config({"type": "NoSuchLoss", "junk": junk}, request.terms[0].config)
    else:
        codec.encode_value(junk, request.terms[0].inputs["junk"])
    with pytest.raises(NotQuick):  # not LossError: nothing was converted, or the unknown type would be refused
        Dataplane(torch.device("cpu")).evaluate(request, lambda: False, quick=True)


@pytest.fixture(scope="module")
def plugin_server() -> ServerProcess:
    argv = module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-workers", "1")
    process = ServerProcess([*argv, "--plugin", "slow_loss"], server_env(plugins=True))
    try:
        process.wait_started()
        yield process
    finally:
        process.close()


@pytest.mark.slow
def test_a_slow_loss_on_small_tensors_leaves_the_event_loop_to_health_and_quick_calls(plugin_server):
    """SlowL1Loss sleeps 3 s on 8 elements: on the event loop it would stall everything for as long."""
    client = LossClient(plugin_server.target, timeout=CALL_TIMEOUT)
    slow = request_of({"type": "SlowL1Loss", "delay": 3.0}, torch.randn(2, 4), torch.randn(2, 4))
    in_flight = threading.Thread(target=client.evaluate, args=(slow,))
    try:
        in_flight.start()
        plugin_server.wait_for(r"SlowL1Loss: sleeping")
        started = time.perf_counter()
        with plain_channel(plugin_server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.5)
        quick = client.evaluate(SMALL_CALLS["FocalLoss"](), timeout=1.5)
        answered = time.perf_counter() - started
    finally:
        in_flight.join()
        client.close()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert quick.results[0].loss.ByteSize() > 0
    assert answered < 1.5, f"health and a quick call took {answered:.2f} s while a slow loss computed"


@pytest.mark.slow
def test_a_quick_call_refused_by_its_loss_gets_the_losss_own_error(plugin_server):
    client = LossClient(plugin_server.target, timeout=CALL_TIMEOUT)
    try:
        with pytest.raises(Exception) as raised:
            client.evaluate(request_of({"type": "FocalLoss", "gamma": -1.0}, torch.randn(4, 3), labels(4, 3)))
    finally:
        client.close()
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "gamma" in str(raised.value)


def test_configs_checked_once_are_still_refused_every_time_they_are_bad():
    """The loss type of a valid config is kept for the calls after (checked once per config); a bad
    config is never kept, and an equal-looking config of another value type is a config of its own."""
    dataplane = Dataplane(torch.device("cpu"))
    pred, target = torch.randn(16, 4), labels(16, 4)
    bad = request_of({"type": "FocalLoss", "gamma": -1.0}, pred, target)
    good = request_of({"type": "FocalLoss", "gamma": 1.0}, pred, target)
    as_int = request_of({"type": "FocalLoss", "gamma": 1}, pred, target)
    for request in (bad, good, bad, good, as_int):
        if request is bad:
            with pytest.raises(Exception, match="gamma"):
                dataplane.evaluate(request, lambda: False)
        else:
            dataplane.evaluate(request, lambda: False)
    answers = [results_of(dataplane.evaluate(r, lambda: False, quick=True).response) for r in (good, as_int, good)]
    assert answers[0] == answers[1] == answers[2]
