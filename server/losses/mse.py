"""Mean squared error (L2) loss, MMDetection's ``MSELoss``.

Shapes: ``pred`` and ``target`` of equal shape (any); ``weight`` broadcastable to it.
Output per element for ``reduction='none'``.
"""

from __future__ import annotations

from torch import Tensor

from .pipeline import PairwiseLoss, Reduction
from .registry import LOSSES


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``(pred - target)^2``, element-wise."""
    return (pred - target).square()


@LOSSES.register_module()
class MSELoss(PairwiseLoss):
    """Mean squared error: ``(pred - target)^2``.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    working_copies = 8.0
    work_per_element = 4

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return mse_loss(pred, target)
