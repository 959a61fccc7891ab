"""Generalized Focal Loss: Quality Focal Loss and Distribution Focal Loss (GFL).

Li et al. 2020, Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense
Object Detection, https://arxiv.org/abs/2006.04388.

QualityFocalLoss shapes: ``pred`` [N, C] logits (probabilities with ``activated=True``);
``target`` either the tuple ``(label [N] int64 in [0, C] with C = background, score [N] float
quality such as IoU)`` or a dense soft target of ``pred``'s shape (0 = negative); ``weight`` [N].
Output per sample ([N]) for ``reduction='none'``.

DistributionFocalLoss shapes: ``pred`` [N, n + 1] logits over the integer bins 0..n; ``target``
[N] float distances in [0, n); ``weight`` [N]. Output per sample ([N]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .errors import LossConfigError, LossInputError
from .pipeline import AvgFactor, PairwiseLoss, Reduction, ReductionOverride
from .registry import LOSSES
from .schema import NonNegative, OutputKind


def quality_factor(modulator: Tensor, beta: float) -> Tensor:
    """QFL's modulating factor ``m^beta``: ``m = |y - p|`` at a positive, ``m = p`` at a negative."""
    return modulator.pow(beta)


def quality_focal_loss(pred: Tensor, soft_target: Tensor, positive: Tensor, beta: float, activated: bool) -> Tensor:
    """Per-sample QFL: ``sum_c BCE(p_c, y_c) |y_c - p_c|^beta`` over [N, C, ...] -> [N, ...].

    Negatives (``positive`` False, ``y_c = 0``) reduce to ``BCE(p, 0) p^beta``.
    """
    # Negatives learn towards 0 whatever the target holds there: no gradient reaches the target.
    soft_target = torch.where(positive, soft_target, torch.zeros_like(soft_target))
    if activated:
        prob = pred
        bce = F.binary_cross_entropy(pred, soft_target, reduction="none")
    else:
        prob = pred.sigmoid()
        bce = F.binary_cross_entropy_with_logits(pred, soft_target, reduction="none")
    scale = torch.where(positive, (soft_target - prob).abs(), prob)
    return (bce * quality_factor(scale, beta)).sum(dim=1)


def dense_quality_target(pred: Tensor, target: tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(label [N], score [N])`` -> (dense [N, C] target holding ``score`` at each label, mask)."""
    if len(target) != 2:
        raise LossInputError(f"a tuple target must be (label, score), got {len(target)} tensors", field="target")
    label = checks.index_tensor("target[0] (label)", target[0])
    score = checks.float_tensor("target[1] (score)", target[1])
    checks.ndim("pred", pred, 2, "[N, C] scores for a (label, score) target")
    num, num_classes = pred.shape
    for name, value in (("target[0] (label)", label), ("target[1] (score)", score)):
        if value.shape != (num,):
            raise LossInputError(f"{name} must have shape [N] = [{num}], got {list(value.shape)}", field="target")
    # a label outside [0, C) matches no column: its row is all negative (mmdet's pos mask), also for C = 0
    positive = label.unsqueeze(1) == torch.arange(num_classes, device=label.device)
    dense = score.to(pred.dtype).unsqueeze(1) * positive
    return dense, positive


@LOSSES.register_module()
class QualityFocalLoss(PairwiseLoss):
    """Quality Focal Loss: a joint classification-IoU score learned with a focal modulation.

    Args:
        use_sigmoid: must be True; only the sigmoid form exists (default True).
        beta: exponent of the modulating factor ``|y - p|`` (default 2.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        activated: ``pred`` already holds probabilities, not logits (default False).
    """

    output_kind = OutputKind.SAMPLE
    differentiable = ("pred", "target")
    working_copies = 14.0
    work_per_element = 28

    def __init__(
        self,
        use_sigmoid: bool = True,
        beta: NonNegative = 2.0,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
    ) -> None:
        super().__init__(reduction, loss_weight)
        if use_sigmoid is not True:
            raise LossConfigError(
                "QualityFocalLoss.use_sigmoid must be True: only the sigmoid form exists", field="use_sigmoid"
            )
        self.use_sigmoid = use_sigmoid
        self.beta = beta
        self.activated = activated

    def forward(
        self,
        pred: Tensor,
        target: Tensor | tuple[Tensor, Tensor],
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        return self.evaluate(pred, target, weight, avg_factor, reduction_override)

    def prepare(self, pred: Tensor, target: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(pred, (the dense soft target, the mask of its positive entries))."""
        if isinstance(target, Tensor):
            checks.same_shape("target", target, "pred", pred)
            dense = (target.to(pred.dtype), target != 0)
        elif isinstance(target, (tuple, list)):
            dense = dense_quality_target(pred, target)
        else:
            raise LossInputError(
                f"target must be a tensor or a (label, score) tuple, got {checks.describe(target)}", field="target"
            )
        if self.activated:
            checks.probabilities("pred", pred)
        return pred, dense

    def kernel(self, pred: Tensor, target: tuple[Tensor, Tensor]) -> Tensor:
        soft_target, positive = target
        return quality_focal_loss(pred, soft_target, positive, self.beta, self.activated)


def distribution_focal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample DFL: cross-entropy to the two bins around ``target``, weighted by proximity.

    With ``l = trunc(target)`` and ``r = l + 1``: ``(r - y) CE(pred, l) + (y - l) CE(pred, r)``.
    """
    left = target.long()
    right = left + 1
    log_prob = pred.log_softmax(dim=1)
    ce_left = -log_prob.gather(1, left.unsqueeze(1)).squeeze(1)
    ce_right = -log_prob.gather(1, right.unsqueeze(1)).squeeze(1)
    return ce_left * (right.to(target.dtype) - target) + ce_right * (target - left.to(target.dtype))


@LOSSES.register_module()
class DistributionFocalLoss(PairwiseLoss):
    """Distribution Focal Loss: learns a discretised distribution of box-side distances.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    output_kind = OutputKind.SAMPLE
    differentiable = ("pred", "target")
    working_copies = 6.0
    work_per_element = 13

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        checks.float_tensor("target", target)
        checks.ndim("pred", pred, 2, "[N, n + 1] logits over the distance bins")
        if target.shape != pred.shape[:1]:
            raise LossInputError(
                f"target must have shape [N] = [{pred.shape[0]}] for pred {list(pred.shape)}, got {list(target.shape)}",
                field="target",
            )
        top = pred.shape[1] - 1
        left = target.detach().long()
        if target.numel() and bool(((left < 0) | (left + 1 > top)).any()):
            raise LossInputError(
                f"target distances must lie in [0, {top}) for {top + 1} bins (pred has {top + 1} "
                f"columns), got values in [{float(target.detach().min())}, {float(target.detach().max())}]",
                field="target",
            )
        return pred, target

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return distribution_focal_loss(pred, target)
