"""The shared pipeline: weight, reduction, avg_factor, loss_weight, reduction_override."""

import pytest
import torch

from losswire.server.losses import AVG_FACTOR_EPS, LossConfigError, LossInputError, build_loss, weight_reduce_loss

PRED = torch.tensor([[0.0, 2, 3, 0], [0, 2, 3, 0]])
TARGET = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
WEIGHT = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])


def test_walkthrough_l1_example():
    loss = build_loss(dict(type="L1Loss", loss_weight=1.0))
    assert loss(PRED, TARGET).item() == pytest.approx(9 / 8)
    # mean divides the weighted sum by the element count (8), not by sum(weight) (7)
    assert loss(PRED, TARGET, WEIGHT).item() == pytest.approx(8 / 8)


def test_reductions_and_loss_weight():
    loss = build_loss(dict(type="L1Loss", loss_weight=0.5, reduction="sum"))
    elementwise = (PRED - TARGET).abs()
    assert torch.equal(loss(PRED, TARGET), 0.5 * elementwise.sum())
    assert torch.equal(loss(PRED, TARGET, reduction_override="none"), 0.5 * elementwise)
    assert torch.equal(loss(PRED, TARGET, reduction_override="mean"), 0.5 * elementwise.mean())


def test_avg_factor_uses_float32_eps_for_every_dtype():
    pred, target = PRED.double(), TARGET.double()
    loss = build_loss(dict(type="L1Loss"))
    got = loss(pred, target, avg_factor=3.0)
    expected = (pred - target).abs().sum() / (3.0 + torch.finfo(torch.float32).eps)
    assert torch.finfo(torch.float32).eps == AVG_FACTOR_EPS
    assert got.dtype == torch.float64
    assert got.item() == expected.item()
    assert got.item() != ((pred - target).abs().sum() / (3.0 + torch.finfo(torch.float64).eps)).item()


def test_avg_factor_ignored_for_none_and_refused_for_sum():
    loss = build_loss(dict(type="L1Loss", reduction="none"))
    assert torch.equal(loss(PRED, TARGET, avg_factor=5.0), (PRED - TARGET).abs())
    with pytest.raises(LossInputError, match="avg_factor can not be used with reduction='sum'") as info:
        loss(PRED, TARGET, avg_factor=5.0, reduction_override="sum")
    assert info.value.field == "avg_factor"


def test_avg_factor_tensor_is_accepted():
    loss = build_loss(dict(type="L1Loss"))
    got = loss(PRED, TARGET, avg_factor=torch.tensor(4.0))
    assert got.item() == pytest.approx(9 / (4 + AVG_FACTOR_EPS))


def test_bad_reductions_name_the_allowed_values():
    with pytest.raises(LossConfigError, match=r"reduction must be one of \['none', 'mean', 'sum'\], got 'avg'"):
        build_loss(dict(type="L1Loss", reduction="avg"))
    with pytest.raises(LossInputError, match="reduction_override must be one of") as info:
        build_loss(dict(type="L1Loss"))(PRED, TARGET, reduction_override="max")
    assert info.value.field == "reduction_override"


def test_weight_that_would_enlarge_the_loss_is_refused():
    with pytest.raises(LossInputError, match=r"weight of shape \[2, 4, 1\] does not broadcast"):
        weight_reduce_loss(torch.ones(2, 4), torch.ones(2, 4, 1))
    # a broadcastable weight that keeps the shape is fine, as in mmdet
    assert weight_reduce_loss(torch.ones(2, 4), torch.ones(2, 1), "sum").item() == 8


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_input_gives_zero_with_gradient(reduction):
    pred = torch.zeros(0, 5, requires_grad=True)
    for cfg, target in [
        (dict(type="FocalLoss"), torch.zeros(0, dtype=torch.long)),
        (dict(type="CrossEntropyLoss"), torch.zeros(0, dtype=torch.long)),
        (dict(type="QualityFocalLoss"), (torch.zeros(0, dtype=torch.long), torch.zeros(0))),
    ]:
        loss = build_loss(cfg)(pred, target, reduction_override=reduction)
        assert loss.item() == 0 and not torch.isnan(loss)
        loss.backward()
        assert pred.grad is not None and pred.grad.shape == pred.shape
    boxes = torch.zeros(0, 4, requires_grad=True)
    for name in ["L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "IoULoss", "GIoULoss"]:
        loss = build_loss(dict(type=name, reduction=reduction))(boxes, torch.zeros(0, 4), avg_factor=None)
        assert loss.item() == 0
        loss.backward()


def test_zero_weight_shortcut_returns_scalar_without_loss_weight():
    pred, target = torch.rand(3, 4, requires_grad=True), torch.rand(3, 4)
    for name in ["L1Loss", "SmoothL1Loss", "GIoULoss"]:
        out = build_loss(dict(type=name, loss_weight=3.0, reduction="none"))(pred, target, torch.zeros(3, 4))
        assert out.shape == () and out.item() == 0
    # IoULoss takes the shortcut only when it reduces
    out = build_loss(dict(type="IoULoss", reduction="none"))(pred, target, torch.zeros(3))
    assert out.shape == (3,)
