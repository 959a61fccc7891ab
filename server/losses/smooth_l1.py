"""L1 and Smooth L1 (Huber) regression losses.

Fast R-CNN, Girshick 2015, https://arxiv.org/abs/1504.08083.

Shapes: ``pred`` and ``target`` [N, 4] (any shape, equal); ``weight`` broadcastable to it
(usually [N, 4] or [N, 1]). Output per element for ``reduction='none'``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .pipeline import PairwiseLoss, Reduction
from .registry import LOSSES
from .schema import Positive


def l1_loss(diff: Tensor) -> Tensor:
    """``|d|`` of the differences ``d = pred - target``, element-wise."""
    return diff.abs()


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """``0.5 d^2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 beta``, of ``d = pred - target``; element-wise.

    torch's one-pass kernel: the same values as mmdet's ``torch.where`` of the two branches (its
    gradient rounds ``d * g / beta`` instead, well within the parity tolerance), at a tenth of its time.
    """
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta)


@LOSSES.register_module()
class L1Loss(PairwiseLoss):
    """L1 loss: the absolute error ``|pred - target|``.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    If ``weight`` is given and no entry is positive, returns ``(pred * weight).sum()`` (zero for
    zero weights) whatever the reduction, as MMDetection does.
    """

    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    weight_shortcut = "always"
    working_copies = 6.0
    work_per_element = 4

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return l1_loss(pred - target)


@LOSSES.register_module()
class SmoothL1Loss(PairwiseLoss):
    """Smooth L1 (Huber) loss: quadratic below ``beta``, linear above.

    Args:
        beta: the threshold between the quadratic and the linear part, > 0 (default 1.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    If ``weight`` is given and no entry is positive, returns ``(pred * weight).sum()`` whatever
    the reduction, as MMDetection does.
    """

    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    weight_shortcut = "always"
    working_copies = 6.0
    work_per_element = 4

    def __init__(self, beta: Positive = 1.0, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.beta = beta

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return smooth_l1_loss(pred, target, self.beta)
