"""IoU-based box regression losses: IoULoss and GIoULoss.

UnitBox, Yu et al. 2016, https://arxiv.org/abs/1608.01471 (IoU loss); Generalized Intersection
over Union, Rezatofighi et al. 2019, https://arxiv.org/abs/1902.09630 (GIoU).

Shapes: ``pred`` and ``target`` [N, 4] boxes as (x1, y1, x2, y2) (or [..., N, 4]); ``weight``
[N] or [N, 4] (averaged over the 4 coordinates). Output per box ([N]) for ``reduction='none'``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import checks
from .errors import LossConfigError, LossInputError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss, zero_weight_shortcut
from .registry import LOSSES
from .schema import OutputKind

# The union's floor inside the overlap computation; IoULoss's own ``eps`` clamps the IoU instead.
OVERLAP_EPS = 1e-6


class BoxOverlap(NamedTuple):
    overlap: Tensor  # intersection area
    union: Tensor  # area1 + area2 - overlap, floored at eps


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _clamp_min0(x: Tensor) -> Tensor:
    # float16 on CPU lacks some clamp kernels in older torch; clamping in float32 is exact.
    if x.dtype == torch.float16 and not x.is_cuda:
        return x.float().clamp(min=0).half()
    return x.clamp(min=0)


def aligned_overlap(pred: Tensor, target: Tensor, eps: float) -> BoxOverlap:
    """Intersection and union of each pair ``pred[i]``, ``target[i]``."""
    top_left = torch.maximum(pred[..., :2], target[..., :2])
    bottom_right = torch.minimum(pred[..., 2:], target[..., 2:])
    wh = _clamp_min0(bottom_right - top_left)
    overlap = wh[..., 0] * wh[..., 1]
    union = _area(pred) + _area(target) - overlap
    return BoxOverlap(overlap, torch.clamp(union, min=eps))


def aligned_iou(pred: Tensor, target: Tensor, eps: float = OVERLAP_EPS) -> Tensor:
    """IoU of each pair, [..., N, 4] x [..., N, 4] -> [..., N]."""
    overlap, union = aligned_overlap(pred, target, eps)
    return overlap / union


def aligned_giou(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """GIoU = IoU - (|C| - |union|) / |C|, with C the smallest box enclosing both."""
    overlap, union = aligned_overlap(pred, target, eps)
    enclose_wh = _clamp_min0(
        torch.maximum(pred[..., 2:], target[..., 2:]) - torch.minimum(pred[..., :2], target[..., :2])
    )
    enclose = torch.clamp(enclose_wh[..., 0] * enclose_wh[..., 1], min=eps)
    return overlap / union - (enclose - union) / enclose


def iou_loss(pred: Tensor, target: Tensor, mode: str, eps: float) -> Tensor:
    """Per box: ``1 - IoU`` (linear), ``1 - IoU^2`` (square) or ``-ln IoU`` (log); IoU >= eps."""
    ious = aligned_iou(pred, target).clamp(min=eps)
    if mode == "linear":
        return 1 - ious
    if mode == "square":
        return 1 - ious.square()
    return -ious.log()


def giou_loss(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """Per box: ``1 - GIoU``, in [0, 2]."""
    return 1 - aligned_giou(pred, target, eps)


def check_boxes(pred: Tensor, target: Tensor) -> None:
    checks.float_tensor("pred", pred)
    checks.tensor("target", target)
    if pred.dim() < 2 or pred.shape[-1] != 4:
        raise LossInputError(f"pred must be [N, 4] boxes (x1, y1, x2, y2), got shape {list(pred.shape)}", field="pred")
    checks.same_shape("target", target, "pred", pred)


def box_weight(weight: Tensor | None, pred: Tensor) -> Tensor | None:
    """[N] stays; [N, 4] (pred's shape) is averaged over the coordinates, as mmdet does."""
    if weight is None or weight.dim() <= 1:
        return weight
    checks.same_shape("weight", weight, "pred", pred)
    return weight.mean(dim=-1)


@LOSSES.register_module()
class IoULoss(WeightedLoss):
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

    output_kind = OutputKind.SAMPLE
    sample_axis = -1  # one loss per box: the 4 coordinates are reduced
    differentiable = ("pred", "target")

    def __init__(
        self,
        linear: bool = False,
        eps: float = 1e-6,
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

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        checks.float_tensor("pred", pred)
        if reduction != "none":
            shortcut = zero_weight_shortcut(pred, weight)
            if shortcut is not None:
                return shortcut
        check_boxes(pred, target)
        weight = box_weight(weight, pred)
        return self.finish(iou_loss(pred, target, self.mode, self.eps), weight, reduction, avg_factor)


@LOSSES.register_module()
class GIoULoss(WeightedLoss):
    """Generalized IoU loss ``1 - GIoU``: informative even for boxes that do not overlap.

    Args:
        eps: floor of the union and enclosing areas (default 1e-6).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    With a ``weight`` that has no positive entry, returns ``(pred * weight).sum()`` whatever the
    reduction, as MMDetection does.
    """

    output_kind = OutputKind.SAMPLE
    sample_axis = -1  # one loss per box: the 4 coordinates are reduced
    differentiable = ("pred", "target")

    def __init__(self, eps: float = 1e-6, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.eps = eps

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        checks.float_tensor("pred", pred)
        shortcut = zero_weight_shortcut(pred, weight)
        if shortcut is not None:
            return shortcut
        check_boxes(pred, target)
        weight = box_weight(weight, pred)
        return self.finish(giou_loss(pred, target, self.eps), weight, reduction, avg_factor)
