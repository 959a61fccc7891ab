"""Batch-hard triplet loss for re-identification embeddings (MMDetection's ``TripletLoss``).

Hermans, Beyer and Leibe 2017, In Defense of the Triplet Loss for Person Re-Identification,
https://arxiv.org/abs/1703.07737.

Shapes: ``inputs`` [B, D] embeddings; ``targets`` [B] identity labels, compared with ``==`` (a [B, 1]
or [1, B] column gives the same pairs, as in mmdet). Output: one scalar whatever the call.

For each anchor ``a``: ``d_ap`` is its largest distance to a sample of the same label -- the anchor
itself included, so a label seen once gives ``d_ap = 1e-6`` -- and ``d_an`` its smallest distance to a
sample of another label, which must exist. The loss is ``loss_weight * mean_a max(0, d_ap - d_an +
margin)``. Distances are ``sqrt(max(|x|^2 + |y|^2 - 2 x.y, 1e-12))``; no gradient flows where the
floor applies, and a hinge at exactly 0 still passes its gradient (mmdet's margin ranking loss).
Where several samples tie for the hardest one, the gradient is split evenly between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import checks
from .cost import Estimate, Shapes, dim, shape_of
from .errors import LossConfigError, LossInputError
from .registry import LOSSES
from .schema import OutputKind

# One forward + backward holds about this many [B, B] tensors of the inputs' dtype at its peak (the
# distances, their square before the root, the masked copies and their gradients), and 1-byte masks.
PAIRWISE_COPIES, PAIRWISE_MASK_BYTES = 9, 2


def pairwise_distances(inputs: Tensor) -> Tensor:
    """[B, D] -> [B, B] Euclidean distances from the expanded square, floored at 1e-12 before the root."""
    squares = inputs.pow(2).sum(dim=1, keepdim=True).expand(inputs.shape[0], inputs.shape[0])
    squared = torch.addmm(squares + squares.t(), inputs, inputs.t(), beta=1, alpha=-2)
    return squared.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(inputs: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Mean over anchors of the hinge between the hardest positive and the hardest negative distance."""
    dist = pairwise_distances(inputs)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    hardest_positive = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(same, float("inf")).amin(dim=1)
    return (hardest_positive - hardest_negative + margin).clamp_min(0).mean()


def check_triplet_inputs(inputs: Tensor, targets: Tensor) -> Tensor:
    """Validate; return the labels as a [B] vector."""
    checks.float_tensor("inputs", inputs)
    checks.ndim("inputs", inputs, 2, "[B, D] embeddings")
    checks.tensor("targets", targets)
    batch = inputs.shape[0]
    if targets.shape in ((batch,), (batch, 1), (1, batch)):
        labels = targets.reshape(batch)
    else:
        raise LossInputError(
            f"targets must hold one label per embedding, shape [B] = [{batch}], got {list(targets.shape)}",
            field="targets",
        )
    if batch == 0:
        raise LossInputError("inputs must hold at least one embedding, got shape [0, D]", field="inputs")
    if bool((labels == labels[0]).all()):
        raise LossInputError(
            f"targets must hold at least two different labels: every anchor needs a sample of another label, "
            f"but all {batch} share label {labels[0].item()!r}",
            field="targets",
        )
    return labels


@LOSSES.register_module()
class TripletLoss(nn.Module):
    """Triplet loss with batch-hard mining: hardest positive against hardest negative per anchor.

    Args:
        margin: the hinge's margin between the two distances (default 0.3).
        loss_weight: multiplier of the loss (default 1.0).
        hard_mining: must be True; mmdet has no other mode (default True).

    No ``weight`` or reduction: the output is always one scalar, the mean over the batch.
    """

    output_kind = OutputKind.SCALAR
    differentiable = ("inputs",)
    separable = True  # a 0-d output
    sample_axis = 1
    stateful = False
    stochastic = False

    @classmethod
    def estimate(cls, params: Mapping[str, Any], shapes: Shapes | None, itemsize: int) -> Estimate:
        """Quadratic in the batch: every anchor's distance to every sample, [B, B]."""
        shape = shape_of(shapes, "inputs")
        batch, features = dim(shape, 0), dim(shape, 1)
        pairs = batch * batch
        forward_bytes = pairs * (PAIRWISE_COPIES * itemsize + PAIRWISE_MASK_BYTES) + 4 * batch * features * itemsize
        # the distances' matrix product runs at BLAS speed: a tenth of a unit per multiply-add
        return Estimate(0, forward_bytes, 3 * pairs * features // 10 + 20 * pairs, "inputs", "inputs")

    def __init__(self, margin: float = 0.3, loss_weight: float = 1.0, hard_mining: bool = True) -> None:
        super().__init__()
        if hard_mining is not True:
            raise LossConfigError(
                "TripletLoss.hard_mining must be True: only batch-hard mining exists (mmdet raises "
                "NotImplementedError otherwise)",
                field="hard_mining",
            )
        self.margin = margin
        self.loss_weight = loss_weight
        self.hard_mining = hard_mining

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        labels = check_triplet_inputs(inputs, targets)
        return self.loss_weight * batch_hard_triplet_loss(inputs, labels, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin!r}, loss_weight={self.loss_weight!r}, hard_mining={self.hard_mining!r}"
