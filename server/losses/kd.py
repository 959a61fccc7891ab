"""Knowledge-distillation loss: the KL divergence from a teacher's softened class distribution.

Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network, https://arxiv.org/abs/1503.02531
(used on the box-side distributions of LD, Zheng et al. 2022, https://arxiv.org/abs/2102.12252).

Shapes: ``pred`` [N, C] student logits (or [N, C, d1, ...]: classes on axis 1); ``soft_label`` the
teacher's logits, ``pred``'s shape; ``weight`` [N] (broadcastable to the per-sample loss without
enlarging it). Output per sample ([N], or [N, d1, ...]) for ``reduction='none'``.
"""

from __future__ import annotations

from torch import Tensor

from .errors import LossInputError
from .pipeline import AvgFactor, PairwiseLoss, Reduction, ReductionOverride
from .registry import LOSSES
from .schema import AtLeastOne, OutputKind


def distillation_kl_div(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_c q_c (log q_c - log p_c)`` with ``q = softmax(teacher / T)``, ``p = softmax(student / T)``.

    The mean runs over the C classes (axis 1), not a sum: mmdet's scale. ``q`` is a constant: the
    teacher receives no gradient.
    """
    teacher_log_prob = (teacher.detach() / temperature).log_softmax(dim=1)
    teacher_prob = teacher_log_prob.exp()
    student_log_prob = (student / temperature).log_softmax(dim=1)
    divergence = teacher_prob * (teacher_log_prob - student_log_prob)
    return divergence.mean(dim=1) * (temperature * temperature)


@LOSSES.register_module()
class KnowledgeDistillationKLDivLoss(PairwiseLoss):
    """Knowledge distillation: temperature-scaled KL divergence from the teacher's soft labels.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
        T: distillation temperature, >= 1; logits are divided by T and the loss is scaled by T^2
            (default 10).
    """

    output_kind = OutputKind.SAMPLE
    differentiable = ("pred",)
    value_inputs = ("pred", "soft_label", "weight")  # arithmetic only: read in place from shared memory
    working_copies = 8.0
    work_per_element = 10

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0, T: AtLeastOne = 10) -> None:  # noqa: N803
        super().__init__(reduction, loss_weight)
        self.T = T

    def forward(
        self,
        pred: Tensor,
        soft_label: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        return self.evaluate(pred, soft_label, weight, avg_factor, reduction_override)

    def prepare(self, pred: Tensor, soft_label: Tensor) -> tuple[Tensor, Tensor]:
        pred, soft_label = super().prepare(pred, soft_label)
        if pred.dim() < 2:
            raise LossInputError(
                f"pred must be [N, C] logits (classes on axis 1), got shape {list(pred.shape)}", field="pred"
            )
        return pred, soft_label.to(pred.dtype)

    def kernel(self, pred: Tensor, soft_label: Tensor) -> Tensor:
        return distillation_kl_div(pred, soft_label, self.T)
