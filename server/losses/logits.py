"""Binary cross-entropy of logits in closed form, for kernels that keep its intermediates.

``BCE(x, t) = (1 - t) x - log sigmoid(x)`` is what ``F.binary_cross_entropy_with_logits`` computes
(without ``pos_weight``), so these forms give its values bit for bit (tests/engine/test_shared_math.py)
while handing out ``sigmoid(x)`` and ``log sigmoid(x)`` for a derivative to reuse. The losses' modules
call ``binary_cross_entropy_with_logits`` itself: its backward is the one autograd replays.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SigmoidParts(NamedTuple):
    prob: Tensor  # sigmoid(x)
    log_sigmoid: Tensor  # log sigmoid(x)
    bce_negative: Tensor  # BCE(x, 0) = x - log sigmoid(x)


def sigmoid_parts(logits: Tensor) -> SigmoidParts:
    """``sigmoid``, ``log sigmoid`` and the BCE of a zero target, element-wise."""
    log_sigmoid = F.logsigmoid(logits)
    return SigmoidParts(torch.sigmoid(logits), log_sigmoid, logits - log_sigmoid)


def bce_positive(log_sigmoid: Tensor) -> Tensor:
    """BCE of a target of 1: ``-log sigmoid(x)``."""
    return -log_sigmoid


def bce_soft(logits: Tensor, target: Tensor, log_sigmoid: Tensor) -> Tensor:
    """BCE of a soft target ``t``: ``(1 - t) x - log sigmoid(x)``."""
    return (1 - target) * logits - log_sigmoid
