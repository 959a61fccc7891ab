"""Provenance on the client: a RemoteLoss names the server's version and the loss's implementation digest,
and a pinned digest refuses any other implementation before one of its numbers is used."""

from __future__ import annotations

import grpc
import pytest
import torch

from losswire.client import ImplementationMismatchError, LossClient, RemoteLoss, RemoteLossError
from losswire.server import __version__
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig

FOCAL = dict(type="FocalLoss", gamma=2.0)
OTHER = "sha256:" + "0" * 64


def call(loss: RemoteLoss) -> torch.Tensor:
    return loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))


def test_the_module_names_what_computes_it(client, target):
    loss = RemoteLoss(FOCAL, target)
    described = client.describe(FOCAL)
    assert loss.implementation == described.loss.implementation and loss.implementation.startswith("sha256:")
    assert loss.server_version == __version__
    assert (loss.last_implementation, loss.last_server_version) == ("", "")
    call(loss)
    assert (loss.last_implementation, loss.last_server_version) == (loss.implementation, __version__)


def test_a_pin_equal_to_the_servers_digest_works(target):
    digest = RemoteLoss(FOCAL, target).implementation
    pinned = RemoteLoss(FOCAL, target, expect=digest)
    assert call(pinned).shape == ()


@pytest.mark.parametrize("validate", [True, False])
def test_another_digest_is_refused_before_any_loss_is_returned(target, validate):
    actual = RemoteLoss(FOCAL, target).implementation
    with pytest.raises(ImplementationMismatchError) as error:
        loss = RemoteLoss(FOCAL, target, expect=OTHER, validate=validate)  # refused here at Describe
        call(loss)  # or, with validate=False, at the first forward's Describe
    message = error.value.details
    assert message.startswith("FocalLoss: ") and OTHER in message and actual in message and target in message
    assert isinstance(error.value, RemoteLossError) and error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.value.expected, error.value.found) == (OTHER, actual)


def test_every_answer_is_checked(target):
    """A pin set after Describe (or a server replaced behind one target) is caught by the Evaluate answer."""
    loss = RemoteLoss(FOCAL, target)
    loss.expect = OTHER
    with pytest.raises(ImplementationMismatchError, match="answered Evaluate with implementation sha256:"):
        call(loss)
    assert loss.last_implementation == ""  # nothing of that answer was taken


def test_a_server_with_fused_kernels_off_is_another_implementation(target):
    """FocalLoss is answered by a fused kernel by default; a server with fused kernels off computes it by
    autograd, its digest differs, and a module pinned to the fused one refuses it."""
    fused = RemoteLoss(FOCAL, target).implementation
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2, fused_kernels=False))
    server.start()
    client = LossClient(f"127.0.0.1:{server.port}", timeout=30)
    try:
        plain = RemoteLoss(FOCAL, client=client)
        assert plain.implementation != fused
        with pytest.raises(ImplementationMismatchError) as error:
            RemoteLoss(FOCAL, client=client, expect=fused)
        assert fused in error.value.details and plain.implementation in error.value.details
        assert call(RemoteLoss(FOCAL, client=client, expect=plain.implementation)).shape == ()
    finally:
        client.close()
        server.stop(grace=0)
