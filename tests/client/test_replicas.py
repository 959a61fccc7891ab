"""Rendezvous ranking and replica sets: every worker pins a session to the same replica without talking."""

from __future__ import annotations

import itertools

import grpc
import pytest

from losswire.client import RemoteLossError
from losswire.client.replicas import REPLICA_REFRESH_SECONDS, ReplicaSet, rendezvous_rank, replica_set

REPLICAS = [f"10.0.0.{i}:50051" for i in range(1, 6)]
SESSIONS = [f"exp/{i}" for i in range(2000)]


def test_the_ranking_is_fixed_across_processes_and_versions():
    """Clients of different processes (and releases, during a rolling upgrade) must agree: the ranking is
    a pure function of the names. These values were computed once; a change here moves every session."""
    assert rendezvous_rank("exp42/roi_head", ["gpu1:50051", "gpu2:50051", "gpu3:50051"]) == [
        "gpu2:50051",
        "gpu1:50051",
        "gpu3:50051",
    ]
    assert rendezvous_rank("private/0", REPLICAS)[:2] == ["10.0.0.3:50051", "10.0.0.4:50051"]


def test_the_order_the_replicas_are_listed_in_does_not_matter():
    first = rendezvous_rank("exp/1", REPLICAS)
    for order in itertools.islice(itertools.permutations(REPLICAS), 0, 120, 7):
        assert rendezvous_rank("exp/1", list(order)) == first
    assert sorted(first) == sorted(REPLICAS) and rendezvous_rank("exp/1", REPLICAS + REPLICAS[:2]) == first


def test_removing_a_replica_moves_only_its_sessions_to_their_second_choice():
    before = {s: rendezvous_rank(s, REPLICAS) for s in SESSIONS}
    gone = REPLICAS[2]
    for session, ranking in before.items():
        after = rendezvous_rank(session, [r for r in REPLICAS if r != gone])
        assert after[0] == (ranking[1] if ranking[0] == gone else ranking[0])


def test_adding_a_replica_takes_about_its_share_and_moves_nothing_else():
    grown = [*REPLICAS, "10.0.0.9:50051"]
    moved = [s for s in SESSIONS if rendezvous_rank(s, grown)[0] != rendezvous_rank(s, REPLICAS)[0]]
    assert all(rendezvous_rank(s, grown)[0] == "10.0.0.9:50051" for s in moved)
    assert len(moved) == pytest.approx(len(SESSIONS) / len(grown), rel=0.2)


def test_a_replica_set_resolves_again_after_its_refresh_time():
    now, answers = [0.0], [["b:1", "a:1"], ["c:1"]]
    replicas = ReplicaSet(lambda: answers[0], refresh_seconds=30.0, clock=lambda: now[0])
    assert replicas.addresses() == ("a:1", "b:1")  # sorted
    answers.pop(0)
    now[0] = 29.0
    assert replicas.addresses() == ("a:1", "b:1")
    now[0] = 30.0
    assert replicas.addresses() == ("c:1",)
    answers[0] = ["d:1"]
    replicas.invalidate()  # a replica failed: resolve at once
    assert replicas.addresses() == ("d:1",)


def test_a_failed_lookup_keeps_the_last_set_and_raises_without_one():
    now, answer = [0.0], [["a:1"]]

    def lookup():
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]

    replicas = ReplicaSet(lookup, refresh_seconds=1.0, clock=lambda: now[0])
    assert replicas.addresses() == ("a:1",)
    answer[0], now[0] = ValueError("cannot resolve 'svc'"), 5.0
    assert replicas.addresses() == ("a:1",)
    empty = ReplicaSet(lambda: [], refresh_seconds=None)
    with pytest.raises(RemoteLossError, match="resolves to no address") as error:
        empty.addresses()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    unresolved = ReplicaSet(lambda: (_ for _ in ()).throw(ValueError("cannot resolve 'svc'")))
    with pytest.raises(RemoteLossError, match="cannot resolve 'svc'"):
        unresolved.addresses()


def test_which_targets_pin_sessions():
    assert replica_set("gpu1:50051") is None  # one server
    assert replica_set("ipv4:10.0.0.1:1") is None
    assert replica_set("xds:///losswire") is None  # the control plane routes
    assert replica_set(("a:1", "b:1")).addresses() == ("a:1", "b:1")
    assert replica_set("ipv4:10.0.0.2:1,10.0.0.1:1").addresses() == ("10.0.0.1:1", "10.0.0.2:1")
    dns = replica_set("dns:///localhost:7")
    assert dns.refresh_seconds == REPLICA_REFRESH_SECONDS and "127.0.0.1:7" in dns.addresses()
    with pytest.raises(ValueError, match="names its own DNS server"):
        replica_set("dns://10.0.0.53/losswire:1").addresses()
