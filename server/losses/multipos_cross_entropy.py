"""Multi-positive cross-entropy (QDTrack's embedding loss): a softmax cross-entropy with several positives.

Pang et al. 2021, Quasi-Dense Similarity Learning for Multiple Object Tracking, https://arxiv.org/abs/2006.06664
(eq. 2, the multiple-positive extension of the N-pair loss).

Shapes: ``cls_score`` [N, M] similarity logits of N queries against M keys; ``label`` [N, M] (any
dtype): ``>= 1`` marks a positive key, ``0`` a negative one; ``weight`` [N]. Output per sample ([N])
for ``reduction='none'``.

Per row: ``log(1 + sum_{i pos} sum_{j neg} exp(x_j - x_i))``. As in mmdet, an entry that is neither
(a negative label, or a fraction in (0, 1)) is not dropped: it takes part as a logit of 0 on both
sides. A row without positives or without negatives (and no such entries) has loss 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .pipeline import AvgFactor, PairwiseLoss, Reduction, ReductionOverride, float32_rounded
from .registry import LOSSES
from .schema import OutputKind


def _masked_logsumexp(values: Tensor, keep: Tensor) -> Tensor:
    """``log sum exp`` of the kept entries of each row; ``-inf`` for a row that keeps none.

    Dropped entries never reach ``logsumexp``, so an empty row has no NaN gradient.
    """
    any_kept = keep.any(dim=1)
    filled = torch.where(keep, values, torch.full_like(values, -torch.inf))
    filled = torch.where(any_kept.unsqueeze(1), filled, torch.zeros_like(values))
    lse = filled.logsumexp(dim=1)
    return torch.where(any_kept, lse, torch.full_like(lse, -torch.inf))


def multi_positive_cross_entropy(logits: Tensor, label: Tensor) -> Tensor:
    """Per-row loss of [N, M] logits; factorised, ``sum_{i,j} exp(x_j - x_i) = sum_j exp(x_j) sum_i exp(-x_i)``.

    Positive entries (``label >= 1``) give ``-x_i``, negatives (``label == 0``) give ``x_j`` and every
    other entry a 0 in both sums.
    """
    positive = label >= 1
    negative = label == 0
    neither = ~(positive | negative)
    zeros = torch.zeros_like(logits)
    negative_side = torch.where(negative, logits, zeros)  # x_j for negatives, 0 for the others
    positive_side = torch.where(positive, -logits, zeros)  # -x_i for positives, 0 for the others
    log_negatives = _masked_logsumexp(negative_side, negative | neither)
    log_positives = _masked_logsumexp(positive_side, positive | neither)
    total = log_negatives + log_positives  # -inf when either side is empty
    finite = torch.isfinite(total)
    safe = torch.where(finite, total, torch.zeros_like(total))
    return torch.where(finite, F.softplus(safe), torch.zeros_like(total))


@LOSSES.register_module()
class MultiPosCrossEntropyLoss(PairwiseLoss):
    """Multi-positive cross-entropy: every positive key is pushed above every negative key of its row.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).

    Integer (or boolean) ``cls_score`` is accepted, as mmdet's own test passes one, and computed in
    float32, as mmdet's float32 masks promote it; it has no gradient.
    """

    output_kind = OutputKind.SAMPLE
    differentiable = ("cls_score",)
    working_copies = 13.0
    work_per_element = 65

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)

    def forward(
        self,
        cls_score: Tensor,
        label: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        return self.evaluate(cls_score, label, weight, avg_factor, reduction_override)

    def check_pred(self, cls_score: Tensor) -> Tensor:
        checks.real_tensor("cls_score", cls_score)
        return cls_score if cls_score.is_floating_point() else cls_score.float()

    def prepare(self, cls_score: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        cls_score, label = super().prepare(cls_score, label)
        checks.ndim("cls_score", cls_score, 2, "[N, M] similarity logits")
        return cls_score, checks.real_tensor("label", label)

    def kernel(self, cls_score: Tensor, label: Tensor) -> Tensor:
        return multi_positive_cross_entropy(cls_score, label)

    def shape_weight(self, weight: Tensor | None, loss: Tensor, cls_score: Tensor) -> Tensor | None:
        return None if weight is None else float32_rounded(checks.tensor("weight", weight), loss.dtype)
