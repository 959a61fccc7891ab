"""Targets: how a target is normalised (the key of shared clients), which default is dialled, what is local."""

from __future__ import annotations

import pytest

from losswire.client import DEFAULT_TARGET, LossClient, RemoteLoss, build_loss
from losswire.client.channels import make_channel
from losswire.client.targets import (
    TARGET_ENV,
    address_list_uri,
    all_loopback,
    default_target,
    label,
    normalise_target,
    split_host_port,
    target_hosts,
    tls_server_name,
)
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec


def test_one_server_a_uri_and_several_servers():
    assert normalise_target(" gpu1:50051 ") == "gpu1:50051"
    assert normalise_target("dns:///losswire.ns.svc:50051") == "dns:///losswire.ns.svc:50051"
    several = ("gpu1:50051", "gpu2:50051")
    assert normalise_target("gpu1:50051,gpu2:50051") == several
    assert normalise_target(["gpu1:50051", "gpu2:50051"]) == several
    assert normalise_target(("gpu1:50051", " gpu2:50051", "gpu1:50051")) == several  # each once, in order
    assert normalise_target(["gpu1:50051"]) == "gpu1:50051"  # one listed server: the same client as its string
    assert label(several) == "gpu1:50051,gpu2:50051"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("dns:///a:1,b:2", "a dns: URI names one host"),
        (["dns:///a:1", "b:2"], "in a list of servers"),
        ("gpu1", "expected 'host:port'"),
        ("::1:50051", "expected 'host:port'"),  # an IPv6 address needs its brackets
        (" , ", "names no server"),
    ],
)
def test_mistakes_are_refused_with_what_to_write(target, message):
    with pytest.raises(ValueError, match=message):
        normalise_target(target)


def test_host_and_port():
    assert split_host_port("[::1]:50051") == ("::1", 50051)
    assert split_host_port("gpu1:7") == ("gpu1", 7)
    assert target_hosts("dns:///losswire.ns.svc:50051") == ["losswire.ns.svc"]
    assert target_hosts("dns://10.0.0.2/losswire:50051") == ["losswire"]
    assert target_hosts("ipv4:10.0.0.1:1,10.0.0.2:1") == ["10.0.0.1", "10.0.0.2"]
    assert target_hosts("xds:///losswire") is None


def test_what_counts_as_this_machine():
    for target in ("localhost:1", "127.0.0.1:1", "[::1]:1", "unix:/tmp/losswire.sock", ("127.0.0.1:1", "localhost:2")):
        assert all_loopback(normalise_target(target)), target
    for target in ("10.0.0.1:1", "dns:///localhost.example.com:1", ("127.0.0.1:1", "10.0.0.1:2"), "xds:///a"):
        assert not all_loopback(normalise_target(target)), target


def test_several_servers_balance_over_their_addresses():
    assert address_list_uri(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert address_list_uri(["[::1]:1"]) == "ipv6:[::1]:1"
    # TLS over listed servers checks one name: the host they share, else it must be given
    assert tls_server_name(("gpu:1", "gpu:2")) == "gpu"
    assert tls_server_name("gpu:1") is None  # gRPC checks the target's host itself
    with pytest.raises(ValueError, match=r"Credentials\(server_name=...\)"):
        tls_server_name(("gpu1:1", "gpu2:1"))


def test_the_default_target_is_the_environments(monkeypatch):
    monkeypatch.delenv(TARGET_ENV, raising=False)
    assert default_target() == DEFAULT_TARGET == "localhost:50051"
    monkeypatch.setenv(TARGET_ENV, "  ")
    assert default_target() == DEFAULT_TARGET  # blank is unset
    monkeypatch.setenv(TARGET_ENV, "losshost:6000")
    assert default_target() == normalise_target(None) == "losshost:6000"
    monkeypatch.setenv(TARGET_ENV, "gpu1:1,gpu2:1")
    assert normalise_target(None) == ("gpu1:1", "gpu2:1")


def test_every_default_dials_losswire_target(monkeypatch, target):
    """RemoteLoss, build_loss, LossClient and make_channel without a target reach $LOSSWIRE_TARGET (the
    test server): Describe is answered, which localhost:50051 would not be."""
    monkeypatch.setenv(TARGET_ENV, target)
    loss = RemoteLoss(dict(type="L1Loss"))
    assert loss.client.target == target and loss.info.name == "L1Loss"
    assert build_loss(dict(type="L1Loss")).client is loss.client  # the one shared client of that target
    own = LossClient()
    try:
        assert own.target == target and own.describe(dict(type="L1Loss")).loss.name == "L1Loss"
    finally:
        own.close()
    channel = make_channel(None)
    try:
        request = pb.DescribeRequest(config=codec.encode_config(dict(type="L1Loss")))
        assert pb_grpc.LossServiceStub(channel).Describe(request, timeout=10).loss.name == "L1Loss"
    finally:
        channel.close()


def test_without_the_variable_the_default_is_localhost(monkeypatch):
    monkeypatch.delenv(TARGET_ENV, raising=False)
    loss = RemoteLoss(dict(type="L1Loss"), validate=False)  # no call: nothing needs to listen there
    assert loss.client.target == DEFAULT_TARGET
