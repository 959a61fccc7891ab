"""Gaussian focal loss (CornerNet / CenterNet): a focal loss on heatmaps whose targets are Gaussian bumps.

Law & Deng 2018, CornerNet: Detecting Objects as Paired Keypoints, https://arxiv.org/abs/1808.01244
(the penalty-reduced focal loss of its eq. 1); focal loss from Lin et al. 2017,
https://arxiv.org/abs/1708.02002.

Shapes: ``pred`` heatmap probabilities in [0, 1] of any shape ([N, C] or [B, C, H, W]); ``target`` the
Gaussian heatmap, ``pred``'s shape, where exactly 1 marks a positive; ``weight`` broadcastable to
``pred`` without enlarging it. Output per element (``pred``'s shape) for ``reduction='none'``.

With ``pos_inds`` (CenterNet-update style): ``pred`` and ``target`` [N, C]; ``pos_inds`` [M] row indices
(or an [N] boolean mask) of the positives and ``pos_labels`` [M] their classes. The positives then come
from these indices, not from ``target == 1``; the positive and the negative part are reduced separately
(each by its own element count under ``mean``), so ``reduction='none'`` is unavailable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .errors import LossInputError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss, reduce_loss
from .registry import LOSSES
from .schema import NonNegative

EPS = 1e-12  # inside both logarithms, as in mmdet


def positive_focal_term(prob: Tensor, alpha: float) -> Tensor:
    """``-log(p) (1 - p)^alpha``: the loss of a prediction at a positive location."""
    return -(prob + EPS).log() * (1 - prob).pow(alpha)


def negative_focal_term(prob: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """``-log(1 - p) p^alpha (1 - y)^gamma``: negatives near a peak are penalised less."""
    return -(1 - prob + EPS).log() * prob.pow(alpha) * (1 - target).pow(gamma)


def gaussian_focal_loss(
    prob: Tensor, target: Tensor, alpha: float, gamma: float, pos_weight: float, neg_weight: float
) -> Tensor:
    """Element-wise loss; a location is positive where ``target == 1`` exactly.

    The negative term is evaluated everywhere, positives included, where ``(1 - y)^gamma`` is 0.
    """
    positive = target == 1
    return pos_weight * (positive_focal_term(prob, alpha) * positive) + neg_weight * negative_focal_term(
        prob, target, alpha, gamma
    )


def _positive_rows(pred: Tensor, pos_inds: Tensor) -> Tensor:
    """Validate ``pos_inds`` (row indices in [-N, N - 1], or an [N] boolean mask) as int64 rows."""
    num = pred.shape[0]
    if pos_inds.dtype == torch.bool:
        if pos_inds.shape != (num,):
            raise LossInputError(
                f"a boolean pos_inds must be an [N] = [{num}] mask over pred's rows, got shape {list(pos_inds.shape)}",
                field="pos_inds",
            )
        return pos_inds.nonzero().squeeze(1)
    rows = checks.index_tensor("pos_inds", pos_inds)
    if rows.dim() != 1:
        raise LossInputError(
            f"pos_inds must be a 1-D tensor of row indices into pred, got shape {list(rows.shape)}", field="pos_inds"
        )
    checks.index_range("pos_inds", rows, -num, num - 1, f"row indices into pred's {num} rows")
    return rows


def check_heatmap(pred: Tensor) -> None:
    """Probabilities in [0, 1]: outside it mmdet's logarithms give NaN."""
    checks.unit_interval("pred", pred, "heatmap probabilities in [0, 1] (after a sigmoid)")


@LOSSES.register_module()
class GaussianFocalLoss(WeightedLoss):
    """Gaussian focal loss: focal loss on heatmap probabilities, negatives damped by ``(1 - target)^gamma``.

    Args:
        alpha: exponent of the focal factor, ``(1 - p)^alpha`` on positives, ``p^alpha`` on negatives
            (default 2.0).
        gamma: exponent of the negatives' penalty reduction ``(1 - target)^gamma`` (default 4.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        pos_weight: multiplier of the positive term (default 1.0).
        neg_weight: multiplier of the negative term (default 1.0).

    ``forward`` takes ``pos_inds`` and ``pos_labels`` before ``weight``, as mmdet does. Given
    ``pos_inds``, mmdet ignores ``weight``; without ``pos_inds`` it ignores ``pos_labels``. losswire
    does the same.
    """

    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    working_copies = 17.0
    work_per_element = 75

    def __init__(
        self,
        alpha: NonNegative = 2.0,
        gamma: NonNegative = 4.0,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        pos_weight: float = 1.0,
        neg_weight: float = 1.0,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.alpha = alpha
        self.gamma = gamma
        self.pos_weight = pos_weight
        self.neg_weight = neg_weight

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        pos_inds: Tensor | None = None,
        pos_labels: Tensor | None = None,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        checks.float_tensor("pred", pred)
        checks.tensor("target", target)
        checks.same_shape("target", target, "pred", pred)
        check_heatmap(pred)
        target = target.to(pred.dtype)
        if pos_inds is None:
            loss = gaussian_focal_loss(pred, target, self.alpha, self.gamma, self.pos_weight, self.neg_weight)
            return self.finish(loss, weight, reduction, avg_factor)
        return self._with_pos_inds(pred, target, pos_inds, pos_labels, reduction, avg_factor, reduction_override)

    def _with_pos_inds(self, pred, target, pos_inds, pos_labels, reduction, avg_factor, reduction_override):
        if pos_labels is None:
            raise LossInputError(
                "GaussianFocalLoss: pos_inds needs pos_labels, the class of each positive; got pos_labels=None",
                field="pos_labels",
            )
        checks.tensor("pos_inds", pos_inds)
        checks.ndim("pred", pred, 2, "[N, C] scores when pos_inds is given")
        rows = _positive_rows(pred, pos_inds)
        labels = checks.index_tensor("pos_labels", pos_labels)
        if labels.shape != rows.shape:
            raise LossInputError(
                f"pos_labels must hold one class per positive, shape [M] = [{rows.shape[0]}] like pos_inds, "
                f"got {list(labels.shape)}",
                field="pos_labels",
            )
        checks.index_range("pos_labels", labels, 0, pred.shape[1] - 1, f"class indices of pred's {pred.shape[1]}")
        if reduction == "none":
            field = "reduction_override" if reduction_override else "reduction"
            raise LossInputError(
                "GaussianFocalLoss with pos_inds reduces its positive ([M]) and negative ([N, C]) parts "
                f"separately, so it needs reduction 'mean' or 'sum', got {field}='none'",
                field=field,
            )
        positive = positive_focal_term(pred[rows, labels], self.alpha)
        negative = negative_focal_term(pred, target, self.alpha, self.gamma)
        positive = reduce_loss(positive, reduction, avg_factor)
        negative = reduce_loss(negative, reduction, avg_factor)
        return self.loss_weight * (self.pos_weight * positive + self.neg_weight * negative)
