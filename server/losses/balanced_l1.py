"""Balanced L1 loss.

Libra R-CNN: Towards Balanced Learning for Object Detection, Pang et al. 2019,
https://arxiv.org/abs/1904.02701.

Shapes: ``pred`` and ``target`` [N, 4] (any shape, equal); ``weight`` broadcastable to it.
Output per element for ``reduction='none'``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import LossConfigError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss
from .registry import LOSSES
from .smooth_l1 import check_regression_pair


def balanced_l1_loss(pred: Tensor, target: Tensor, alpha: float, gamma: float, beta: float) -> Tensor:
    """Element-wise Balanced L1 of ``d = |pred - target|``, with ``b = e^(gamma/alpha) - 1``:

    ``alpha/b (b d + 1) ln(b d / beta + 1) - alpha d`` for ``d < beta``, else
    ``gamma d + gamma/b - alpha beta``. ``b`` makes both pieces meet with gradient ``gamma``.
    """
    diff = (pred - target).abs()
    b = math.exp(gamma / alpha) - 1
    inner = alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff
    outer = gamma * diff + gamma / b - alpha * beta
    return torch.where(diff < beta, inner, outer)


@LOSSES.register_module()
class BalancedL1Loss(WeightedLoss):
    """Balanced L1 loss: promotes the gradient of inliers (small errors) over outliers.

    Args:
        alpha: scales the inlier gradient, > 0 (default 0.5).
        gamma: the gradient bound of outliers (default 1.5).
        beta: threshold between inliers and outliers, > 0 (default 1.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")

    def __init__(
        self,
        alpha: float = 0.5,
        gamma: float = 1.5,
        beta: float = 1.0,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__(reduction, loss_weight)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value > 0:
                raise LossConfigError(f"BalancedL1Loss.{name} must be > 0, got {value!r}", field=name)
        if math.exp(gamma / alpha) - 1 == 0:
            raise LossConfigError("BalancedL1Loss.gamma must be non-zero (b = e^(gamma/alpha) - 1 = 0)", field="gamma")
        self.alpha = alpha
        self.gamma = gamma
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
        check_regression_pair(pred, target)
        loss = balanced_l1_loss(pred, target, self.alpha, self.gamma, self.beta)
        return self.finish(loss, weight, reduction, avg_factor)
