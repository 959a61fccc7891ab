"""Mean squared error (L2) loss, MMDetection's ``MSELoss``.

Shapes: ``pred`` and ``target`` of equal shape (any); ``weight`` broadcastable to it.
Output per element for ``reduction='none'``.
"""

from __future__ import annotations

from torch import Tensor

from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss
from .registry import LOSSES
from .smooth_l1 import check_regression_pair


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``(pred - target)^2``, element-wise."""
    return (pred - target).square()


@LOSSES.register_module()
class MSELoss(WeightedLoss):
    """Mean squared error: ``(pred - target)^2``.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
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
        check_regression_pair(pred, target)
        return self.finish(mse_loss(pred, target), weight, reduction, avg_factor)
