"""losswire replicas behind a real layer-7 proxy: nginx as a gRPC proxy, with ``deploy/nginx/losswire.conf``.

Three ``losswire serve`` replicas and nginx (Debian's package; CI installs it) on loopback. The client
targets the proxy as one ``host:port``. Checked: stateless calls spread over every replica, call by call;
every call of a session lands on one replica (nginx hashes the ``x-losswire-session`` header the client
sends), and so do all the streams of a call over lanes; a replica stopped in the middle of a run of
stateless calls costs none of them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.calls import answer_headers, read_log_to_now, send_call_to
from support.paths import ROOT
from support.servers import CALL_TIMEOUT, ServerProcess, serve_cmd, server_env

from losswire.client import LossClient, RemoteLoss
from losswire.server.losses import build_loss

pytestmark = pytest.mark.slow  # server subprocesses and nginx

CONFIG = ROOT / "deploy" / "nginx" / "losswire.conf"
FOCAL = dict(type="FocalLoss", gamma=2.0)
SEESAW = dict(type="SeesawLoss", num_classes=4)


def nginx_binary() -> str:
    """nginx on this machine: missing fails under CI (it installs it), skips elsewhere."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError("nginx is not installed; .ci/run installs Debian's nginx package")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Proxy:
    """nginx running ``deploy/nginx/losswire.conf`` in front of ``replicas``."""

    def __init__(self, binary: str, replicas: list[str], runtime: Path) -> None:
        self.port = free_port()
        lines = "\n        ".join(f"server {replica} max_fails=0;" for replica in replicas)
        text = CONFIG.read_text().replace("{{REPLICAS}}", lines)
        text = text.replace("{{LISTEN}}", f"127.0.0.1:{self.port}").replace("{{RUNTIME}}", str(runtime))
        self.config = runtime / "nginx.conf"
        self.config.write_text(text)
        checked = subprocess.run([binary, "-t", "-c", str(self.config)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.config), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(
            f"nginx did not listen on {self.port}: {self.proc.stderr.read() if self.proc.stderr else ''}"
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def replica() -> ServerProcess:
    argv = serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-workers", "2")
    argv += ["--torch-threads", "1", "--shutdown-notice", "0.5", "--grace", "5", "--log-level", "DEBUG"]
    return ServerProcess(argv, server_env())


@pytest.fixture
def fleet(tmp_path) -> Iterator[tuple[list[ServerProcess], Proxy]]:
    binary = nginx_binary()
    replicas = [replica() for _ in range(3)]
    proxy = None
    try:
        for process in replicas:
            process.wait_started()
        proxy = Proxy(binary, [process.target for process in replicas], tmp_path)
        yield replicas, proxy
    finally:
        if proxy is not None:
            proxy.close()
        for process in replicas:
            process.close()


def focal_call(client: LossClient, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    scores, labels = torch.randn(16, 4, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    remote = RemoteLoss(FOCAL, client=client, validate=False)(scores, labels)
    torch.testing.assert_close(remote, build_loss(FOCAL)(scores, labels))


def evaluated(process: ServerProcess) -> int:
    """FocalLoss calls the replica answered, from its DEBUG log (one line per call). A sentinel call of its
    own (SmoothL1Loss) first: once its line is read, so is every earlier line."""
    read_log_to_now(process)
    return process.log().count("Evaluate FocalLoss:")


def test_stateless_calls_spread_over_every_replica_call_by_call(fleet):
    replicas, proxy = fleet
    client = LossClient(proxy.target, timeout=CALL_TIMEOUT, shared_memory="off")
    try:
        for seed in range(30):
            focal_call(client, seed)
    finally:
        client.close()
    served = [evaluated(process) for process in replicas]
    assert all(count > 0 for count in served), f"calls per replica: {served}"
    assert sum(served) == 30, served


def test_every_call_of_a_session_lands_on_one_replica(fleet):
    replicas, proxy = fleet
    client = LossClient(proxy.target, timeout=CALL_TIMEOUT, shared_memory="off")
    # nginx's consistent hash places the replicas' ephemeral addresses on its ring: with a lopsided ring 6
    # names all landed on one replica once in CI; with 24 that takes a ring no test run will draw
    names = [f"exp/proxy/{i}" for i in range(24)]
    try:
        for step in range(3):
            for name in names:
                scores, labels = torch.randn(8, 6), torch.randint(0, 5, (8,))
                module = RemoteLoss(SEESAW, client=client, session=name, validate=False)
                module(scores, labels)
                assert module.last_session_step == step + 1, (name, step)  # one state: the steps go on
    finally:
        client.close()
    holders = {name: [i for i, process in enumerate(replicas) if name in sessions_of(process)] for name in names}
    assert all(len(found) == 1 for found in holders.values()), holders
    assert len({found[0] for found in holders.values()}) > 1, f"every session on one replica: {holders}"


def test_a_replica_stopped_mid_run_costs_no_stateless_call(fleet):
    replicas, proxy = fleet
    client = LossClient(proxy.target, timeout=60, shared_memory="off")
    failures: list[BaseException] = []
    done = 0

    def run() -> None:
        nonlocal done
        for seed in range(90):
            try:
                focal_call(client, seed)
                done += 1
            except BaseException as error:
                failures.append(error)

    runner = threading.Thread(target=run)
    runner.start()
    while done < 30 and runner.is_alive():
        time.sleep(0.01)
    replicas[1].proc.send_signal(signal.SIGTERM)  # drains (0.5 s notice), then exits
    runner.join(120)
    client.close()
    assert replicas[1].wait_exit() == 0
    assert not failures, failures[:3]
    assert done == 90


def test_a_call_over_lanes_reaches_one_replica_with_all_its_lanes(fleet):
    """Each of a call's streams is an HTTP/2 request of its own, which nginx could send anywhere; the client
    sends them all with one x-losswire-session header, hashed to one replica. So every call over lanes is
    answered (as unary answers it, bit for bit), and each replica's lanes are those of its own calls."""
    replicas, proxy = fleet
    spread = LossClient(proxy.target, timeout=CALL_TIMEOUT, shared_memory="off", stream_threshold=0, lanes=2)
    unary = LossClient(proxy.target, timeout=CALL_TIMEOUT, shared_memory="off", stream_threshold=None)
    try:
        for seed in range(8):
            generator = torch.Generator().manual_seed(seed)
            pred, labels = (
                torch.randn(16384, 80, generator=generator),
                torch.randint(0, 81, (16384,), generator=generator),
            )
            answers = []
            for client in (spread, unary):  # 5 MiB of pred: 5 stripes of 1 MiB over 3 streams
                leaf = pred.clone().requires_grad_()
                RemoteLoss(FOCAL, client=client, validate=False)(leaf, labels).backward()
                answers.append(leaf.grad)
            assert torch.equal(*answers)
        assert spread.transports.lanes == 2  # never fell back to one stream
    finally:
        spread.close()
        unary.close()
    for process in replicas:
        read_log_to_now(process)
    streamed = [process.log().count("EvaluateStream FocalLoss:") for process in replicas]
    joined = [len(re.findall(r"EvaluateStream lane \d: \d+ chunks, in", process.log())) for process in replicas]
    assert sum(streamed) == 8 and joined == [2 * count for count in streamed], (streamed, joined)


def sessions_of(process: ServerProcess) -> set[str]:
    client = LossClient(process.target, timeout=CALL_TIMEOUT)
    try:
        return {info.session for info in client.list_sessions().sessions}
    finally:
        client.close()


def test_a_path_that_is_not_utf8_stops_at_nginx(fleet):
    """grpcio's server shuts its port down on a call whose :path is not UTF-8 (losswire serves the port again
    at once, but every call in flight there is cancelled); the configuration passes only gRPC method paths,
    so nginx answers such a call itself (404) and no replica sees it. (It passed the path on as it came.)"""
    replicas, proxy = fleet
    with send_call_to(proxy.port, b"/\xff") as sock:
        assert answer_headers(sock) == 1  # nginx's own answer, once it has decided where the call goes
    client = LossClient(proxy.target, timeout=CALL_TIMEOUT, shared_memory="off")
    try:
        focal_call(client, 0)
    finally:
        client.close()
    for process in replicas:
        assert "stopped accepting calls" not in process.log(), process.log()
