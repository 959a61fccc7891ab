"""Varifocal loss (VarifocalNet): an IoU-aware classification loss that treats positives and
negatives asymmetrically.

Zhang et al. 2021, VarifocalNet: An IoU-aware Dense Object Detector, https://arxiv.org/abs/2008.13367.

Shapes: ``pred`` [N, C] logits; ``target`` [N, C] IoU-aware classification scores (the IoU with the
ground truth at the true class, 0 elsewhere; any float, ``> 0`` marks a positive); ``weight``
broadcastable to [N, C] without enlarging it (usually [N, C] or [N, 1]). Output per element
([N, C]) for ``reduction='none'``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .errors import LossConfigError
from .pipeline import PairwiseLoss, Reduction
from .registry import LOSSES
from .schema import NonNegative


def varifocal_loss(logits: Tensor, target: Tensor, alpha: float, gamma: float, iou_weighted: bool) -> Tensor:
    """``BCE(sigmoid(x), q)`` scaled by ``q`` (or 1) where ``q > 0`` and ``alpha |p - q|^gamma`` elsewhere.

    Element-wise; nothing is detached: the gradient also flows through both scale factors, into
    ``logits`` and into ``target``.
    """
    positive = target > 0
    prob = logits.sigmoid()
    negative_scale = alpha * (prob - target).abs().pow(gamma)
    positive_scale = target if iou_weighted else positive.to(target.dtype)
    scale = positive_scale * positive + negative_scale * ~positive
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * scale


@LOSSES.register_module()
class VarifocalLoss(PairwiseLoss):
    """Varifocal loss: BCE weighted by the IoU target on positives and ``alpha |p - q|^gamma`` on negatives.

    Args:
        use_sigmoid: must be True; only the sigmoid form exists (default True).
        alpha: weight of the negatives' focal term, not focal loss's alpha; >= 0 (default 0.75).
        gamma: exponent of the negatives' modulating factor ``|p - q|`` (default 2.0).
        iou_weighted: scale each positive by its IoU target ``q``; False scales positives by 1 (default True).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    working_copies = 14.0
    work_per_element = 22

    def __init__(
        self,
        use_sigmoid: bool = True,
        alpha: NonNegative = 0.75,
        gamma: NonNegative = 2.0,
        iou_weighted: bool = True,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__(reduction, loss_weight)
        if use_sigmoid is not True:
            raise LossConfigError(
                f"VarifocalLoss.use_sigmoid must be True: only the sigmoid form exists, got {use_sigmoid!r}",
                field="use_sigmoid",
            )
        self.use_sigmoid = use_sigmoid
        self.alpha = alpha
        self.gamma = gamma
        self.iou_weighted = iou_weighted

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        pred, target = super().prepare(pred, target)
        return pred, target.to(pred.dtype)

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return varifocal_loss(pred, target, self.alpha, self.gamma, self.iou_weighted)
