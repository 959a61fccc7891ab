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
