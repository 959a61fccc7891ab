"""L2 loss with margins on similarity scores (MMDetection's ``MarginL2Loss``).

The similarity loss of quasi-dense tracking: Pang et al. 2021, Quasi-Dense Similarity Learning for
Multiple Object Tracking, https://arxiv.org/abs/2006.06664.

Shapes: ``pred`` [N, M] similarity scores; ``target`` of pred's shape, 1 positive, 0 negative, other
values neither; ``weight`` of target's shape. 2-D whenever negative mining runs. Output per element
for ``reduction='none'``.

The same steps as ``L2Loss`` (``l2.py``: ignored entries, margins, the [0, 1] clamp, hard or random
negative mining from ``np.random``, the mean over positive weights, ``sum`` refused). The one
difference, mmdet's: the loss is taken against float32 copies of ``target`` and ``weight``, so with
float64 inputs their values are rounded to float32 first (the target's gradient too).
"""

from __future__ import annotations

from .l2 import MinedSquaredLoss
from .registry import LOSSES


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
    weight is > 0 after mining. Random mining draws from ``np.random`` (see ``l2.py``).
    """

    differentiable = ("pred", "target")
    float32_terms = True
