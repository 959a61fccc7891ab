"""A tensor avg_factor stays a tensor on the wire, so the server adds eps in the tensor's own dtype as
mmdet does; a number stays a number. (CenterNet's avg_factor is a tensor: float64 losses differed by up
to 2.4e-8 relative when the client sent it as a double.)"""

from __future__ import annotations

import torch

from losswire.client import RemoteLoss
from losswire.client.terms import BoundTerm, encode_term
from losswire.server.losses import LOSSES
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

GAUSSIAN = dict(type="GaussianFocalLoss")


def heatmaps() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 16, 16, generator=generator, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    return pred, torch.rand(2, 3, 16, 16, generator=generator, dtype=torch.float64)


def encoded(loss: RemoteLoss, *args, **kwargs) -> pb.LossTerm:
    message = pb.LossTerm()
    encode_term(
        BoundTerm(loss, loss.call_shape().bind(args, kwargs)), message, 0, grad_enabled=False, transfer=0, sink=None
    )
    return message


def test_a_tensor_avg_factor_travels_as_a_tensor_and_a_number_as_a_number(target):
    loss = RemoteLoss(GAUSSIAN, target)
    pred, goal = heatmaps()
    as_tensor = encoded(loss, pred, goal, avg_factor=torch.tensor(3.0))
    assert not as_tensor.HasField("avg_factor")
    torch.testing.assert_close(codec.decode_value(as_tensor.inputs["avg_factor"], "avg_factor"), torch.tensor(3.0))
    as_number = encoded(loss, pred, goal, avg_factor=3.0)
    assert as_number.avg_factor == 3.0 and "avg_factor" not in as_number.inputs


def test_float64_with_a_float32_tensor_avg_factor_is_the_local_modules_to_the_bit(target):
    """mmdet computes avg_factor + eps in the tensor's dtype: float32(3) + eps rounds back to 3 there,
    while a double 3 + eps does not, which made the remote loss 4e-8 off."""
    remote, local = RemoteLoss(GAUSSIAN, target), LOSSES.build(GAUSSIAN)
    pred, goal = heatmaps()
    for value in (3.0, 7.3, 250.0):
        avg_factor = torch.tensor(value, dtype=torch.float32)
        want = local(pred, goal, avg_factor=avg_factor)
        got = remote(pred, goal, avg_factor=avg_factor)
        assert got.dtype == torch.float64 and torch.equal(got, want), (value, (got - want).item())
    # the difference the tensor makes: the same value as a number is another loss
    as_number = remote(pred, goal, avg_factor=3.0)
    assert not torch.equal(as_number, local(pred, goal, avg_factor=torch.tensor(3.0)))
    assert torch.equal(as_number, local(pred, goal, avg_factor=3.0))


def test_a_float64_tensor_avg_factor_too(target):
    remote, local = RemoteLoss(GAUSSIAN, target), LOSSES.build(GAUSSIAN)
    pred, goal = heatmaps()
    avg_factor = torch.tensor(5.5, dtype=torch.float64)
    assert torch.equal(remote(pred, goal, avg_factor=avg_factor), local(pred, goal, avg_factor=avg_factor))


def test_an_avg_factor_of_shape_one_gives_the_local_modules_loss_of_that_shape(target):
    """A head's count as a one-element tensor (``reduce_mean(torch.tensor([num_pos]))``): mmdet's mean is
    ``loss.sum() / (avg_factor + eps)``, which broadcasts to avg_factor's shape [1] (or [1, 1]). The server
    answered that shape, and the client refused it as a malformed answer (DATA_LOSS, "must have shape []").
    Now: the local module's value, shape and gradient."""
    torch.manual_seed(0)
    cases = [
        (dict(type="L1Loss"), torch.randn(6, 4), torch.randn(6, 4)),
        (dict(type="FocalLoss", gamma=2.0, alpha=0.25), torch.randn(6, 5), torch.randint(0, 6, (6,))),
    ]
    for config, pred, goal in cases:
        for avg_factor in (torch.tensor([3.5]), torch.tensor([[3.5]])):
            mine, theirs = pred.clone().requires_grad_(), pred.clone().requires_grad_()
            remote = RemoteLoss(config, target)(mine, goal, avg_factor=avg_factor)
            local = LOSSES.build(config)(theirs, goal, avg_factor=avg_factor)
            assert remote.shape == local.shape == avg_factor.shape, (config, remote.shape, local.shape)
            torch.testing.assert_close(remote, local)
            (remote * 2).sum().backward()
            (local * 2).sum().backward()
            torch.testing.assert_close(mine.grad, theirs.grad)
