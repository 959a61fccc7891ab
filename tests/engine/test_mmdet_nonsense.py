"""Calls mmdet answers with nonsense or a crash, and what losswire does instead (docs/semantics.md)."""

from __future__ import annotations

import pytest
import torch

from losswire.server.losses import LOSSES, LossInputError, build_loss

# -- integer pred ----------------------------------------------------------------------------------------


def test_multi_pos_cross_entropy_takes_integer_scores_as_mmdet_does():
    """mmdet's own test passes integer costs; its float32 masks make the loss float32."""
    loss = build_loss(dict(type="MultiPosCrossEntropyLoss", reduction="mean", loss_weight=1.0))
    costs = torch.tensor([[1, 0], [0, 1]])
    assert loss(costs, torch.tensor([[1, 1], [0, 0]])).item() == 0.0  # mmdet's first expectation
    value = loss(costs, torch.tensor([[1, 0], [0, 1]]))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(0.31326, abs=1e-5)  # log(1 + e^-1), mmdet's second expectation
    assert torch.equal(value, loss(costs.float(), torch.tensor([[1, 0], [0, 1]])))
    for dtype in (torch.int32, torch.uint8, torch.bool):
        assert torch.equal(loss(costs.to(dtype), torch.tensor([[1, 0], [0, 1]])), value)


def test_complex_scores_stay_refused():
    with pytest.raises(LossInputError, match="cls_score must be real") as info:
        build_loss(dict(type="MultiPosCrossEntropyLoss"))(torch.zeros(2, 2, dtype=torch.complex64), torch.eye(2))
    assert info.value.field == "cls_score"


@pytest.mark.parametrize(
    ("cfg", "args"),
    [
        (dict(type="FocalLoss"), (torch.tensor([[1, 0]]), torch.tensor([0]))),
        (dict(type="L1Loss"), (torch.tensor([[1, 0]]), torch.tensor([[1.0, 0.0]]))),
        (dict(type="CrossEntropyLoss"), (torch.tensor([[1, 0]]), torch.tensor([0]))),
        (dict(type="GIoULoss"), (torch.tensor([[0, 0, 2, 2]]), torch.tensor([[0.0, 0, 2, 2]]))),
    ],
    ids=lambda v: v["type"] if isinstance(v, dict) else "",
)
def test_other_losses_refuse_integer_pred(cfg, args):
    """Documented difference: pred is what the gradient is taken of, and mmdet's answers for an integer
    one differ per loss (a crash in sigmoid, softmax or mean for most, a float32 number for a few)."""
    name = LOSSES.describe(cfg["type"]).inputs[0].name
    with pytest.raises(LossInputError, match=rf"{name} must be a floating-point tensor, got torch.int64") as info:
        build_loss(cfg)(*args)
    assert info.value.field == name


# -- FocalLoss with class indices in a target of pred's shape --------------------------------------------


@pytest.mark.parametrize(
    ("pred", "target"),
    [
        (torch.randn(8), torch.randint(0, 81, (8,), generator=torch.Generator().manual_seed(0))),  # labels as 1-D
        (torch.randn(8, 80), torch.randint(0, 81, (8, 80), generator=torch.Generator().manual_seed(0))),
        (torch.randn(8, 80), torch.full((8, 80), 1.5)),
        (torch.randn(8, 80), torch.full((8, 80), -0.5)),
    ],
    ids=["labels-1d", "int-2d-up-to-80", "soft-above-1", "soft-below-0"],
)
def test_focal_loss_refuses_a_same_shape_target_outside_0_1(pred, target):
    """mmdet returns nonsense (-1440027.875 for the first) without an error."""
    with pytest.raises(LossInputError, match=r"one-hot or soft targets in \[0, 1\].*got values in") as info:
        build_loss(dict(type="FocalLoss"))(pred, target)
    assert info.value.field == "target"
    assert "shape [N] for pred [N, C]" in str(info.value)


def test_focal_loss_keeps_one_hot_soft_and_boolean_targets():
    pred = torch.randn(8, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(1))
    one_hot = torch.nn.functional.one_hot(labels, 5)
    loss = build_loss(dict(type="FocalLoss"))
    by_index = loss(pred, labels)
    assert torch.equal(loss(pred, one_hot), by_index)
    assert torch.equal(loss(pred, one_hot.bool()), by_index)
    soft = torch.rand(8, 5, dtype=torch.float64)
    assert torch.isfinite(loss(pred, soft))


# -- CrossEntropyLoss with float labels ----------------------------------------------------------------------


def test_cross_entropy_names_the_dtype_of_float_labels():
    """Float labels of the index shape: the message says they are floats, not a shape mismatch only."""
    with pytest.raises(LossInputError) as info:
        build_loss(dict(type="CrossEntropyLoss"))(torch.randn(4, 3), torch.tensor([0.0, 1, 2, 1]))
    message = str(info.value)
    assert info.value.field == "label"
    assert "torch.float32 tensor of shape [4]" in message
    assert "integer class indices (int64, int32...) of shape [4]" in message
    assert "class probabilities of the shape of cls_score [4, 3]" in message


def test_cross_entropy_still_takes_class_probabilities():
    probs = torch.softmax(torch.randn(4, 3), dim=1)
    assert torch.isfinite(build_loss(dict(type="CrossEntropyLoss"))(torch.randn(4, 3), probs))
