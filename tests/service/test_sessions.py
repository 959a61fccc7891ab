"""Server-held state for stateful losses: named sessions over a real server.

State updates once per forward (never again in a backward recompute or a retried call), is shared
by every client naming the session, can be read, reset and listed, expires when idle, and two
concurrent workers on one SeesawLoss session get exactly what one mmdet module fed the same
batches in the server's order computes (fixtures from ``tests/reference/cases_sessions.py``).
"""

from __future__ import annotations

import os
import threading

import grpc
import pytest
import torch
from support.mmdet_fixtures import FAMILIES, parts
from support.stateful_losses import CountingBatchSoftmaxLoss, CountingSoftmaxPairLoss, register

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.evaluation.sessions import SessionStore, UnknownSessionError
from losswire.server.losses import LOSSES
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

DEVICE = os.environ.get("LOSSWIRE_TEST_DEVICE", "cpu")
MAX_SESSIONS = 12


@pytest.fixture(scope="module")
def target():
    server = LosswireServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            device=DEVICE,
            max_workers=8,
            max_sessions=MAX_SESSIONS,
            # each of two concurrent workers may run all three of its forwards between the other's
            # forward and its backward's replay (test_two_concurrent_workers...): 4 keeps that replayable
            session_replay_depth=4,
        ),
        registry=register(LOSSES.copy("session-tests")),
    )
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=1)


@pytest.fixture(autouse=True)
def fresh_sessions(target):
    """Each test starts with no live sessions."""
    client = LossClient.shared(target)
    for info in client.list_sessions().sessions:
        client.reset_session(info.session)


def _pair(seed: int = 0, shape=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def _counting_l1(pred, target, calls):
    return (calls * (pred - target).abs()).mean()


def test_state_is_shared_by_every_client_and_updated_once_per_forward(target):
    workers = [RemoteLoss(dict(type="CountingL1Loss"), target, session="exp42/head0") for _ in range(2)]
    for step in range(1, 5):
        pred, tgt = _pair(step)
        pred.requires_grad_()
        loss = workers[step % 2](pred, tgt)
        loss.backward()
        torch.testing.assert_close(loss.detach(), _counting_l1(pred.detach(), tgt, step))
        torch.testing.assert_close(pred.grad, step * torch.sign(pred.detach() - tgt) / pred.numel())
        assert workers[step % 2].last_session_step == step
    assert workers[0].session_state()["calls"].item() == 4
    info = LossClient.shared(target).get_session("exp42/head0")
    assert info.steps == 4 and codec.decode_config(info.config)["type"] == "CountingL1Loss"


def test_without_a_session_state_lives_for_one_call(target):
    loss_fn = RemoteLoss(dict(type="CountingL1Loss"), target)
    pred, tgt = _pair()
    for _ in range(3):
        torch.testing.assert_close(loss_fn(pred, tgt), _counting_l1(pred, tgt, 1))
    assert LossClient.shared(target).list_sessions().sessions == []


def test_non_separable_backward_replays_the_forwards_state_without_updating_it(target):
    remote = RemoteLoss(dict(type="CountingBatchSoftmaxLoss"), target, session="softmax")
    local = CountingBatchSoftmaxLoss()
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for step in (1, 2):
        pred = torch.randn(3, 4, generator=torch.Generator().manual_seed(step), requires_grad=True)
        tgt = torch.rand(3, 4)
        out = remote(pred, tgt)
        out.backward(upstream)  # a resend: the server replays step `step`'s state
        ref_pred = pred.detach().clone().requires_grad_()
        ref = local(ref_pred, tgt)
        ref.backward(upstream)
        torch.testing.assert_close(out.detach(), ref.detach())
        torch.testing.assert_close(pred.grad, ref_pred.grad)
    state = remote.session_state()
    assert state["calls"].item() == 2  # two forwards; the two recomputes did not count
    assert LossClient.shared(target).get_session("softmax").steps == 2


@pytest.mark.parametrize("session", [None, "pair"])
def test_non_separable_dict_output_resends_one_upstream_gradient_per_part(target, session):
    remote = RemoteLoss(dict(type="CountingSoftmaxPairLoss"), target, session=session)
    local = CountingSoftmaxPairLoss()
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(3, 4, generator=g, requires_grad=True)
    tgt = torch.rand(3, 4, generator=g)
    upstream = torch.randn(3, 4, generator=g)
    out = remote(pred, tgt)
    (out["spread"] * upstream).sum().add(3.0 * out["peak"]).backward()
    ref_pred = pred.detach().clone().requires_grad_()
    ref = local(ref_pred, tgt)
    (ref["spread"] * upstream).sum().add(3.0 * ref["peak"]).backward()
    assert set(out) == {"spread", "peak"}
    torch.testing.assert_close(out["spread"].detach(), ref["spread"].detach())
    torch.testing.assert_close(pred.grad, ref_pred.grad)
    if session:
        assert remote.session_state()["calls"].item() == 1


def test_a_loss_reducing_several_axes_broadcasts_the_upstream_gradient_per_sample(target):
    """Separable [N, H, W] -> [N]: one round trip, size-1 axes inserted until the ranks match."""
    g = torch.Generator().manual_seed(6)
    pred, tgt = torch.randn(5, 3, 4, generator=g, requires_grad=True), torch.randn(5, 3, 4, generator=g)
    upstream = torch.randn(5, generator=g)
    cfg = dict(type="MaskMeanSquareLoss", reduction="none")
    out = RemoteLoss(cfg, target)(pred, tgt)
    out.backward(upstream)
    ref_pred = pred.detach().clone().requires_grad_()
    ((ref_pred - tgt).square().mean((1, 2)) * upstream).sum().backward()
    torch.testing.assert_close(pred.grad, ref_pred.grad)


def _raw_term(session: str, pred: torch.Tensor, tgt: torch.Tensor, forward_id: str = "") -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    term = request.terms.add(session=session, forward_id=forward_id)
    codec.encode_config({"type": "CountingL1Loss"}, term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(tgt, term.target)
    return request


def test_a_retried_forward_is_answered_without_updating_the_state_twice(target):
    client = LossClient.shared(target)
    pred, tgt = _pair()
    first = client.evaluate(_raw_term("retry", pred, tgt, forward_id="f-1"))
    again = client.evaluate(_raw_term("retry", pred, tgt, forward_id="f-1"))
    assert first.results[0].session_step == again.results[0].session_step == 1
    assert first.results[0].loss == again.results[0].loss
    assert client.get_session("retry").steps == 1
    later = client.evaluate(_raw_term("retry", pred, tgt, forward_id="f-2"))
    assert later.results[0].session_step == 2


def _expect(code: grpc.StatusCode, field: str | None = None):
    class Check:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, tb):
            assert isinstance(error, RemoteLossError), f"expected {code.name}, got {error!r}"
            assert error.code == code, f"{error.code} != {code}: {error.details}"
            if field is not None:
                assert error.field == field, error.details
            self.error = error
            return True

    return Check()


def test_a_session_keeps_its_config(target):
    RemoteLoss(dict(type="CountingL1Loss"), target, session="fixed")(*_pair())
    other = RemoteLoss(dict(type="CountingL1Loss", loss_weight=2.0), target, session="fixed")
    with _expect(grpc.StatusCode.FAILED_PRECONDITION, "terms[0].session") as check:
        other(*_pair())
    assert "loss_weight" in check.error.details and "fixed" in check.error.details


def test_get_reset_and_list(target):
    client = LossClient.shared(target)
    with _expect(grpc.StatusCode.NOT_FOUND, "session"):
        client.get_session("nobody")
    loss_fn = RemoteLoss(dict(type="CountingL1Loss"), target, session="a/b")
    pred, tgt = _pair()
    loss_fn(pred, tgt)
    loss_fn(pred, tgt)
    assert [s.session for s in client.list_sessions().sessions] == ["a/b"]
    listed = client.list_sessions().sessions[0]
    assert listed.steps == 2 and not listed.state and 0 < listed.expires_in_seconds <= 3600
    assert loss_fn.reset_session()["calls"].item() == 2
    with _expect(grpc.StatusCode.NOT_FOUND, "session"):
        client.get_session("a/b")
    torch.testing.assert_close(loss_fn(pred, tgt), _counting_l1(pred, tgt, 1))  # starts afresh


def test_bad_session_names_are_refused(target):
    for name in ("-leading-dash", "has space", "x" * 201):
        with _expect(grpc.StatusCode.INVALID_ARGUMENT, "terms[0].session") as check:
            RemoteLoss(dict(type="CountingL1Loss"), target, session=name)(*_pair())
        assert "[A-Za-z0-9._:/@+-]" in check.error.details


def test_a_step_older_than_the_replay_depth_cannot_be_replayed(target):
    client = LossClient.shared(target)
    pred, tgt = _pair()
    for _ in range(5):  # the test server keeps the state before the last 4 steps
        client.evaluate(_raw_term("deep", pred, tgt))
    request = _raw_term("deep", pred, tgt)
    request.terms[0].replay_step = 1
    with _expect(grpc.StatusCode.FAILED_PRECONDITION, "terms[0].replay_step") as check:
        client.evaluate(request)
    assert "steps [2, 3, 4, 5]" in check.error.details
    request.terms[0].replay_step = 5
    replayed = client.evaluate(request).results[0]
    assert replayed.session_step == 5 and client.get_session("deep").steps == 5


def test_a_refused_forward_leaves_the_state_as_it_was(target):
    loss_fn = RemoteLoss(dict(type="CountingL1Loss"), target, session="careful")
    pred, tgt = _pair()
    loss_fn(pred, tgt)
    with _expect(grpc.StatusCode.INVALID_ARGUMENT):
        loss_fn(pred, tgt[:2])  # the loss raises after it counted the call: the count is rolled back
    assert loss_fn.session_state()["calls"].item() == 1
    torch.testing.assert_close(loss_fn(pred, tgt), _counting_l1(pred, tgt, 2))


def test_the_session_limit_is_resource_exhausted(target):
    pred, tgt = _pair()
    for i in range(MAX_SESSIONS):
        RemoteLoss(dict(type="CountingL1Loss"), target, session=f"s{i}")(pred, tgt)
    with _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "terms[0].session") as check:
        RemoteLoss(dict(type="CountingL1Loss"), target, session="one-too-many")(pred, tgt)
    assert "--max-sessions" in check.error.details
    RemoteLoss(dict(type="CountingL1Loss"), target, session="s0")(pred, tgt)  # existing ones still serve


def test_idle_sessions_expire():
    now = [0.0]
    store = SessionStore(register(LOSSES.copy("expiry")), ttl_seconds=10.0, clock=lambda: now[0])
    config = {"type": "CountingL1Loss"}
    pred, tgt = _pair()
    for name in ("old", "busy"):
        with store.open(name, config) as (module, _):
            module(pred, tgt)
    now[0] = 8.0
    with store.open("busy", config) as (module, step):
        module(pred, tgt)
    assert step == 2
    now[0] = 12.0  # "old" idle for 12 s, "busy" for 4 s
    assert [s.name for s in store.sessions()] == ["busy"]
    with pytest.raises(UnknownSessionError):
        store.get("old")
    assert store.expires_in(store.get("busy")) == pytest.approx(6.0)


# -- two workers, one SeesawLoss session, compared with mmdet ------------------------------------------

SEESAW = {c["id"].rsplit("-", 1)[1]: c for c in FAMILIES["sessions"]["cases"]}
CFG = next(iter(SEESAW.values()))["cfg"]


def _worker_batches(worker: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The worker's three batches, as the fixture recorded them (in the order that runs A first)."""
    case = SEESAW["AAABBB"]
    steps = case["steps"][:3] if worker == "A" else case["steps"][3:]
    return [(s["args"][0].clone(), s["args"][1].clone()) for s in steps]


def test_two_concurrent_workers_share_one_seesaw_state_exactly_as_mmdet_in_server_order(target):
    session = "exp42/roi_head"
    start = threading.Barrier(2, timeout=60)  # a worker that fails before it ends the wait of the other
    records: list[tuple[int, str, dict, torch.Tensor]] = []
    lock = threading.Lock()
    errors = []

    def work(worker: str) -> None:
        try:
            loss_fn = RemoteLoss(CFG, target, session=session)
            start.wait()
            for score, labels in _worker_batches(worker):
                score = score.to(DEVICE).requires_grad_()
                losses = loss_fn(score, labels.to(DEVICE))
                sum(losses.values()).backward()
                with lock:
                    records.append((loss_fn.last_session_step, worker, losses, score.grad))
        except Exception as error:  # surfaced below: a thread's assertion would be lost
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    records.sort(key=lambda r: r[0])
    assert [r[0] for r in records] == [1, 2, 3, 4, 5, 6]
    order = "".join(r[1] for r in records)
    case = SEESAW[order]
    for (step, _, losses, grad), want in zip(records, case["steps"], strict=True):
        for (key, got), (want_key, value) in zip(parts(losses), parts(want["output"]), strict=True):
            assert key == want_key
            torch.testing.assert_close(got.detach().cpu(), value, rtol=1e-5, atol=1e-6, msg=f"step {step} {key}")
        torch.testing.assert_close(grad.cpu(), want["grads"][0], rtol=1e-5, atol=1e-6, msg=f"step {step} grad")
    state = RemoteLoss(CFG, target, session=session).session_state()
    torch.testing.assert_close(state["cum_samples"].cpu(), case["steps"][-1]["state"]["cum_samples"])
