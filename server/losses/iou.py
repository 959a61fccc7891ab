"""IoU-based box regression losses: IoU, GIoU, Bounded IoU, DIoU, CIoU, EIoU and SIoU.

UnitBox, Yu et al. 2016, https://arxiv.org/abs/1608.01471 (IoU loss); Generalized Intersection
over Union, Rezatofighi et al. 2019, https://arxiv.org/abs/1902.09630 (GIoU); Improving Object
Localization with Fitness NMS and Bounded IoU Loss, Tychsen-Smith and Petersson 2018,
https://arxiv.org/abs/1711.00164 (Bounded IoU); Distance-IoU Loss, Zheng et al. 2020,
https://arxiv.org/abs/1911.08287 (DIoU); Enhancing Geometric Factors in Model Learning and Inference
for Object Detection and Instance Segmentation, Zheng et al. 2021, https://arxiv.org/abs/2005.03572
(CIoU); A Systematic IoU-Related Method: Beyond Simplified Regression for Better Localization, Peng
and Yu 2021, https://ieeexplore.ieee.org/abstract/document/9429909 (EIoU); SIoU Loss: More Powerful
Learning for Bounding Box Regression, Gevorgyan 2022, https://arxiv.org/abs/2205.12740 (SIoU).

Shapes: ``pred`` and ``target`` [N, 4] boxes as (x1, y1, x2, y2) (IoULoss and GIoULoss also take
[..., N, 4]); ``weight`` [N] or [N, 4] (averaged over the 4 coordinates). Output per box ([N]) for
``reduction='none'``, except BoundedIoULoss: one loss per coordinate ([N, 4]), with an [N, 4] or
[N, 1] weight applied element-wise.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .boxes import (
    aligned_iou,
    area,
    box_weight,
    check_box_rows,
    check_boxes,
    check_coordinate_weight,
    clamp_min,
    double_centre_offset,
    enclosing_sides,
    enclosing_wh,
    iou_eps_union,
    overlap_sides,
    sizes,
)
from .errors import LossConfigError
from .pipeline import PairwiseLoss, Reduction
from .registry import LOSSES
from .schema import NonNegative, OutputKind, Positive


def iou_loss(pred: Tensor, target: Tensor, mode: str, eps: float) -> Tensor:
    """Per box: ``1 - IoU`` (linear), ``1 - IoU^2`` (square) or ``-ln IoU`` (log); IoU >= eps."""
    ious = aligned_iou(pred, target).clamp(min=eps)
    if mode == "linear":
        return 1 - ious
    if mode == "square":
        return 1 - ious.square()
    return -ious.log()


class GIoUParts(NamedTuple):
    """GIoU's forward, step by step: what its fused kernel's backward reads, and the loss."""

    overlap_raw: Tensor  # intersection sides before the clamp at 0, [..., N, 2]
    overlap_wh: Tensor  # ... after it
    overlap: Tensor  # intersection area I
    union_raw: Tensor  # A_p + A_t - I
    union: Tensor  # ... floored at eps: U
    enclose_raw_wh: Tensor  # enclosing box's sides before the clamp at 0, [..., N, 2]
    enclose_wh: Tensor  # ... after it
    enclose_raw: Tensor  # enclosing area
    enclose: Tensor  # ... floored at eps: E
    loss: Tensor  # 1 - (I / U - (E - U) / E), per box


def giou_parts(pred: Tensor, target: Tensor, eps: float | Tensor) -> GIoUParts:
    """``1 - GIoU`` per box, in [0, 2], with ``GIoU = IoU - (|C| - |union|) / |C|`` and C the smallest box
    enclosing both; the union and ``|C|`` are floored at ``eps`` (a 0-d tensor in a closed form)."""
    overlap_raw = overlap_sides(pred, target)
    overlap_wh = clamp_min(overlap_raw, 0.0)
    overlap = overlap_wh[..., 0] * overlap_wh[..., 1]
    union_raw = area(pred) + area(target) - overlap
    union = torch.clamp(union_raw, min=eps)
    enclose_raw_wh = enclosing_sides(pred, target)
    enclose_wh = clamp_min(enclose_raw_wh, 0.0)
    enclose_raw = enclose_wh[..., 0] * enclose_wh[..., 1]
    enclose = torch.clamp(enclose_raw, min=eps)
    loss = 1 - (overlap / union - (enclose - union) / enclose)
    return GIoUParts(
        overlap_raw, overlap_wh, overlap, union_raw, union, enclose_raw_wh, enclose_wh, enclose_raw, enclose, loss
    )


# -- the distance/shape-aware family (Bounded IoU, DIoU, CIoU, EIoU, SIoU) --------------------------
# These follow MMDetection's conventions, which differ from IoU/GIoU above: ``eps`` is *added* to the
# union (not a floor), and heights (never widths) carry ``eps`` where an aspect ratio is taken.

# CIoU's aspect-ratio term: v = (4 / pi^2) (atan(w_t / h_t) - atan(w_p / h_p))^2 lies in [0, 1].
ASPECT_SCALE = 4 / math.pi**2
# SIoU measures the angle of the centre offset to the nearer axis: sin(45 deg) is the switch point.
SIN_45 = math.sqrt(2) / 2


def centre_distance_penalty(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """``rho^2 / c^2``: squared distance of the centres over the squared diagonal of the enclosing box
    (plus ``eps``), [N]. Zero for concentric boxes, tends to 1 for centres far apart."""
    rho2 = double_centre_offset(pred, target).square().sum(dim=-1) / 4
    c2 = enclosing_wh(pred, target, 0.0).square().sum(dim=-1) + eps
    return rho2 / c2


def bounded_iou_loss(pred: Tensor, target: Tensor, beta: float, eps: float) -> Tensor:
    """Per coordinate, [N, 4] -> [N, 4]: smooth-L1 (threshold ``beta``) of the four bounded-IoU costs.

    With ``d`` the centre offset and ``w`` the sizes (target fixed, no gradient):
    ``cost_x = 1 - max((w_t - 2|d_x|) / (w_t + 2|d_x| + eps), 0)`` (and y), the best IoU reachable
    with this centre error; ``cost_w = 1 - min(w_t / (w_p + eps), w_p / (w_t + eps))`` (and h), the
    IoU of two concentric boxes with these widths. Columns in the order (x, y, w, h).
    """
    target = target.detach()
    pred_centre, target_centre = (pred[..., :2] + pred[..., 2:]) * 0.5, (target[..., :2] + target[..., 2:]) * 0.5
    pred_size, target_size = pred[..., 2:] - pred[..., :2], target[..., 2:] - target[..., :2]
    offset = 2 * (target_centre - pred_centre).abs()
    centre_ratio = (target_size - offset) / (target_size + offset + eps)
    centre_cost = 1 - torch.maximum(centre_ratio, torch.zeros_like(centre_ratio))
    size_cost = 1 - torch.minimum(target_size / (pred_size + eps), pred_size / (target_size + eps))
    cost = torch.cat([centre_cost, size_cost], dim=-1)
    return torch.where(cost < beta, 0.5 * cost * cost / beta, cost - 0.5 * beta)


def diou_loss(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """Per box: ``1 - IoU + rho^2 / c^2``, in [0, 2)."""
    return 1 - (iou_eps_union(pred, target, eps) - centre_distance_penalty(pred, target, eps))


def ciou_loss(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """Per box: ``1 - clamp(IoU - rho^2 / c^2 - alpha v, -1, 1)``.

    ``v`` compares the aspect ratios (``h + eps``); the trade-off ``alpha = v / (1 - IoU + v)``,
    applied only where IoU > 0.5, is a constant for autograd. As in mmdet, that gate is a float32
    tensor, so half-precision boxes are finished in float32; the result is cast back to pred's dtype.
    """
    iou = iou_eps_union(pred, target, eps)
    pred_size, target_size = sizes(pred, eps), sizes(target, eps)
    angle_gap = torch.atan(target_size[..., 0] / target_size[..., 1]) - torch.atan(
        pred_size[..., 0] / pred_size[..., 1]
    )
    v = ASPECT_SCALE * angle_gap.square()
    with torch.no_grad():
        alpha = (iou > 0.5).to(torch.float32) * v / (1 - iou + v)
    ciou = iou - (centre_distance_penalty(pred, target, eps) + alpha * v)
    return (1 - ciou.clamp(min=-1.0, max=1.0)).to(pred.dtype)


def eiou_loss(pred: Tensor, target: Tensor, smooth_point: float, eps: float) -> Tensor:
    """Per box: smooth-L1 (threshold ``smooth_point``) of ``1 - I_e / (union + eps)``.

    ``I_e`` is EIoU's *extended* intersection: measured from the enclosing box's top-left corner
    with ``a = far - corner`` (the intersection's far edges) and ``b = near - corner`` (its near
    edges), ``I_e = a_x a_y + min(a_x, b_x) min(a_y, b_y) - b_x max(a_y, b_y) - max(a_x, b_x) b_y``.
    It equals the intersection area when the boxes overlap and turns negative as they move apart,
    so the loss keeps a gradient beyond 1. The smooth-L1 branch choice is a constant for autograd
    (a float32 mask, as in mmdet; the result is cast back to pred's dtype).
    """
    corner = torch.minimum(pred[..., :2], target[..., :2])
    near = torch.maximum(pred[..., :2], target[..., :2]) - corner
    far = torch.minimum(pred[..., 2:], target[..., 2:]) - corner
    low, high = torch.minimum(near, far), torch.maximum(near, far)
    extended = (
        far[..., 0] * far[..., 1]
        + low[..., 0] * low[..., 1]
        - near[..., 0] * high[..., 1]
        - high[..., 0] * near[..., 1]
    )
    gap = 1 - extended / (area(pred) + area(target) - extended + eps)
    quadratic = (gap < smooth_point).detach().to(torch.float32)
    loss = 0.5 * quadratic * gap.square() / smooth_point + (1 - quadratic) * (gap - 0.5 * smooth_point)
    return loss.to(pred.dtype)


def siou_loss(pred: Tensor, target: Tensor, eps: float, neg_gamma: bool) -> Tensor:
    """Per box: ``1 - clamp(IoU - (distance + shape) / 2, -1, 1)``.

    With ``s`` the centre offset (+ eps) and ``c`` the enclosing box (sides >= eps): the angle cost
    ``L = sin(2 asin(sin_a))``, ``a`` the angle of ``s`` to the nearer axis; the distance cost
    ``2 - exp(g (s_x / c_x)^2) - exp(g (s_y / c_y)^2)`` with ``g = 2 - L`` (``L - 2``, the paper's
    sign, with ``neg_gamma``); the shape cost ``sum (1 - exp(-|w_p - w_t| / max(w_p, w_t)))^4`` over
    width and height (+ eps).
    """
    iou = iou_eps_union(pred, target, eps)
    enclose = enclosing_wh(pred, target, eps)
    offset = double_centre_offset(pred, target) * 0.5 + eps
    length = offset.square().sum(dim=-1).sqrt()
    sin_x, sin_y = offset[..., 0].abs() / length, offset[..., 1].abs() / length
    # sin(2a) is symmetric about 45 degrees: the switch changes no value, it keeps asin away from 1
    sin_angle = torch.where(sin_x > SIN_45, sin_y, sin_x)
    angle_cost = torch.cos(2 * torch.asin(sin_angle) - math.pi / 2)
    gamma = angle_cost - 2 if neg_gamma else 2 - angle_cost
    rho = (offset / enclose).square()
    distance_cost = 2 - torch.exp(gamma * rho[..., 0]) - torch.exp(gamma * rho[..., 1])
    pred_size, target_size = sizes(pred, eps), sizes(target, eps)
    omega = (pred_size - target_size).abs() / torch.maximum(pred_size, target_size)
    shape_cost = (1 - torch.exp(-omega)).pow(4).sum(dim=-1)
    siou = iou - 0.5 * (distance_cost + shape_cost)
    return 1 - siou.clamp(min=-1.0, max=1.0)


class _PerBoxLoss(PairwiseLoss):
    """One loss per box: [N, 4] pairs (IoU and GIoU also [..., N, 4]), mmdet's zero-weight shortcut,
    and an [N, 4] weight averaged over the coordinates."""

    output_kind = OutputKind.SAMPLE
    sample_axis = -1  # one loss per box: the 4 coordinates are reduced
    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    weight_shortcut = "always"

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        check_box_rows(type(self).__name__, pred, target)
        return pred, target

    def shape_weight(self, weight: Tensor | None, loss: Tensor, pred: Tensor) -> Tensor | None:
        return box_weight(weight, pred)


@LOSSES.register_module()
class IoULoss(_PerBoxLoss):
    """IoU loss between predicted and target boxes.

    Args:
        linear: deprecated alias of ``mode='linear'`` (default False).
        eps: lower clamp of the IoU, keeps ``log`` finite (default 1e-6).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        mode: "linear" (1 - IoU), "square" (1 - IoU^2) or "log" (-ln IoU, default).

    With a ``weight`` that has no positive entry and a reduction other than "none", returns
    ``(pred * weight).sum()`` as MMDetection does.
    """

    weight_shortcut = "reduced"
    working_copies = 6.0
    work_per_element = 40

    def __init__(
        self,
        linear: bool = False,
        eps: Positive = 1e-6,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        mode: Literal["linear", "square", "log"] = "log",
    ) -> None:
        super().__init__(reduction, loss_weight)
        if mode not in ("linear", "square", "log"):
            raise LossConfigError(
                f"IoULoss.mode must be one of ['linear', 'square', 'log'], got {mode!r}", field="mode"
            )
        self.linear = linear
        self.mode = "linear" if linear else mode
        self.eps = eps

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        check_boxes(pred, target)
        return pred, target

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return iou_loss(pred, target, self.mode, self.eps)


@LOSSES.register_module()
class GIoULoss(_PerBoxLoss):
    """Generalized IoU loss ``1 - GIoU``: informative even for boxes that do not overlap.

    Args:
        eps: floor of the union and enclosing areas (default 1e-6).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    With a ``weight`` that has no positive entry, returns ``(pred * weight).sum()`` whatever the
    reduction, as MMDetection does.
    """

    working_copies = 8.0
    work_per_element = 60

    def __init__(self, eps: NonNegative = 1e-6, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.eps = eps

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        check_boxes(pred, target)
        return pred, target

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return giou_parts(pred, target, self.eps).loss


class _EpsBoxLoss(_PerBoxLoss):
    """The per-box losses whose ``eps`` is added to the union (DIoU, CIoU, EIoU, SIoU): 2-D [N, 4] boxes."""

    working_copies = 9.0
    work_per_element = 70

    def __init__(self, eps: NonNegative = 1e-6, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.eps = eps


@LOSSES.register_module()
class BoundedIoULoss(PairwiseLoss):
    """Bounded IoU loss: smooth-L1 of four per-coordinate upper bounds of ``1 - IoU``.

    Each coordinate's cost is 1 minus the best IoU reachable when only that coordinate is wrong
    (centre x / y, width / height), bounded in [0, 1]; the target is held fixed (no gradient).

    Args:
        beta: threshold of the smooth-L1 applied to the costs, > 0 (default 0.2).
        eps: added to the denominators (default 1e-3).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    Output per coordinate ([N, 4], columns x, y, w, h) for ``reduction='none'``; ``weight`` is
    [N, 4] or [N, 1]. With a ``weight`` that has no positive entry, returns ``(pred * weight).sum()``
    whatever the reduction, as MMDetection does.
    """

    differentiable = ("pred",)
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    # A coordinate's loss depends on the box's other coordinates (x on x1 and x2): the gradient for
    # an arbitrary upstream gradient needs a recompute, not upstream x the all-ones gradient.
    separable = False
    weight_shortcut = "always"
    working_copies = 20.0
    work_per_element = 50

    def __init__(
        self, beta: Positive = 0.2, eps: NonNegative = 1e-3, reduction: Reduction = "mean", loss_weight: float = 1.0
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.beta = beta
        self.eps = eps

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        check_box_rows("BoundedIoULoss", pred, target)
        return pred, target

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return bounded_iou_loss(pred, target, self.beta, self.eps)

    def shape_weight(self, weight: Tensor | None, loss: Tensor, pred: Tensor) -> Tensor | None:
        check_coordinate_weight("BoundedIoULoss", weight, pred)
        return weight


@LOSSES.register_module()
class DIoULoss(_EpsBoxLoss):
    """Distance-IoU loss ``1 - IoU + rho^2 / c^2``: also pulls the centres together.

    ``rho`` is the distance between the box centres, ``c`` the diagonal of the smallest box
    enclosing both, so the loss has a gradient when the boxes do not overlap.

    Args:
        eps: added to the union and to ``c^2`` (default 1e-6).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    With a ``weight`` that has no positive entry, returns ``(pred * weight).sum()`` whatever the
    reduction, as MMDetection does.
    """

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return diou_loss(pred, target, self.eps)


@LOSSES.register_module()
class CIoULoss(_EpsBoxLoss):
    """Complete-IoU loss: DIoU plus an aspect-ratio term ``alpha v`` where IoU > 0.5.

    ``v = (4 / pi^2) (atan(w_t / h_t) - atan(w_p / h_p))^2``, ``alpha = v / (1 - IoU + v)`` taken
    as a constant (no gradient); the CIoU is clamped to [-1, 1] before ``1 - CIoU``.

    Args:
        eps: added to the union, to ``c^2`` and to the heights (default 1e-6).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    With a ``weight`` that has no positive entry, returns ``(pred * weight).sum()`` whatever the
    reduction, as MMDetection does.
    """

    working_copies = 10.0
    work_per_element = 80

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return ciou_loss(pred, target, self.eps)


@LOSSES.register_module()
class EIoULoss(_EpsBoxLoss):
    """Extended-IoU loss: smooth-L1 of ``1 - IoU_e`` with an intersection that goes negative apart.

    ``IoU_e`` equals the IoU for overlapping boxes and keeps decreasing below 0 for separated
    ones; the loss is quadratic below ``smooth_point`` and linear above (branch choice detached).

    Args:
        eps: added to the union (default 1e-6).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        smooth_point: threshold between the quadratic and the linear part, > 0 (default 0.1).

    With a ``weight`` that has no positive entry, returns ``(pred * weight).sum()`` whatever the
    reduction, as MMDetection does.
    """

    def __init__(
        self,
        eps: NonNegative = 1e-6,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        smooth_point: Positive = 0.1,
    ) -> None:
        super().__init__(eps, reduction, loss_weight)
        self.smooth_point = smooth_point

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return eiou_loss(pred, target, self.smooth_point, self.eps)


@LOSSES.register_module()
class SIoULoss(_EpsBoxLoss):
    """SIoU loss: IoU with angle-aware distance and shape costs.

    ``1 - clamp(IoU - (distance + shape) / 2, -1, 1)``: the distance cost weighs the centre offset,
    relative to the enclosing box, by its angle to the nearer axis; the shape cost compares widths
    and heights.

    Args:
        eps: added to the union, the centre offset and the heights; floor of the enclosing box's
            sides (default 1e-6).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        neg_gamma: use the paper's ``gamma = angle_cost - 2`` instead of mmdet's default
            ``2 - angle_cost`` (default False).

    With a ``weight`` that has no positive entry, returns ``(pred * weight).sum()`` whatever the
    reduction, as MMDetection does.
    """

    working_copies = 20.0
    work_per_element = 105

    def __init__(
        self, eps: NonNegative = 1e-6, reduction: Reduction = "mean", loss_weight: float = 1.0, neg_gamma: bool = False
    ) -> None:
        super().__init__(eps, reduction, loss_weight)
        self.neg_gamma = neg_gamma

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return siou_loss(pred, target, self.eps, self.neg_gamma)
