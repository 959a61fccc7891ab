"""Sigmoid focal loss (RetinaNet).

Focal Loss for Dense Object Detection, Lin et al. 2017, https://arxiv.org/abs/1708.02002.

Shapes: ``pred`` [N, C] logits (probabilities with ``activated=True``); ``target`` either [N]
class indices in [0, C] where C means background, or [N, C] one-hot / soft float targets;
``weight`` [N] (per sample), [N, C], or [N * C] flattened. Output per element ([N, C]) for
``reduction='none'``.

FocalCustomLoss (V3Det, Wang et al. 2023, https://arxiv.org/abs/2304.03752): ``pred`` [N, C] logits
(always logits), ``target`` [N] class indices in [0, C] only; ``weight`` as above. Output per element.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import checks
from .classifier import CustomClassifierMixin, check_num_classes
from .errors import LossConfigError, LossInputError
from .pipeline import PairwiseLoss, Reduction
from .registry import LOSSES
from .schema import Count, NonNegative, Probability


def focal_factor(p_wrong: Tensor, alpha_t: Tensor | float, gamma: float) -> Tensor:
    """The modulating factor ``alpha_t (1 - p_t)^gamma`` from ``1 - p_t``.

    At a negative (t = 0) ``1 - p_t = p`` and ``alpha_t = 1 - alpha``; at a positive (t = 1)
    ``1 - p_t = 1 - p`` and ``alpha_t = alpha``.
    """
    return alpha_t * p_wrong.pow(gamma)


def _focal_term(prob: Tensor, target: Tensor, gamma: float, alpha: float) -> Tensor:
    """``alpha_t (1 - p_t)^gamma`` for any target in [0, 1], differentiable in both arguments."""
    p_wrong = (1 - prob) * target + prob * (1 - target)  # 1 - p_t
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return focal_factor(p_wrong, alpha_t, gamma)


def sigmoid_focal_loss(logits: Tensor, target: Tensor, gamma: float, alpha: float) -> Tensor:
    """``-alpha_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(logits)``; element-wise.

    ``target`` is a float tensor of the logits' shape (0/1 or soft).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * _focal_term(logits.sigmoid(), target, gamma, alpha)


def focal_loss_with_prob(prob: Tensor, target: Tensor, gamma: float, alpha: float) -> Tensor:
    """Focal loss on probabilities (``activated=True``); ``log`` is clamped at -100 like BCE."""
    bce = F.binary_cross_entropy(prob, target, reduction="none")
    return bce * _focal_term(prob, target, gamma, alpha)


def one_hot_targets(pred: Tensor, target: Tensor) -> Tensor:
    """[N] indices in [0, C] (C = background) -> [N, C] 0/1 targets in pred's dtype."""
    labels = checks.index_tensor("target", target)
    checks.ndim("pred", pred, 2, "[N, C] scores when target holds class indices")
    if labels.shape != pred.shape[:1]:
        raise LossInputError(
            f"target of class indices must have shape [N] = [{pred.shape[0]}] for pred "
            f"{list(pred.shape)}, got {list(labels.shape)}",
            field="target",
        )
    num_classes = pred.shape[1]
    checks.index_range("target", labels, 0, num_classes, f"class indices, {num_classes} = background")
    return F.one_hot(labels, num_classes + 1)[:, :num_classes].to(pred.dtype)


def dense_targets(pred: Tensor, target: Tensor) -> Tensor:
    """A target of pred's shape: one-hot or soft, in [0, 1] (class indices there would be nonsense)."""
    checks.same_shape("target", target, "pred", pred)
    checks.unit_interval(
        "target",
        target,
        "one-hot or soft targets in [0, 1] when it has pred's shape (class indices take a target of shape "
        "[N] for pred [N, C])",
    )
    return target.to(pred.dtype)


def reshape_focal_weight(weight: Tensor, loss: Tensor) -> Tensor:
    """mmdet's weight rule for focal losses: [N] -> [N, 1]; [N * C] -> [N, C]."""
    checks.tensor("weight", weight)
    if weight.shape == loss.shape:
        return weight
    if weight.dim() >= 1 and weight.shape[0] == loss.shape[0]:
        weight = weight.reshape(-1, 1)
    elif weight.numel() == loss.numel():
        weight = weight.reshape(loss.shape[0], -1)
    else:
        raise LossInputError(
            f"weight must have shape [N], [N, C] or [N * C] for a loss of shape {list(loss.shape)}, "
            f"got {list(weight.shape)}",
            field="weight",
        )
    checks.broadcasts_to("weight", weight, "the element-wise loss", loss)
    return weight


class _SigmoidFocal(PairwiseLoss):
    """What FocalLoss and FocalCustomLoss share: the use_sigmoid rule and mmdet's focal weight rule."""

    working_copies = 15.0
    work_per_element = 40

    def check_sigmoid(self, use_sigmoid: bool) -> None:
        if use_sigmoid is not True:
            raise LossConfigError(
                f"{type(self).__name__}.use_sigmoid must be True: only sigmoid focal loss exists", field="use_sigmoid"
            )

    def shape_weight(self, weight: Tensor | None, loss: Tensor, pred: Tensor) -> Tensor | None:
        return None if weight is None else reshape_focal_weight(weight, loss)


@LOSSES.register_module()
class FocalLoss(_SigmoidFocal):
    """Sigmoid focal loss: binary cross-entropy down-weighted by ``alpha_t (1 - p_t)^gamma``.

    Args:
        use_sigmoid: must be True; only the sigmoid form exists (default True).
        gamma: focusing exponent; 0 gives alpha-balanced BCE (default 2.0).
        alpha: weight of positives, ``1 - alpha`` for negatives (default 0.25).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        activated: ``pred`` already holds probabilities, not logits (default False).
    """

    differentiable = ("pred", "target")

    def __init__(
        self,
        use_sigmoid: bool = True,
        gamma: NonNegative = 2.0,
        alpha: Probability = 0.25,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.check_sigmoid(use_sigmoid)
        self.use_sigmoid = use_sigmoid
        self.gamma = gamma
        self.alpha = alpha
        self.activated = activated

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        checks.tensor("target", target)
        target = one_hot_targets(pred, target) if pred.dim() != target.dim() else dense_targets(pred, target)
        if self.activated:
            checks.probabilities("pred", pred)
        return pred, target

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.activated:
            return focal_loss_with_prob(pred, target, self.gamma, self.alpha)
        return sigmoid_focal_loss(pred, target, self.gamma, self.alpha)


@LOSSES.register_module()
class FocalCustomLoss(CustomClassifierMixin, _SigmoidFocal):
    """Sigmoid focal loss for classifiers with a custom number of output channels (V3Det).

    The loss is FocalLoss's on logits with class-index targets; ``num_classes`` sizes the classifier
    (``C`` channels) and drives the hooks ``get_cls_channels``, ``get_activation`` and
    ``get_accuracy``, not the loss value.

    Args:
        use_sigmoid: must be True; only the sigmoid form exists (default True).
        num_classes: number of foreground classes; required (default -1, which is refused).
        gamma: focusing exponent; 0 gives alpha-balanced BCE (default 2.0).
        alpha: weight of positives, ``1 - alpha`` for negatives (default 0.25).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        activated: accepted and stored but without effect, as in mmdet 3.3: ``pred`` is always taken
            as logits (default False).
    """

    def __init__(
        self,
        use_sigmoid: bool = True,
        num_classes: Count = -1,
        gamma: NonNegative = 2.0,
        alpha: Probability = 0.25,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.check_sigmoid(use_sigmoid)
        self.use_sigmoid = use_sigmoid
        self.num_classes = check_num_classes("FocalCustomLoss", num_classes)
        self.gamma = gamma
        self.alpha = alpha
        self.activated = activated

    def get_cls_channels(self, num_classes: int) -> int:
        """The classifier's output width: one channel per foreground class, no background channel."""
        self._check_cls_channels_request(num_classes)
        return num_classes

    def get_activation(self, cls_score: Tensor) -> Tensor:
        """[N, C] per-class sigmoid scores of the first ``num_classes`` columns."""
        return cls_score[:, : self.num_classes].sigmoid()

    def prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        checks.tensor("target", target)
        return pred, one_hot_targets(pred, target)

    def kernel(self, pred: Tensor, target: Tensor) -> Tensor:
        return sigmoid_focal_loss(pred, target, self.gamma, self.alpha)
