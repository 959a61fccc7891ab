"""Small test losses for the session and protocol tests (registered into a test server's own registry).

* ``CountingL1Loss``: ``calls * |pred - target|`` where the buffer ``calls`` counts forwards, so
  every value shows which state it saw. Separable: one round trip serves backward.
* ``CountingBatchSoftmaxLoss``: ``calls * softmax(pred over all elements) * target``; *not*
  separable, so the client's backward resends the upstream gradient and the server must replay the
  state the forward saw, without counting the replay as another forward.
* ``CountingSoftmaxPairLoss``: the same with a dict output of two parts.
* ``MaskMeanSquareLoss``: stateless, separable, one loss per [H, W] mask (several axes reduced).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losswire.server.losses import Registry, WeightedLoss
from losswire.server.losses.pipeline import AvgFactor, Reduction, ReductionOverride
from losswire.server.losses.schema import OutputKind


class CountingL1Loss(WeightedLoss):
    """``calls * |pred - target|``, with ``calls`` the number of forwards so far, this one included.

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.register_buffer("calls", torch.zeros(()))

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        if pred.shape != target.shape:
            raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} differ")
        self.calls += 1
        return self.finish(self.calls * (pred - target).abs(), weight, reduction, avg_factor)


class CountingBatchSoftmaxLoss(nn.Module):
    """``calls * softmax(pred over all elements) * target``, element-wise (not separable).

    Args:
        reduction: accepted for the config's sake; the output is always per element (default "none").
    """

    separable = False
    differentiable = ("pred",)

    def __init__(self, reduction: str = "none") -> None:
        super().__init__()
        self.reduction = reduction
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        self.calls += 1
        return self.calls * pred.flatten().softmax(0).view_as(pred) * target


class CountingSoftmaxPairLoss(nn.Module):
    """``{'spread': calls * softmax(pred) * target, 'peak': softmax(pred).max()}``: a non-separable
    dict output, so the client's backward resends one upstream gradient per part (``grad_outputs``).
    """

    separable = False
    differentiable = ("pred",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        self.calls += 1
        prob = pred.flatten().softmax(0).view_as(pred)
        return {"spread": self.calls * prob * target, "peak": prob.max()}


class MaskMeanSquareLoss(WeightedLoss):
    """Stateless and separable: the mean over each sample's mask of ``(pred - target)^2``.

    ``pred`` [N, H, W] -> loss [N]: several axes reduced, so the client inserts two size-1 axes into
    an upstream gradient of shape [N] (the protocol's rule for ``sample_axis``).

    Args:
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    output_kind = OutputKind.SAMPLE
    differentiable = ("pred", "target")

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        loss = (pred - target).square().flatten(1).mean(1)
        return self.finish(loss, weight, self.resolve_reduction(reduction_override), avg_factor)


def register(registry: Registry) -> Registry:
    for cls in (CountingL1Loss, CountingBatchSoftmaxLoss, CountingSoftmaxPairLoss, MaskMeanSquareLoss):
        registry.register_module(module=cls)
    return registry
