"""The server as it is deployed: ``losswire serve`` (or ``python -m losswire.server``, the same command line)
in a subprocess.

Each server binds an ephemeral loopback port (``--port 0``); the tests read the bound port from the
start-up log line. Covers health checking, reflection, graceful stop on SIGTERM/SIGINT with a call in
flight, configuration from the environment, plugins (with the client's recompute path
for a non-separable loss) and the per-request DEBUG log.

Every subprocess has a watchdog that kills it after ``HARD_LIMIT`` seconds, and is killed in the
fixture's teardown if a test left it running.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.calls import plain_channel, read_log_to_now
from support.paths import PLUGINS
from support.servers import (
    CALL_TIMEOUT,
    SERVICE,
    START_TIMEOUT,
    ServerProcess,
    losswire_script,
    module_cmd,
    serve_cmd,
    server_env,
)

import losswire.server.losses as engine
from losswire.client import LossClient, RemoteLoss, evaluate_terms
from losswire.client.errors import RemoteLossError
from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server.log_lines import BURST, RepeatedLines
from losswire.server.losses import Registry
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # server subprocesses


@pytest.fixture(scope="module")
def plugin_server() -> Iterator[ServerProcess]:
    """One server for the read-only tests: the test plugin loaded, one DEBUG line per request."""
    argv = module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-workers", "4")
    argv += ["--plugin", "slow_loss", "--log-level", "DEBUG"]
    process = ServerProcess(argv, server_env(plugins=True))
    try:
        yield process.wait_started()
    finally:
        process.close()


@pytest.fixture
def client(plugin_server: ServerProcess) -> Iterator[LossClient]:
    instance = LossClient(plugin_server.target, timeout=CALL_TIMEOUT)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    """tests/plugins/slow_loss.py imported here, registering into a throwaway registry.

    The process-wide ``LOSSES`` stays as it is: other tests (the README catalogue, the registry
    tests, the in-process server) must not see the test losses.
    """
    spec = importlib.util.spec_from_file_location("losswire_test_plugin_slow_loss", PLUGINS / "slow_loss.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "LOSSES", Registry("test-plugin"))
        spec.loader.exec_module(module)
        assert sorted(engine.LOSSES.names()) == ["BatchSoftmaxLoss", "SlowL1Loss"]
    yield module


# -- health and reflection ---------------------------------------------------------------------------


def test_health_reports_serving(plugin_server: ServerProcess):
    with plain_channel(plugin_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_api_without_the_proto(plugin_server: ServerProcess):
    with plain_channel(plugin_server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {SERVICE, "grpc.health.v1.Health"} <= services, services

        # a pool of its own: nothing from losswire.v1's generated code, only what the server sent
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE)
        evaluate = service.methods_by_name["Evaluate"]
        assert evaluate.input_type.full_name == "losswire.v1.EvaluateRequest"
        assert evaluate.output_type.full_name == "losswire.v1.EvaluateResponse"
        assert "terms" in evaluate.input_type.fields_by_name

        # and a call made with the reflected types alone
        list_losses = service.methods_by_name["ListLosses"]
        request_class = message_factory.GetMessageClass(list_losses.input_type)
        response_class = message_factory.GetMessageClass(list_losses.output_type)
        call = channel.unary_unary(
            f"/{SERVICE}/ListLosses",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = call(request_class(), timeout=CALL_TIMEOUT)
        assert response.device == "cpu"
        assert "FocalLoss" in [loss.name for loss in response.losses]


# -- plugins -------------------------------------------------------------------------------------------


def test_plugin_losses_are_listed_with_their_params(client: LossClient):
    losses = {info.name: info for info in client.list_losses().losses}
    assert {"SlowL1Loss", "BatchSoftmaxLoss", "FocalLoss"} <= set(losses)

    slow = losses["SlowL1Loss"]
    params = {p.name: p for p in slow.params}
    assert list(params) == ["delay", "reduction", "loss_weight"]
    assert params["delay"].type == "float" and params["delay"].default.number_value == 1.0
    assert [c.string_value for c in params["reduction"].choices] == ["none", "mean", "sum"]
    assert params["reduction"].default.string_value == "mean"
    assert [i.name for i in slow.inputs] == ["pred", "target", "weight", "avg_factor", "reduction_override"]
    assert slow.separable
    assert "sleeps" in slow.summary

    batch = losses["BatchSoftmaxLoss"]
    assert [(p.name, p.type, p.default.string_value) for p in batch.params] == [("reduction", "str", "none")]
    assert [(i.name, i.kind, i.optional) for i in batch.inputs] == [
        ("pred", "tensor", False),
        ("target", "tensor", False),
    ]
    assert list(batch.differentiable) == ["pred"]
    assert not batch.separable


def test_non_separable_loss_backward_recomputes_on_the_server(
    plugin_server: ServerProcess, client: LossClient, plugin: ModuleType
):
    generator = torch.Generator().manual_seed(11)
    pred = torch.randn(4, 5, generator=generator, requires_grad=True)
    target = torch.rand(4, 5, generator=generator)
    grad_output = torch.randn(4, 5, generator=generator)

    mark = plugin_server.mark()
    remote = RemoteLoss(dict(type="BatchSoftmaxLoss", reduction="none"), client=client)
    out = remote(pred, target)
    out.backward(grad_output)

    local = plugin.BatchSoftmaxLoss()
    ref_pred = pred.detach().clone().requires_grad_()
    want = local(ref_pred, target)
    want.backward(grad_output)
    assert out.shape == want.shape == pred.shape
    torch.testing.assert_close(out.detach(), want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(pred.grad, ref_pred.grad, rtol=0, atol=0)

    # the shortcut that is right for separable losses, upstream x d(loss)/d(pred) for all-ones, is
    # wrong here: the test can tell a client that skipped the recompute
    all_ones = torch.autograd.grad(local(ref_pred, target), ref_pred, torch.ones_like(want))[0]
    assert not torch.allclose(grad_output * all_ones, ref_pred.grad, rtol=1e-3, atol=1e-5)

    # forward, then backward sent the upstream gradient back: two Evaluate requests
    _sentinel(client)
    plugin_server.wait_for(r"Evaluate SmoothL1Loss:", since=mark)
    assert len(re.findall(r"Evaluate BatchSoftmaxLoss:", plugin_server.log(mark))) == 2, plugin_server.log(mark)


def _sentinel(client: LossClient) -> None:
    """One SmoothL1Loss request: once its DEBUG line is read, so are the lines of every earlier request."""
    pred = torch.zeros(2, 4)
    RemoteLoss(dict(type="SmoothL1Loss"), client=client)(pred, pred)


def test_debug_log_has_one_line_per_request(plugin_server: ServerProcess, client: LossClient):
    mark = plugin_server.mark()
    pred, target = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    l1 = RemoteLoss(dict(type="L1Loss"), client=client)
    mse = RemoteLoss(dict(type="MSELoss"), client=client)
    l1(pred, target).backward()  # separable: one request for forward and backward
    losses = evaluate_terms({"a": (l1, (pred, target), {}), "b": (mse, (pred, target), {})}, client=client)
    sum(losses.values()).backward()  # two terms, one request
    with pytest.raises(RemoteLossError):
        l1(pred, target, avg_factor=2.0, reduction_override="sum")  # refused
    _sentinel(client)

    plugin_server.wait_for(r"Evaluate SmoothL1Loss:", since=mark)
    log = plugin_server.log(mark)
    assert len(re.findall(r"DEBUG losswire\.server: Evaluate L1Loss: decode [\d.]+ ms, compute", log)) == 1, log
    assert len(re.findall(r"Evaluate L1Loss,MSELoss: decode", log)) == 1, log
    assert len(re.findall(r"refused: .*avg_factor", log)) == 1, log


def test_a_line_a_caller_causes_call_after_call_is_written_a_few_times(spawn):
    """ResetSession writes an INFO line a reset: a caller creating and resetting sessions in a loop wrote one
    line a call, ~27 KB of log a second from one caller on two cores. Each line of the server's code now
    writes at most BURST lines a minute; per-request DEBUG lines, asked for, stay one a request."""
    argv = module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--log-level", "DEBUG")
    server = spawn(argv, server_env()).wait_started()
    client = LossClient(server.target, timeout=CALL_TIMEOUT)
    resets = 4 * BURST
    try:
        for n in range(resets):
            seesaw = RemoteLoss(dict(type="SeesawLoss", num_classes=3), client=client, session=f"loop-{n}")
            seesaw(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
            client.reset_session(f"loop-{n}")
        read_log_to_now(server)
    finally:
        client.close()
    log = server.log()
    written = re.findall(r"INFO losswire\.server: session loop-\d+ reset after", log)
    assert 1 <= len(written) <= 2 * BURST, log  # a second minute at most, on the slowest machine
    assert len(re.findall(r"DEBUG losswire\.server: Evaluate SeesawLoss:", log)) == resets, log


def test_lines_left_out_are_counted_on_the_next_one_written():
    now = [0.0]
    lines = RepeatedLines(burst=2, interval=60.0, clock=lambda: now[0])

    def record(level: int = logging.INFO, line: int = 1) -> logging.LogRecord:
        return logging.LogRecord("losswire.server", level, "app.py", line, "session %s reset", ("a",), None)

    assert [lines.filter(record()) for _ in range(5)] == [True, True, False, False, False]
    assert lines.filter(record(line=2)) and lines.filter(record(logging.DEBUG))  # another line; a debug line
    now[0] = 61.0
    later = record()
    assert lines.filter(later) and later.getMessage() == "session a reset; 3 more such lines left out before it"
    assert lines.filter(record()) and not lines.filter(record())


def test_the_count_of_a_flood_that_stops_is_written_when_its_window_ends(caplog):
    """No line comes after a flood to carry its count: the count is written on its own once the window has
    ended (it was never written before), and only once, whichever comes first."""
    now, due = [0.0], []
    lines = RepeatedLines(burst=2, interval=60.0, clock=lambda: now[0], schedule=lambda s, work: due.append((s, work)))

    def record(line: int = 1) -> logging.LogRecord:
        return logging.LogRecord(
            "losswire.server", logging.WARNING, "app.py", line, "out of memory on %s", ("x",), None
        )

    now[0] = 5.0  # the window starts
    assert [lines.filter(record()) for _ in range(2)] == [True, True]
    now[0] = 20.0
    assert [lines.filter(record()) for _ in range(4)] == [False] * 4
    assert [seconds for seconds, _ in due] == [45.0]  # one count due, when the window ends
    logger = logging.getLogger("losswire.server")
    logger.addFilter(lines)
    try:
        with caplog.at_level(logging.INFO, logger="losswire.server"):
            due[0][1]()
            due[0][1]()  # written once
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (
                logging.WARNING,
                '4 lines like "out of memory on %s" left out in 60 s (at most 2 a line of the code are written)',
            )
        ]
    finally:
        logger.removeFilter(lines)
    now[0] = 70.0  # the next window: nothing left to carry
    first = record()
    assert lines.filter(first) and first.getMessage() == "out of memory on x"

    # a line of the next window carried the count before the timer came: the timer writes nothing
    due.clear()
    assert [lines.filter(record()) for _ in range(3)] == [True, False, False]
    now[0] = 131.0
    carried = record()
    assert lines.filter(carried) and carried.getMessage().endswith("; 2 more such lines left out before it")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="losswire.server"):
        due[0][1]()
    assert caplog.records == []


# -- configuration -------------------------------------------------------------------------------------


def test_environment_configures_the_server(spawn):
    env = server_env(
        plugins=True,
        LOSSWIRE_HOST="127.0.0.1",
        LOSSWIRE_PORT="0",
        LOSSWIRE_DEVICE="cpu",
        LOSSWIRE_PLUGINS="slow_loss",
        LOSSWIRE_LOG_LEVEL="DEBUG",
    )
    server = spawn([losswire_script()], env).wait_started()  # no command, no flags
    assert server.device == "cpu"
    assert "listening on 127.0.0.1:" in server.log()
    client = LossClient(server.target, timeout=CALL_TIMEOUT)
    try:
        listing = client.list_losses()
        assert listing.device == "cpu"
        assert "SlowL1Loss" in [loss.name for loss in listing.losses]
        pred = torch.randn(2, 4)
        RemoteLoss(dict(type="L1Loss"), client=client)(pred, pred + 1)
    finally:
        client.close()
    server.wait_for(r"DEBUG losswire\.server: Evaluate L1Loss:")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0, server.log()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda would start")
def test_device_cuda_without_cuda_fails_clearly():
    result = subprocess.run(
        module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cuda"),
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert result.returncode == 2
    assert "losswire serve: --device cuda: CUDA is not available on this machine" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening" not in result.stderr, result.stderr


# -- stopping -----------------------------------------------------------------------------------------


def test_sigterm_drains_the_call_in_flight_and_refuses_new_ones(spawn):
    argv = module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--plugin", "slow_loss", "--grace", "10")
    server = spawn(argv, server_env(plugins=True)).wait_started()
    client = LossClient(server.target, timeout=CALL_TIMEOUT)
    health_channel = grpc.insecure_channel(server.target)
    probe_channel = grpc.insecure_channel(server.target, options=[("grpc.enable_retries", 0)])
    try:
        slow = RemoteLoss(dict(type="SlowL1Loss", delay=1.5), client=client)  # Describe: config is valid
        pred = torch.tensor([[0.5, -1.0, 2.0, 0.0]], requires_grad=True)
        target = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                loss = slow(pred, target)
                loss.backward()  # separable: no second request
                outcome["loss"], outcome["grad"] = loss.detach(), pred.grad
            except BaseException as error:
                outcome["error"] = error

        probe = pb_grpc.LossServiceStub(probe_channel)
        probe.ListLosses(pb.ListLossesRequest(), timeout=CALL_TIMEOUT)  # connected, and serving
        watch = health_pb2_grpc.HealthStub(health_channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=CALL_TIMEOUT
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        mark = server.mark()
        caller = threading.Thread(target=call, name="slow-call", daemon=True)
        caller.start()
        server.wait_for(r"SlowL1Loss: sleeping 1\.50 s", since=mark)  # the call has reached the loss
        server.proc.send_signal(signal.SIGTERM)

        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # the watch is an open call too: let the drain wait only for the slow one

        # New calls until one is refused with UNAVAILABLE. A call can still succeed in the moment
        # between SIGTERM and the server's stop(), and a call that races with stop() itself reaches
        # the transport but is CANCELLED by gRPC core (the server no longer takes calls).
        refused: grpc.RpcError | None = None
        in_flight = False
        while caller.is_alive():
            try:
                probe.ListLosses(pb.ListLossesRequest(), timeout=CALL_TIMEOUT)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.CANCELLED:
                    refused, in_flight = error, caller.is_alive()
                    break
            caller.join(0.02)  # not refused yet: poll again shortly
        assert refused is not None, "the slow call ended before the server refused a new call"
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        assert in_flight, "the new call was refused only after the slow call had finished"

        caller.join(CALL_TIMEOUT)
        assert not caller.is_alive()
        assert "error" not in outcome, outcome.get("error")
        torch.testing.assert_close(outcome["loss"], torch.tensor(1.125))  # mean |pred - target|
        torch.testing.assert_close(outcome["grad"], torch.tensor([[-0.25, -0.25, 0.25, -0.25]]))
    finally:
        client.close()
        health_channel.close()
        probe_channel.close()
    assert server.wait_exit() == 0, server.log()
    log = server.log()
    assert "stopping: health NOT_SERVING, draining in-flight calls for up to 10 s" in log
    assert log.rstrip().endswith("stopped"), log


def test_shutdown_notice_lets_health_checks_see_not_serving(spawn):
    argv = module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--shutdown-notice", "1.5")
    server = spawn(argv, server_env()).wait_started()
    with plain_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE)
        assert health.Check(check, timeout=CALL_TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.2
        status = health_pb2.HealthCheckResponse.SERVING
        while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            status = health.Check(check, timeout=CALL_TIMEOUT).status  # a polling probe, not a Watch
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # still serving calls during the notice, and the Open Inference Protocol's readiness agrees
        assert pb_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), timeout=CALL_TIMEOUT).losses
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        assert not inference.ServerReady(oip.ServerReadyRequest(), timeout=CALL_TIMEOUT).ready
        assert inference.ServerLive(oip.ServerLiveRequest(), timeout=CALL_TIMEOUT).live
    assert server.wait_exit() == 0, server.log()
    assert "still serving for 1.5 s of notice" in server.log()


def test_sigint_stops_gracefully(spawn):
    server = spawn(serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu"), server_env()).wait_started()
    with plain_channel(server.target) as channel:
        response = pb_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), timeout=CALL_TIMEOUT)
        assert response.server_version
    server.proc.send_signal(signal.SIGINT)
    assert server.wait_exit() == 0, server.log()
    log = server.log()
    assert "stopping: health NOT_SERVING" in log
    assert "KeyboardInterrupt" not in log and "Traceback" not in log, log
