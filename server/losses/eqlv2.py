"""Equalization loss v2: sigmoid cross-entropy reweighted by running gradient statistics (stateful).

Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object Detection, Tan et al.
CVPR 2021, https://arxiv.org/abs/2012.08548.

Shapes: ``cls_score`` [N, C + 1] logits with C = ``num_classes`` (the last channel is background /
objectness); ``label`` [N] integer class indices in [0, C], C = background. The output is always a
0-d scalar, whatever the reduction: ``loss_weight * sum_ij w_ij BCE(z_ij, t_ij) / N`` with ``t`` the
one-hot labels.

Weights: for class j with accumulated gradient ratio ``r_j`` (positive over negative),
``f_j = 1 / (1 + exp(-gamma (r_j - mu)))``; negatives weigh ``f_j`` and positives
``1 + alpha (1 - f_j)``; the background channel weighs 1 either way. The weights are constants for
autograd.

State (float32 buffers, [C] each): ``pos_grad`` and ``neg_grad``, the weighted gradient magnitudes
``|sigmoid(z) - t|`` summed over positives and negatives of each class so far, and ``pos_neg`` =
``pos_grad / (neg_grad + 1e-10)``, which starts at 100 (weights 1 until the first update). Every
forward reads the statistics first, then adds its own batch once; a forward that raises leaves them
untouched.

MMDetection all-reduces each batch's statistics across processes when ``use_distributed=True``.
losswire holds one module per session on the server, so every worker's batches already update the
same statistics: there is no all-reduce, and ``use_distributed`` has no effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, cost
from .cost import Estimate, Shapes
from .errors import LossInputError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss
from .registry import LOSSES
from .schema import Count, NonNegative, OutputKind

INITIAL_RATIO = 100.0  # a ratio far above mu: every weight starts at 1
RATIO_EPS = 1e-10  # keeps pos_grad / neg_grad finite before any negative gradient was seen
# Bytes per class: three float32 buffers held; a forward's per-class temporaries (the weights' logistic,
# the statistics' sums and their update) peak at about CLASS_FORWARD_BYTES on top of cls_score's copies.
CLASS_BUFFER_BYTES, CLASS_FORWARD_BYTES = 12, 16


@LOSSES.register_module()
class EQLV2Loss(WeightedLoss):
    """Equalization loss v2: sigmoid cross-entropy with class weights from gradient statistics.

    Args:
        use_sigmoid: no effect, EQLv2 is always sigmoid; the attribute reads True (default True).
        reduction: no effect, the loss is always sum / N, as in MMDetection (default "mean").
        class_weight: no effect, as in MMDetection (default None).
        loss_weight: multiplier of the loss (default 1.0).
        num_classes: number of foreground classes C; cls_score has C + 1 channels (default 1203, LVIS v1).
        use_distributed: no effect: the server holds the statistics for every worker (default False).
        mu: centre of the ratio-to-weight logistic (default 0.8).
        alpha: extra weight of positives, ``1 + alpha (1 - f)`` (default 4.0).
        gamma: slope of the ratio-to-weight logistic (default 12).
        vis_grad: no effect, as in MMDetection (default False).
        test_with_obj: ``get_activation`` scales class scores by 1 - P(background) (default True).

    ``forward``'s ``weight``, ``avg_factor`` and ``reduction_override`` are accepted and ignored, as in
    MMDetection. Stateful: the buffers ``pos_grad``, ``neg_grad`` and ``pos_neg`` (module docstring).
    """

    stateful = True

    output_kind = OutputKind.SCALAR
    differentiable = ("cls_score",)
    working_copies = 10.0
    work_per_element = 20

    @classmethod
    def estimate(cls, params: Mapping[str, Any], shapes: Shapes | None, itemsize: int) -> Estimate:
        """Three [C] float32 buffers when built; a forward adds per-class temporaries to its working set."""
        num_classes = params["num_classes"]
        base = super().estimate(params, shapes, itemsize)
        return cost.with_config_terms(
            base,
            shapes,
            num_classes * CLASS_BUFFER_BYTES,
            num_classes * CLASS_FORWARD_BYTES,
            10 * num_classes,
            "num_classes",
        )

    def __init__(
        self,
        use_sigmoid: bool = True,
        reduction: Reduction = "mean",
        class_weight: list[float] | None = None,
        loss_weight: float = 1.0,
        num_classes: Count = 1203,
        use_distributed: bool = False,
        mu: float = 0.8,
        alpha: NonNegative = 4.0,
        gamma: float = 12,
        vis_grad: bool = False,
        test_with_obj: bool = True,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.use_sigmoid = True
        self.class_weight = None if class_weight is None else list(class_weight)
        self.num_classes = num_classes
        self.use_distributed = use_distributed
        self.mu = mu
        self.alpha = alpha
        self.gamma = gamma
        self.vis_grad = vis_grad
        self.test_with_obj = test_with_obj
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        self.register_buffer("pos_neg", torch.full((num_classes,), INITIAL_RATIO))

    # -- MMDetection's head hooks --------------------------------------------------------------------

    def get_channel_num(self, num_classes: int) -> int:
        """The classifier's output channels for ``num_classes`` classes: C + 1."""
        return num_classes + 1

    def get_activation(self, pred: Tensor) -> Tensor:
        """[N, C + 1] logits -> sigmoid scores; with ``test_with_obj`` the classes' times 1 - P(background)."""
        checks.float_tensor("pred", pred)
        checks.ndim("pred", pred, 2, "[N, C + 1] logits")
        scores = pred.sigmoid()
        if not self.test_with_obj:
            return scores
        background = scores[:, -1:]
        return torch.cat([scores[:, :-1] * (1 - background), background], dim=1)

    # -- the loss ------------------------------------------------------------------------------------

    def negative_weight(self) -> Tensor:
        """``f(r)`` per class from the current statistics, [C] in the buffers' dtype."""
        return 1 / (1 + torch.exp(-self.gamma * (self.pos_neg - self.mu)))

    def forward(
        self,
        cls_score: Tensor,
        label: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        label = self._check_inputs(cls_score, label)
        num, channels = cls_score.shape
        target = F.one_hot(label, channels).to(cls_score.dtype)
        is_positive = target.bool()

        negative = torch.cat([self.negative_weight().to(cls_score.dtype), cls_score.new_ones(1)])
        positive = 1 + self.alpha * (1 - negative)
        class_weight = torch.where(is_positive, positive, negative)

        loss = F.binary_cross_entropy_with_logits(cls_score, target, reduction="none")
        loss = self.loss_weight * ((loss * class_weight).sum() / max(num, 1))

        with torch.no_grad():
            prob = cls_score.detach().sigmoid()
            magnitude = torch.where(is_positive, 1 - prob, prob)  # |d BCE / d z|
            # the background channel keeps no statistics
            pos_grad = (magnitude * target * class_weight).sum(dim=0)[:-1]
            neg_grad = (magnitude * (1 - target) * class_weight).sum(dim=0)[:-1]
            self.pos_grad += pos_grad
            self.neg_grad += neg_grad
            self.pos_neg.copy_(self.pos_grad / (self.neg_grad + RATIO_EPS))
        return loss

    def _check_inputs(self, cls_score: Tensor, label: Tensor) -> Tensor:
        checks.float_tensor("cls_score", cls_score)
        channels = self.num_classes + 1
        if cls_score.dim() != 2 or cls_score.shape[1] != channels:
            raise LossInputError(
                f"cls_score must be [N, num_classes + 1] = [N, {channels}] logits (background last), "
                f"got shape {list(cls_score.shape)}",
                field="cls_score",
            )
        return checks.row_labels("label", label, cls_score, self.num_classes)
