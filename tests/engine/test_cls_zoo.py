"""The classification zoo: VarifocalLoss, GaussianFocalLoss, KnowledgeDistillationKLDivLoss, DiceLoss,
MultiPosCrossEntropyLoss, CrossEntropyCustomLoss and FocalCustomLoss.

mmdet's own numbers are replayed by ``test_engine_parity`` (``fixtures/mmdet_cls.pt``). Here:
float64 ``gradcheck`` for every loss and mode, low precision against float64, values worked out by
hand or by a brute-force formula, the separability the descriptions claim, mmdet's signatures,
the custom-classifier hooks and the typed errors.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from losswire.server.losses import LOSSES, LossConfigError, LossError, LossInputError, build_loss, output_kind_of

N, C = 6, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# inputs: each mode builds float64 inputs; low-precision tests cast the float ones
# --------------------------------------------------------------------------------------------------
def _iou_target(seed: int, away_from_zero: bool = False) -> torch.Tensor:
    """Varifocal targets: IoUs at a few entries, 0 elsewhere (or -0.4..-0.1, away from the q > 0 switch)."""
    target = -0.1 - 0.3 * _rand(seed, N, C) if away_from_zero else torch.zeros(N, C, dtype=torch.float64)
    for i, c in ((0, 1), (2, 3), (3, 0), (5, 2)):
        target[i, c] = 0.1 + 0.8 * float(_rand(seed + i, 1))
    return target


def _heatmap(seed: int, shape: tuple[int, ...], peaks: bool = True) -> torch.Tensor:
    """Values in [0, 0.81) with exact 1s (the positives) unless ``peaks`` is False."""
    target = (0.9 * _rand(seed, *shape)) ** 2
    if peaks:
        flat = target.view(-1)
        flat[[0, 5, flat.numel() - 2]] = 1.0
    return target


def _probs(seed: int, *shape: int) -> torch.Tensor:
    return 0.05 + 0.9 * _rand(seed, *shape)


def _mpce_labels(seed: int, others: bool = True) -> torch.Tensor:
    label = (_rand(seed, N, 5) < 0.4).double()
    label[0, 1], label[0, 3] = 1.0, 0.0
    label[1] = 0.0  # no positive
    label[2] = 1.0  # no negative
    if others:  # neither >= 1 nor 0: a logit of 0 on both sides
        label[3, 0], label[4, 2], label[1, 4] = -1.0, 0.5, -1.0
    return label


def _sig_labels() -> torch.Tensor:
    return torch.tensor([0, C, 2, 3, -100, 1])


@dataclasses.dataclass
class Mode:
    id: str
    cfg: dict[str, Any]
    args: list[Any]  # float64 inputs, in forward order
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    grads: tuple[int, ...] = (0,)  # positional inputs gradcheck differentiates
    reductions: tuple[str, ...] = ("none", "mean", "sum")
    low_precision: bool = True


MODES = [
    Mode("varifocal", {"type": "VarifocalLoss"}, [_randn(1, N, C) * 1.5, _iou_target(2)]),
    Mode(
        "varifocal/target-away-from-0",
        {"type": "VarifocalLoss"},
        [_randn(3, N, C) * 1.5, _iou_target(4, away_from_zero=True)],
        grads=(0, 1),
    ),
    Mode(
        "varifocal/iou_weighted-False/alpha-0.5/gamma-1.5",
        {"type": "VarifocalLoss", "iou_weighted": False, "alpha": 0.5, "gamma": 1.5},
        [_randn(5, N, C) * 1.5, _iou_target(6, away_from_zero=True), _rand(7, N, 1) + 0.2],
        grads=(0, 1),
    ),
    Mode("gaussian_focal", {"type": "GaussianFocalLoss"}, [_probs(8, N, C), _heatmap(9, (N, C))]),
    Mode(
        "gaussian_focal/no-peaks/image/alpha-1.5/gamma-3/pos-neg-weights",
        {"type": "GaussianFocalLoss", "alpha": 1.5, "gamma": 3.0, "pos_weight": 0.6, "neg_weight": 1.8},
        [_probs(10, 2, C, 3, 3), _heatmap(11, (2, C, 3, 3), peaks=False)],
        grads=(0, 1),
    ),
    Mode(
        "gaussian_focal/pos_inds",
        {"type": "GaussianFocalLoss"},
        [_probs(12, N, C), _heatmap(13, (N, C)), torch.tensor([0, 2, 5, 2]), torch.tensor([1, 3, 0, 2])],
        grads=(0, 1),
        reductions=("mean", "sum"),
    ),
    Mode(
        "kd/T-10",
        {"type": "KnowledgeDistillationKLDivLoss"},
        [_randn(14, N, 5) * 2, _randn(15, N, 5) * 2, _rand(16, N) + 0.2],
    ),
    Mode(
        "kd/T-1.5/NxCx3",
        {"type": "KnowledgeDistillationKLDivLoss", "T": 1.5},
        [_randn(17, N, 5, 3), _randn(18, N, 5, 3)],
    ),
    Mode(
        "dice/NxHxW",
        {"type": "DiceLoss"},
        [_randn(19, N, 4, 3) * 1.5, (_rand(20, N, 4, 3) < 0.4).double(), _rand(21, N) + 0.2],
    ),
    Mode(
        "dice/naive/eps-0.1/points",
        {"type": "DiceLoss", "naive_dice": True, "eps": 0.1},
        [_randn(22, N, 7) * 1.5, _rand(23, N, 7)],
    ),
    Mode(
        "dice/activate-False",
        {"type": "DiceLoss", "activate": False, "use_sigmoid": False},
        [_probs(24, N, 2, 5), (_rand(25, N, 2, 5) < 0.5).double()],
    ),
    Mode(
        "multipos", {"type": "MultiPosCrossEntropyLoss"}, [_randn(26, N, 5) * 2, _mpce_labels(27), _rand(28, N) + 0.2]
    ),
    Mode(
        "multipos/only-0-1-labels",
        {"type": "MultiPosCrossEntropyLoss"},
        [_randn(29, N, 5) * 2, _mpce_labels(30, False)],
    ),
    Mode(
        "ce_custom/softmax",
        {"type": "CrossEntropyCustomLoss", "num_classes": C},
        [_randn(31, N, C + 1), torch.tensor([0, C, 2, 3, 1, C]), _rand(32, N) + 0.2],
    ),
    Mode(
        "ce_custom/sigmoid/class_weight",
        {"type": "CrossEntropyCustomLoss", "num_classes": C, "use_sigmoid": True, "class_weight": [0.5, 1, 2, 0.8]},
        [_randn(33, N, C), _sig_labels(), _rand(34, N) + 0.2],
    ),
    Mode(
        "ce_custom/mask",
        {"type": "CrossEntropyCustomLoss", "num_classes": C, "use_mask": True},
        [_randn(35, N, C, 3, 3), _rand(36, N, 3, 3), torch.tensor([0, 3, 1, 1, 2, 0])],
        grads=(0, 1),
        reductions=("mean",),
    ),
    Mode(
        "focal_custom",
        {"type": "FocalCustomLoss", "num_classes": C, "gamma": 1.5, "alpha": 0.4},
        [_randn(37, N, C) * 1.5, torch.tensor([C, 1, 1, 0, 3, 2]), _rand(38, N * C) + 0.2],
    ),
]
MODE_IDS = [m.id for m in MODES]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _call(mode: Mode, args: list[Any], reduction: str, avg_factor: float | None = None, **cfg: Any) -> torch.Tensor:
    module = build_loss(dict(mode.cfg, **cfg))
    kwargs = dict(mode.kwargs)
    if mode.cfg.get("use_mask"):
        return module(*args, **kwargs)
    kwargs.update(reduction_override=reduction, avg_factor=avg_factor)
    return module(*args, **kwargs)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_gradcheck(mode: Mode):
    for reduction in mode.reductions:
        for avg_factor in (None, 2.5) if reduction == "mean" and not mode.cfg.get("use_mask") else (None,):

            def fn(*leaves, reduction=reduction, avg_factor=avg_factor):
                args = list(mode.args)
                for index, leaf in zip(mode.grads, leaves, strict=True):
                    args[index] = leaf
                return _call(mode, args, reduction, avg_factor, loss_weight=0.7)

            inputs = [mode.args[i].clone().requires_grad_() for i in mode.grads]
            assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", [m for m in MODES if m.low_precision], ids=[m.id for m in MODES if m.low_precision])
def test_low_precision_close_to_float64(mode: Mode, dtype: torch.dtype):
    reduction = mode.reductions[-1] if mode.cfg.get("use_mask") else "mean"
    ref_args = [a.clone() for a in mode.args]
    ref_args[0].requires_grad_()
    low_args = [_cast(a, dtype) for a in mode.args]
    low_args[0].requires_grad_()
    ref = _call(mode, ref_args, reduction)
    out = _call(mode, low_args, reduction)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.sum().backward()
    ref.sum().backward()
    assert low_args[0].grad.dtype == dtype and torch.isfinite(low_args[0].grad).all()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(low_args[0].grad.double(), ref_args[0].grad, **tol)


@pytest.mark.parametrize("mode", [m for m in MODES if "none" in m.reductions], ids=lambda m: m.id)
def test_none_output_shape_and_reductions(mode: Mode):
    module = build_loss(mode.cfg)
    none = _call(mode, mode.args, "none")
    kind = output_kind_of(module, LOSSES.describe(mode.cfg["type"]))
    pred = mode.args[0]
    expected = {"element": pred.shape, "sample": pred.shape[:1] + pred.shape[2:]}[kind.value]
    if mode.cfg["type"] == "DiceLoss":
        expected = pred.shape[:1]  # every axis after the first is reduced
    assert none.shape == expected
    torch.testing.assert_close(_call(mode, mode.args, "sum"), none.sum())
    torch.testing.assert_close(_call(mode, mode.args, "mean"), none.mean())
    torch.testing.assert_close(_call(mode, mode.args, "mean", avg_factor=2.5), none.sum() / (2.5 + 1.1920929e-07))
    torch.testing.assert_close(_call(mode, mode.args, "mean", loss_weight=0.7), 0.7 * none.mean())


@pytest.mark.parametrize("mode", [m for m in MODES if "none" in m.reductions], ids=lambda m: m.id)
def test_separable_gradient_shortcut_holds(mode: Mode):
    """What the client does for a separable loss: upstream x gradient-for-ones, one axis inserted."""
    description = LOSSES.describe(mode.cfg["type"])
    if not description.separable:
        pytest.skip("not separable")
    pred = mode.args[0].clone().requires_grad_()
    args = [pred, *mode.args[1:]]
    out = _call(mode, args, "none")
    upstream = _randn(99, *out.shape)
    (exact,) = torch.autograd.grad(out, pred, upstream, retain_graph=True)
    (ones,) = torch.autograd.grad(out, pred, torch.ones_like(out))
    if upstream.shape != ones.shape:
        upstream = upstream.unsqueeze(description.sample_axis)
    torch.testing.assert_close(upstream * ones, exact)


def test_dice_is_not_separable_for_the_client_shortcut():
    """[N, H, W] masks reduce two axes: one inserted axis can not broadcast [N] over them."""
    assert not LOSSES.describe("DiceLoss").separable
    pred = _randn(1, N, 4, 3).requires_grad_()
    out = build_loss(dict(type="DiceLoss", reduction="none"))(pred, (_rand(2, N, 4, 3) < 0.5).double())
    upstream = _randn(3, N)
    (exact,) = torch.autograd.grad(out, pred, upstream, retain_graph=True)
    (ones,) = torch.autograd.grad(out, pred, torch.ones_like(out))
    torch.testing.assert_close(upstream.view(N, 1, 1) * ones, exact)


# --------------------------------------------------------------------------------------------------
# values by hand and by independent formulas
# --------------------------------------------------------------------------------------------------
def test_varifocal_values_by_hand():
    pred = torch.zeros(1, 3, dtype=torch.float64)  # p = 0.5 everywhere
    target = torch.tensor([[0.6, 0.0, -0.5]], dtype=torch.float64)
    log2 = math.log(2)
    out = build_loss(dict(type="VarifocalLoss", reduction="none"))(pred, target)
    # positive: q * BCE(0.5, 0.6); negative q = 0: alpha p^2 BCE(0.5, 0); q = -0.5: alpha |0.5 + 0.5|^2 BCE(x, -0.5)
    bce_neg = -(-0.5 * math.log(0.5) + 1.5 * math.log(0.5))
    expected = torch.tensor([[0.6 * log2, 0.75 * 0.25 * log2, 0.75 * 1.0 * bce_neg]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    unweighted = build_loss(dict(type="VarifocalLoss", reduction="none", iou_weighted=False))(pred, target)
    torch.testing.assert_close(unweighted[0, 0], torch.tensor(log2, dtype=torch.float64))


def test_gaussian_focal_values_by_hand():
    pred = torch.tensor([[0.5, 0.5, 0.2]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    loss = build_loss(dict(type="GaussianFocalLoss", reduction="none", pos_weight=2.0, neg_weight=3.0))
    expected = torch.tensor(
        [[2 * math.log(2) * 0.25, 3 * math.log(2) * 0.25 * 0.5**4, 3 * -math.log(0.8) * 0.04]], dtype=torch.float64
    )
    torch.testing.assert_close(loss(pred, target), expected)


def test_gaussian_focal_pos_inds_reduces_the_two_parts_apart():
    pred, target = _probs(1, N, C), _heatmap(2, (N, C), peaks=False)
    inds, labels = torch.tensor([1, 4, 4]), torch.tensor([0, 2, 3])
    loss = build_loss(dict(type="GaussianFocalLoss", pos_weight=0.5, neg_weight=2.0, loss_weight=0.7))
    picked = pred[inds, labels]
    positive = (-picked.log() * (1 - picked) ** 2).mean()
    negative = (-(1 - pred).log() * pred**2 * (1 - target) ** 4).mean()
    torch.testing.assert_close(loss(pred, target, inds, labels), 0.7 * (0.5 * positive + 2.0 * negative))
    # a boolean mask selects the same rows as their indices; weight is ignored with pos_inds, as in mmdet
    mask = torch.tensor([False, True, False, False, True, False])
    torch.testing.assert_close(
        loss(pred, target, mask, torch.tensor([0, 2])), loss(pred, target, torch.tensor([1, 4]), torch.tensor([0, 2]))
    )
    torch.testing.assert_close(
        loss(pred, target, inds, labels, weight=torch.zeros(N, C)), loss(pred, target, inds, labels)
    )


def test_knowledge_distillation_matches_kl_divergence_and_detaches_the_teacher():
    pred, teacher = _randn(1, N, 5).requires_grad_(), _randn(2, N, 5).requires_grad_()
    temperature = 3.0
    loss = build_loss(dict(type="KnowledgeDistillationKLDivLoss", T=temperature, reduction="none"))
    out = loss(pred, teacher)
    q = torch.softmax(teacher.detach() / temperature, dim=1)
    p = torch.softmax(pred.detach() / temperature, dim=1)
    expected = (q * (q.log() - p.log())).sum(dim=1) / 5 * temperature**2  # mean over classes, times T^2
    torch.testing.assert_close(out.detach(), expected)
    out.sum().backward()
    assert teacher.grad is None and pred.grad is not None
    assert "soft_label" not in LOSSES.describe("KnowledgeDistillationKLDivLoss").differentiable


def test_dice_values_by_hand():
    prob = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    eps = 1e-3
    vnet = build_loss(dict(type="DiceLoss", activate=False, reduction="none"))(prob, target)
    expected = torch.tensor([1 - 2 / (2 + 2 * eps), 1 - 1 / ((0.5 + eps) + (1 + eps))], dtype=torch.float64)
    torch.testing.assert_close(vnet, expected)
    naive = build_loss(dict(type="DiceLoss", activate=False, naive_dice=True, reduction="none"))(prob, target)
    expected = torch.tensor([0.0, 1 - (1 + eps) / (2 + eps)], dtype=torch.float64)
    torch.testing.assert_close(naive, expected)


def test_dice_argument_order_is_mmdets():
    assert list(inspect.signature(LOSSES.get("DiceLoss").forward).parameters)[4:6] == [
        "reduction_override",
        "avg_factor",
    ]
    pred, target = _randn(1, N, 5), (_rand(2, N, 5) < 0.5).double()
    loss = build_loss(dict(type="DiceLoss", reduction="sum"))
    torch.testing.assert_close(
        loss(pred, target, None, "mean", 2.0), loss(pred, target, avg_factor=2.0, reduction_override="mean")
    )


def test_dice_target_gradient_follows_the_float32_rounded_target():
    pred, target = _randn(1, N, 5), _rand(2, N, 5).requires_grad_()
    build_loss(dict(type="DiceLoss"))(pred, target).backward()
    rounded = target.detach().float().double().requires_grad_()
    prob = pred.sigmoid()
    textbook = 1 - 2 * (prob * rounded).sum(1) / ((prob * prob).sum(1) + (rounded * rounded).sum(1) + 2e-3)
    textbook.mean().backward()
    torch.testing.assert_close(target.grad, rounded.grad, rtol=1e-6, atol=1e-7)


def _multipos_brute_force(score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """log(1 + sum over (i, j) of exp(b_j - a_i)), pairs enumerated one by one."""
    rows = []
    for x, y in zip(score.tolist(), label.tolist(), strict=True):
        a = [(xi if yi >= 1 else 0.0) for xi, yi in zip(x, y, strict=True) if yi != 0]  # positives and others
        b = [(xj if yj == 0 else 0.0) for xj, yj in zip(x, y, strict=True) if not yj >= 1]  # negatives and others
        rows.append(math.log(1 + sum(math.exp(bj - ai) for ai in a for bj in b)))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("others", [False, True])
def test_multipos_matches_the_pairwise_definition(others: bool):
    score, label = _randn(5, N, 5) * 2, _mpce_labels(6, others)
    out = build_loss(dict(type="MultiPosCrossEntropyLoss", reduction="none"))(score, label)
    torch.testing.assert_close(out, _multipos_brute_force(score, label))
    assert out[1 if not others else 2] == 0  # a row without positives (or negatives) costs nothing


def test_multipos_empty_rows_have_finite_zero_gradients():
    score = _randn(1, 3, 4).requires_grad_()
    label = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    out = build_loss(dict(type="MultiPosCrossEntropyLoss", reduction="none"))(score, label)
    out.sum().backward()
    assert torch.isfinite(score.grad).all() and not score.grad[:2].any() and score.grad[2].any()


def test_focal_custom_is_focal_loss_on_logits_whatever_activated_says():
    pred, target, weight = _randn(1, N, C), torch.tensor([C, 1, 1, 0, 3, 2]), _rand(2, N) + 0.2
    focal = build_loss(dict(type="FocalLoss", gamma=1.5, alpha=0.4))(pred, target, weight, avg_factor=3.0)
    for activated in (False, True):
        custom = build_loss(dict(type="FocalCustomLoss", num_classes=C, gamma=1.5, alpha=0.4, activated=activated))
        torch.testing.assert_close(custom(pred, target, weight, avg_factor=3.0), focal)


def test_ce_custom_is_cross_entropy_for_every_mode():
    for cfg, args in (
        ({}, [_randn(1, N, C + 1), torch.tensor([0, C, 2, 3, 1, C])]),
        ({"use_sigmoid": True}, [_randn(2, N, C), _sig_labels()]),
        ({"avg_non_ignore": True, "ignore_index": 2}, [_randn(3, N, C + 1), torch.tensor([0, 2, 2, 3, 1, C])]),
    ):
        ours = build_loss(dict(type="CrossEntropyCustomLoss", num_classes=C, **cfg))(*args)
        torch.testing.assert_close(ours, build_loss(dict(type="CrossEntropyLoss", **cfg))(*args))


# --------------------------------------------------------------------------------------------------
# the custom-classifier hooks (V3Det heads call them; they do not enter the loss)
# --------------------------------------------------------------------------------------------------
def test_custom_classifier_channels():
    assert build_loss(dict(type="CrossEntropyCustomLoss", num_classes=7)).get_cls_channels(7) == 8
    assert build_loss(dict(type="CrossEntropyCustomLoss", num_classes=7, use_sigmoid=True)).get_cls_channels(7) == 7
    focal = build_loss(dict(type="FocalCustomLoss", num_classes=7))
    assert focal.get_cls_channels(7) == 7 and focal.custom_cls_channels and focal.custom_activation
    with pytest.raises(LossInputError) as caught:
        focal.get_cls_channels(6)
    assert caught.value.field == "num_classes"


def test_custom_classifier_activation():
    score = _randn(1, N, C + 1)
    softmax = build_loss(dict(type="CrossEntropyCustomLoss", num_classes=C)).get_activation(score)
    torch.testing.assert_close(softmax, torch.softmax(score, dim=-1))
    sigmoid = build_loss(dict(type="CrossEntropyCustomLoss", num_classes=C, use_sigmoid=True)).get_activation(score)
    fg = score[:, :C].sigmoid()
    assert sigmoid.shape == (N, C + 1)
    torch.testing.assert_close(sigmoid[:, :C], fg)
    torch.testing.assert_close(sigmoid[:, C], (1 - fg.sum(1)).clamp(0, 1))
    focal = build_loss(dict(type="FocalCustomLoss", num_classes=C)).get_activation(score)
    torch.testing.assert_close(focal, fg)


def test_custom_classifier_accuracy():
    score = torch.tensor([[3.0, 1, 0, 9], [0, 2, 1, 9], [1, 0, 2, 0], [0, 0, 1, 5]])  # last column: background
    labels = torch.tensor([0, 0, 2, 3])  # 3 = background for num_classes 3: not counted
    loss = build_loss(dict(type="CrossEntropyCustomLoss", num_classes=3))
    acc = loss.get_accuracy(score, labels)["acc_classes"]
    torch.testing.assert_close(acc, torch.tensor([200.0 / 3]))
    none = loss.get_accuracy(score[3:], labels[3:])["acc_classes"]
    assert none.shape == () and none == 0


# --------------------------------------------------------------------------------------------------
# signatures and descriptions
# --------------------------------------------------------------------------------------------------
MMDET_FORWARD = {
    "VarifocalLoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "GaussianFocalLoss": ["pred", "target", "pos_inds", "pos_labels", "weight", "avg_factor", "reduction_override"],
    "KnowledgeDistillationKLDivLoss": ["pred", "soft_label", "weight", "avg_factor", "reduction_override"],
    "DiceLoss": ["pred", "target", "weight", "reduction_override", "avg_factor"],
    "MultiPosCrossEntropyLoss": ["cls_score", "label", "weight", "avg_factor", "reduction_override"],
    "CrossEntropyCustomLoss": ["cls_score", "label", "weight", "avg_factor", "reduction_override", "ignore_index"],
    "FocalCustomLoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
}
MMDET_PARAMS = {
    "VarifocalLoss": dict(
        use_sigmoid=True, alpha=0.75, gamma=2.0, iou_weighted=True, reduction="mean", loss_weight=1.0
    ),
    "GaussianFocalLoss": dict(alpha=2.0, gamma=4.0, reduction="mean", loss_weight=1.0, pos_weight=1.0, neg_weight=1.0),
    "KnowledgeDistillationKLDivLoss": dict(reduction="mean", loss_weight=1.0, T=10),
    "DiceLoss": dict(use_sigmoid=True, activate=True, reduction="mean", naive_dice=False, loss_weight=1.0, eps=1e-3),
    "MultiPosCrossEntropyLoss": dict(reduction="mean", loss_weight=1.0),
    "CrossEntropyCustomLoss": dict(
        use_sigmoid=False,
        use_mask=False,
        reduction="mean",
        num_classes=-1,
        class_weight=None,
        ignore_index=None,
        loss_weight=1.0,
        avg_non_ignore=False,
    ),
    "FocalCustomLoss": dict(
        use_sigmoid=True, num_classes=-1, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.0, activated=False
    ),
}
OUTPUT = {
    "VarifocalLoss": ("element", ("pred", "target")),
    "GaussianFocalLoss": ("element", ("pred", "target")),
    "KnowledgeDistillationKLDivLoss": ("sample", ("pred",)),
    "DiceLoss": ("sample", ("pred", "target")),
    "MultiPosCrossEntropyLoss": ("sample", ("cls_score",)),
    "CrossEntropyCustomLoss": ("sample", ("cls_score", "label")),
    "FocalCustomLoss": ("element", ("pred",)),
}


@pytest.mark.parametrize("name", sorted(MMDET_FORWARD))
def test_signatures_and_descriptions_match_mmdet(name: str):
    assert list(inspect.signature(LOSSES.get(name).forward).parameters)[1:] == MMDET_FORWARD[name]
    description = LOSSES.describe(name)
    assert [i.name for i in description.inputs] == MMDET_FORWARD[name]
    assert [(p.name, p.default) for p in description.params] == list(MMDET_PARAMS[name].items())
    assert (description.output.value, description.differentiable) == OUTPUT[name]
    inputs = {i.name: i for i in description.inputs}
    assert inputs["reduction_override"].choices == ("none", "mean", "sum")
    assert inputs["avg_factor"].kind == "number" and inputs["weight"].kind == "tensor"
    assert description.summary


def test_repr_and_config_round_trip():
    loss = build_loss(dict(type="GaussianFocalLoss", alpha=1.5, neg_weight=2.0))
    assert "alpha=1.5" in repr(loss)
    again = build_loss(dict(type="GaussianFocalLoss", **loss.config()))
    assert again.config() == loss.config()
    custom = build_loss(dict(type="CrossEntropyCustomLoss", num_classes=3, use_sigmoid=True))
    assert custom.config()["num_classes"] == 3 and custom.config()["use_sigmoid"] is True


# --------------------------------------------------------------------------------------------------
# errors: typed, naming the field
# --------------------------------------------------------------------------------------------------
P, T_ = _randn(1, N, C), _iou_target(2)
PROB, HEAT = _probs(3, N, C), _heatmap(4, (N, C))
INDS, LABELS = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 0])
MASKS, MASK_T = _randn(5, N, 4, 3), (_rand(6, N, 4, 3) < 0.5).double()

CONFIG_ERRORS = [
    (dict(type="VarifocalLoss", use_sigmoid=False), "use_sigmoid"),
    (dict(type="VarifocalLoss", alpha=-0.1), "alpha"),
    (dict(type="KnowledgeDistillationKLDivLoss", T=0.5), "T"),
    (dict(type="DiceLoss", use_sigmoid=False), "use_sigmoid"),
    (dict(type="CrossEntropyCustomLoss"), "num_classes"),
    (dict(type="CrossEntropyCustomLoss", num_classes=3, use_sigmoid=True, use_mask=True), "use_mask"),
    (dict(type="FocalCustomLoss"), "num_classes"),
    (dict(type="FocalCustomLoss", num_classes=3, use_sigmoid=False), "use_sigmoid"),
    (dict(type="GaussianFocalLoss", reduction="max"), "reduction"),
    (dict(type="KnowledgeDistillationKLDivLoss", T="hot"), "T"),
    (dict(type="FocalCustomLoss", num_classes=2.5), "num_classes"),
]


@pytest.mark.parametrize("cfg, field", CONFIG_ERRORS, ids=[f"{c['type']}-{f}" for c, f in CONFIG_ERRORS])
def test_config_errors(cfg: dict, field: str):
    with pytest.raises(LossConfigError) as caught:
        build_loss(cfg)
    assert caught.value.field == field
    assert field in str(caught.value)


InputError = tuple[str, dict[str, Any], Callable[[], tuple[list[Any], dict[str, Any]]], str, str]
INPUT_ERRORS: list[InputError] = [
    ("vfl-target-shape", dict(type="VarifocalLoss"), lambda: ([P, T_[:, :3]], {}), "target", r"\[6, 3\]"),
    ("vfl-weight-N", dict(type="VarifocalLoss"), lambda: ([P, T_, torch.ones(N)], {}), "weight", r"\[6\]"),
    ("vfl-int-pred", dict(type="VarifocalLoss"), lambda: ([P.long(), T_], {}), "pred", "floating-point"),
    (
        "vfl-reduction",
        dict(type="VarifocalLoss"),
        lambda: ([P, T_], {"reduction_override": "max"}),
        "reduction_override",
        "max",
    ),
    (
        "vfl-sum-avg",
        dict(type="VarifocalLoss", reduction="sum"),
        lambda: ([P, T_], {"avg_factor": 2.0}),
        "avg_factor",
        "sum",
    ),
    ("gfl-pred-range", dict(type="GaussianFocalLoss"), lambda: ([PROB + 0.5, HEAT], {}), "pred", r"\[0, 1\]"),
    ("gfl-target-broadcast", dict(type="GaussianFocalLoss"), lambda: ([PROB, HEAT[:1]], {}), "target", r"\[1, 4\]"),
    ("gfl-pos_labels-missing", dict(type="GaussianFocalLoss"), lambda: ([PROB, HEAT, INDS], {}), "pos_labels", "None"),
    (
        "gfl-pos_labels-count",
        dict(type="GaussianFocalLoss"),
        lambda: ([PROB, HEAT, INDS, LABELS[:2]], {}),
        "pos_labels",
        r"\[2\]",
    ),
    (
        "gfl-pos_labels-range",
        dict(type="GaussianFocalLoss"),
        lambda: ([PROB, HEAT, INDS, torch.tensor([1, 4, 0])], {}),
        "pos_labels",
        "4",
    ),
    (
        "gfl-pos_inds-range",
        dict(type="GaussianFocalLoss"),
        lambda: ([PROB, HEAT, torch.tensor([0, 6, 1]), LABELS], {}),
        "pos_inds",
        "6",
    ),
    (
        "gfl-pos_inds-float",
        dict(type="GaussianFocalLoss"),
        lambda: ([PROB, HEAT, INDS.double(), LABELS], {}),
        "pos_inds",
        "integer",
    ),
    (
        "gfl-pos_inds-mask-length",
        dict(type="GaussianFocalLoss"),
        lambda: ([PROB, HEAT, torch.ones(N - 1, dtype=torch.bool), LABELS], {}),
        "pos_inds",
        r"\[5\]",
    ),
    (
        "gfl-pos_inds-4d",
        dict(type="GaussianFocalLoss"),
        lambda: ([PROB.view(2, 3, 2, 2), HEAT.view(2, 3, 2, 2), INDS[:2], LABELS[:2]], {}),
        "pred",
        "2-D",
    ),
    (
        "gfl-pos_inds-none",
        dict(type="GaussianFocalLoss", reduction="none"),
        lambda: ([PROB, HEAT, INDS, LABELS], {}),
        "reduction",
        "none",
    ),
    (
        "gfl-pos_inds-none-override",
        dict(type="GaussianFocalLoss"),
        lambda: ([PROB, HEAT, INDS, LABELS], {"reduction_override": "none"}),
        "reduction_override",
        "none",
    ),
    ("kd-shape", dict(type="KnowledgeDistillationKLDivLoss"), lambda: ([P, P[:, :3]], {}), "soft_label", r"\[6, 3\]"),
    ("kd-1d", dict(type="KnowledgeDistillationKLDivLoss"), lambda: ([P[0], P[1]], {}), "pred", r"\[4\]"),
    (
        "kd-weight-Nx1",
        dict(type="KnowledgeDistillationKLDivLoss"),
        lambda: ([P, P, torch.ones(N, 1)], {}),
        "weight",
        r"\[6, 1\]",
    ),
    ("dice-target-shape", dict(type="DiceLoss"), lambda: ([MASKS, MASK_T[:, :3]], {}), "target", r"\[6, 3, 3\]"),
    ("dice-target-Nx1", dict(type="DiceLoss"), lambda: ([MASKS, MASK_T[:, :1, 0]], {}), "target", r"\[6, 1\]"),
    ("dice-1d", dict(type="DiceLoss"), lambda: ([MASKS[:, 0, 0], MASK_T[:, 0, 0]], {}), "pred", r"\[6\]"),
    ("dice-weight-Nx1", dict(type="DiceLoss"), lambda: ([MASKS, MASK_T, torch.ones(N, 1)], {}), "weight", r"\[6, 1\]"),
    ("dice-weight-length", dict(type="DiceLoss"), lambda: ([MASKS, MASK_T, torch.ones(N - 1)], {}), "weight", r"\[5\]"),
    (
        "dice-reduction-positional",
        dict(type="DiceLoss"),
        lambda: ([MASKS, MASK_T, None, "max"], {}),
        "reduction_override",
        "max",
    ),
    ("mpce-shape", dict(type="MultiPosCrossEntropyLoss"), lambda: ([P, T_[:, :3]], {}), "label", r"\[6, 3\]"),
    ("mpce-3d", dict(type="MultiPosCrossEntropyLoss"), lambda: ([P[..., None], T_[..., None]], {}), "cls_score", "2-D"),
    (
        "mpce-weight-Nx1",
        dict(type="MultiPosCrossEntropyLoss"),
        lambda: ([P, T_, torch.ones(N, 1)], {}),
        "weight",
        r"\[6, 1\]",
    ),
    (
        "ce-custom-label-range",
        dict(type="CrossEntropyCustomLoss", num_classes=3),
        lambda: ([P, torch.tensor([0, 1, 4, 2, 3, 0])], {}),
        "label",
        "4",
    ),
    (
        "focal-custom-onehot",
        dict(type="FocalCustomLoss", num_classes=C),
        lambda: ([P, F.one_hot(torch.arange(N) % C, C)], {}),
        "target",
        r"\[6, 4\]",
    ),
    (
        "focal-custom-float-target",
        dict(type="FocalCustomLoss", num_classes=C),
        lambda: ([P, T_], {}),
        "target",
        "integer",
    ),
    (
        "focal-custom-target-range",
        dict(type="FocalCustomLoss", num_classes=C),
        lambda: ([P, torch.tensor([0, 1, 5, 2, 3, 0])], {}),
        "target",
        "5",
    ),
    (
        "focal-custom-target-negative",
        dict(type="FocalCustomLoss", num_classes=C),
        lambda: ([P, torch.tensor([0, 1, -1, 2, 3, 0])], {}),
        "target",
        "-1",
    ),
    (
        "focal-custom-weight",
        dict(type="FocalCustomLoss", num_classes=C),
        lambda: ([P, torch.tensor([0, 1, 1, 2, 3, 0]), torch.ones(5)], {}),
        "weight",
        r"\[5\]",
    ),
]


@pytest.mark.parametrize("case", INPUT_ERRORS, ids=[c[0] for c in INPUT_ERRORS])
def test_input_errors(case: InputError):
    _, cfg, make, field, message = case
    args, kwargs = make()
    with pytest.raises(LossInputError, match=message) as caught:
        build_loss(cfg)(*args, **kwargs)
    assert caught.value.field == field
    assert field.split("_")[0] in str(caught.value)


def test_errors_are_loss_errors_not_torch_errors():
    """Odd but valid inputs give numbers, never a torch crash."""
    pred = _probs(1, N, C)
    gfl = build_loss(dict(type="GaussianFocalLoss"))
    # duplicate and negative row indices index like torch does; no positives at all gives the negative part
    assert torch.isfinite(gfl(pred, _heatmap(2, (N, C)), torch.tensor([-1, 2, 2]), torch.tensor([0, 1, 1])))
    empty = torch.zeros(0, dtype=torch.int64)
    negative_only = gfl(pred, _heatmap(2, (N, C)), empty, empty, reduction_override="sum")
    torch.testing.assert_close(negative_only, (-(1 - pred).log() * pred**2 * (1 - _heatmap(2, (N, C))) ** 4).sum())
    with pytest.raises(LossError):
        gfl(pred, _heatmap(2, (N, C)), "rows", torch.tensor([0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_cuda_matches_cpu(mode: Mode):
    reduction = mode.reductions[-1] if mode.cfg.get("use_mask") else "mean"
    cpu = _call(mode, mode.args, reduction)
    gpu = _call(mode, [a.cuda() if isinstance(a, torch.Tensor) else a for a in mode.args], reduction)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu)
