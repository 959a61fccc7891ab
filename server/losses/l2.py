"""L2 losses on similarity scores with margins and negative mining (MMDetection's ``L2Loss``, ``MarginL2Loss``).

The auxiliary similarity loss of quasi-dense tracking: Pang et al. 2021, Quasi-Dense Similarity
Learning for Multiple Object Tracking, https://arxiv.org/abs/2006.06664.

Shapes: ``pred`` [N, M] similarity scores, learned towards [0, 1]; ``target`` of pred's shape, 1 for a
positive pair, 0 for a negative pair, any other value (e.g. -1) for neither; ``weight`` of target's
shape. Any shape works while no negative mining runs; mining needs 2-D inputs. Output per element
for ``reduction='none'``.

The steps, MMDetection 3.3's, for both:

1. An entry whose ``weight <= 0`` is ignored: its target becomes -1, neither positive nor negative
   (it stays in the loss with its weight).
2. ``pred`` drops by ``pos_margin`` at positives and by ``neg_margin`` at negatives, each only when
   > 0, and is then clamped to [0, 1] -- always, margins or not. The gradient is zero where the clamp
   bites.
3. Mining: when ``neg_pos_ub > 0`` and the negatives outnumber ``neg_pos_ub`` times the positives,
   only ``neg_pos_ub * positives`` negatives keep their weight -- the costliest (``hard_mining``) or a
   random subset -- and the other negatives get weight 0. Without positives every negative drops.
4. ``loss = (pred' - target')^2 * weight'``. The reduction's ``avg_factor`` is always the number of
   entries whose final weight is > 0: a caller's ``avg_factor`` is ignored, and ``reduction='sum'``
   is refused (mmdet raises there too, as it can not combine ``sum`` with an ``avg_factor``).

Random mining draws from NumPy's global legacy generator (``np.random``), as mmdet does: a permutation
of the negatives (row-major order) whose first ``neg_pos_ub * positives`` entries are kept. After
``np.random.seed(s)`` the kept negatives are exactly mmdet's. A module's ``rng`` attribute, when set
(``loss.rng = np.random.RandomState(s)``), is drawn from instead of the global generator; it picks what
``np.random.seed(s)`` would. Hard mining is deterministic (``torch.topk`` over the costs).

mmdet also writes into the caller's ``pred`` (margins), ``target`` and ``weight``; losswire never
modifies its inputs.

``MarginL2Loss`` differs in one step, as mmdet's does: the loss is taken against float32 copies of
``target`` and ``weight``, so with float64 inputs their values are rounded to float32 first (the
target's gradient too).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import checks
from .errors import LossConfigError, LossInputError
from .pipeline import AvgFactor, Reduction, ReductionOverride, WeightedLoss
from .registry import LOSSES


def squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """``(pred - target)^2``, element-wise."""
    return (pred - target).square()


def check_similarity_inputs(pred: Tensor, target: Tensor, weight: Tensor | None) -> None:
    checks.float_tensor("pred", pred)
    checks.tensor("target", target)
    if target.dtype == torch.bool or target.is_complex():
        raise LossInputError(
            f"target must hold numbers (1 positive, 0 negative, others neither), got {checks.describe(target)}",
            field="target",
        )
    checks.same_shape("target", target, "pred", pred)
    if weight is not None:
        checks.tensor("weight", weight)
        checks.same_shape("weight", weight, "target", target)


class MinedSquaredLoss(WeightedLoss):
    """The margin, clamp and mining steps shared by ``L2Loss`` and ``MarginL2Loss``."""

    # MarginL2Loss computes its loss against float32 copies of target and weight.
    float32_terms = False
    # None: draw random negatives from NumPy's global generator, as mmdet does. The server seeds it
    # from the request's seed, so remote mining is reproducible.
    rng: np.random.RandomState | None = None
    stochastic = True
    working_copies = 16.0
    work_per_element = 110

    def __init__(
        self,
        neg_pos_ub: int = -1,
        pos_margin: float = -1.0,
        neg_margin: float = -1.0,
        hard_mining: bool = False,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.neg_pos_ub = neg_pos_ub
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.hard_mining = hard_mining

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        check_similarity_inputs(pred, target, weight)
        pred, target, weight = self.mine(pred, target, weight)
        if reduction == "sum":
            field = "reduction_override" if reduction_override else "reduction"
            error = LossInputError if reduction_override else LossConfigError
            raise error(
                f"{type(self).__name__} can not reduce with 'sum': its mean always divides by the number of "
                "positive weights (mmdet passes that count as avg_factor, which 'sum' refuses); use 'mean' or 'none'",
                field=field,
            )
        if self.float32_terms:
            target, weight = target.float(), weight.float()
        positive_weights = (weight > 0).sum()
        return self.finish(squared_error(pred, target), weight, reduction, positive_weights)

    def mine(self, pred: Tensor, target: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-3: (shifted and clamped pred, target with -1 where ignored, mined weight)."""
        if weight is None:
            weight = torch.ones_like(target)
        target = torch.where(weight <= 0, -1, target)
        positive, negative = target == 1, target == 0
        if self.pos_margin > 0:
            pred = torch.where(positive, pred - self.pos_margin, pred)
        if self.neg_margin > 0:
            pred = torch.where(negative, pred - self.neg_margin, pred)
        pred = pred.clamp(min=0, max=1)

        num_pos, num_neg = int(positive.sum()), int(negative.sum())
        if self.neg_pos_ub > 0 and num_neg / (num_pos + 1e-6) > self.neg_pos_ub:
            if target.dim() != 2:
                raise LossInputError(
                    f"negative mining (neg_pos_ub={self.neg_pos_ub}, here {num_neg} negatives for {num_pos} "
                    f"positives) needs 2-D [N, M] pred and target, got shape {list(target.shape)}",
                    field="target",
                )
            kept = self.kept_negatives(pred, target, negative, num_pos * self.neg_pos_ub)
            weight = torch.where(negative & ~kept, 0, weight)
        return pred, target, weight

    def kept_negatives(self, pred: Tensor, target: Tensor, negative: Tensor, count: int) -> Tensor:
        """A mask of the ``count`` negatives that keep their weight."""
        candidates = negative.flatten().nonzero().squeeze(1)  # row-major, as torch.nonzero lists them
        if self.hard_mining:
            if self.float32_terms:
                target = target.float()
            cost = squared_error(pred, target).detach().flatten()[candidates]
            chosen = candidates[cost.topk(count).indices]
        else:
            rng = np.random if self.rng is None else self.rng
            order = torch.from_numpy(rng.permutation(candidates.numel())[:count]).to(candidates.device)
            chosen = candidates[order]
        kept = torch.zeros(negative.numel(), dtype=torch.bool, device=negative.device)
        kept[chosen] = True
        return kept.view(negative.shape)


@LOSSES.register_module()
class L2Loss(MinedSquaredLoss):
    """L2 loss on [0, 1]-clamped similarity scores, with margins and negative mining.

    Args:
        neg_pos_ub: at most this many negatives per positive keep their weight; <= 0 keeps all
            (default -1).
        pos_margin: subtracted from pred at positives when > 0 (default -1).
        neg_margin: subtracted from pred at negatives when > 0 (default -1).
        hard_mining: keep the negatives with the largest loss instead of random ones (default False).
        reduction: "none" or "mean" (default); "sum" is refused, as in mmdet.
        loss_weight: multiplier of the reduced loss (default 1.0).

    ``avg_factor`` is accepted and ignored: the mean always divides by the number of entries whose
    weight is > 0 after mining. Random mining draws from ``np.random`` (see the module notes).
    """

    differentiable = ("pred", "target")


@LOSSES.register_module()
class MarginL2Loss(MinedSquaredLoss):
    """L2 loss on [0, 1]-clamped similarity scores with margins and negative mining; float32 targets.

    Args:
        neg_pos_ub: at most this many negatives per positive keep their weight; <= 0 keeps all
            (default -1).
        pos_margin: subtracted from pred at positives when > 0 (default -1).
        neg_margin: subtracted from pred at negatives when > 0 (default -1).
        hard_mining: keep the negatives with the largest loss instead of random ones (default False).
        reduction: "none" or "mean" (default); "sum" is refused, as in mmdet.
        loss_weight: multiplier of the reduced loss (default 1.0).

    ``avg_factor`` is accepted and ignored: the mean always divides by the number of entries whose
    weight is > 0 after mining. Random mining draws from ``np.random`` (see the module notes).
    """

    differentiable = ("pred", "target")
    float32_terms = True
