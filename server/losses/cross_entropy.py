"""Cross-entropy losses: softmax, sigmoid (binary) and mask cross-entropy.

Murphy, Machine Learning: A Probabilistic Perspective (2012), ch. 8; the mask form is Mask R-CNN's
per-class mask loss (He et al. 2017, https://arxiv.org/abs/1703.06870).

Modes and shapes:

* softmax (default): ``cls_score`` [N, C] (or [N, C, d1, ...]) logits, ``label`` [N] (or
  [N, d1, ...]) int64 class indices, or float class probabilities of ``cls_score``'s shape;
  ``weight`` [N]. Output per sample ([N]) for ``reduction='none'``.
* ``use_sigmoid=True``: ``cls_score`` [N, C] logits, ``label`` [N] class indices in [0, C]
  (C = background: an all-zero row) or 0/1 / soft targets of ``cls_score``'s shape; ``weight`` [N]
  for index labels, else broadcastable to [N, C]. Output per element ([N, C]).
* ``use_mask=True``: ``cls_score`` [N, C, H, W] mask logits, ``label`` [N, H, W] mask targets in
  [0, 1], and -- in the ``weight`` slot, as MMDetection passes it -- [N] int64 class indices that
  pick each RoI's mask channel. Only ``reduction='mean'`` without ``avg_factor``; output [1].

CrossEntropyCustomLoss (V3Det, Wang et al. 2023, https://arxiv.org/abs/2304.03752) computes the same
loss in the same three modes; its ``num_classes`` sizes the classifier: ``cls_score`` [N, C + 1] with the
last column background for softmax, [N, C] for sigmoid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, cost
from .classifier import CustomClassifierMixin, check_num_classes
from .cost import Estimate, Shapes
from .errors import LossConfigError, LossInputError
from .pipeline import (
    AvgFactor,
    Reduction,
    ReductionOverride,
    WeightedLoss,
    apply_weight,
    float32_rounded,
    reduce_loss,
)
from .registry import LOSSES
from .schema import Count, OutputKind

DEFAULT_IGNORE_INDEX = -100  # torch's default, which mmdet adopts when ignore_index is None


class SoftmaxParts(NamedTuple):
    """Softmax cross-entropy of class indices, step by step (its fused kernel reads them)."""

    log_prob: Tensor  # log softmax over the classes (axis 1)
    valid: Tensor  # labels != ignore_index
    safe: Tensor  # the labels, ignored ones at 0 (gatherable)
    class_weight: Tensor | None  # each sample's class weight w[y]
    loss: Tensor  # -w[y] log softmax[y] per sample, 0 where ignored


def softmax_cross_entropy_parts(
    logits: Tensor, labels: Tensor, class_weight: Tensor | None, ignore_index: int
) -> SoftmaxParts:
    """``-w[y] log softmax(logits)[y]`` per sample for int64 indices ``labels`` ([N, ...]); 0 where
    ``y == ignore_index``."""
    log_prob = logits.log_softmax(dim=1)
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    loss = -log_prob.gather(1, safe.unsqueeze(1)).squeeze(1)
    sample_weight = None
    if class_weight is not None:
        sample_weight = class_weight[safe]
        loss = loss * sample_weight
    return SoftmaxParts(log_prob, valid, safe, sample_weight, loss.masked_fill(~valid, 0))


def softmax_cross_entropy(logits: Tensor, labels: Tensor, class_weight: Tensor | None, ignore_index: int) -> Tensor:
    """``-w[y] log softmax(logits)[y]`` per sample; 0 where ``y == ignore_index``.

    ``labels`` holds int64 indices ([N, ...]) or class probabilities (logits' shape, float).
    """
    if not labels.is_floating_point():
        return softmax_cross_entropy_parts(logits, labels, class_weight, ignore_index).loss
    log_prob = logits.log_softmax(dim=1)  # class probabilities: -sum_c w_c y_c log p_c
    if class_weight is not None:
        log_prob = log_prob * class_weight.view(1, -1, *([1] * (logits.dim() - 2)))
    return -(labels * log_prob).sum(dim=1)


def non_ignored_count(labels: Tensor, ignore_index: int) -> Tensor:
    """The labels that are not ``ignore_index`` (what ``avg_non_ignore`` averages over), as mmdet counts
    them: every entry of ``labels``, class probabilities included."""
    return labels.numel() - (labels == ignore_index).sum()


def invalid_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """The labels that are neither a class index in [0, num_classes) nor ``ignore_index`` (softmax mode)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def binary_cross_entropy(logits: Tensor, targets: Tensor, pos_weight: Tensor | None) -> Tensor:
    """``-(w t log sigmoid(x) + (1 - t) log(1 - sigmoid(x)))``, element-wise."""
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")


def _check_softmax_labels(cls_score: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    expected = cls_score.shape[:1] + cls_score.shape[2:]
    if label.is_floating_point():
        if label.shape != cls_score.shape:
            raise LossInputError(
                f"label must hold integer class indices (int64, int32...) of shape {list(expected)}, or class "
                f"probabilities of the shape of cls_score {list(cls_score.shape)}; got a {checks.describe(label)}",
                field="label",
            )
        return label.to(cls_score.dtype)
    label = checks.index_tensor("label", label)
    if label.shape != expected:
        raise LossInputError(
            f"label must hold one class index per sample, shape {list(expected)} for cls_score "
            f"{list(cls_score.shape)}, got {list(label.shape)}",
            field="label",
        )
    num_classes = cls_score.shape[1]
    outside = invalid_labels(label, num_classes, ignore_index)
    if bool(outside.any()):
        bad = int(label[outside][0])
        raise LossInputError(
            f"label values must be class indices in [0, {num_classes - 1}] or ignore_index ({ignore_index}), got {bad}",
            field="label",
        )
    return label


def _expand_index_labels(
    cls_score: Tensor, label: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid mode, [N] indices -> ([N, C] 0/1 targets, [N, C] weights, [N, C] valid mask).

    Indices in [0, C) set their column; C and above are background (all-zero rows); negative
    indices and ``ignore_index`` are ignored (weight 0).
    """
    checks.ndim("cls_score", cls_score, 2, "[N, C] logits when label holds class indices")
    num, num_classes = cls_score.shape
    if label.shape != (num,):
        raise LossInputError(
            f"label of class indices must have shape [N] = [{num}], got {list(label.shape)}", field="label"
        )
    valid = (label >= 0) & (label != ignore_index)
    positive = valid & (label < num_classes)
    columns = label.clamp(0, num_classes - 1)
    targets = F.one_hot(columns, num_classes).to(cls_score.dtype) * positive.unsqueeze(1)
    valid_mask = valid.unsqueeze(1).expand(num, num_classes).to(cls_score.dtype)
    if weight is None:
        return targets, valid_mask, valid_mask
    checks.tensor("weight", weight)
    if weight.numel() != num:
        raise LossInputError(
            f"weight must have one entry per sample ([N] = [{num}]) when label holds class indices, "
            f"got shape {list(weight.shape)}",
            field="weight",
        )
    return targets, weight.reshape(-1, 1) * valid_mask, valid_mask


@LOSSES.register_module()
class CrossEntropyLoss(WeightedLoss):
    """Cross-entropy: softmax over classes, per-class sigmoid, or per-RoI mask BCE.

    Args:
        use_sigmoid: binary cross-entropy per class instead of softmax (default False).
        use_mask: mask cross-entropy of each RoI's own class channel (default False).
        reduction: "none", "mean" (default) or "sum".
        class_weight: per-class weights, length C (softmax: class weight; sigmoid: positive weight).
        ignore_index: label value whose samples contribute nothing (default None = -100).
        loss_weight: multiplier of the reduced loss (default 1.0).
        avg_non_ignore: with "mean", average over non-ignored labels only (default False).

    ``forward``'s ``ignore_index`` overrides the configured one for that call.
    """

    output_kind = OutputKind.SAMPLE
    output_variants = {"use_sigmoid=True": OutputKind.ELEMENT, "use_mask=True": OutputKind.SCALAR}
    differentiable = ("cls_score", "label")
    # per mode, (copies of cls_score at a forward + backward's peak, work per element): the mask mode
    # works on one channel of cls_score
    mode_cost: ClassVar[dict[str, tuple[float, int]]] = {"softmax": (5.0, 4), "sigmoid": (8.0, 20), "mask": (2.0, 2)}

    @classmethod
    def estimate(cls, params: Mapping[str, Any], shapes: Shapes | None, itemsize: int) -> Estimate:
        """A multiple of cls_score's bytes, by mode."""
        mode = "mask" if params["use_mask"] else "sigmoid" if params["use_sigmoid"] else "softmax"
        return cost.proportional("cls_score", shapes, itemsize, *cls.mode_cost[mode])

    def __init__(
        self,
        use_sigmoid: bool = False,
        use_mask: bool = False,
        reduction: Reduction = "mean",
        class_weight: list[float] | None = None,
        ignore_index: int | None = None,
        loss_weight: float = 1.0,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__(reduction, loss_weight)
        if use_sigmoid and use_mask:
            raise LossConfigError(
                "CrossEntropyLoss: use_sigmoid and use_mask are exclusive; set at most one", field="use_mask"
            )
        self.use_sigmoid = use_sigmoid
        self.use_mask = use_mask
        self.class_weight = None if class_weight is None else list(class_weight)
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore

    def background_label(self, cls_score: Tensor) -> int:
        """The background class index a sampler splits by: softmax scores carry a background column
        (C + 1 columns, background = C); sigmoid scores do not (C columns, background = C)."""
        if self.use_sigmoid or self.use_mask:
            return cls_score.shape[1]
        return cls_score.shape[1] - 1

    @property
    def current_output_kind(self) -> OutputKind:
        if self.use_mask:
            return OutputKind.SCALAR
        return OutputKind.ELEMENT if self.use_sigmoid else OutputKind.SAMPLE

    def forward(
        self,
        cls_score: Tensor,
        label: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
        ignore_index: int | None = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        checks.float_tensor("cls_score", cls_score)
        checks.tensor("label", label)
        class_weight = None
        if self.class_weight is not None:
            class_weight = cls_score.new_tensor(self.class_weight)
        if self.use_mask:
            call_ignore_index = self.ignore_index if ignore_index is None else ignore_index
            return self._mask(cls_score, label, weight, class_weight, reduction, avg_factor, call_ignore_index)
        ignore_index = self.resolve_ignore_index(ignore_index)
        if self.use_sigmoid:
            return self._sigmoid(cls_score, label, weight, class_weight, reduction, avg_factor, ignore_index)
        return self._softmax(cls_score, label, weight, class_weight, reduction, avg_factor, ignore_index)

    def resolve_ignore_index(self, ignore_index: int | None) -> int:
        """The call's ignore_index: the forward's, else the config's, else torch's -100."""
        if ignore_index is None:
            ignore_index = self.ignore_index
        return DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index

    def effective_avg_factor(self, reduction: str, avg_factor: AvgFactor, count: Tensor) -> AvgFactor:
        """``avg_non_ignore`` replaces a missing avg_factor by the non-ignored ``count`` under 'mean'."""
        if avg_factor is None and self.avg_non_ignore and reduction == "mean":
            return float(count)
        return avg_factor

    def _softmax(self, cls_score, label, weight, class_weight, reduction, avg_factor, ignore_index):
        if cls_score.dim() < 2:
            raise LossInputError(
                f"cls_score must be [N, C] logits, got shape {list(cls_score.shape)}", field="cls_score"
            )
        label = _check_softmax_labels(cls_score, label, ignore_index)
        if class_weight is not None and class_weight.numel() != cls_score.shape[1]:
            raise LossInputError(
                f"CrossEntropyLoss.class_weight must have one entry per class ({cls_score.shape[1]}), "
                f"got {class_weight.numel()}",
                field="class_weight",
            )
        loss = softmax_cross_entropy(cls_score, label, class_weight, ignore_index)
        if weight is not None:
            weight = float32_rounded(checks.tensor("weight", weight), loss.dtype)
        avg_factor = self.effective_avg_factor(reduction, avg_factor, non_ignored_count(label, ignore_index))
        return self.finish(loss, weight, reduction, avg_factor)

    def _sigmoid(self, cls_score, label, weight, class_weight, reduction, avg_factor, ignore_index):
        if cls_score.dim() != label.dim():
            label = checks.index_tensor("label", label)
            targets, weight, valid_mask = _expand_index_labels(cls_score, label, weight, ignore_index)
        else:
            checks.same_shape("label", label, "cls_score", cls_score)
            valid_mask = ((label >= 0) & (label != ignore_index)).to(cls_score.dtype)
            weight = valid_mask if weight is None else apply_weight(valid_mask, weight)
            targets = float32_rounded(label, cls_score.dtype)
        if class_weight is not None:
            checks.broadcasts_to("class_weight", class_weight, "cls_score", cls_score)
        loss = binary_cross_entropy(cls_score, targets, class_weight)
        weight = float32_rounded(weight, loss.dtype)
        avg_factor = self.effective_avg_factor(reduction, avg_factor, valid_mask.sum())
        return self.finish(loss, weight, reduction, avg_factor)

    def _mask(self, cls_score, label, weight, class_weight, reduction, avg_factor, ignore_index):
        # In mask mode mmdet passes `weight` through as the RoIs' class indices.
        if ignore_index is not None:
            raise LossInputError(
                "CrossEntropyLoss with use_mask=True does not support ignore_index", field="ignore_index"
            )
        if reduction != "mean" or avg_factor is not None:
            raise LossInputError(
                f"CrossEntropyLoss with use_mask=True supports only reduction='mean' without avg_factor, "
                f"got reduction={reduction!r}, avg_factor={avg_factor!r}",
                field="reduction" if reduction != "mean" else "avg_factor",
            )
        if weight is None:
            raise LossInputError(
                "CrossEntropyLoss with use_mask=True needs the RoIs' class indices [N] as its third argument (weight)",
                field="weight",
            )
        roi_labels = checks.index_tensor("weight", weight)
        if cls_score.dim() < 2 or roi_labels.shape != cls_score.shape[:1]:
            raise LossInputError(
                f"with use_mask=True, cls_score must be [N, C, ...] mask logits and weight [N] class "
                f"indices; got cls_score {list(cls_score.shape)} and weight {list(roi_labels.shape)}",
                field="weight",
            )
        checks.index_range("weight", roi_labels, 0, cls_score.shape[1] - 1, "class indices of the RoIs")
        rows = torch.arange(cls_score.shape[0], device=cls_score.device)
        logits = cls_score[rows, roi_labels].squeeze(1)
        checks.same_shape("label", label, "the selected mask logits", logits)
        if class_weight is not None:
            checks.broadcasts_to("class_weight", class_weight, "the mask logits", logits)
        loss = F.binary_cross_entropy_with_logits(logits, label.to(cls_score.dtype), reduction="none")
        return self.loss_weight * reduce_loss(apply_weight(loss, class_weight), "mean", None)[None]


@LOSSES.register_module()
class CrossEntropyCustomLoss(CustomClassifierMixin, CrossEntropyLoss):
    """Cross-entropy for classifiers with a custom number of output channels (V3Det's large vocabularies).

    The loss is CrossEntropyLoss's, for the same config; ``num_classes`` sizes the classifier (``C + 1``
    channels, the last one background, for softmax; ``C`` for sigmoid) and drives the hooks
    ``get_cls_channels``, ``get_activation`` and ``get_accuracy``, not the loss value.

    Args:
        use_sigmoid: binary cross-entropy per class instead of softmax (default False).
        use_mask: mask cross-entropy of each RoI's own class channel (default False).
        reduction: "none", "mean" (default) or "sum".
        num_classes: number of foreground classes; required (default -1, which is refused).
        class_weight: per-class weights, one per channel (softmax: class weight; sigmoid: positive weight).
        ignore_index: label value whose samples contribute nothing (default None = -100).
        loss_weight: multiplier of the reduced loss (default 1.0).
        avg_non_ignore: with "mean", average over non-ignored labels only (default False).
    """

    def __init__(
        self,
        use_sigmoid: bool = False,
        use_mask: bool = False,
        reduction: Reduction = "mean",
        num_classes: Count = -1,
        class_weight: list[float] | None = None,
        ignore_index: int | None = None,
        loss_weight: float = 1.0,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__(use_sigmoid, use_mask, reduction, class_weight, ignore_index, loss_weight, avg_non_ignore)
        self.num_classes = check_num_classes("CrossEntropyCustomLoss", num_classes)

    def get_cls_channels(self, num_classes: int) -> int:
        """The classifier's output width: one background channel more for softmax."""
        self._check_cls_channels_request(num_classes)
        return num_classes if self.use_sigmoid else num_classes + 1

    def get_activation(self, cls_score: Tensor) -> Tensor:
        """[N, C + 1] class scores, the last column background.

        Softmax: a softmax over the first C columns and the last one. Sigmoid: the C sigmoids, then
        ``1 - sum`` of them clamped to [0, 1] as the background score.
        """
        foreground = cls_score[:, : self.num_classes]
        if not self.use_sigmoid:
            return torch.cat([foreground, cls_score[:, -1:]], dim=-1).softmax(dim=-1)
        prob = foreground.sigmoid()
        background = (1 - prob.sum(dim=1, keepdim=True)).clamp(0, 1)
        return torch.cat([prob, background], dim=1)
