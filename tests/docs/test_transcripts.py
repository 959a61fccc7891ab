"""Transcripts in the docs come from real runs: each test runs the commands a doc shows (grpcurl, Node.js,
``losswire`` itself) or the Python call it describes, against real servers, and fails when the doc's copy
differs from what they print now.

To rewrite them after a change, then review the diff:

    LOSSWIRE_UPDATE_DOCS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/docs/test_transcripts.py

What a run cannot reproduce is normalised on both sides, never invented: the servers listen on free
loopback ports, shown as ``localhost:50051``; ``.venv/bin/`` stands for this environment's scripts;
timestamps are cut from log lines; the Evaluate answer's ``implementation`` digest and ``timings`` are
shown as ``…``; Node's float differences (rounding of the last bit) compare as numbers of any value.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support.paths import EXAMPLES, ROOT
from support.servers import ServerProcess, serve_cmd, server_env

from losswire.client import LossClient, RemoteLoss, RemoteLossError

pytestmark = pytest.mark.slow  # server subprocesses

DOCS = ROOT / "docs"
SHOWN_TARGET = "localhost:50051"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.MULTILINE)
GRPC_CORE_STAMP = re.compile(r"^([EWI])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ", re.MULTILINE)  # gRPC core's own lines
COMMAND_TIMEOUT = 120.0  # a hang guard


def require(found: str | None, what: str) -> str:
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {what} is not installed")
        pytest.skip(f"{what} is not installed")
    return found


@pytest.fixture(scope="module")
def plain_server() -> Iterator[ServerProcess]:
    process = ServerProcess(serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu"), server_env())
    try:
        yield process.wait_started()
    finally:
        process.close()


@pytest.fixture(scope="module")
def fault_server() -> Iterator[ServerProcess]:
    """Test-only losses that sleep or need too much memory; shared memory off, as in a container."""
    argv = serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--shared-memory", "off")
    process = ServerProcess([*argv, "--plugin", "slow_loss,fault_losses"], server_env(plugins=True))
    try:
        yield process.wait_started()
    finally:
        process.close()


def shell(commands: list[str], port: int | None = None, extra: dict[str, str] | None = None, **env: str) -> str:
    """``$ command`` and its output (stdout and stderr) for each command, run by bash as shown, with the
    shown target and paths mapped to the real ones."""
    scripts = str(Path(sys.executable).parent) + "/"
    lines = []
    for shown in commands:
        real = shown.replace(".venv/bin/", scripts)
        if port is not None:
            real = real.replace(SHOWN_TARGET, f"127.0.0.1:{port}")
        for a, b in (extra or {}).items():
            real = real.replace(a, b)
        result = subprocess.run(
            ["bash", "-c", "exec 2>&1\n" + real],
            cwd=ROOT,
            env=server_env(COLUMNS="80", **env),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        output = result.stdout
        if port is not None:
            output = output.replace(f"127.0.0.1:{port}", SHOWN_TARGET)
        output = GRPC_CORE_STAMP.sub(r"\1… ", TIMESTAMP.sub("… ", output))
        lines.append(f"$ {shown}\n{output}")
    return "".join(lines)


# -- the README and server.md ------------------------------------------------------------------------------


def test_readme_start_up_line(plain_server: ServerProcess):
    """The README quotes the start-up line of `losswire serve` (default host 0.0.0.0, port 50051)."""
    line = plain_server.wait_for(r"listening on .*")
    now = re.sub(r"listening on 127\.0\.0\.1:\d+", "listening on 0.0.0.0:50051", line.group(0))
    quoted = re.search(r"`(listening on 0\.0\.0\.0:50051, device cpu, \d+ losses)`", (ROOT / "README.md").read_text())
    assert quoted, "the README no longer quotes the start-up line"
    assert now.startswith(quoted.group(1) + ": "), f"README: `{quoted.group(1)}`; the server: {now}"


def test_readme_example_runs(plain_server: ServerProcess, tmp_path):
    """The README's example, as a user would run it against the server of the quick start."""
    example = re.search(r"## An example.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert example, "the README has no example"
    script = tmp_path / "example.py"
    script.write_text(example.group(1) + "\nassert cls_score.grad is not None and boxes.grad is not None\n")
    result = subprocess.run(
        [sys.executable, str(script)],
        env=server_env(LOSSWIRE_TARGET=f"localhost:{plain_server.port}"),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr


def test_help(transcript):
    transcript(DOCS / "server.md", "help", shell([".venv/bin/losswire --help"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the doc shows a machine without CUDA")
def test_bad_values(transcript):
    body = shell(
        [
            ".venv/bin/losswire serve --device gpu",
            "LOSSWIRE_MAX_WORKERS=0 .venv/bin/losswire serve",
            "LOSSWIRE_DEVICE=cuda:1 .venv/bin/losswire serve   # on a machine without CUDA",
        ]
    )
    transcript(DOCS / "server.md", "bad-values", body)


# -- protocol.md: grpcurl and Node ---------------------------------------------------------------------------

EVALUATE = """.venv/bin/grpcurl -plaintext -d '{"terms": [{"config": {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25},
    "pred": {"dtype": "FLOAT32", "shape": [2, 2], "data": "AAAAPwAAgL8AAABAAAAAAA=="},
    "target": {"tensor": {"dtype": "INT64", "shape": [2], "data": "AAAAAAAAAAACAAAAAAAAAA=="}},
    "avg_factor": 1.0}]}' localhost:50051 losswire.v1.LossService/Evaluate"""
UNKNOWN = """.venv/bin/grpcurl -plaintext -d '{"terms": [{"config": {"type": "FocalLos"},
    "pred": {"dtype": "FLOAT32", "shape": [2, 2], "data": "AAAAPwAAgL8AAABAAAAAAA=="},
    "target": {"tensor": {"dtype": "INT64", "shape": [2], "data": "AAAAAAAAAAACAAAAAAAAAA=="}}}]}' \\
    localhost:50051 losswire.v1.LossService/Evaluate"""


def grpcurl() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    return require(str(beside) if beside.exists() else None, "grpcurl (pip install -e '.[test]')")


def mask_volatile(text: str) -> str:
    text = re.sub(r'"implementation": "sha256:[0-9a-f]+"', '"implementation": "sha256:…"', text)
    return re.sub(r'"(decode|compute|encode)_ms": [0-9.e+-]+', r'"\1_ms": …', text)


def test_grpcurl_list(transcript, plain_server: ServerProcess):
    grpcurl()
    body = shell([".venv/bin/grpcurl -plaintext localhost:50051 list"], plain_server.port)
    assert "inference.GRPCInferenceService" in body and "losswire.v1.LossService" in body
    transcript(DOCS / "protocol.md", "grpcurl-list", body)


def test_grpcurl_evaluate(transcript, plain_server: ServerProcess):
    grpcurl()
    port = plain_server.port
    body = shell([".venv/bin/grpcurl -plaintext localhost:50051 describe losswire.v1.Tensor", EVALUATE], port)
    body = mask_volatile(body)
    loss = re.search(r'"loss": \{\s*"dtype": "FLOAT32",\s*"data": "([^"]+)"', body).group(1)
    gradient = re.search(r'"pred": \{[^}]*"data": "([^"]+)"', body[body.index('"gradients"') :]).group(1)
    body += shell(
        [
            f"echo {loss} | base64 -d | od -An -tf4                  # the loss",
            f"echo {gradient} | base64 -d | od -An -tf4  # d loss / d pred",
        ]
    )
    transcript(DOCS / "protocol.md", "grpcurl-evaluate", body)


def test_grpcurl_error(transcript, plain_server: ServerProcess):
    grpcurl()
    body = shell([UNKNOWN], plain_server.port)
    assert "type.googleapis.com/google.rpc.BadRequest" in body and "terms[0].config.type" in body, body
    transcript(DOCS / "protocol.md", "grpcurl-error", body)


def mask_float_noise(text: str) -> str:
    """Node's differences from the engine are last-bit rounding, which varies between CPUs."""
    return re.sub(r"\d+(\.\d+)?e-\d+", "<tiny>", text)


def test_node_caller(transcript, plain_server: ServerProcess, tmp_path):
    require(shutil.which("node"), "node")
    require("ok" if (EXAMPLES / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir() else None, "node_modules")
    cases = {"/tmp/cases.json": str(tmp_path / "cases.json")}
    body = shell(
        [
            ".venv/bin/python examples/node/make_cases.py --out /tmp/cases.json",
            "node examples/node/evaluate.js --target localhost:50051 --cases /tmp/cases.json | grep -v '^RESULT'",
        ],
        plain_server.port,
        cases,
    )
    body = body.replace(str(tmp_path / "cases.json"), "/tmp/cases.json")
    assert "SUMMARY passed=5 failed=0" in body, body
    transcript(DOCS / "protocol.md", "node", body, mask_float_noise)


# -- troubleshooting.md: what a caller and an operator see ------------------------------------------------------


def raised(call: Callable[[], object]) -> str:
    with pytest.raises(RemoteLossError) as caught:
        call()
    error = caught.value
    return f"{type(error).__module__}.{type(error).__qualname__}: {error}"


def shown(text: str, port: int) -> str:
    text = re.sub(rf"\b(ipv4|ipv6):(127\.0\.0\.1|%5B::1%5D):{port}\b", r"\1:\2:50051", text)
    return re.sub(rf"(?<![\w.:])(127\.0\.0\.1|localhost|\[::1\]):{port}\b", SHOWN_TARGET, text)


def any_loopback_address(text: str) -> str:
    """gRPC names the last address it tried, IPv4 or IPv6 loopback, which varies with the resolver."""
    return re.sub(r"\b(ipv4|ipv6):(127\.0\.0\.1|%5B::1%5D):", "ADDRESS:", text)


def test_connection_refused(transcript):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    message = raised(lambda: RemoteLoss(dict(type="L1Loss"), target=f"localhost:{port}"))
    body = f'>>> RemoteLoss(dict(type="L1Loss"))  # nothing listens on {SHOWN_TARGET}\n{shown(message, port)}'
    transcript(DOCS / "troubleshooting.md", "refused", body, any_loopback_address)


def test_deadline_exceeded(transcript, fault_server: ServerProcess):
    pred = torch.zeros(2, 4)
    slow = RemoteLoss(dict(type="SlowL1Loss", delay=3.0), target=f"localhost:{fault_server.port}", timeout=1.0)
    message = raised(lambda: slow(pred, pred))
    body = ">>> loss_fn(pred, target)  # timeout=1.0, and the server needs 3 s for this call\n"
    transcript(DOCS / "troubleshooting.md", "deadline", body + shown(message, fault_server.port))


def test_server_gone_past_the_deadline(transcript):
    """A call waits for a server that answered before (a restart) only until its deadline."""
    process = ServerProcess(serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu"), server_env())
    try:
        port = process.wait_started().port
        loss = RemoteLoss(dict(type="L1Loss"), target=f"localhost:{port}", timeout=2.0)
        loss(torch.ones(2), torch.zeros(2))
        process.proc.send_signal(signal.SIGTERM)
        assert process.wait_exit() == 0, process.log()
        message = raised(lambda: loss(torch.ones(2), torch.zeros(2)))
    finally:
        process.close()
    body = ">>> loss_fn(pred, target)  # timeout=2.0; the server answered before, then stopped and is not back\n"
    transcript(DOCS / "troubleshooting.md", "restart-deadline", body + shown(message, port))


def test_port_in_use(transcript):
    with socket.socket() as taken:  # a listener that does not share its port (no SO_REUSEPORT)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        body = shell([".venv/bin/losswire serve --host 127.0.0.1 --port 50051"], extra={"50051": str(port)})
    body = body.replace(str(port), "50051")
    assert "cannot start" in body, body
    transcript(DOCS / "troubleshooting.md", "port-in-use", body)


def test_shared_memory_fallback(transcript, fault_server: ServerProcess, caplog):
    client = LossClient(f"localhost:{fault_server.port}", timeout=60)  # shared_memory="auto": this host
    try:
        pred = torch.randn(512, 1024)  # 2 MiB: big enough for shared memory
        with caplog.at_level(logging.INFO, logger="losswire.client"):
            RemoteLoss(dict(type="L1Loss"), client=client)(pred, pred + 1)
    finally:
        client.close()
    lines = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records if "shared memory" in r.getMessage()]
    assert lines, caplog.text
    transcript(DOCS / "troubleshooting.md", "shm-fallback", shown(lines[0], fault_server.port))


def test_out_of_memory(transcript, fault_server: ServerProcess):
    pred = torch.zeros(2, 4)
    hungry = RemoteLoss(dict(type="HungryL1Loss", allocate_bytes=2**60), target=f"localhost:{fault_server.port}")
    message = raised(lambda: hungry(pred, pred))
    body = ">>> loss_fn(pred, target)  # a term that needs more memory than the server has (here: a CPU server)\n"
    transcript(DOCS / "troubleshooting.md", "oom", body + shown(message, fault_server.port))


def test_message_too_large(transcript, plain_server: ServerProcess):
    client = LossClient(f"localhost:{plain_server.port}", timeout=60, stream_threshold=None, shared_memory="off")
    try:
        pred = torch.zeros(8 << 20)  # 32 MiB, and as much of target: one message over the server's 64 MiB
        message = raised(lambda: RemoteLoss(dict(type="L1Loss"), client=client)(pred, pred))
    finally:
        client.close()
    body = ">>> loss_fn(pred, target)  # LossClient(stream_threshold=None): 32 MiB each, sent in one message\n"
    transcript(DOCS / "troubleshooting.md", "too-large", body + shown(message, plain_server.port))
