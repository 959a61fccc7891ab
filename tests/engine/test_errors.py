"""Bad inputs raise a typed LossInputError naming the field, what was expected and what arrived --
never a bare assert, IndexError or a CUDA-side crash."""

import pytest
import torch

from losswire.server.losses import LossConfigError, LossInputError, build_loss

LOGITS = torch.randn(4, 3)
BOXES = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4], [0, 0, 1, 1], [2, 2, 5, 5]])


@pytest.mark.parametrize(
    "cfg, args, kwargs, field, message",
    [
        (
            dict(type="L1Loss"),
            (torch.rand(3, 4), torch.rand(3, 5)),
            {},
            "target",
            r"shape of pred \[3, 4\], got \[3, 5\]",
        ),
        (dict(type="MSELoss"), (torch.rand(3, 4), torch.rand(4, 4)), {}, "target", r"pred \[3, 4\], got \[4, 4\]"),
        (dict(type="L1Loss"), (torch.ones(3, 4, dtype=torch.long), torch.rand(3, 4)), {}, "pred", "floating-point"),
        (dict(type="L1Loss"), ([1.0, 2.0], torch.rand(2)), {}, "pred", "must be a tensor, got list"),
        (dict(type="GIoULoss"), (torch.rand(3, 5), torch.rand(3, 5)), {}, "pred", r"\[N, 4\] boxes"),
        (dict(type="GIoULoss"), (BOXES, BOXES), {"weight": torch.ones(4, 2)}, "weight", r"shape of pred \[4, 4\]"),
        (
            dict(type="FocalLoss"),
            (LOGITS, torch.tensor([0, 1, 4, 2])),
            {},
            "target",
            r"\[0, 3\].*got values in \[0, 4\]",
        ),
        (dict(type="FocalLoss"), (LOGITS, torch.tensor([0, 1, 2])), {}, "target", r"shape \[N\] = \[4\]"),
        (dict(type="FocalLoss"), (LOGITS, torch.rand(4, 2)), {}, "target", r"shape of pred \[4, 3\], got \[4, 2\]"),
        (dict(type="FocalLoss"), (LOGITS, torch.tensor([0, 1, 2, 3])), {"weight": torch.ones(5)}, "weight", r"\[N\]"),
        (dict(type="FocalLoss", activated=True), (LOGITS + 5, torch.tensor([0, 1, 2, 3])), {}, "pred", "probabilities"),
        (dict(type="CrossEntropyLoss"), (LOGITS, torch.tensor([0, 1, 3, 2])), {}, "label", r"\[0, 2\].*got 3"),
        (dict(type="CrossEntropyLoss"), (LOGITS, torch.tensor([0.0, 1, 2, 1])), {}, "label", r"shape of cls_score"),
        (dict(type="CrossEntropyLoss"), (LOGITS, torch.tensor([0, 1])), {}, "label", r"shape \[4\].*got \[2\]"),
        (
            dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0]),
            (LOGITS, torch.tensor([0, 1, 1, 0])),
            {},
            "class_weight",
            "one entry per class",
        ),
        (
            dict(type="CrossEntropyLoss", use_sigmoid=True),
            (LOGITS, torch.tensor([0, 1, 3, 2])),
            {"weight": torch.ones(3)},
            "weight",
            r"one entry per sample",
        ),
        (
            dict(type="CrossEntropyLoss", use_mask=True),
            (torch.rand(2, 3, 2, 2), torch.rand(2, 2, 2)),
            {},
            "weight",
            "class indices",
        ),
        (
            dict(type="CrossEntropyLoss", use_mask=True),
            (torch.rand(2, 3, 2, 2), torch.rand(2, 2, 2), torch.tensor([0, 3])),
            {},
            "weight",
            r"\[0, 2\]",
        ),
        (
            dict(type="CrossEntropyLoss", use_mask=True),
            (torch.rand(2, 3, 2, 2), torch.rand(2, 2, 2), torch.tensor([0, 1])),
            {"reduction_override": "sum"},
            "reduction",
            "only reduction='mean'",
        ),
        (
            dict(type="QualityFocalLoss"),
            (LOGITS, (torch.tensor([0, 1, 2, 3]),)),
            {},
            "target",
            r"\(label, score\), got 1",
        ),
        (
            dict(type="QualityFocalLoss"),
            (LOGITS, (torch.tensor([0, 1, 2, 3]), torch.rand(3))),
            {},
            "target",
            r"score\) must have shape \[N\] = \[4\]",
        ),
        (
            dict(type="QualityFocalLoss"),
            (LOGITS, (torch.rand(4), torch.rand(4))),
            {},
            "target[0] (label)",
            "integer class indices",
        ),
        (dict(type="QualityFocalLoss"), (LOGITS, "label"), {}, "target", "tensor or a \\(label, score\\) tuple"),
        (
            dict(type="DistributionFocalLoss"),
            (torch.rand(4, 8), torch.tensor([0.5, 7.0, 1.2, 3.0])),
            {},
            "target",
            r"\[0, 7\)",
        ),
        (
            dict(type="DistributionFocalLoss"),
            (torch.rand(4, 8), torch.tensor([0.5, -1.2, 1.2, 3.0])),
            {},
            "target",
            r"\[0, 7\)",
        ),
        (
            dict(type="L1Loss"),
            (torch.rand(2, 4), torch.rand(2, 4)),
            {"avg_factor": "3"},
            "avg_factor",
            "must be a number, got str",
        ),
        (
            dict(type="L1Loss"),
            (torch.rand(2, 4), torch.rand(2, 4)),
            {"avg_factor": torch.ones(2)},
            "avg_factor",
            "one-element",
        ),
    ],
)
def test_bad_inputs_are_clear(cfg, args, kwargs, field, message):
    with pytest.raises(LossInputError, match=message) as info:
        build_loss(cfg)(*args, **kwargs)
    assert info.value.field == field


def test_config_errors_are_config_errors():
    with pytest.raises(LossConfigError) as info:
        build_loss(dict(type="L1Loss", reduction=None))
    assert info.value.field == "reduction"


def test_errors_do_not_leave_state_behind():
    """A failing call leaves the module usable: the next good call gives the right answer."""
    loss = build_loss(dict(type="FocalLoss"))
    good = loss(LOGITS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(LossInputError):
        loss(LOGITS, torch.tensor([0, 1, 9, 3]))
    assert torch.equal(loss(LOGITS, torch.tensor([0, 1, 2, 3])), good)
