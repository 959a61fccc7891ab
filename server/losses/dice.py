"""Dice loss: one minus the soft Dice coefficient of each predicted mask with its target.

Milletari et al. 2016, V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image
Segmentation, https://arxiv.org/abs/1606.04797 (squared denominators); ``naive_dice=True`` is the plain
Sørensen-Dice form with first powers.

Shapes: ``pred`` [N, ...] mask logits (probabilities with ``activate=False``), e.g. [N, H, W] or
[N, P] point samples; ``target`` [N, ...] with the same number of elements per sample (0/1 masks or
soft, any dtype: mmdet rounds it to float32); ``weight`` [N]. Each sample's entries are flattened and
reduced together. Output per sample ([N]) for ``reduction='none'``.

Note the forward's argument order, mmdet's: ``reduction_override`` comes before ``avg_factor``.
"""

from __future__ import annotations

from torch import Tensor

from . import checks
from .errors import LossConfigError, LossInputError
from .pipeline import AvgFactor, PairwiseLoss, Reduction, ReductionOverride
from .registry import LOSSES
from .schema import NonNegative, OutputKind


def dice_loss(prob: Tensor, target: Tensor, eps: float, naive: bool) -> Tensor:
    """``1 - dice`` per row of [N, K] inputs.

    V-Net: ``dice = 2 sum(p t) / ((sum(p^2) + eps) + (sum(t^2) + eps))``;
    naive: ``dice = (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``.

    ``target`` is float32 and its own sums stay in float32, mmdet's rounding; the terms with ``prob``
    follow type promotion (float64 stays float64).
    """
    overlap = (prob * target).sum(dim=1)
    if naive:
        dice = (2 * overlap + eps) / (prob.sum(dim=1) + target.sum(dim=1) + eps)
    else:
        pred_norm = (prob * prob).sum(dim=1) + eps
        target_norm = (target * target).sum(dim=1) + eps
        dice = 2 * overlap / (pred_norm + target_norm)
    return 1 - dice


@LOSSES.register_module()
class DiceLoss(PairwiseLoss):
    """Dice loss: ``1 - dice(sigmoid(pred), target)`` per sample, V-Net (squared) or naive form.

    Args:
        use_sigmoid: activate with a sigmoid; must be True while ``activate`` is True, as only the
            sigmoid exists (default True).
        activate: apply the activation to ``pred``; False takes ``pred`` as given (default True).
        reduction: "none", "mean" (default) or "sum".
        naive_dice: first powers in the denominator and ``eps`` in the numerator too, instead of
            V-Net's squares (default False).
        loss_weight: multiplier of the reduced loss (default 1.0).
        eps: smoothing term against a zero denominator (default 1e-3).
    """

    output_kind = OutputKind.SAMPLE
    differentiable = ("pred", "target")
    value_inputs = ("pred", "target", "weight")  # arithmetic only: read in place from shared memory
    # Each sample's loss depends on its own row only, but the target's gradient passes through a float32
    # cast: for float64 inputs, scaling the float32-rounded gradient-for-ones by the upstream gradient
    # differs from mmdet's (rounded after the scaling) by ~1e-5 relative. The recompute is exact.
    separable = False
    working_copies = 5.0
    work_per_element = 9

    def __init__(
        self,
        use_sigmoid: bool = True,
        activate: bool = True,
        reduction: Reduction = "mean",
        naive_dice: bool = False,
        loss_weight: float = 1.0,
        eps: NonNegative = 1e-3,
    ) -> None:
        super().__init__(reduction, loss_weight)
        if activate and not use_sigmoid:
            raise LossConfigError(
                "DiceLoss: with activate=True only the sigmoid activation exists, so use_sigmoid must be True "
                "(or set activate=False and pass probabilities); got use_sigmoid=False",
                field="use_sigmoid",
            )
        self.use_sigmoid = use_sigmoid
        self.activate = activate
        self.naive_dice = naive_dice
        self.eps = eps

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        reduction_override: ReductionOverride = None,
        avg_factor: AvgFactor = None,
    ) -> Tensor:
        return self.evaluate(pred, target, weight, avg_factor, reduction_override)

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample's entries flattened: [N, K] pred and a float32 [N, K] target (mmdet's rounding)."""
        checks.tensor("target", target)
        if pred.dim() < 2:
            raise LossInputError(
                f"pred must be [N, ...] with the entries of each sample after the first axis, got shape "
                f"{list(pred.shape)}",
                field="pred",
            )
        flat_pred = pred.flatten(1)
        if target.dim() < 2 or target.flatten(1).shape != flat_pred.shape:
            raise LossInputError(
                f"target must have pred's sample count and entries per sample, {list(flat_pred.shape)} once "
                f"flattened after the first axis (pred {list(pred.shape)}), got {list(target.shape)}",
                field="target",
            )
        return flat_pred, target.flatten(1).float()

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        prob = pred.sigmoid() if self.activate else pred
        return dice_loss(prob, target, self.eps, self.naive_dice).to(pred.dtype)

    def shape_weight(self, weight: Tensor | None, loss: Tensor, pred: Tensor) -> Tensor | None:
        if weight is not None:
            checks.tensor("weight", weight)
            if weight.shape != pred.shape[:1]:
                raise LossInputError(
                    f"weight must have one entry per sample, shape [N] = [{pred.shape[0]}], got {list(weight.shape)}",
                    field="weight",
                )
        return weight
