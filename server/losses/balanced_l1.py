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
from .pipeline import PairwiseLoss, Reduction
from .registry import LOSSES
from .schema import Positive


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
class BalancedL1Loss(PairwiseLoss):
    """Balanced L1 loss: promotes the gradient of inliers (small errors) over outliers.

    Args:
        alpha: scales the inlier gradient, > 0 (default 0.5).
        gamma: the gradient bound of outliers (default 1.5).
        beta: threshold between inliers and outliers, > 0 (default 1.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    working_copies = 13.0
    work_per_element = 40

    def __init__(
        self,
        alpha: Positive = 0.5,
        gamma: float = 1.5,
        beta: Positive = 1.0,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__(reduction, loss_weight)
        try:
            b = math.exp(gamma / alpha) - 1
        except OverflowError:
            b = math.inf
        if not math.isfinite(b):  # the inlier branch would be inf / inf
            raise LossConfigError(
                f"BalancedL1Loss.gamma / alpha must be at most 709 (e^(gamma/alpha) overflows float64), "
                f"got {gamma!r} / {alpha!r}",
                field="gamma",
            )
        if b == 0:
            raise LossConfigError("BalancedL1Loss.gamma must be non-zero (b = e^(gamma/alpha) - 1 = 0)", field="gamma")
        self.alpha = alpha
        self.gamma = gamma
        self.beta = beta

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return balanced_l1_loss(pred, target, self.alpha, self.gamma, self.beta)
