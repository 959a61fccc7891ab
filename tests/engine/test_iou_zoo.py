"""BoundedIoULoss, DIoULoss, CIoULoss, EIoULoss and SIoULoss: gradients, precision, shapes and errors.

Their numbers and gradients are compared with MMDetection 3.3 in ``test_engine_parity``
(``fixtures/mmdet_iou.pt``); here: float64 gradchecks, hand-derived values, the terms held constant
for autograd, the half-precision paths and the typed errors.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from losswire.server.losses import LOSSES, LossConfigError, LossInputError, OutputKind, build_loss

ZOO = ("BoundedIoULoss", "DIoULoss", "CIoULoss", "EIoULoss", "SIoULoss")
PER_BOX = ("DIoULoss", "CIoULoss", "EIoULoss", "SIoULoss")
# MMDetection 3.3's config parameters with their defaults, in order (the public contract).
MMDET_PARAMS = {
    "BoundedIoULoss": dict(beta=0.2, eps=1e-3, reduction="mean", loss_weight=1.0),
    "DIoULoss": dict(eps=1e-6, reduction="mean", loss_weight=1.0),
    "CIoULoss": dict(eps=1e-6, reduction="mean", loss_weight=1.0),
    "EIoULoss": dict(eps=1e-6, reduction="mean", loss_weight=1.0, smooth_point=0.1),
    "SIoULoss": dict(eps=1e-6, reduction="mean", loss_weight=1.0, neg_gamma=False),
}
# A non-default value of each loss-specific option, so every test also runs off the defaults.
OPTIONS = {
    "BoundedIoULoss": dict(beta=0.5, eps=0.01),
    "DIoULoss": dict(eps=0.01),
    "CIoULoss": dict(eps=0.01),
    "EIoULoss": dict(smooth_point=0.3, eps=0.01),
    "SIoULoss": dict(neg_gamma=True, eps=0.01),
}


def box_pairs(n: int, seed: int, dtype: torch.dtype = torch.float64, apart: tuple[int, ...] = (0,)) -> tuple:
    """Valid boxes in [0, 8]: targets overlap their pred partially, except rows in ``apart``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    corner = rand(n, 2) * 3
    size = 1 + rand(n, 2) * 2
    target_corner = corner + (rand(n, 2) - 0.5) * 1.5
    target_size = size * (0.6 + 0.8 * rand(n, 2))
    for row in apart:
        target_corner[row, 0] += 4.0
    pred = torch.cat([corner, corner + size], dim=1)
    target = torch.cat([target_corner, target_corner + target_size], dim=1)
    return pred.to(dtype), target.to(dtype)


def plain_iou(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    wh = (torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    area = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1]) + (target[:, 2] - target[:, 0]) * (
        target[:, 3] - target[:, 1]
    )
    return overlap / (area - overlap + eps)


def aspect_term(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """CIoU's ``v = (4 / pi^2) (atan(w_t / (h_t + eps)) - atan(w_p / (h_p + eps)))^2``."""

    def angle(b: torch.Tensor) -> torch.Tensor:
        return torch.atan((b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1] + eps))

    return 4 / math.pi**2 * (angle(target) - angle(pred)) ** 2


# -- descriptions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_signatures_and_defaults_match_mmdet(name):
    cls = LOSSES.get(name)
    assert list(inspect.signature(cls.forward).parameters)[1:] == [
        "pred",
        "target",
        "weight",
        "avg_factor",
        "reduction_override",
    ]
    description = LOSSES.describe(name)
    assert {p.name: p.default for p in description.params} == MMDET_PARAMS[name]
    assert [p.name for p in description.params] == list(MMDET_PARAMS[name])
    assert build_loss(dict(type=name)).config() == MMDET_PARAMS[name]


def test_descriptions_output_kinds_and_gradients():
    bounded = LOSSES.describe("BoundedIoULoss")
    assert bounded.output is OutputKind.ELEMENT and bounded.differentiable == ("pred",)
    assert not bounded.separable
    assert LOSSES.describe("SIoULoss").param("neg_gamma").type == "bool"
    for name in PER_BOX:
        description = LOSSES.describe(name)
        assert description.output is OutputKind.SAMPLE and description.sample_axis == -1
        assert description.differentiable == ("pred", "target") and description.separable


# -- gradients ----------------------------------------------------------------------------------------

GRAD_CALLS = [
    pytest.param("none", None, None, id="none"),
    pytest.param("mean", None, None, id="mean"),
    pytest.param("sum", "weight", None, id="sum-weighted"),
    pytest.param("mean", "weight", 2.5, id="mean-weighted-avg_factor"),
]


def _weight(name: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    shape = (n, 4) if name == "BoundedIoULoss" else (n,)
    return 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("options", [False, True], ids=["defaults", "options"])
@pytest.mark.parametrize("reduction, weighted, avg_factor", GRAD_CALLS)
@pytest.mark.parametrize("name", ["BoundedIoULoss", "DIoULoss", "EIoULoss", "SIoULoss"])
def test_gradcheck(name, reduction, weighted, avg_factor, options):
    loss = build_loss(dict(type=name, **(OPTIONS[name] if options else {})))
    pred, target = box_pairs(6, seed=1)
    pred.requires_grad_()
    if name != "BoundedIoULoss":
        target.requires_grad_()
    weight = _weight(name, 6) if weighted else None

    def fn(p, t):
        return loss(p, t, weight, avg_factor=avg_factor, reduction_override=reduction)

    assert torch.autograd.gradcheck(fn, (pred, target))


@pytest.mark.parametrize("reduction, weighted, avg_factor", GRAD_CALLS)
def test_gradcheck_ciou_below_half_iou(reduction, weighted, avg_factor):
    # alpha is a constant for autograd where IoU > 0.5; below, alpha = 0 and finite differences apply
    loss = build_loss(dict(type="CIoULoss"))
    pred, target = box_pairs(16, seed=3)
    low = plain_iou(pred, target, 1e-6) < 0.45
    pred, target = pred[low][:6], target[low][:6]
    assert len(pred) == 6
    weight = _weight("CIoULoss", 6) if weighted else None
    inputs = (pred.requires_grad_(), target.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda p, t: loss(p, t, weight, avg_factor=avg_factor, reduction_override=reduction), inputs
    )


def test_ciou_alpha_is_a_constant_for_autograd():
    eps = 1e-6
    pred = torch.tensor([[0.0, 0.0, 4.0, 2.0], [1.0, 1.0, 4.0, 5.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.1, 0.2, 4.0, 2.9], [1.2, 0.9, 4.3, 4.6]], dtype=torch.float64, requires_grad=True)
    iou = plain_iou(pred, target, eps)
    assert (iou > 0.5).all()
    v = aspect_term(pred, target, eps)
    alpha = (v / (1 - iou + v)).detach()
    diou = build_loss(dict(type="DIoULoss", reduction="none"))(pred, target)
    ciou = build_loss(dict(type="CIoULoss", reduction="none"))(pred, target)
    expected = diou + alpha * v
    torch.testing.assert_close(ciou, expected, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ciou.sum(), (pred, target))
    want = torch.autograd.grad(expected.sum(), (pred, target), retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # ... and differs from the gradient where alpha would follow the boxes
    free = torch.autograd.grad((diou + v / (1 - iou + v) * v).sum(), pred)[0]
    assert not torch.allclose(got[0], free)


def test_bounded_iou_target_gets_no_gradient():
    pred, target = box_pairs(5, seed=4)
    pred.requires_grad_()
    target.requires_grad_()
    out = build_loss(dict(type="BoundedIoULoss"))(pred, target)
    grad_pred, grad_target = torch.autograd.grad(out, (pred, target), allow_unused=True)
    assert grad_target is None and grad_pred.abs().sum() > 0


@pytest.mark.parametrize("name", PER_BOX)
def test_per_box_losses_are_separable(name):
    # the service's shortcut: upstream x (gradient for all-ones), broadcast over the 4 coordinates
    pred, target = box_pairs(6, seed=5)
    pred.requires_grad_()
    target.requires_grad_()
    out = build_loss(dict(type=name, reduction="none"))(pred, target)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.autograd.grad(out, (pred, target), upstream, retain_graph=True)
    ones = torch.autograd.grad(out.sum(), (pred, target))
    for e, o in zip(exact, ones, strict=True):
        torch.testing.assert_close(e, upstream.unsqueeze(-1) * o)


def test_bounded_iou_is_not_element_separable():
    # each coordinate's loss depends on the others (x on x1 and x2): the shortcut would be wrong
    pred, target = box_pairs(6, seed=5)
    pred.requires_grad_()
    out = build_loss(dict(type="BoundedIoULoss", reduction="none"))(pred, target)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.autograd.grad(out, pred, upstream, retain_graph=True)[0]
    shortcut = upstream * torch.autograd.grad(out.sum(), pred)[0]
    assert not torch.allclose(exact, shortcut)


# -- hand-derived values --------------------------------------------------------------------------------


def _one(name: str, pred: list, target: list, **cfg) -> torch.Tensor:
    loss = build_loss(dict(type=name, reduction="none", **cfg))
    return loss(torch.tensor([pred], dtype=torch.float64), torch.tensor([target], dtype=torch.float64))[0]


def test_hand_derived_diou_and_ciou():
    # IoU 2/6, centres 1 apart, enclosing box 3 x 2: 1 - 1/3 + 1/13; same aspect ratio, so CIoU == DIoU
    want = 1 - 1 / 3 + 1 / 13
    assert _one("DIoULoss", [0, 0, 2, 2], [1, 0, 3, 2], eps=0.0).item() == pytest.approx(want, rel=1e-12)
    assert _one("CIoULoss", [0, 0, 2, 2], [1, 0, 3, 2], eps=0.0).item() == pytest.approx(want, rel=1e-12)
    # IoU 8/12 > 0.5: the aspect term counts, alpha = v / (1 - IoU + v); centres 0.5 apart, enclosing 4 x 3
    v = 4 / math.pi**2 * (math.atan(4 / 3) - math.atan(2)) ** 2
    want = 1 - 2 / 3 + 0.25 / 25 + v / (1 / 3 + v) * v
    assert _one("CIoULoss", [0, 0, 4, 2], [0, 0, 4, 3], eps=0.0).item() == pytest.approx(want, rel=1e-12)
    # IoU exactly 0.5: no aspect term (the gate is IoU > 0.5)
    diou = _one("DIoULoss", [0, 0, 2, 2], [0, 0, 2, 1], eps=0.0)
    assert _one("CIoULoss", [0, 0, 2, 2], [0, 0, 2, 1], eps=0.0).item() == pytest.approx(diou.item(), rel=1e-12)


def test_hand_derived_eiou():
    # apart in x: the extended intersection is -(x gap) * (y overlap) = -1, union 1 + 1 + 1 = 3
    assert _one("EIoULoss", [0, 0, 1, 1], [2, 0, 3, 1], eps=0.0).item() == pytest.approx(4 / 3 - 0.05, rel=1e-12)
    # overlapping: the plain intersection (1 of union 7), linear part
    assert _one("EIoULoss", [0, 0, 2, 2], [1, 1, 3, 3], eps=0.0).item() == pytest.approx(6 / 7 - 0.05, rel=1e-12)
    # 1 - IoU = 0.01 < smooth_point: quadratic part 0.5 * 0.01^2 / 0.1
    got = _one("EIoULoss", [0, 0, 10, 10], [0, 0, 10, 9.9], eps=0.0).item()
    assert got == pytest.approx(0.5 * 0.01**2 / 0.1, rel=1e-9)


def test_hand_derived_siou():
    # a horizontal shift: angle cost 0, so gamma = +-2; equal sizes: no shape cost; rho_x = (1 / 3)^2
    for neg_gamma, gamma in ((False, 2.0), (True, -2.0)):
        distance = 1 - math.exp(gamma / 9)
        want = 1 - (1 / 3 - 0.5 * distance)
        got = _one("SIoULoss", [0, 0, 2, 2], [1, 0, 3, 2], eps=0.0, neg_gamma=neg_gamma).item()
        assert got == pytest.approx(want, rel=1e-12)
    # apart, centre offset (3, 1): angle cost sin(2 atan(1/3)) = 0.6; enclosing box 5 x 3; IoU 0
    for neg_gamma, gamma in ((False, 1.4), (True, -1.4)):
        distance = 2 - math.exp(gamma * (3 / 5) ** 2) - math.exp(gamma * (1 / 3) ** 2)
        want = 1 - max(-1.0, min(1.0, -0.5 * distance))
        got = _one("SIoULoss", [0, 0, 2, 2], [3, 1, 5, 3], eps=0.0, neg_gamma=neg_gamma).item()
        assert got == pytest.approx(want, rel=1e-12)


def test_hand_derived_bounded_iou():
    # centre off by half the target width: best reachable IoU 0, cost 1 -> 1 - beta / 2; the rest exact
    got = _one("BoundedIoULoss", [0, 0, 2, 2], [1, 0, 3, 2], eps=0.0)
    torch.testing.assert_close(got, torch.tensor([0.9, 0.0, 0.0, 0.0], dtype=torch.float64))
    # centre off by 0.5 of width 2: IoU bound (2 - 1) / (2 + 1), cost 2/3 (linear part); width 2 vs 1.6
    got = _one("BoundedIoULoss", [0, 0, 1.6, 2], [0.3, 0, 2.3, 2], eps=0.0)
    cost_w = 1 - 1.6 / 2
    want = torch.tensor([2 / 3 - 0.1, 0.0, 0.5 * cost_w**2 / 0.2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want)


# -- weights, reduction, shortcut -----------------------------------------------------------------------


@pytest.mark.parametrize("name", PER_BOX)
def test_box_weight_is_averaged_over_coordinates(name):
    pred, target = box_pairs(5, seed=6)
    w4 = torch.rand(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    loss = build_loss(dict(type=name, **OPTIONS[name]))
    torch.testing.assert_close(loss(pred, target, w4), loss(pred, target, w4.mean(-1)))
    unweighted = loss(pred, target, reduction_override="none")
    torch.testing.assert_close(loss(pred, target, w4, reduction_override="sum"), (unweighted * w4.mean(-1)).sum())
    torch.testing.assert_close(
        loss(pred, target, w4, avg_factor=3.0), (unweighted * w4.mean(-1)).sum() / (3.0 + torch.finfo().eps)
    )


def test_bounded_iou_weight_is_per_coordinate():
    pred, target = box_pairs(5, seed=6)
    loss = build_loss(dict(type="BoundedIoULoss", reduction="none"))
    plain = loss(pred, target)
    assert plain.shape == (5, 4)
    w1 = torch.rand(5, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    torch.testing.assert_close(loss(pred, target, w1), plain * w1)
    w4 = w1.expand(5, 4).contiguous()
    torch.testing.assert_close(loss(pred, target, w4, reduction_override="mean"), (plain * w1).mean())


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_zero_weight_shortcut(name, reduction):
    pred, target = box_pairs(4, seed=8)
    pred.requires_grad_()
    loss = build_loss(dict(type=name, reduction=reduction, loss_weight=0.7))
    out = loss(pred, target, torch.zeros(4))
    assert out.dim() == 0 and out.item() == 0
    assert not torch.autograd.grad(out, pred)[0].any()
    # no positive entry but some negative: (pred * weight).sum(), not scaled by loss_weight
    weight = torch.tensor([-0.5, 0.0, -1.0, -0.25], dtype=torch.float64)
    out = loss(pred, target, weight)
    torch.testing.assert_close(out, (pred * weight[:, None]).sum())


@pytest.mark.parametrize("name", ZOO)
def test_empty_input_gives_zero_with_gradient(name):
    pred = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    out = build_loss(dict(type=name))(pred, torch.zeros(0, 4, dtype=torch.float64))
    assert out.item() == 0
    (grad,) = torch.autograd.grad(out, pred)
    assert grad.shape == (0, 4)


# -- precision ------------------------------------------------------------------------------------------

# loss values are O(1); coordinates below 8 (bf16 resolves 1/32 there)
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE), ids=str)
@pytest.mark.parametrize("name", ZOO)
def test_low_precision_close_to_float64(name, dtype):
    pred, target = box_pairs(16, seed=9, apart=(0, 5))
    pred, target = pred.to(dtype), target.to(dtype)
    loss = build_loss(dict(type=name, reduction="none", **OPTIONS[name]))
    leaf = pred.clone().requires_grad_()
    out = loss(leaf, target)
    assert out.dtype == dtype  # also CIoU/EIoU, whose float32 masks promote mmdet's result
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    # the reference sees the same rounded boxes, in float64
    want = loss(pred.double(), target.double())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=HALF_TOLERANCE[dtype])


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_input_errors_name_the_field(name):
    pred, target = box_pairs(8, seed=10, dtype=torch.float32)
    loss = build_loss(dict(type=name))
    cases = [
        ((pred.reshape(2, 4, 4), target.reshape(2, 4, 4)), {}, "pred", r"2-D \[N, 4\] boxes.*\[2, 4, 4\]"),
        ((pred[0], target[0]), {}, "pred", r"got shape \[4\]"),
        ((pred[:, :3], target[:, :3]), {}, "pred", r"got shape \[8, 3\]"),
        ((pred.long(), target), {}, "pred", "floating-point"),
        ((pred, target[:5]), {}, "target", r"shape of pred \[8, 4\], got \[5, 4\]"),
        ((pred, target.numpy()), {}, "target", "must be a tensor"),
        ((pred, target), {"avg_factor": 2.0, "reduction_override": "sum"}, "avg_factor", "reduction='sum'"),
        ((pred, target), {"reduction_override": "max"}, "reduction_override", "'max'"),
    ]
    if name == "BoundedIoULoss":
        cases.append(((pred, target, torch.ones(8)), {}, "weight", r"\[N, 4\] or \[N, 1\].*got shape \[8\]"))
    else:
        cases.append(((pred, target, torch.ones(8, 1)), {}, "weight", r"shape of pred \[8, 4\], got \[8, 1\]"))
        cases.append(((pred, target, torch.ones(9)), {}, "weight", r"\[9\] does not broadcast"))
    for args, kwargs, field, message in cases:
        with pytest.raises(LossInputError, match=message) as info:
            loss(*args, **kwargs)
        assert info.value.field == field, (args, kwargs)


@pytest.mark.parametrize(
    "cfg, field, message",
    [
        (dict(type="BoundedIoULoss", beta=0.0), "beta", r"BoundedIoULoss.beta must be > 0.*got 0.0"),
        (dict(type="BoundedIoULoss", beta=-0.2), "beta", "must be > 0"),
        (dict(type="EIoULoss", smooth_point=0.0), "smooth_point", r"EIoULoss.smooth_point must be > 0"),
        (dict(type="SIoULoss", neg_gamma=1), "neg_gamma", r"SIoULoss.neg_gamma must be a bool, got int 1"),
        (dict(type="DIoULoss", eps="tiny"), "eps", r"DIoULoss.eps must be a float"),
        (dict(type="CIoULoss", reduction="avg"), "reduction", "reduction must be one of"),
        (dict(type="EIoULoss", smooth=0.1), "smooth", "valid parameters: eps"),
    ],
)
def test_config_errors_name_the_field(cfg, field, message):
    with pytest.raises(LossConfigError, match=message) as info:
        build_loss(cfg)
    assert info.value.field == field
