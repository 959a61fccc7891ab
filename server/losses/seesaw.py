"""Seesaw loss: softmax cross-entropy rebalanced by running class counts (stateful).

Seesaw Loss for Long-Tailed Instance Segmentation, Wang et al. CVPR 2021, https://arxiv.org/abs/2008.10032.

Shapes: ``cls_score`` [N, C + 2] with C = ``num_classes``: C class logits, then two objectness
logits (foreground, background); ``labels`` [N] integer class indices in [0, C], C = background;
``label_weights`` [N]. The output is a dict ``{'loss_cls_objectness', 'loss_cls_classes'}`` (their
sum with ``return_dict=False``). For ``reduction='none'`` the objectness part is [N] and the classes
part is [P], one entry per sample with a foreground label in batch order (a 0-d zero when P = 0).

The loss of a foreground sample with label ``y`` is the cross-entropy of its class logits after each
other class's logit ``z_j`` is shifted by ``log(M_yj * K_yj)``:

* mitigation ``M_yj = (n_j / n_y)^p`` where ``n_j < n_y``, else 1 (only for ``p > 0``); ``n`` are the
  running label counts, each clamped to at least 1;
* compensation ``K_yj = (s_j / s_y)^q`` where ``s_j > s_y``, else 1 (only for ``q > 0``); ``s`` is the
  softmax of the class logits and ``s_y`` is clamped to at least ``eps``.

Both factors are constants for autograd (the softmax inside ``K`` is taken of detached logits), so the
gradient is the one of a cross-entropy with fixed logit offsets. The objectness part is a two-way
softmax cross-entropy: target 0 for foreground labels, 1 for background.

State: ``cum_samples`` [C + 1] (float32 buffer), the number of labels of each class seen so far,
background last. Every forward adds its batch's labels once, *before* the loss uses the counts; a
forward that raises leaves the counts untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, cost
from .classifier import top1_accuracy
from .cost import Estimate, Shapes
from .errors import LossConfigError, LossInputError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss, check_reduction, float32_rounded
from .registry import LOSSES
from .schema import Count, OutputKind, Positive

# The mitigation factor's [C, C] table (float32, the counts' dtype): the ratios, their comparison, their
# power, the ones and the chosen table are alive together at the peak: 16.2 bytes per entry measured.
TABLE_BYTES_PER_ENTRY = 20


def mitigation_factor(counts: Tensor, labels: Tensor, p: float) -> Tensor:
    """[P, C] factors ``(n_j / n_y)^p`` where class j is rarer than label y, else 1; in ``counts``' dtype.

    The [C, C] table is built whole, then its label rows picked: torch's vectorised ``pow`` may round
    differently by position, so this keeps the values bit-identical to MMDetection's.
    """
    counts = counts.clamp(min=1)
    ratio = counts[None, :] / counts[:, None]  # ratio[y, j] = n_j / n_y
    table = torch.where(ratio < 1, ratio.pow(p), torch.ones_like(ratio))
    return table[labels]


def compensation_factor(logits: Tensor, labels: Tensor, q: float, eps: float) -> Tensor:
    """[P, C] factors ``(s_j / s_y)^q`` where class j scores above label y, else 1 (no gradient)."""
    scores = logits.detach().softmax(dim=1)
    own = scores.gather(1, labels[:, None]).clamp(min=eps)
    ratio = scores / own
    return torch.where(ratio > 1, ratio.pow(q), torch.ones_like(ratio))


def seesaw_cross_entropy(logits: Tensor, labels: Tensor, counts: Tensor, p: float, q: float, eps: float) -> Tensor:
    """Per-sample seesaw cross-entropy of [P, C] class logits with [P] labels in [0, C)."""
    factor = logits.new_ones(logits.shape)
    if p > 0:
        factor = factor * mitigation_factor(counts, labels, p)
    if q > 0:
        factor = factor * compensation_factor(logits, labels, q, eps)
    # The label's own factor is 1 (log 0): only the other classes' logits move.
    return F.cross_entropy(logits + factor.log(), labels, reduction="none")


@LOSSES.register_module()
class SeesawLoss(WeightedLoss):
    """Seesaw loss: class cross-entropy rebalanced by label counts and scores, plus objectness.

    Args:
        use_sigmoid: must be False; only the softmax form exists (default False).
        p: exponent of the mitigation factor; <= 0 disables it (default 0.8).
        q: exponent of the compensation factor; <= 0 disables it (default 2.0).
        num_classes: number of foreground classes C; cls_score has C + 2 channels (default 1203, LVIS v1).
        eps: lower clamp of the label's own score in the compensation factor (default 1e-2).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of each reduced part (default 1.0).
        return_dict: return ``{'loss_cls_objectness', 'loss_cls_classes'}`` instead of their sum
            (default True).

    Stateful: the buffer ``cum_samples`` counts every label seen (see the module docstring).
    """

    stateful = True

    output_kind = OutputKind.SAMPLE
    differentiable = ("cls_score",)
    # Under reduction 'none' the classes part holds only the foreground rows, so its row i is not
    # input row i.
    separable = False
    # The head hooks MMDetection's bbox heads look for.
    custom_cls_channels: ClassVar[bool] = True
    custom_activation: ClassVar[bool] = True
    custom_accuracy: ClassVar[bool] = True
    working_copies = 11.0
    work_per_element = 22

    @classmethod
    def estimate(cls, params: Mapping[str, Any], shapes: Shapes | None, itemsize: int) -> Estimate:
        """``cum_samples`` ([C + 1] float32) when built; a forward with ``p > 0`` builds the [C, C]
        mitigation table, whatever the batch: quadratic in ``num_classes``."""
        num_classes = params["num_classes"]
        entries = num_classes**2 if params["p"] > 0 else 0
        base = super().estimate(params, shapes, itemsize)
        return cost.with_config_terms(
            base, shapes, (num_classes + 1) * 4, TABLE_BYTES_PER_ENTRY * entries, 5 * entries, "num_classes"
        )

    def __init__(
        self,
        use_sigmoid: bool = False,
        p: float = 0.8,
        q: float = 2.0,
        num_classes: Count = 1203,
        eps: Positive = 1e-2,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        return_dict: bool = True,
    ) -> None:
        super().__init__(reduction, loss_weight)
        if use_sigmoid is not False:
            raise LossConfigError(
                "SeesawLoss.use_sigmoid must be False: only the softmax form exists", field="use_sigmoid"
            )
        self.use_sigmoid = use_sigmoid
        self.p = p
        self.q = q
        self.num_classes = num_classes
        self.eps = eps
        self.return_dict = return_dict
        self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=torch.float32))

    # -- MMDetection's head hooks --------------------------------------------------------------------

    def background_label(self, cls_score: Tensor) -> int:
        """The background class index a sampler splits by: ``num_classes``."""
        return self.num_classes

    def get_cls_channels(self, num_classes: int) -> int:
        """The classifier's output channels for ``num_classes`` classes: C + 2."""
        if num_classes != self.num_classes:
            raise LossInputError(
                f"SeesawLoss was built for num_classes={self.num_classes}, asked for {num_classes}",
                field="num_classes",
            )
        return num_classes + 2

    def get_activation(self, cls_score: Tensor) -> Tensor:
        """[..., C + 2] logits -> [..., C + 1] scores: class softmax times P(foreground), then P(background)."""
        classes, objectness = self._split(cls_score)
        foreground_background = objectness.softmax(dim=-1)
        scores = classes.softmax(dim=-1) * foreground_background[..., :1]
        return torch.cat([scores, foreground_background[..., 1:]], dim=-1)

    def get_accuracy(self, cls_score: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Top-1 accuracy in percent: ``acc_objectness`` over all rows, ``acc_classes`` over foreground rows."""
        classes, objectness = self._split(cls_score)
        labels = checks.index_tensor("labels", labels)
        foreground = labels < self.num_classes
        background = (labels == self.num_classes).long()
        return {
            "acc_objectness": top1_accuracy(objectness, background),
            "acc_classes": top1_accuracy(classes[foreground], labels[foreground]),
        }

    def _split(self, cls_score: Tensor) -> tuple[Tensor, Tensor]:
        checks.float_tensor("cls_score", cls_score)
        if cls_score.dim() == 0 or cls_score.shape[-1] != self.num_classes + 2:
            raise LossInputError(
                f"cls_score must have num_classes + 2 = {self.num_classes + 2} channels in its last axis "
                f"(classes, then objectness), got shape {list(cls_score.shape)}",
                field="cls_score",
            )
        return cls_score[..., :-2], cls_score[..., -2:]

    # -- the loss ------------------------------------------------------------------------------------

    def forward(
        self,
        cls_score: Tensor,
        labels: Tensor,
        label_weights: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor | dict[str, Tensor]:
        if reduction_override is not None:
            check_reduction(reduction_override, "reduction_override")
        reduction = self.resolve_reduction(reduction_override)
        labels = self._check_inputs(cls_score, labels, label_weights)
        num = cls_score.shape[0]
        foreground = labels < self.num_classes
        num_foreground = int(foreground.sum())
        if reduction == "none" and not self.return_dict and num_foreground not in (0, num):
            raise LossInputError(
                f"SeesawLoss with return_dict=False and reduction 'none' adds the classes loss of the "
                f"{num_foreground} foreground samples to the objectness loss of all {num}: that needs every "
                f"label or none to be a foreground class; use return_dict=True or a reduction",
                field="labels",
            )
        weights = None if label_weights is None else float32_rounded(label_weights, cls_score.dtype)

        # This batch's labels count before the loss reads the counts; committed once the loss succeeded.
        counts = self.cum_samples + torch.bincount(labels, minlength=self.num_classes + 1).to(self.cum_samples.dtype)

        classes, objectness = cls_score[:, :-2], cls_score[:, -2:]
        if num_foreground > 0:
            loss = seesaw_cross_entropy(
                classes[foreground], labels[foreground], counts[: self.num_classes], self.p, self.q, self.eps
            )
            part_weights = None if weights is None else weights[foreground]
            loss_classes = self.finish(loss, part_weights, reduction, avg_factor)
        else:
            loss_classes = classes[foreground].sum()  # a zero that still reaches cls_score
        loss_objectness = F.cross_entropy(objectness, (labels == self.num_classes).long(), reduction="none")
        loss_objectness = self.finish(loss_objectness, weights, reduction, avg_factor)

        with torch.no_grad():
            self.cum_samples.copy_(counts)
        if self.return_dict:
            return {"loss_cls_objectness": loss_objectness, "loss_cls_classes": loss_classes}
        return loss_classes + loss_objectness

    def _check_inputs(self, cls_score: Tensor, labels: Tensor, label_weights: Tensor | None) -> Tensor:
        checks.float_tensor("cls_score", cls_score)
        if cls_score.dim() != 2 or cls_score.shape[1] != self.num_classes + 2:
            raise LossInputError(
                f"cls_score must be [N, num_classes + 2] = [N, {self.num_classes + 2}] logits (classes, then "
                f"objectness), got shape {list(cls_score.shape)}",
                field="cls_score",
            )
        labels = checks.row_labels("labels", labels, cls_score, self.num_classes)
        if label_weights is not None:
            checks.tensor("label_weights", label_weights)
            if label_weights.shape != labels.shape:
                raise LossInputError(
                    f"label_weights must hold one weight per sample, shape [{labels.shape[0]}], "
                    f"got {list(label_weights.shape)}",
                    field="label_weights",
                )
        return labels
