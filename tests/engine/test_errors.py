"""Bad inputs raise a typed LossInputError naming the field, what was expected and what arrived --
never a bare assert, IndexError or a CUDA-side crash."""

import pytest
import torch

from losswire.server.evaluation import Evaluator, LossFailedError, TermRequest
from losswire.server.losses import LOSSES, LossConfigError, LossInputError, build_loss

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


# -- through the evaluator: what the wire's decoded terms meet ---------------------------------------------

CE_LOSSES = {"CrossEntropyLoss": {}, "CrossEntropyCustomLoss": {"num_classes": 3}}
# the fused kernel; autograd's path (fused kernels off, or a session)
PATHS = {
    "fused": (Evaluator(), {}),
    "autograd": (Evaluator(fused=False), {}),
    "session": (Evaluator(), {"session": "s-ignore-index"}),
}


def ce_term(loss: str, ignore_index, **fields) -> TermRequest:
    config = {"type": loss, **CE_LOSSES[loss]}
    return TermRequest(
        name="t",
        config=config,
        pred=LOGITS.clone(),
        target=torch.tensor([0, 1, 2, 0]),
        inputs={"ignore_index": ignore_index},
        **fields,
    )


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("value", [1e308, 1e19, -1e19, 2.0**63, 9.3e18, -(2.0**64)], ids=repr)
@pytest.mark.parametrize("loss", list(CE_LOSSES))
def test_integer_input_beyond_int64_is_refused(loss, value, path):
    """An integral float past int64 (a wire number) is refused where inputs are bound, on every path."""
    evaluator, fields = PATHS[path]
    with pytest.raises(LossInputError) as info:
        evaluator.evaluate(ce_term(loss, value, **fields))
    assert info.value.field == "ignore_index"
    assert str(info.value) == (
        f"{loss} input 'ignore_index' must be an int64, in [-2**63, 2**63 - 1], got float {value!r}"
    )


@pytest.mark.parametrize("path", list(PATHS))
def test_int64_bounds_are_the_line(path):
    """2**63 (the first float past int64) is refused; int64's own extremes still evaluate."""
    evaluator, fields = PATHS[path]
    with pytest.raises(LossInputError, match=r"must be an int64, in \[-2\*\*63, 2\*\*63 - 1\], got float 9.22"):
        evaluator.evaluate(ce_term("CrossEntropyLoss", 2.0**63, **fields))
    expected = Evaluator(fused=False).evaluate(ce_term("CrossEntropyLoss", -100))
    for value in (2**63 - 1, -(2.0**63)):
        outcome = evaluator.evaluate(ce_term("CrossEntropyLoss", value, **fields))
        torch.testing.assert_close(outcome.parts[0].loss, expected.parts[0].loss)


def test_forward_overflow_is_an_input_error():
    """A loss's OverflowError (an int torch cannot take) answers as its other failures on inputs do."""
    description = LOSSES.describe("CrossEntropyLoss")
    kwargs = {"cls_score": LOGITS.clone(), "label": torch.tensor([0, 1, 2, 0]), "ignore_index": 2**70}
    with pytest.raises(LossFailedError, match=r"^CrossEntropyLoss failed on these inputs: int too big to convert"):
        Evaluator._forward(build_loss(dict(type="CrossEntropyLoss")), description, kwargs)


def test_fused_selection_that_fails_leaves_the_term_to_autograd():
    """A fused kernel's ``supports`` that raises on inputs (here an int beyond int64, past binding) picks
    no kernel: autograd's path answers, as it does for every input the kernel does not cover."""
    evaluator = Evaluator()
    module = build_loss(dict(type="CrossEntropyLoss"))
    term = ce_term("CrossEntropyLoss", 2**70)
    kwargs = {"cls_score": term.pred, "label": term.target, "ignore_index": 2**70}
    description = LOSSES.describe("CrossEntropyLoss")
    assert evaluator._fused_kernel(term, None, module, description, kwargs) == (None, None)
    kernel, _ = evaluator._fused_kernel(term, None, module, description, {**kwargs, "ignore_index": -100})
    assert kernel is not None


BOX_PRED = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4], [0, 0, 1, 1], [2, 2, 5, 5]])


@pytest.mark.parametrize("eps", [1e39, 1e308], ids=repr)
def test_fused_kernel_errors_are_answered_as_autograds(eps):
    """GIoULoss's eps past float32 fails in torch.clamp: the fused kernel's failure is the input error
    autograd's path raises, type and message alike, not an internal error."""

    def term(cfg_eps):
        return TermRequest(name="t", config={"type": "GIoULoss", "eps": cfg_eps}, pred=BOX_PRED, target=BOXES)

    assert Evaluator().evaluate(term(1e-6)).fused != ""  # the fused kernel answers such a term
    with pytest.raises(LossFailedError) as autograd:
        Evaluator(fused=False).evaluate(term(eps))
    with pytest.raises(LossFailedError) as fused:
        Evaluator().evaluate(term(eps))
    assert str(fused.value) == str(autograd.value)
    assert (
        str(fused.value) == "GIoULoss failed on these inputs: value cannot be converted to type float without overflow"
    )
    assert fused.value.field is None and autograd.value.field is None
