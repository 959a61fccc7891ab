"""A call is atomic, and sessions belong to their owner.

- A refused or failed call creates no session and changes no state, whichever of its terms failed.
- Sessions hold at most ``--max-session-bytes`` of state; beyond, RESOURCE_EXHAUSTED naming the setting.
- With tokens on, a token sees, reads, feeds and resets only its own sessions; ``--share-sessions``
  shares them.
"""

from __future__ import annotations

import contextlib

import grpc
import pytest
import torch
from support.calls import field_of, plain_channel
from support.in_process import running_server

from losswire.client import Credentials, LossClient, RemoteLoss, RemoteLossError, evaluate_terms
from losswire.server.app import LosswireServer
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec

SEESAW = dict(type="SeesawLoss", num_classes=4)
TOKENS = ("token-of-alice-0123456789", "token-of-bob-0123456789ab")


def running(**settings) -> contextlib.AbstractContextManager[LosswireServer]:
    return running_server(max_workers=2, **settings)


def target_of(server: LosswireServer) -> str:
    return f"127.0.0.1:{server.port}"


def seesaw_batch(seed: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=generator), torch.randint(0, 5, (rows,), generator=generator)


def seesaw_term(name: str, session: str, score: torch.Tensor, labels: torch.Tensor) -> pb.LossTerm:
    term = pb.LossTerm(name=name, session=session, forward_id=f"{name}-{session}")
    codec.encode_config(SEESAW, term.config)
    codec.encode_tensor(score, term.pred)
    codec.encode_value(labels, term.target)
    return term


def evaluate(server: LosswireServer, *terms: pb.LossTerm) -> grpc.RpcError:
    with plain_channel(target_of(server)) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.LossServiceStub(channel).Evaluate(pb.EvaluateRequest(terms=list(terms)), timeout=30)
    return refused.value


def test_a_refused_call_creates_no_session():
    with running() as server:
        score, _ = seesaw_batch(0)
        error = evaluate(server, seesaw_term("", "new", score, torch.zeros(3, dtype=torch.long)))  # wrong shape
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(server.sessions) == 0


@pytest.mark.parametrize("failing", ["decode", "forward"])
def test_a_call_whose_later_term_fails_leaves_every_session_as_it_was(failing):
    with running() as server:
        client = LossClient(target_of(server), timeout=30)
        first = RemoteLoss(SEESAW, client=client, session="kept")
        first(*seesaw_batch(0))  # step 1
        before = first.session_state()["cum_samples"].clone()
        score, labels = seesaw_batch(1)
        second = seesaw_term("b", "fresh", score, labels)
        if failing == "decode":
            second.pred.dtype = 99  # refused while decoding
        else:
            second.target.tensor.shape[:] = [3]  # the loss refuses it in its forward
            codec.encode_tensor(torch.zeros(3, dtype=torch.long), second.target.tensor)
        error = evaluate(server, seesaw_term("a", "kept", *seesaw_batch(2)), second)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_of(error).startswith("terms[1]")
        info = client.get_session("kept")
        assert info.steps == 1, "the call's first term was applied though the call failed"
        torch.testing.assert_close(codec.decode_tensor(info.state["cum_samples"], "state"), before)
        assert [s.session for s in client.list_sessions().sessions] == ["kept"]
        client.close()


def test_session_state_is_budgeted():
    with running(max_session_bytes=20_000) as server:
        client = LossClient(target_of(server), timeout=30)
        RemoteLoss(SEESAW, client=client, session="small")(*seesaw_batch(0))  # (4 + 1) floats x 5 copies
        big = RemoteLoss(dict(type="SeesawLoss", num_classes=2000), client=client, session="big", validate=False)
        with pytest.raises(RemoteLossError) as refused:
            big(torch.randn(2, 2002), torch.randint(0, 2000, (2,)))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-session-bytes" in refused.value.details and refused.value.field == "terms[0].session"
        assert [s.session for s in client.list_sessions().sessions] == ["small"]
        client.close()


def test_a_session_s_config_is_counted_and_bounded():
    """A session keeps its config as long as it lives (and ListSessions sends it back): it counts against
    --max-session-bytes, and a config over 64 KiB as JSON is refused. Any loss may have a session, so
    before, a CrossEntropyLoss of a megabyte of class_weight held ~4 MB of memory per session, counted as
    nothing."""
    weights = [0.5] * 8000  # 40 KB as JSON, counted three times: one such session fits 200 KB, not two
    pred, labels = torch.randn(4, 8000), torch.randint(0, 8000, (4,))
    with running(max_session_bytes=200_000) as server:
        client = LossClient(target_of(server), timeout=30)
        config = dict(type="CrossEntropyLoss", class_weight=weights)
        RemoteLoss(config, client=client, session="first")(pred, labels)
        with pytest.raises(RemoteLossError) as full:
            RemoteLoss(config, client=client, session="second")(pred, labels)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, full.value.details
        assert "--max-session-bytes" in full.value.details and "its config" in full.value.details
        huge = dict(type="CrossEntropyLoss", class_weight=[0.5] * 20_000)  # 100 KB as JSON
        with pytest.raises(RemoteLossError) as refused:
            RemoteLoss(huge, client=client, session="huge")(torch.randn(4, 20_000), torch.randint(0, 20_000, (4,)))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details
        assert refused.value.field == "terms[0].config" and "at most 65536 bytes" in refused.value.details
        assert [s.session for s in client.list_sessions().sessions] == ["first"]
        client.close()


def test_a_call_whose_answer_is_too_big_to_send_leaves_its_sessions_as_they_were():
    """--max-message-bytes bounds the answer message too. gRPC refused to send a too big answer only after
    the call's session changes were kept, so a failed call had moved its session on (and its retry would
    apply the batch again); the answer's size is now checked before they are kept."""
    focal = {"type": "FocalLoss", "reduction": "none"}

    def focal_term(rows: int) -> pb.LossTerm:
        term = pb.LossTerm(session="kept", forward_id=f"forward-{rows}")
        codec.encode_config(focal, term.config)
        codec.encode_tensor(torch.randn(rows, 80), term.pred)  # answered: a loss and a gradient of its size
        codec.encode_value(torch.randint(0, 81, (rows,)), term.target)
        return term

    with running(max_message_bytes=600_000, max_request_message_bytes=600_000) as server:
        with plain_channel(target_of(server)) as channel:
            pb_grpc.LossServiceStub(channel).Evaluate(pb.EvaluateRequest(terms=[focal_term(10)]), timeout=30)
        error = evaluate(server, focal_term(1000))  # a 330 KB request, a 640 KB answer
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "--max-message-bytes" in error.details() and "left as they were" in error.details()
        client = LossClient(target_of(server), timeout=30)
        assert client.get_session("kept").steps == 1, "the refused call moved the session on"
        client.close()


def clients(server: LosswireServer) -> tuple[LossClient, LossClient]:
    return tuple(LossClient(target_of(server), timeout=30, credentials=Credentials(token=token)) for token in TOKENS)  # type: ignore[return-value]


def test_with_tokens_each_token_has_sessions_of_its_own():
    with running(auth_tokens=TOKENS) as server:
        alice, bob = clients(server)
        RemoteLoss(SEESAW, client=alice, session="exp")(*seesaw_batch(0))
        RemoteLoss(SEESAW, client=alice, session="exp")(*seesaw_batch(1))
        assert [s.session for s in bob.list_sessions().sessions] == []
        with pytest.raises(RemoteLossError) as unseen:
            bob.get_session("exp")
        assert unseen.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RemoteLossError):
            bob.reset_session("exp")
        bobs = RemoteLoss(SEESAW, client=bob, session="exp")
        bobs(*seesaw_batch(2))  # bob's own "exp": a new state, step 1
        assert bobs.last_session_step == 1
        assert alice.get_session("exp").steps == 2 and bob.get_session("exp").steps == 1
        bob.reset_session("exp")
        assert alice.get_session("exp").steps == 2
        alice.close()
        bob.close()


def test_shared_sessions_are_one_state_for_every_token():
    with running(auth_tokens=TOKENS, share_sessions=True) as server:
        alice, bob = clients(server)
        RemoteLoss(SEESAW, client=alice, session="exp")(*seesaw_batch(0))
        evaluate_terms({"s": (RemoteLoss(SEESAW, client=bob, session="exp"), seesaw_batch(1), {})})
        assert alice.get_session("exp").steps == 2
        assert [s.session for s in bob.list_sessions().sessions] == ["exp"]
        alice.close()
        bob.close()


@pytest.mark.parametrize(
    "limit, flag",
    [({"max_sessions_per_token": 2}, "--max-sessions-per-token"), ({"max_session_bytes_per_token": 1250}, None)],
    ids=["count", "bytes"],
)
def test_one_token_cannot_take_every_token_s_room_for_sessions(limit, flag):
    """A token's sessions are bounded apart from the server's totals: alice, at her limit (two sessions;
    or 1250 bytes, which two SeesawLoss sessions of 4 classes fit: 571 bytes each, its state and 4 replay
    snapshots, 100 bytes, and three times its config's 157 bytes as JSON), is refused a third,
    RESOURCE_EXHAUSTED naming the flag; bob still gets his."""
    flag = flag or "--max-session-bytes-per-token"
    with running(auth_tokens=TOKENS, **limit) as server:
        alice, bob = clients(server)
        for name in ("a", "b"):
            RemoteLoss(SEESAW, client=alice, session=name)(*seesaw_batch(0))
        with pytest.raises(RemoteLossError) as refused:
            RemoteLoss(SEESAW, client=alice, session="c")(*seesaw_batch(0))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert flag in refused.value.details and refused.value.field == "terms[0].session"
        RemoteLoss(SEESAW, client=bob, session="c")(*seesaw_batch(0))
        assert [s.session for s in bob.list_sessions().sessions] == ["c"]
        assert sorted(s.session for s in alice.list_sessions().sessions) == ["a", "b"]
        alice.close()
        bob.close()


def test_without_tokens_the_per_token_limits_do_not_bound_the_one_anonymous_owner():
    """Without tokens every caller is one owner: the server's totals are its limits, not the per-token ones."""
    with running(max_sessions_per_token=1) as server:
        client = LossClient(target_of(server), timeout=30)
        for name in ("a", "b", "c"):
            RemoteLoss(SEESAW, client=client, session=name)(*seesaw_batch(0))
        assert len(client.list_sessions().sessions) == 3
        client.close()
