"""Test plugin: extra losses a server imports with ``--plugin slow_loss`` (``tests/plugins`` on ``PYTHONPATH``).

* ``SlowL1Loss`` is ``L1Loss`` that first sleeps ``delay`` seconds, so a call stays in flight long
  enough to stop the server under it. It logs one line when it starts sleeping, so a test can tell
  that the call has reached the loss.
* ``BatchSoftmaxLoss`` is deliberately *not* separable: every output element depends on all of
  ``pred``, so the gradient for an upstream gradient other than all-ones can not be derived from the
  all-ones one. The client must send the upstream gradient back (the exact recompute path).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from losswire.server.losses import LOSSES, WeightedLoss
from losswire.server.losses.pipeline import AvgFactor, Reduction, ReductionOverride

log = logging.getLogger("losswire.plugins.slow_loss")


@LOSSES.register_module()
class SlowL1Loss(WeightedLoss):
    """L1 loss ``|pred - target|`` that sleeps ``delay`` seconds first (a test plugin).

    Args:
        delay: seconds to sleep before computing (default 1.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")

    def __init__(self, delay: float = 1.0, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.delay = float(delay)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        log.info("SlowL1Loss: sleeping %.2f s", self.delay)
        time.sleep(self.delay)
        return self.finish((pred - target).abs(), weight, reduction, avg_factor)


@LOSSES.register_module()
class BatchSoftmaxLoss(nn.Module):
    """``softmax(pred over all elements) * target``, element-wise: a non-separable test loss.

    Args:
        reduction: accepted for the config's sake; the output is always per element (default "none").
    """

    differentiable = ("pred",)
    separable = False

    def __init__(self, reduction: str = "none") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return torch.softmax(pred.flatten(), 0).view_as(pred) * target
