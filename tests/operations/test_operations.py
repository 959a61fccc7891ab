"""Operations: Prometheus metrics scraped over HTTP, the TOML config file, JSON logs.

The metrics tests run ``losswire serve --metrics-port 0`` in a subprocess and scrape it with
``curl`` (as an operator would), parsing the exposition text with prometheus-client's own parser.
Every count they assert is computed from the requests the test itself sent.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from support.paths import ROOT
from support.servers import CALL_TIMEOUT, ServerProcess, losswire_script, module_cmd, server_env

from losswire.client import LossClient, RemoteLoss
from losswire.client.errors import RemoteLossError
from losswire.server.cli import KNOBS, KnobError, build_parser, resolve_settings
from losswire.server.rpc.metrics import METRICS_CONNECTIONS, METRICS_IDLE_SECONDS, METRICS_SCRAPE_INTERVAL_SECONDS
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

pytestmark = pytest.mark.slow  # server subprocesses

METRICS_AT = r"metrics on http://(?P<host>\S+):(?P<port>\d+)/metrics"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from ``curl`` of the metrics endpoint."""
    curl = shutil.which("curl")
    assert curl, "curl is needed to scrape the metrics endpoint as an operator would"
    text = subprocess.run(
        [curl, "-sf", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT,
        check=True,
    ).stdout
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def change(before: dict, after: dict, name: str, **labels: str) -> float:
    """How far a sample moved between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


def focal_request(n: int = 8) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config({"type": "FocalLoss", "gamma": 2.0}, term.config)
    codec.encode_tensor(torch.randn(n, 5), term.pred)
    codec.encode_value(torch.randint(0, 6, (n,)), term.target)
    return request


@pytest.fixture(scope="module")
def metered_server() -> Iterator[ServerProcess]:
    argv = module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--metrics-port", "0")
    process = ServerProcess([*argv, "--plugin", "slow_loss"], server_env(plugins=True))
    try:
        process.wait_started()
        process.metrics_port = int(process.wait_for(METRICS_AT)["port"])
        yield process
    finally:
        process.close()


def test_metrics_count_requests_losses_statuses_and_bytes(metered_server: ServerProcess):
    client = LossClient(metered_server.target, timeout=CALL_TIMEOUT)
    before = scrape(metered_server.metrics_port)
    requests = [focal_request(n) for n in (4, 8, 16)]
    try:
        for request in requests:
            client.evaluate(request)
        unknown = focal_request()
        codec.encode_config({"type": "NoSuchLoss"}, unknown.terms[0].config)
        short_bytes = focal_request()
        short_bytes.terms[0].pred.data = short_bytes.terms[0].pred.data[:-1]  # shape and bytes disagree
        for request, code in ((unknown, grpc.StatusCode.NOT_FOUND), (short_bytes, grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(RemoteLossError) as raised:
                client.evaluate(request)
            assert raised.value.code == code
        client.list_losses()
    finally:
        client.close()
    after = scrape(metered_server.metrics_port)

    moved = functools.partial(change, before, after)

    assert moved("losswire_requests_total", method="Evaluate", code="OK") == 3
    assert moved("losswire_requests_total", method="Evaluate", code="NOT_FOUND") == 1
    assert moved("losswire_requests_total", method="Evaluate", code="INVALID_ARGUMENT") == 1
    assert moved("losswire_requests_total", method="ListLosses", code="OK") == 1
    assert moved("losswire_loss_terms_total", loss="FocalLoss", code="OK") == 3
    assert moved("losswire_loss_terms_total", loss="FocalLoss", code="INVALID_ARGUMENT") == 1
    # a client's made-up type never becomes a label of its own
    assert moved("losswire_loss_terms_total", loss="unregistered", code="NOT_FOUND") == 1
    assert not any("NoSuchLoss" in str(key) for key in after)
    sent_bytes = sum(r.ByteSize() for r in requests) + unknown.ByteSize() + short_bytes.ByteSize()
    assert moved("losswire_received_bytes_total", method="Evaluate") == sent_bytes
    assert moved("losswire_sent_bytes_total", method="Evaluate") > 0
    assert moved("losswire_request_duration_seconds_count", method="Evaluate") == 5
    for stage in ("decode", "compute", "encode"):  # stages are timed for answered calls only
        assert moved("losswire_evaluate_stage_seconds_count", stage=stage) == 3
    assert value(after, "losswire_in_flight_requests", method="Evaluate") == 0
    assert value(after, "losswire_device_memory_bytes", device="cpu", kind="resident") > 0
    assert value(after, "losswire_build_info", version=_version(), device="cpu") == 1


def test_metrics_say_which_fused_kernel_answered(metered_server: ServerProcess):
    """Every fused kernel has its series from the start; a CPU server's terms are its family kernels' (the
    closed forms and hand-written kernels answer on a GPU), and no GPU kernel is off."""
    client = LossClient(metered_server.target, timeout=CALL_TIMEOUT)
    before = scrape(metered_server.metrics_port)
    try:
        for n in (4, 8, 16):
            client.evaluate(focal_request(n))
    finally:
        client.close()
    after = scrape(metered_server.metrics_port)
    fused = {labels for name, labels in after if name == "losswire_fused_terms_total"}
    losses = {dict(labels)["loss"] for labels in fused}
    assert {"FocalLoss", "QualityFocalLoss", "GIoULoss", "CrossEntropyLoss", "L1Loss", "SmoothL1Loss"} <= losses
    assert {dict(labels)["kernel"] for labels in fused} == {"family", "compiled", "by hand"}
    assert change(before, after, "losswire_fused_terms_total", loss="FocalLoss", kernel="family") == 3
    for kernel in ("compiled", "by hand"):
        assert value(after, "losswire_fused_terms_total", loss="FocalLoss", kernel=kernel) == 0
    off = {dict(labels)["loss"]: after[name, labels] for name, labels in after if name == "losswire_gpu_kernel_off"}
    assert set(off) == losses and not any(off.values())


def test_metrics_count_streamed_calls(metered_server: ServerProcess):
    """EvaluateStream is one call: its status, its terms, its chunks' bytes, its answer's stages."""
    client = LossClient(metered_server.target, timeout=CALL_TIMEOUT, stream_threshold=0, shared_memory="off")
    before = scrape(metered_server.metrics_port)
    request = focal_request(20_000)  # pred 400 KB: streamed in chunks, and so is its gradient
    try:
        response = client.evaluate(request)
        bad = focal_request(20_000)
        codec.encode_config({"type": "NoSuchLoss"}, bad.terms[0].config)
        with pytest.raises(RemoteLossError) as raised:
            client.evaluate(bad)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        client.close()
    after = scrape(metered_server.metrics_port)

    moved = functools.partial(change, before, after)

    assert moved("losswire_requests_total", method="EvaluateStream", code="OK") == 1
    assert moved("losswire_requests_total", method="EvaluateStream", code="NOT_FOUND") == 1
    assert moved("losswire_loss_terms_total", loss="FocalLoss", code="OK") == 1
    assert moved("losswire_loss_terms_total", loss="unregistered", code="NOT_FOUND") == 1
    pred_bytes = len(request.terms[0].pred.data)
    assert moved("losswire_received_bytes_total", method="EvaluateStream") >= 2 * pred_bytes  # both calls
    gradient_bytes = len(response.results[0].gradients["pred"].data)
    assert moved("losswire_sent_bytes_total", method="EvaluateStream") >= gradient_bytes
    assert moved("losswire_request_duration_seconds_count", method="EvaluateStream") == 2
    assert moved("losswire_evaluate_stage_seconds_count", stage="compute") == 1
    assert value(after, "losswire_in_flight_requests", method="EvaluateStream") == 0


def _version() -> str:
    from losswire.server import __version__

    return __version__


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_to_the_metrics_port_are_bounded(metered_server: ServerProcess):
    """Each connection to the metrics endpoint took a thread and a descriptor for as long as its caller
    kept it, so idle connections could use up the process's descriptors and the gRPC ports stopped
    accepting connections. Beyond METRICS_CONNECTIONS a connection is closed at once; the threads stay
    bounded, the gRPC port answers meanwhile, and scrapes work once the idle ones are gone."""
    tasks = f"/proc/{metered_server.proc.pid}/task"
    threads_before = len(os.listdir(tasks))
    extra = 40
    held = [
        socket.create_connection(("127.0.0.1", metered_server.metrics_port), timeout=10)
        for _ in range(METRICS_CONNECTIONS + extra)
    ]
    try:
        time.sleep(1.0)  # the server has accepted them all by now, and closed those beyond its bound
        closed = sum(_closed_by_server(sock) for sock in held)
        assert extra <= closed < extra + METRICS_CONNECTIONS // 2, closed
        assert len(os.listdir(tasks)) - threads_before <= METRICS_CONNECTIONS + 2
        client = LossClient(metered_server.target, timeout=CALL_TIMEOUT)
        assert RemoteLoss(dict(type="L1Loss"), client=client)(torch.ones(4), torch.zeros(4)).item() == 1.0
        client.close()
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 20
    while True:  # the server sees them go, and frees their threads
        try:
            assert any(name == "losswire_build_info" for name, _ in scrape(metered_server.metrics_port))
            break
        except subprocess.CalledProcessError:
            assert time.monotonic() < deadline, "no scrape succeeded once the idle connections had gone"
            time.sleep(0.2)


def test_a_silent_metrics_connection_is_closed(metered_server: ServerProcess):
    sock = socket.create_connection(("127.0.0.1", metered_server.metrics_port), timeout=10)
    try:
        sock.settimeout(METRICS_IDLE_SECONDS + 10)
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert METRICS_IDLE_SECONDS - 1 <= time.monotonic() - started <= METRICS_IDLE_SECONDS + 5
    finally:
        sock.close()


def test_a_flood_of_scrapes_is_answered_at_a_bounded_pace(metered_server: ServerProcess):
    """Eight threads scraping back to back for 2 s: every answer is whole, and at most one scrape per
    METRICS_SCRAPE_INTERVAL_SECONDS is answered (the server answers them in turn). Unpaced, such threads
    took ~300 scrapes a second and made a small call 55 times slower: the event loop waited for the GIL."""
    url = f"http://127.0.0.1:{metered_server.metrics_port}/metrics"
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def scrape_until_stopped() -> None:
        while not stop.is_set():
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read()
            with lock:
                answers.append(body)

    threads = [threading.Thread(target=scrape_until_stopped) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(2.0)  # the flood's length: the bound below is proportional to it
    stop.set()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    assert answers and all(b"losswire_build_info" in body for body in answers)
    assert len(answers) <= elapsed / METRICS_SCRAPE_INTERVAL_SECONDS + 2, (len(answers), elapsed)


def test_in_flight_gauge_sees_a_running_call(metered_server: ServerProcess):
    client = LossClient(metered_server.target, timeout=CALL_TIMEOUT)
    mark = metered_server.mark()
    pred = torch.randn(3, 4)
    call = threading.Thread(
        target=lambda: RemoteLoss(dict(type="SlowL1Loss", delay=2.0), client=client)(pred, pred + 1)
    )
    call.start()
    try:
        metered_server.wait_for("SlowL1Loss: sleeping", since=mark)
        during = scrape(metered_server.metrics_port)
    finally:
        call.join(CALL_TIMEOUT)
        client.close()
    assert value(during, "losswire_in_flight_requests", method="Evaluate") == 1
    assert value(scrape(metered_server.metrics_port), "losswire_in_flight_requests", method="Evaluate") == 0


def test_config_file_sets_what_flags_and_environment_do_not(tmp_path):
    config = tmp_path / "losswire.toml"
    config.write_text('port = 6000\nsession_ttl = 120\nplugins = ["a", "b"]\nlog_format = "json"\nmax_elements = 0\n')
    args = build_parser().parse_args(["serve", "--config", str(config), "--port", "7000"])
    settings = resolve_settings(args, environ={"LOSSWIRE_SESSION_TTL": "90"})
    assert settings["port"] == 7000  # the flag wins
    assert settings["session_ttl"] == 90.0  # then the environment
    assert settings["plugins"] == ("a", "b")  # then the file
    assert settings["log_format"] == "json"
    assert settings["max_elements"] is None  # 0: unbounded
    assert settings["max_workers"] == 8  # then the default
    # LOSSWIRE_CONFIG names the file when --config does not
    no_flag = resolve_settings(build_parser().parse_args(["serve"]), environ={"LOSSWIRE_CONFIG": str(config)})
    assert no_flag["port"] == 6000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown key(s) prot"),
        ('port = "high"\n', "key port: expected port 0..65535, got 'high'"),
        ("port = 70000\n", "must be in 0..65535"),
        ("max_workers = 0\n", "key max_workers: expected integer >= 1"),
        ('plugins = "a"\n', "key plugins: expected a list of module names"),
        ("grace = true\n", "key grace: expected seconds >= 0, got True"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_config_file_errors_name_the_key_and_what_was_expected(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(KnobError) as raised:
        resolve_settings(build_parser().parse_args(["serve", "--config", str(config)]), environ={})
    assert message in str(raised.value)
    assert str(config) in str(raised.value)


def test_bad_config_file_stops_the_server_before_it_binds(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("max_sessions = -3\n")
    result = subprocess.run(
        [losswire_script(), "serve", "--config", str(config)],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT * 2,
    )
    assert result.returncode == 2
    assert "key max_sessions: expected integer >= 1, got '-3'" in result.stderr


def test_server_runs_from_a_config_file_with_json_logs(tmp_path):
    config = tmp_path / "losswire.toml"
    config.write_text(
        'host = "127.0.0.1"\nport = 0\ndevice = "cpu"\nplugins = ["slow_loss"]\n'
        'log_format = "json"\nlog_level = "debug"\nmetrics_port = 0\n'
    )
    server = ServerProcess([losswire_script(), "serve", "--config", str(config)], server_env(plugins=True))
    try:
        metrics_port = int(server.wait_for(METRICS_AT)["port"])
        server.wait_started()
        client = LossClient(server.target, timeout=CALL_TIMEOUT)
        try:
            assert "SlowL1Loss" in [loss.name for loss in client.list_losses().losses]
            pred = torch.randn(2, 3)
            RemoteLoss(dict(type="L1Loss"), client=client)(pred, pred - 1)
        finally:
            client.close()
        server.wait_for(r'"rpc": "Evaluate"')
        assert value(scrape(metrics_port), "losswire_loss_terms_total", loss="L1Loss", code="OK") == 1
    finally:
        server.close()
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records), records
    (request,) = [r for r in records if r.get("rpc") == "Evaluate"]
    assert request["losses"] == ["L1Loss"] and request["level"] == "DEBUG"
    assert {"decode_ms", "compute_ms", "encode_ms"} <= set(request)


def test_every_knob_is_in_serve_help():
    result = subprocess.run(
        [losswire_script(), "serve", "--help"], env=server_env(COLUMNS="100"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout[result.stdout.index("options:") :]
    # each option's entry runs from its "  --flag" line to the next option's, wrapped lines joined
    entries = {
        m.group(1): " ".join(m.group(0).split()) for m in re.finditer(r"(?ms)^  (--[a-z-]+)\b.*?(?=^  -|\Z)", text)
    }
    assert "LOSSWIRE_CONFIG" in entries["--config"]
    for knob in KNOBS:
        flag = "--plugin" if knob.name == "plugins" else knob.flag
        assert flag in entries, f"{flag} missing from `losswire serve --help`:\n{text}"
        assert f"[env {knob.env}; file key {knob.name}; default " in entries[flag], entries[flag]


def test_health_command_finds_the_server_by_the_same_settings(metered_server: ServerProcess, tmp_path):
    """``losswire health`` (the image's HEALTHCHECK) resolves host and port as ``serve`` does."""
    config = tmp_path / "losswire.toml"
    config.write_text(f'host = "0.0.0.0"\nport = {metered_server.port}\n')

    def health(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [losswire_script(), "health", *args], env=server_env(**env), capture_output=True, text=True, timeout=60
        )

    by_env = health(LOSSWIRE_PORT=str(metered_server.port), LOSSWIRE_HOST="127.0.0.1")
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout.strip() == f"127.0.0.1:{metered_server.port} losswire.v1.LossService: SERVING"
    assert health("--config", str(config), "--service", "").returncode == 0  # wildcard host: loopback
    unknown = health("--config", str(config), "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    with socket.socket() as free:  # a port nobody listens on
        free.bind(("127.0.0.1", 0))
        closed = health("--port", str(free.getsockname()[1]), "--host", "127.0.0.1", "--timeout", "2")
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stderr


def test_docs_metrics_table_names_every_metric(metered_server: ServerProcess):
    """docs/server.md's metrics table lists exactly the losswire_* metrics a real server exposes."""
    client = LossClient(metered_server.target, timeout=CALL_TIMEOUT)
    try:
        client.evaluate(focal_request())  # labelled metrics appear once a call has set their labels
    finally:
        client.close()
    exposed = set()
    for name, _labels in scrape(metered_server.metrics_port):
        if name.startswith("losswire_") and not name.endswith("_created"):
            exposed.add(re.sub(r"_(bucket|count|sum)$", "", name))
    text = (ROOT / "docs" / "server.md").read_text()
    table = text[text.index("| metric | labels | what |") :]
    documented = set(re.findall(r"^\| `(losswire_\w+)`", table[: table.index("\n\n")], re.MULTILINE))
    assert documented == exposed, f"documented only: {documented - exposed}; undocumented: {exposed - documented}"
