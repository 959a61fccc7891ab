"""Scale-out: one client over several server processes (replicas) on loopback, and the Kubernetes manifests.

Three ``losswire serve`` subprocesses listen on 127.0.0.1:P, 127.0.0.2:P and 127.0.0.3:P, one port on
three loopback addresses, as three pods behind a headless Service. Each logs one DEBUG line per
Evaluate, which tells which replica served how many calls (``served``).

* A list of targets spreads calls over every replica; the results are the in-process engine's.
* A DNS name that resolves to the three (a DNS server on loopback, asked through a ``dns://server/``
  URI, as the cluster DNS answers for a headless Service) is balanced round_robin, where gRPC's
  default policy pins one replica; ``dns:///localhost:P`` resolves as the system does.
* Stopping a replica (SIGTERM, with a shutdown notice) loses no call: the others serve on, and the
  sessions it held move to their next replica, which the client reports.
* Every client, in this process or another, meets each session on one replica, whose state is the
  state of every call; terms of sessions on different replicas are sent to each and answered in
  order; a session restarted behind a client's back is reported (or raises).
* Rendezvous hashing moves only the sessions of a replica that leaves.
* ``deploy/k8s``: native gRPC probes on the container port, a headless Service that selects the
  pods, a termination grace period longer than the server's notice and drain, the API schema.

Every server subprocess is watchdogged (``ServerProcess``) and killed at teardown.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import torch
from support.calls import read_log_to_now
from support.paths import ROOT
from support.servers import CALL_TIMEOUT, START_TIMEOUT, ServerProcess, serve_cmd, server_env

from losswire.client import LossClient, RemoteLoss, RemoteLossError, SessionRestartedError, evaluate_terms
from losswire.client.replicas import rendezvous_rank
from losswire.client.targets import normalise_target
from losswire.server.cli import KNOBS, build_parser, config_from_args
from losswire.server.losses import build_loss
from losswire.wire.protocol import SERVICE_NAME

pytestmark = pytest.mark.slow  # server subprocesses

K8S = ROOT / "deploy" / "k8s"
SEESAW = dict(type="SeesawLoss", num_classes=4)
CALLS = 30
DNS_NAME = "replicas.losswire.test"


def needs(module: str) -> ModuleType:
    """An optional test dependency (the test extra): missing fails under CI, skips elsewhere."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed: pip install -e '.[test]'")


class Replica(ServerProcess):
    """A ``losswire serve`` subprocess bound to ``host``, logging one DEBUG line per Evaluate."""

    def __init__(self, host: str, port: int = 0, *flags: str) -> None:
        argv = serve_cmd("--host", host, "--port", str(port), "--device", "cpu", "--max-workers", "4")
        super().__init__([*argv, "--torch-threads", "1", "--log-level", "DEBUG", *flags], server_env())
        self.host = host

    @property
    def target(self) -> str:
        assert self.port is not None, "the server has not started"
        return f"{self.host}:{self.port}"


def start_all(replicas: list[Replica]) -> list[Replica]:
    for replica in replicas:
        replica.wait_started()
    return replicas


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Replica]]:
    """Three replicas on one port of three loopback addresses (Linux routes all of 127.0.0.0/8 to lo)."""
    started = [Replica("127.0.0.1")]
    try:
        port = start_all(started)[0].port
        started += [Replica(f"127.0.0.{i}", port) for i in (2, 3)]
        yield start_all(started)
    finally:
        for replica in started:
            replica.close()


@pytest.fixture
def doomed() -> Iterator[list[Replica]]:
    """Three replicas for a test that stops one: half a second of shutdown notice, as a pod's."""
    started = [Replica("127.0.0.1", 0, "--shutdown-notice", "0.5", "--grace", "5") for _ in range(3)]
    try:
        yield start_all(started)
    finally:
        for replica in started:
            replica.close()


def served(replicas: list[Replica], marks: list[int], loss: str) -> list[int]:
    """How many Evaluate calls of ``loss`` each replica logged since its mark.

    A running replica first gets a sentinel call (SmoothL1Loss) of its own: once its line is read, so
    is every earlier line. A stopped replica's log is complete once it has exited."""
    for replica in replicas:
        if replica.proc.poll() is None:
            read_log_to_now(replica)
    return [len(re.findall(rf"Evaluate {loss}:", r.log(m))) for r, m in zip(replicas, marks, strict=True)]


def call_l1(client: LossClient, calls: int = CALLS) -> None:
    loss = RemoteLoss(dict(type="L1Loss"), client=client, validate=False)
    for _ in range(calls):
        loss(torch.ones(2, 3), torch.zeros(2, 3))


def seesaw_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SeesawLoss inputs: scores [6, num_classes + 2] and labels in [0, num_classes] (num_classes: background)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 6, generator=generator), torch.randint(0, 5, (6,), generator=generator)


def sessions_on(replica: Replica) -> dict[str, int]:
    """The replica's own live sessions and their step counts."""
    client = LossClient(replica.target, timeout=CALL_TIMEOUT)
    try:
        return {info.session: info.steps for info in client.list_sessions().sessions}
    finally:
        client.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = CALL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


# -- balancing -----------------------------------------------------------------------------------------


def test_a_list_of_targets_spreads_calls_over_every_replica(replicas: list[Replica]):
    targets = [r.target for r in replicas]
    assert LossClient.shared(",".join(targets)) is LossClient.shared(targets)  # one client for both spellings
    cfg = dict(type="FocalLoss", gamma=2.0, alpha=0.25)
    remote, local = RemoteLoss(cfg, target=targets), build_loss(cfg)
    marks = [r.mark() for r in replicas]
    generator = torch.Generator().manual_seed(0)
    for _ in range(CALLS):
        pred = torch.randn(8, 5, generator=generator, requires_grad=True)
        labels = torch.randint(0, 6, (8,), generator=generator)
        loss = remote(pred, labels)
        loss.backward()
        ref = pred.detach().clone().requires_grad_()
        want = local(ref, labels)
        want.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=0, atol=0)
        torch.testing.assert_close(pred.grad, ref.grad, rtol=0, atol=0)
    counts = served(replicas, marks, "FocalLoss")
    print(f"\n{CALLS} calls, target list of 3 replicas: {counts} per replica")
    assert sum(counts) == CALLS and all(counts), counts


@pytest.fixture(scope="module")
def dns_port(replicas: list[Replica]) -> Iterator[int]:
    """A DNS server on loopback that answers DNS_NAME with one A record per replica, as the cluster
    DNS answers a headless Service's name with one per ready pod. Yields its UDP port."""
    dnslib = needs("dnslib")
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    addresses = [r.host for r in replicas]

    class ReplicaRecords(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            name = request.q.qname
            if name != dnslib.DNSLabel(DNS_NAME):
                reply.header.rcode = dnslib.RCODE.NXDOMAIN
            elif request.q.qtype == dnslib.QTYPE.A:
                for address in addresses:
                    reply.add_answer(dnslib.RR(name, dnslib.QTYPE.A, rdata=dnslib.A(address), ttl=5))
            return reply  # AAAA and the rest: no records

    server = DNSServer(ReplicaRecords(), address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield server.server.server_address[1]
    finally:
        server.stop()


@pytest.mark.skipif(
    os.environ.get("GRPC_DNS_RESOLVER", "").lower() == "native", reason="gRPC's native resolver ignores dns://server/"
)
def test_a_dns_name_is_balanced_round_robin_where_grpcs_default_pins_one_replica(
    replicas: list[Replica], dns_port: int
):
    uri = f"dns://127.0.0.1:{dns_port}/{DNS_NAME}:{replicas[0].port}"
    balanced = LossClient(uri, timeout=CALL_TIMEOUT)
    default = LossClient(uri, timeout=CALL_TIMEOUT, channel=grpc.insecure_channel(uri))  # gRPC's pick_first
    try:
        marks = [r.mark() for r in replicas]
        call_l1(balanced)
        spread = served(replicas, marks, "L1Loss")
        marks = [r.mark() for r in replicas]
        call_l1(default)
        pinned = served(replicas, marks, "L1Loss")
        print(f"\n{CALLS} calls to {DNS_NAME}: round_robin {spread}, gRPC's default {pinned} per replica")
        assert sum(spread) == CALLS and all(spread), spread
        assert sorted(pinned) == [0, 0, CALLS], pinned

        # the client pins sessions by resolving the name itself, which it cannot do at another DNS server
        with pytest.raises(ValueError, match=r"names its own DNS server .*dns:///name:port"):
            RemoteLoss(SEESAW, client=balanced, session="exp/dns")(*seesaw_batch(0))
    finally:
        balanced.close()
        default.close()


def test_a_dns_name_resolved_by_the_system_balances_and_pins_sessions(replicas: list[Replica]):
    """``dns:///localhost:P``: localhost is 127.0.0.1 (and maybe ::1, where nothing listens on P, which
    round_robin skips): every call reaches the first replica, the session too."""
    client = LossClient(f"dns:///localhost:{replicas[0].port}", timeout=CALL_TIMEOUT)
    try:
        marks = [r.mark() for r in replicas]
        call_l1(client)
        assert served(replicas, marks, "L1Loss") == [CALLS, 0, 0]
        seesaw = RemoteLoss(SEESAW, client=client, session="exp/localhost")
        for seed in (1, 2):
            seesaw(*seesaw_batch(seed))
        assert seesaw.last_session_step == 2
        assert sessions_on(replicas[0])["exp/localhost"] == 2
        assert "exp/localhost" not in sessions_on(replicas[1]) | sessions_on(replicas[2])
    finally:
        client.close()


# -- a replica going away ------------------------------------------------------------------------------


def test_stopping_a_replica_loses_no_call_and_its_sessions_move(doomed: list[Replica], caplog):
    client = LossClient([r.target for r in doomed], timeout=CALL_TIMEOUT)
    l1 = RemoteLoss(dict(type="L1Loss"), client=client)
    seesaw = RemoteLoss(SEESAW, client=client, session="exp/moving")
    for seed in (1, 2):
        seesaw(*seesaw_batch(seed))
    victim = next(r for r in doomed if r.target == client.replica_for("exp/moving"))
    survivors = [r for r in doomed if r is not victim]
    assert sessions_on(victim) == {"exp/moving": 2}

    marks = [r.mark() for r in doomed]
    done, errors, stop = [0], [], threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                l1(torch.ones(2, 3), torch.zeros(2, 3))
            except Exception as error:  # every one is a failure the user would have seen
                errors.append(error)
            else:
                done[0] += 1
            stop.wait(0.005)

    caller = threading.Thread(target=keep_calling, name="keep-calling", daemon=True)
    caller.start()
    try:
        wait_until(lambda: done[0] >= 10, "10 calls before the stop")
        victim.proc.send_signal(signal.SIGTERM)
        assert victim.wait_exit() == 0, victim.log()
        after_exit, exit_marks = done[0], [r.mark() for r in survivors]
        wait_until(lambda: done[0] >= after_exit + CALLS, f"{CALLS} calls after the stop")
    finally:
        stop.set()
        caller.join(CALL_TIMEOUT)
    assert not errors, errors[:3]
    counts = served(doomed, marks, "L1Loss")
    later = served(survivors, exit_marks, "L1Loss")
    print(f"\n{done[0]} calls while one of 3 replicas stopped: {counts} per replica, {later} after its exit")
    assert sum(counts) == done[0], (counts, done[0])  # every call served once
    assert counts[doomed.index(victim)] > 0 and all(later), (counts, later)
    assert "still serving for 0.5 s of notice" in victim.log()

    # the stopped replica's session goes to its next replica, where it starts afresh: the client says so
    with caplog.at_level(logging.WARNING, logger="losswire.client"):
        seesaw(*seesaw_batch(3))
    assert seesaw.last_session_step == 1
    home = next(r for r in survivors if r.target == client.replica_for("exp/moving"))
    assert sessions_on(home) == {"exp/moving": 1}
    assert f"replica {victim.target} is unavailable" in caplog.text
    assert "session 'exp/moving' restarted: this client last saw step 2, the server answered step 1" in caplog.text
    seesaw(*seesaw_batch(4))
    assert seesaw.last_session_step == 2
    client.close()


# -- sessions ------------------------------------------------------------------------------------------

SESSIONS = [f"exp/scale/{i}" for i in range(12)]

# worker B: another process, the replicas listed in another order, another hash seed
WORKER = """
import sys
import torch
from losswire.client import LossClient, RemoteLoss

job = torch.load(sys.argv[1])
client = LossClient(job["targets"], timeout=30)
for session, (scores, labels) in job["batches"].items():
    RemoteLoss(job["cfg"], client=client, session=session)(scores, labels)
print(" ".join(client.replica_for(session) for session in job["batches"]))
"""


def test_every_client_in_every_process_meets_a_session_on_one_replica(replicas: list[Replica], tmp_path: Path):
    targets = [r.target for r in replicas]
    batches = {name: [seesaw_batch(100 + 3 * i + k) for k in range(3)] for i, name in enumerate(SESSIONS)}
    first = LossClient(targets, timeout=CALL_TIMEOUT)
    second = LossClient(targets, timeout=CALL_TIMEOUT)
    try:
        for session in SESSIONS:  # worker A: each session's first batch
            RemoteLoss(SEESAW, client=first, session=session)(*batches[session][0])
        job = tmp_path / "job.pt"
        reordered = ",".join(reversed(targets))
        torch.save({"targets": reordered, "cfg": SEESAW, "batches": {s: batches[s][1] for s in SESSIONS}}, job)
        worker = subprocess.run(
            [sys.executable, "-c", WORKER, str(job)],
            env=server_env(PYTHONHASHSEED="4242"),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        assert worker.returncode == 0, worker.stderr
        for session in SESSIONS:  # worker C, another client here: the third batch, after A's and B's
            loss = RemoteLoss(SEESAW, client=second, session=session)
            loss(*batches[session][2])
            assert loss.last_session_step == 3, session

        homes = {s: first.replica_for(s) for s in SESSIONS}
        assert worker.stdout.split() == [homes[s] for s in SESSIONS]
        assert {s: second.replica_for(s) for s in SESSIONS} == homes
        listed = {r.target: sessions_on(r) for r in replicas}
        for session in SESSIONS:  # on its replica, with all three steps; on no other
            assert [t for t, on in listed.items() if session in on] == [homes[session]], session
            assert listed[homes[session]][session] == 3
        placement = Counter(homes.values())
        print(f"\n{len(SESSIONS)} sessions over 3 replicas: {sorted(placement.values())}")
        assert len(placement) > 1, placement  # hashed over the replicas, not all on one
        assert {i.session for i in first.list_sessions().sessions} >= set(SESSIONS)  # the client lists all

        for session in SESSIONS:  # the state of all three calls: one module fed the same batches
            local = build_loss(SEESAW)
            for batch in batches[session]:
                local(*batch)
            state = RemoteLoss(SEESAW, client=second, session=session).session_state()
            torch.testing.assert_close(state["cum_samples"], local.state_dict()["cum_samples"], rtol=0, atol=0)
    finally:
        first.close()
        second.close()


def test_terms_of_sessions_on_different_replicas_go_to_each_and_come_back_in_order(replicas: list[Replica]):
    client = LossClient([r.target for r in replicas], timeout=CALL_TIMEOUT)
    try:
        names = [f"exp/split/{i}" for i in range(20)]
        first = names[0]
        second = next(n for n in names if client.replica_for(n) != client.replica_for(first))
        l1 = RemoteLoss(dict(type="L1Loss"), client=client)
        remote = {name: RemoteLoss(SEESAW, client=client, session=name) for name in (first, second)}
        pred, goal = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
        scores = {name: seesaw_batch(seed)[0].requires_grad_() for seed, name in enumerate((first, second))}
        labels = {name: seesaw_batch(seed)[1] for seed, name in enumerate((first, second))}
        terms = {"l1": (l1, (pred, goal), {})}
        terms |= {name: (remote[name], (scores[name], labels[name]), {}) for name in (first, second)}
        out = evaluate_terms(terms, client=client)
        assert list(out) == ["l1", first, second]
        (out["l1"] + sum(sum(out[name].values()) for name in (first, second))).backward()

        ref_pred = pred.detach().clone().requires_grad_()
        want = build_loss(dict(type="L1Loss"))(ref_pred, goal)
        want.backward()
        torch.testing.assert_close(out["l1"].detach(), want.detach())
        torch.testing.assert_close(pred.grad, ref_pred.grad)
        for name in (first, second):  # each a fresh module's first step, on its own replica
            ref_score = scores[name].detach().clone().requires_grad_()
            local = build_loss(SEESAW)(ref_score, labels[name])
            sum(local.values()).backward()
            for key, value in local.items():
                torch.testing.assert_close(out[name][key].detach(), value.detach())
            torch.testing.assert_close(scores[name].grad, ref_score.grad)
            home = next(r for r in replicas if r.target == client.replica_for(name))
            assert sessions_on(home)[name] == 1 and remote[name].last_session_step == 1

        # an error in the second replica's request names the caller's term
        bad = torch.full((6,), 9)  # labels beyond num_classes
        with pytest.raises(RemoteLossError) as caught:
            evaluate_terms(
                {first: (remote[first], seesaw_batch(5), {}), second: (remote[second], (scores[second], bad), {})}
            )
        assert caught.value.field == "terms[1].labels" and f"terms[1] ({second})" in caught.value.details, caught.value
    finally:
        client.close()


def test_a_session_restarted_behind_a_clients_back_is_reported(replicas: list[Replica], caplog):
    targets = [r.target for r in replicas]
    strict = LossClient(targets, timeout=CALL_TIMEOUT, on_session_restart="raise")
    lenient, other = LossClient(targets, timeout=CALL_TIMEOUT), LossClient(targets, timeout=CALL_TIMEOUT)
    try:
        loss = RemoteLoss(SEESAW, client=strict, session="exp/restart")
        for seed in (1, 2):
            loss(*seesaw_batch(seed))
        loss.reset_session()  # its own reset is no surprise
        for seed in (3, 4):
            loss(*seesaw_batch(seed))
        assert loss.last_session_step == 2
        other.reset_session("exp/restart")  # another worker's is
        with pytest.raises(SessionRestartedError) as caught:
            loss(*seesaw_batch(5))
        assert caught.value.code == grpc.StatusCode.DATA_LOSS
        assert (caught.value.session, caught.value.last_step, caught.value.step) == ("exp/restart", 2, 1)

        carry_on = RemoteLoss(SEESAW, client=lenient, session="exp/restart")
        carry_on(*seesaw_batch(6))
        other.reset_session("exp/restart")
        with caplog.at_level(logging.WARNING, logger="losswire.client"):
            carry_on(*seesaw_batch(7))
        assert carry_on.last_session_step == 1
        assert "session 'exp/restart' restarted: this client last saw step 2, the server answered step 1" in caplog.text

        other.reset_session("exp/restart")  # after one step only: step 1 again, but another forward's
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="losswire.client"):
            carry_on(*seesaw_batch(8))
        assert "last saw step 1, the server answered step 1" in caplog.text
    finally:
        for client in (strict, lenient, other):
            client.close()


def test_rendezvous_moves_only_the_sessions_of_a_replica_that_leaves():
    replicas = [f"10.0.0.{i}:50051" for i in range(1, 6)]
    keys = [f"exp{i}/roi_head" for i in range(500)]
    ranks = {k: rendezvous_rank(k, replicas) for k in keys}
    assert all(rendezvous_rank(k, replicas[::-1]) == ranks[k] for k in keys[:50])  # the listing order is moot
    homes = Counter(rank[0] for rank in ranks.values())
    assert set(homes) == set(replicas) and min(homes.values()) > len(keys) / len(replicas) / 2, homes

    leaving = replicas[2]
    rest = [r for r in replicas if r != leaving]
    after = {k: rendezvous_rank(k, rest)[0] for k in keys}
    moved = {k for k in keys if after[k] != ranks[k][0]}
    assert moved == {k for k in keys if ranks[k][0] == leaving}  # only its sessions move...
    assert all(after[k] == ranks[k][1] for k in moved)  # ...each to its own second choice

    joining = [*replicas, "10.0.0.9:50051"]
    taken = {k for k in keys if rendezvous_rank(k, joining)[0] != ranks[k][0]}
    assert taken and all(rendezvous_rank(k, joining)[0] == "10.0.0.9:50051" for k in taken)


@pytest.mark.parametrize(
    ("target", "normalised"),
    [
        ("gpu1:50051", "gpu1:50051"),
        (" gpu1:50051 , gpu2:50051,gpu1:50051", ("gpu1:50051", "gpu2:50051")),
        (["gpu1:50051", "[::1]:50051"], ("gpu1:50051", "[::1]:50051")),
        (("gpu1:50051",), "gpu1:50051"),
        ("dns:///losswire-headless.ml.svc.cluster.local:50051", "dns:///losswire-headless.ml.svc.cluster.local:50051"),
        ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
    ],
)
def test_targets_are_normalised_to_one_shared_key(target, normalised):
    assert normalise_target(target) == normalised


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("gpu1", "expected 'host:port'"),
        ("::1:50051", r"IPv6: '\[address\]:port'"),
        (" , ", "names no server"),
        (["gpu1:50051", "dns:///x:50051"], "list host:port addresses, or pass one gRPC URI alone"),
        ("dns:///a:1,b:2", "a dns: URI names one host"),
        (["127.0.0.1:1", "[::1]:2"], "one balanced gRPC channel takes one family"),
    ],
)
def test_bad_targets_are_refused_with_the_reason(target, message):
    with pytest.raises(ValueError, match=message):
        LossClient(target)


# -- the Kubernetes manifests --------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """Every object under deploy/k8s by kind (kustomization.yaml aside)."""
    yaml = needs("yaml")
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for document in yaml.safe_load_all(path.read_text()):
                objects[document["kind"]] = document
    return objects


def test_kubernetes_manifests_probe_grpc_and_drain_within_the_grace_period():
    objects = manifests()
    deployment, service, budget = objects["Deployment"], objects["Service"], objects["PodDisruptionBudget"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    env = {item["name"]: item["value"] for item in container["env"]}

    # the settings the server reads from that environment, as `losswire serve` in the pod will
    assert set(env) <= {knob.env for knob in KNOBS}, set(env) - {knob.env for knob in KNOBS}
    config = config_from_args(build_parser().parse_args(["serve"]), env)
    assert config.host in ("0.0.0.0", "::") and config.port == ports["grpc"] and config.metrics_port == ports["metrics"]
    # the probes' own port: a flood on the callers' port cannot keep them waiting
    assert config.health_port == ports["health"] != ports["grpc"]

    expected = {"startupProbe": SERVICE_NAME, "livenessProbe": "", "readinessProbe": SERVICE_NAME}
    for name, health_service in expected.items():
        probe = container[name]
        assert {"httpGet", "tcpSocket", "exec"}.isdisjoint(probe), f"{name}: a native grpc probe"
        assert probe["grpc"]["port"] == ports["health"], name
        assert probe["grpc"].get("service", "") == health_service, name

    # SIGTERM: NOT_SERVING for the notice, long enough for readiness to fail; then the drain; Kubernetes
    # waits for both before it would SIGKILL
    readiness = container["readinessProbe"]
    assert config.shutdown_notice_seconds >= readiness["periodSeconds"] * readiness.get("failureThreshold", 3)
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.shutdown_notice_seconds + config.grace_seconds

    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and {"cpu", "memory"} <= set(resources["requests"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["runAsUser"] > 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]

    labels = pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per ready pod
    assert service["spec"]["selector"].items() <= labels
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == ports["grpc"] and service_port["targetPort"] in ("grpc", ports["grpc"])
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels

    kustomization = needs("yaml").safe_load((K8S / "kustomization.yaml").read_text())
    listed = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == listed


@pytest.mark.parametrize("version", ["1.27.0", "latest"])  # 1.27: native gRPC probes are GA
def test_kubernetes_manifests_match_the_api_schema(version: str):
    validator = needs("kubernetes_validate")
    version = validator.latest_version() if version == "latest" else version
    for kind, document in manifests().items():
        try:  # strict: an unknown field (a misspelt probe) is an error, not ignored
            validator.validate(document, version, strict=True)
        except validator.ValidationError as error:
            pytest.fail(f"{kind} is not a valid Kubernetes {version} object: {error.message}")
