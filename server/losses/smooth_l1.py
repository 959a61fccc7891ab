"""L1 and Smooth L1 (Huber) regression losses.

Fast R-CNN, Girshick 2015, https://arxiv.org/abs/1504.08083.

Shapes: ``pred`` and ``target`` [N, 4] (any shape, equal); ``weight`` broadcastable to it
(usually [N, 4] or [N, 1]). Output per element for ``reduction='none'``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .errors import LossConfigError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss, zero_weight_shortcut
from .registry import LOSSES


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``|pred - target|``, element-wise."""
    return (pred - target).abs()


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """``0.5 d^2 / beta`` where ``d = |pred - target| < beta``, else ``d - 0.5 beta``; element-wise."""
    diff = (pred - target).abs()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def check_regression_pair(pred: Tensor, target: Tensor) -> None:
    checks.float_tensor("pred", pred)
    checks.tensor("target", target)
    checks.same_shape("target", target, "pred", pred)


@LOSSES.register_module()
class L1Loss(WeightedLoss):
    """L1 loss: the absolute error ``|pred - target|``.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    If ``weight`` is given and no entry is positive, returns ``(pred * weight).sum()`` (zero for
    zero weights) whatever the reduction, as MMDetection does.
    """

    differentiable = ("pred", "target")

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)

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
        check_regression_pair(pred, target)
        return self.finish(l1_loss(pred, target), weight, reduction, avg_factor)


@LOSSES.register_module()
class SmoothL1Loss(WeightedLoss):
    """Smooth L1 (Huber) loss: quadratic below ``beta``, linear above.

    Args:
        beta: the threshold between the quadratic and the linear part, > 0 (default 1.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    If ``weight`` is given and no entry is positive, returns ``(pred * weight).sum()`` whatever
    the reduction, as MMDetection does.
    """

    differentiable = ("pred", "target")

    def __init__(self, beta: float = 1.0, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        if not beta > 0:
            raise LossConfigError(f"SmoothL1Loss.beta must be > 0, got {beta!r}", field="beta")
        self.beta = beta

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
        check_regression_pair(pred, target)
        return self.finish(smooth_l1_loss(pred, target, self.beta), weight, reduction, avg_factor)
