"""SeesawLoss and EQLV2Loss: gradients, state updates, state_dict round trips and typed errors.

Parity with MMDetection's numbers (sequences included) lives in ``test_engine_parity``; here the
properties that hold whatever mmdet says: the gradient is the derivative of the loss with the
documented terms held constant, each forward updates the state exactly once (and a refused one not
at all), and ``state_dict`` carries everything the next step needs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from losswire.server.losses import LOSSES, LossConfigError, LossInputError, OutputKind, build_loss
from losswire.server.losses import seesaw as seesaw_module

C = 4
SEESAW = dict(type="SeesawLoss", num_classes=C)
EQLV2 = dict(type="EQLV2Loss", num_classes=C)


def seesaw_batch(seed: int, n: int = 8, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(n, C + 2, generator=g, dtype=dtype) * 1.5
    labels = torch.randint(0, C + 1, (n,), generator=g)
    labels[0], labels[1], labels[-1] = 0, 0, C  # class 0 frequent, one background
    return score, labels


def eqlv2_batch(seed: int, n: int = 8, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(n, C + 1, generator=g, dtype=dtype) * 1.5
    labels = torch.randint(0, C + 1, (n,), generator=g)
    labels[-1] = C
    return score, labels


def total(output) -> torch.Tensor:
    if isinstance(output, dict):
        return sum(t.sum() for t in output.values())
    return output.sum()


def warmed(cfg: dict, batch, steps: int = 2):
    """A module that has seen ``steps`` batches, so its state is no longer the initial one."""
    module = build_loss(cfg)
    for seed in range(steps):
        module(*batch(100 + seed))
    return module


# -- descriptions ------------------------------------------------------------------------------------


def test_descriptions_follow_mmdet_signatures():
    seesaw = LOSSES.describe("SeesawLoss")
    names = ["cls_score", "labels", "label_weights", "avg_factor", "reduction_override"]
    assert [i.name for i in seesaw.inputs] == names
    assert {p.name: p.default for p in seesaw.params} == dict(
        use_sigmoid=False, p=0.8, q=2.0, num_classes=1203, eps=1e-2, reduction="mean", loss_weight=1.0, return_dict=True
    )
    assert seesaw.output is OutputKind.SAMPLE and not seesaw.separable and seesaw.differentiable == ("cls_score",)
    eqlv2 = LOSSES.describe("EQLV2Loss")
    assert [i.name for i in eqlv2.inputs] == ["cls_score", "label", "weight", "avg_factor", "reduction_override"]
    assert {p.name: p.default for p in eqlv2.params} == dict(
        use_sigmoid=True,
        reduction="mean",
        class_weight=None,
        loss_weight=1.0,
        num_classes=1203,
        use_distributed=False,
        mu=0.8,
        alpha=4.0,
        gamma=12,
        vis_grad=False,
        test_with_obj=True,
    )
    assert eqlv2.output is OutputKind.SCALAR and eqlv2.separable and eqlv2.differentiable == ("cls_score",)


def test_state_lives_in_registered_buffers():
    assert set(build_loss(SEESAW).state_dict()) == {"cum_samples"}
    assert set(build_loss(EQLV2).state_dict()) == {"pos_grad", "neg_grad", "pos_neg"}
    fresh = build_loss(EQLV2)
    assert torch.equal(fresh.pos_neg, torch.full((C,), 100.0)) and fresh.pos_grad.dtype == torch.float32


# -- gradients (state frozen: every evaluation runs on a copy) ---------------------------------------


def frozen(module, *rest, **kwargs):
    def f(score):
        return total(copy.deepcopy(module)(score, *rest, **kwargs))

    return f


@pytest.mark.parametrize("return_dict", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"reduction_override": "sum"}, {"avg_factor": 3.7}])
def test_seesaw_gradcheck_mitigation_only(return_dict, kwargs):
    # q = 0: the loss depends on cls_score only through the cross-entropy, so autograd is exact.
    module = warmed(dict(SEESAW, q=0.0, p=1.5, return_dict=return_dict), seesaw_batch)
    score, labels = seesaw_batch(7)
    weights = torch.linspace(0.2, 1.5, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(frozen(module, labels, weights, **kwargs), (score.requires_grad_(),))


def test_seesaw_gradient_holds_the_compensation_constant(monkeypatch):
    # mmdet detaches the compensation factor: the gradient is that of a cross-entropy whose logit
    # offsets are fixed at the evaluation point, not the derivative of the whole expression.
    module = warmed(dict(SEESAW, p=0.8, q=2.0), seesaw_batch)
    score, labels = seesaw_batch(8)
    fg = labels < C
    constant = seesaw_module.compensation_factor(score[fg, :C], labels[fg], 2.0, 1e-2)
    monkeypatch.setattr(seesaw_module, "compensation_factor", lambda *args: constant)
    assert torch.autograd.gradcheck(frozen(module, labels), (score.clone().requires_grad_(),))
    monkeypatch.undo()

    # ... and that gradient is not the full derivative (the test would notice a live factor)
    leaf = score.clone().requires_grad_()
    (analytic,) = torch.autograd.grad(frozen(module, labels)(leaf), leaf)
    numeric = torch.zeros_like(score)
    for index in range(score.numel()):
        step = torch.zeros_like(score).view(-1)
        step[index] = 1e-6
        step = step.view_as(score)
        numeric.view(-1)[index] = (frozen(module, labels)(score + step) - frozen(module, labels)(score - step)) / 2e-6
    assert not torch.allclose(analytic, numeric, atol=1e-5)


def test_seesaw_gradient_is_softmax_minus_onehot_of_shifted_logits():
    module = warmed(dict(SEESAW, return_dict=True), seesaw_batch)
    score, labels = seesaw_batch(9)
    counts = module.cum_samples + torch.bincount(labels, minlength=C + 1).float()
    leaf = score.clone().requires_grad_()
    out = copy.deepcopy(module)(leaf, labels, reduction_override="sum")
    (grad,) = torch.autograd.grad(out["loss_cls_classes"], leaf)
    fg = labels < C
    ratio = counts[None, :C] / counts[:C, None]
    mitigation = torch.where(ratio < 1, ratio**0.8, 1.0)[labels[fg]].double()
    prob = score[fg, :C].softmax(1)
    own = prob.gather(1, labels[fg, None]).clamp(min=1e-2)
    compensation = torch.where(prob / own > 1, (prob / own) ** 2, 1.0)
    shifted = score[fg, :C] + (mitigation * compensation).log()
    expected = shifted.softmax(1) - F.one_hot(labels[fg], C)
    torch.testing.assert_close(grad[fg, :C], expected)
    assert not grad[~fg].any() and not grad[:, C:].any()


@pytest.mark.parametrize("cfg", [{}, {"mu": 0.3, "alpha": 2.0, "gamma": 3.0, "loss_weight": 0.7}])
def test_eqlv2_gradcheck(cfg):
    module = warmed(dict(EQLV2, **cfg), eqlv2_batch)
    assert not torch.all(module.pos_neg == 100.0)  # the weights are no longer all 1
    score, labels = eqlv2_batch(7)
    assert torch.autograd.gradcheck(frozen(module, labels), (score.requires_grad_(),))


# -- state: updated exactly once per forward --------------------------------------------------------


def test_seesaw_counts_every_label_once_per_forward():
    module = build_loss(SEESAW)
    expected = torch.zeros(C + 1)
    for seed in range(3):
        score, labels = seesaw_batch(seed)
        out = module(score.requires_grad_(), labels)
        expected += torch.bincount(labels, minlength=C + 1).float()
        assert torch.equal(module.cum_samples, expected)
        total(out).backward()  # backward does not count again
        assert torch.equal(module.cum_samples, expected)


def test_seesaw_counts_the_batch_before_the_loss_reads_them():
    score, labels = seesaw_batch(3)
    module = build_loss(dict(SEESAW, q=0.0))
    out = module(score, labels)
    # a module fed only this batch sees its counts; p = 0 would not, so the mitigation is visible
    plain = build_loss(dict(SEESAW, q=0.0, p=0.0))(score, labels)
    assert not torch.allclose(out["loss_cls_classes"], plain["loss_cls_classes"])
    torch.testing.assert_close(out["loss_cls_objectness"], plain["loss_cls_objectness"])


def test_eqlv2_statistics_once_per_forward():
    module = build_loss(EQLV2)
    pos, neg = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for seed in range(3):
        score, labels = eqlv2_batch(seed)
        ratio = (pos / (neg + 1e-10)).float().double() if seed else torch.full((C,), 100.0, dtype=torch.float64)
        f = torch.cat([1 / (1 + torch.exp(-12 * (ratio - 0.8))), torch.ones(1, dtype=torch.float64)])
        target = F.one_hot(labels, C + 1).double()
        weight = target * (1 + 4.0 * (1 - f)) + (1 - target) * f
        prob = score.sigmoid()
        magnitude = (prob - target).abs()
        out = module(score.requires_grad_(), labels)
        expected = (F.binary_cross_entropy_with_logits(score, target, reduction="none") * weight).sum() / 8
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        pos += (magnitude * target * weight).sum(0)[:-1].detach()
        neg += (magnitude * (1 - target) * weight).sum(0)[:-1].detach()
        torch.testing.assert_close(module.pos_grad.double(), pos, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.neg_grad.double(), neg, rtol=1e-5, atol=1e-6)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        out.backward()
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "cfg, batch, bad_call",
    [
        (dict(SEESAW, reduction="sum"), seesaw_batch, lambda m, s, lab: m(s, lab, avg_factor=3.0)),
        (SEESAW, seesaw_batch, lambda m, s, lab: m(s, lab, torch.ones(3))),
        (dict(SEESAW, return_dict=False), seesaw_batch, lambda m, s, lab: m(s, lab, reduction_override="none")),
        (SEESAW, seesaw_batch, lambda m, s, lab: m(s, lab.clamp(max=C) + 1)),
        (EQLV2, eqlv2_batch, lambda m, s, lab: m(s, lab.index_fill(0, torch.tensor([2]), -1))),
        (EQLV2, eqlv2_batch, lambda m, s, lab: m(s[:, :-1], lab)),
    ],
)
def test_a_refused_forward_leaves_the_state_alone(cfg, batch, bad_call):
    module = warmed(cfg, batch)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    score, labels = batch(5)
    with pytest.raises(LossInputError):
        bad_call(module, score, labels)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


# -- state_dict round trip --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, batch",
    [(SEESAW, seesaw_batch), (dict(SEESAW, return_dict=False, p=1.1), seesaw_batch), (EQLV2, eqlv2_batch)],
)
def test_state_dict_round_trip_reproduces_the_next_step(cfg, batch):
    original = warmed(cfg, batch, steps=3)
    restored = build_loss(cfg)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    score, labels = batch(42)
    a, b = score.clone().requires_grad_(), score.clone().requires_grad_()
    out_a, out_b = original(a, labels), restored(b, labels)
    assert torch.equal(total(out_a), total(out_b))
    (grad_a,) = torch.autograd.grad(total(out_a), a)
    (grad_b,) = torch.autograd.grad(total(out_b), b)
    assert torch.equal(grad_a, grad_b)
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    # a fresh module (no restored state) would have computed something else
    assert not torch.equal(total(build_loss(cfg)(score, labels)), total(out_b))


# -- outputs and helpers ----------------------------------------------------------------------------


def test_seesaw_output_structure():
    score, labels = seesaw_batch(1)
    n_fg = int((labels < C).sum())
    out = build_loss(dict(SEESAW, reduction="none"))(score, labels)
    assert list(out) == ["loss_cls_objectness", "loss_cls_classes"]
    assert out["loss_cls_objectness"].shape == (8,) and out["loss_cls_classes"].shape == (n_fg,)
    summed = build_loss(dict(SEESAW, return_dict=False))(score, labels)
    parts = build_loss(SEESAW)(score, labels)
    torch.testing.assert_close(summed, parts["loss_cls_classes"] + parts["loss_cls_objectness"])
    background = torch.full((8,), C)
    none_fg = build_loss(dict(SEESAW, loss_weight=3.0))(score, background)
    assert none_fg["loss_cls_classes"].dim() == 0 and none_fg["loss_cls_classes"].item() == 0


def test_seesaw_helpers():
    module = build_loss(SEESAW)
    assert module.get_cls_channels(C) == C + 2
    assert module.custom_cls_channels and module.custom_activation and module.custom_accuracy
    score, labels = seesaw_batch(2)
    scores = module.get_activation(score)
    assert scores.shape == (8, C + 1)
    torch.testing.assert_close(scores.sum(-1), torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(scores[:, C], score[:, C:].softmax(-1)[:, 1])
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 0, 1])
    score = torch.full((8, C + 2), -5.0)
    score[torch.arange(8), labels.clamp(max=C - 1)] = 5.0  # classes all right
    score[:, C] = torch.tensor([1.0, 1, 1, -1, -1, 1, 1, 1])  # objectness right in rows 0-2, 4, 6, 7
    acc = module.get_accuracy(score, labels)
    torch.testing.assert_close(acc["acc_classes"], torch.tensor([100.0]))
    torch.testing.assert_close(acc["acc_objectness"], torch.tensor([75.0]))
    assert module.get_accuracy(score[4:6], labels[4:6])["acc_classes"].item() == 0  # no foreground row


def test_eqlv2_helpers():
    module = build_loss(EQLV2)
    assert module.get_channel_num(C) == C + 1
    score, _ = eqlv2_batch(3)
    prob = score.sigmoid()
    scores = module.get_activation(score)
    torch.testing.assert_close(scores[:, :C], prob[:, :C] * (1 - prob[:, C:]))
    torch.testing.assert_close(build_loss(dict(EQLV2, test_with_obj=False)).get_activation(score), prob)


def test_eqlv2_ignores_reduction_weight_and_avg_factor_like_mmdet():
    score, labels = eqlv2_batch(4)
    plain = build_loss(EQLV2)(score, labels)
    other = build_loss(dict(EQLV2, reduction="sum"))(
        score, labels, torch.rand(8, C + 1), avg_factor=2.0, reduction_override="none"
    )
    assert plain.dim() == 0 and torch.equal(plain, other)


def test_empty_batches_give_zero_with_a_gradient():
    score = torch.zeros(0, C + 2, requires_grad=True)
    out = build_loss(SEESAW)(score, torch.zeros(0, dtype=torch.long))
    assert all(t.item() == 0 for t in out.values())
    score = torch.zeros(0, C + 1, requires_grad=True)
    loss = build_loss(EQLV2)(score, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0 and loss.requires_grad


# -- typed errors -----------------------------------------------------------------------------------


def _seesaw_call(**change):
    score, labels = seesaw_batch(0, dtype=torch.float32)
    args = dict(cls_score=score, labels=labels)
    args.update(change)
    return lambda: build_loss(SEESAW)(**args)


def _eqlv2_call(**change):
    score, labels = eqlv2_batch(0, dtype=torch.float32)
    args = dict(cls_score=score, label=labels)
    args.update(change)
    return lambda: build_loss(EQLV2)(**args)


score32, labels32 = seesaw_batch(0, dtype=torch.float32)
escore32, elabels32 = eqlv2_batch(0, dtype=torch.float32)


@pytest.mark.parametrize(
    "call, error, field, match",
    [
        (lambda: build_loss(dict(SEESAW, use_sigmoid=True)), LossConfigError, "use_sigmoid", "must be False"),
        (lambda: build_loss(dict(SEESAW, num_classes=0)), LossConfigError, "num_classes", ">= 1"),
        (lambda: build_loss(dict(EQLV2, num_classes=0)), LossConfigError, "num_classes", ">= 1"),
        (lambda: build_loss(SEESAW).get_cls_channels(5), LossInputError, "num_classes", "built for num_classes=4"),
        (_seesaw_call(cls_score=score32[:, :-1]), LossInputError, "cls_score", r"\[N, 6\].*got shape \[8, 5\]"),
        (_seesaw_call(cls_score=labels32), LossInputError, "cls_score", "floating-point"),
        (_seesaw_call(labels=labels32[:-1]), LossInputError, "labels", r"shape \[8\], got \[7\]"),
        (_seesaw_call(labels=labels32.float()), LossInputError, "labels", "integer class indices"),
        (_seesaw_call(labels=labels32.clamp(max=C) + 1), LossInputError, "labels", r"\[0, 4\].*\[1, 5\]"),
        (_seesaw_call(labels=labels32 - 1), LossInputError, "labels", r"\[0, 4\]"),
        (_seesaw_call(label_weights=torch.ones(7)), LossInputError, "label_weights", r"\[8\], got \[7\]"),
        (_seesaw_call(label_weights=torch.ones(8, 1)), LossInputError, "label_weights", r"got \[8, 1\]"),
        (_seesaw_call(reduction_override="avg"), LossInputError, "reduction_override", "avg"),
        (_seesaw_call(reduction_override="sum", avg_factor=2.0), LossInputError, "avg_factor", "reduction='sum'"),
        (
            lambda: build_loss(dict(SEESAW, reduction="none", return_dict=False))(score32, labels32),
            LossInputError,
            "labels",
            "return_dict=False",
        ),
        (_eqlv2_call(cls_score=escore32[:, :-1]), LossInputError, "cls_score", r"\[N, 5\]"),
        (_eqlv2_call(cls_score=escore32[None]), LossInputError, "cls_score", r"got shape \[1, 8, 5\]"),
        (_eqlv2_call(label=elabels32[:-1]), LossInputError, "label", r"got \[7\]"),
        (_eqlv2_call(label=elabels32[:, None]), LossInputError, "label", r"got \[8, 1\]"),
        (_eqlv2_call(label=elabels32.float()), LossInputError, "label", "integer class indices"),
        (_eqlv2_call(label=elabels32.index_fill(0, torch.tensor([2]), -1)), LossInputError, "label", r"\[-1, 4\]"),
        (_eqlv2_call(label=elabels32.clamp(max=C) + 1), LossInputError, "label", r"\[0, 4\]"),
    ],
)
def test_typed_errors_name_the_field(call, error, field, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert info.value.field == field
