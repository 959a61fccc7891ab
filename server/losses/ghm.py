"""Gradient Harmonizing Mechanism losses: GHM-C (classification) and GHM-R (box regression).

Li, Liu and Wang 2019, Gradient Harmonized Single-stage Detector, https://arxiv.org/abs/1811.05181.

GHMC shapes: ``pred`` [N, C] logits; ``target`` [N, C] binary (or soft) targets, or [N] class indices
(an index outside [0, C), e.g. C for background, gives an all-zero row); ``label_weight`` of pred's
shape (or broadcastable to it), [N] with index targets. GHMR shapes: ``pred`` and ``target`` [N, 4]
box deltas (any shape, equal); ``label_weight`` of their shape or broadcastable to it. Output per
element for ``reduction='none'``.

The weights, MMDetection 3.3's:

* ``g`` is each entry's gradient norm, detached: ``|sigmoid(pred) - target|`` (GHMC) or
  ``|d| / sqrt(d^2 + mu^2)`` with ``d = pred - target`` (GHMR).
* ``[0, 1]`` is cut into ``bins`` equal bins with float32 edges; GHMC's top edge is ``1 + 1e-6``,
  GHMR's ``1e3``. Only valid entries (``label_weight > 0``) are counted and weighted.
* ``tot`` is the number of valid entries (GHMC) or the float32 sum of ``label_weight`` (GHMR), at
  least 1; ``n`` is the number of non-empty bins.
* A valid entry in bin ``b`` weighs ``tot / count_b / n``. With ``momentum > 0`` it weighs
  ``tot / acc_b / n`` instead, where the buffer ``acc_sum`` (float32, one value per bin, kept across
  calls) is first updated as ``acc_b = momentum * acc_b + (1 - momentum) * count_b`` for every
  non-empty bin, once per forward.

The loss is BCE with logits (GHMC) or the authentic smooth L1 ``sqrt(d^2 + mu^2) - mu`` (GHMR), times
the weights; no gradient flows through the weights. ``mean`` divides the weighted sum by ``tot``
(mmdet passes it as ``avg_factor``), so ``reduction='sum'`` is refused, as in mmdet, and a caller's
``avg_factor`` is ignored. mmdet casts GHMC's target to float32: with float64 logits the BCE comes out
float32-rounded (the weighted loss is float64 again); losswire keeps that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, cost
from .cost import Estimate, Shapes
from .errors import LossConfigError, LossInputError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss
from .registry import LOSSES
from .schema import Count, Momentum, Positive

# Bytes per bin: building holds the float32 edges (and arange's float32 before the division, at the peak)
# and, with momentum, the float32 acc_sum; a forward's per-bin temporaries (int64 counts, a float64 and two
# float32 per-bin weights, the momentum update's) peak at about BIN_FORWARD_BYTES (26.5 measured, 25M bins).
BIN_BUILD_BYTES, BIN_MOMENTUM_BYTES, BIN_FORWARD_BYTES = 8, 4, 36


class HarmonizedLoss(WeightedLoss):
    """Bins, momentum and the per-bin weights shared by GHMC and GHMR."""

    stateful = True  # with momentum > 0: the moving average of the bin counts
    working_copies = 18.0
    work_per_element = 70

    @classmethod
    def estimate(cls, params: Mapping[str, Any], shapes: Shapes | None, itemsize: int) -> Estimate:
        """The bins' buffers (module) and temporaries (forward), besides the element-wise working set."""
        bins = params["bins"]
        module_bytes = (bins + 1) * BIN_BUILD_BYTES + (bins * BIN_MOMENTUM_BYTES if params["momentum"] > 0 else 0)
        base = super().estimate(params, shapes, itemsize)
        return cost.with_config_terms(base, shapes, module_bytes, bins * BIN_FORWARD_BYTES, 10 * bins, "bins")

    def keeps_state(self) -> bool:
        return self.momentum > 0

    def setup_bins(self, bins: int, momentum: float, top_edge: float, bump: bool) -> None:
        self.bins = bins
        self.momentum = momentum
        edges = torch.arange(bins + 1, dtype=torch.float32) / bins
        edges[-1] = edges[-1] + top_edge if bump else top_edge
        self.register_buffer("edges", edges)
        if momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(bins))

    def refuse_sum(self, reduction: str, reduction_override: str | None) -> None:
        if reduction == "sum":
            field = "reduction_override" if reduction_override else "reduction"
            error = LossInputError if reduction_override else LossConfigError
            raise error(
                f"{type(self).__name__} can not reduce with 'sum': its mean divides by the valid entries "
                "(mmdet passes them as avg_factor, which 'sum' refuses); use 'mean' or 'none'",
                field=field,
            )

    @torch.no_grad()
    def harmonized_weights(self, g: Tensor, valid: Tensor, tot: float, dtype: torch.dtype) -> Tensor:
        """Per-entry weights (of ``dtype``) from the gradient norms ``g``; updates ``acc_sum``."""
        bin_index = torch.bucketize(g, self.edges.to(g), right=True) - 1
        counted = valid & (bin_index >= 0) & (bin_index < self.bins)
        bin_index = bin_index.clamp(0, self.bins - 1)
        counts = torch.bincount(bin_index[counted], minlength=self.bins)
        filled = counts > 0
        used_bins = int(filled.sum())
        if self.momentum > 0:
            acc = self.acc_sum
            step = ((1 - self.momentum) * counts.double()).to(acc.dtype)  # mmdet adds a Python float
            acc = torch.where(filled, self.momentum * acc + step, acc)
            per_bin = (tot / acc).to(dtype)
            self.acc_sum.copy_(acc)
        else:
            per_bin = (tot / counts.double()).to(dtype)
        if used_bins > 0:
            per_bin = per_bin / used_bins
        return torch.where(counted, per_bin[bin_index], torch.zeros((), dtype=dtype, device=g.device))


def one_hot_with_weights(pred: Tensor, target: Tensor, label_weight: Tensor) -> tuple[Tensor, Tensor]:
    """[N] class indices and [N] label weights -> [N, C] 0/1 targets and their [N, C] weights."""
    labels = checks.index_tensor("target", target)
    checks.ndim("pred", pred, 2, "[N, C] logits when target holds class indices")
    num, num_classes = pred.shape
    if labels.shape != (num,):
        raise LossInputError(
            f"target of class indices must have shape [N] = [{num}] for pred {list(pred.shape)}, "
            f"got {list(labels.shape)}",
            field="target",
        )
    if label_weight.shape not in ((num,), (num, 1)):
        raise LossInputError(
            f"label_weight must have shape [N] = [{num}] with a target of class indices, "
            f"got {list(label_weight.shape)}",
            field="label_weight",
        )
    classes = torch.arange(num_classes, device=labels.device)
    dense = (labels.unsqueeze(1) == classes).long()
    return dense, label_weight.reshape(num, 1).expand(num, num_classes)


@LOSSES.register_module()
class GHMC(HarmonizedLoss):
    """GHM-C: binary cross-entropy re-weighted by the inverse density of its gradient norm.

    Args:
        bins: number of equal bins of the gradient norm in [0, 1], >= 1 (default 10).
        momentum: moving-average factor of the bin counts; > 0 keeps them in the buffer ``acc_sum``
            across calls (default 0).
        use_sigmoid: must be True; only the sigmoid (BCE) form exists (default True).
        loss_weight: multiplier of the reduced loss (default 1.0).
        reduction: "none" or "mean" (default); "sum" is refused, as in mmdet.

    ``label_weight`` only marks entries valid (> 0) or ignored; its magnitude is not used. Extra
    keyword arguments (``avg_factor=...`` from a detection head) are accepted and ignored, as in mmdet.
    """

    differentiable = ("pred", "target")

    def __init__(
        self,
        bins: Count = 10,
        momentum: Momentum = 0.0,
        use_sigmoid: bool = True,
        loss_weight: float = 1.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction, loss_weight)
        if use_sigmoid is not True:
            raise LossConfigError("GHMC.use_sigmoid must be True: only the sigmoid form exists", field="use_sigmoid")
        self.use_sigmoid = use_sigmoid
        self.setup_bins(bins, momentum, 1e-6, bump=True)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        label_weight: Tensor,
        reduction_override: ReductionOverride = None,
        **kwargs: Any,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        checks.float_tensor("pred", pred)
        checks.tensor("target", target)
        checks.tensor("label_weight", label_weight)
        if pred.dim() != target.dim():
            target, label_weight = one_hot_with_weights(pred, target, label_weight)
        else:
            checks.same_shape("target", target, "pred", pred)
            checks.broadcasts_to("label_weight", label_weight, "pred", pred)
        self.refuse_sum(reduction, reduction_override)
        # mmdet's target and label_weight are float32 whatever pred's dtype
        target, label_weight = target.float(), label_weight.float()
        valid = label_weight > 0
        tot = max(valid.float().sum().item(), 1.0)
        g = (pred.detach().sigmoid() - target.detach()).abs()
        weights = self.harmonized_weights(g, valid, tot, pred.dtype)
        loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        return self.finish(loss, weights, reduction, tot)


@LOSSES.register_module()
class GHMR(HarmonizedLoss):
    """GHM-R: authentic smooth L1 re-weighted by the inverse density of its gradient norm.

    Args:
        mu: the smoothing constant of ``sqrt(d^2 + mu^2) - mu`` (default 0.02).
        bins: number of equal bins of the gradient norm in [0, 1], >= 1 (default 10).
        momentum: moving-average factor of the bin counts; > 0 keeps them in the buffer ``acc_sum``
            across calls (default 0).
        loss_weight: multiplier of the reduced loss (default 1.0).
        reduction: "none" or "mean" (default); "sum" is refused, as in mmdet.

    ``avg_factor`` is accepted and ignored: the mean divides by the sum of ``label_weight``.
    """

    differentiable = ("pred", "target")

    def __init__(
        self,
        mu: Positive = 0.02,
        bins: Count = 10,
        momentum: Momentum = 0.0,
        loss_weight: float = 1.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.mu = mu
        self.setup_bins(bins, momentum, 1e3, bump=False)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        label_weight: Tensor,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        checks.regression_pair(pred, target)
        checks.tensor("label_weight", label_weight)
        checks.broadcasts_to("label_weight", label_weight, "pred", pred)
        self.refuse_sum(reduction, reduction_override)
        diff = pred - target
        root = torch.sqrt(diff * diff + self.mu * self.mu)
        loss = root - self.mu
        g = (diff / root).abs().detach()
        valid = label_weight > 0
        tot = max(label_weight.float().sum().item(), 1.0)
        weights = self.harmonized_weights(g, valid, tot, g.dtype)
        return self.finish(loss, weights, reduction, tot)
