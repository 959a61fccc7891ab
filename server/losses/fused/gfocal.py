"""QualityFocalLoss's fused kernel: QFL of a ``(label, score)`` target and its gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..gfocal import QualityFocalLoss, quality_factor
from ..logits import bce_soft, sigmoid_parts
from . import (
    Fused,
    FusedKernel,
    broadcasts,
    finite,
    negatives_gradient,
    plain_reducer,
    pow_grad,
    register,
    same_float_dtype,
    supported_exponent,
)


def quality_target(kwargs: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
    """The ``(label [N] int64, score [N])`` target, or None where the kernel does not apply."""
    pred, target = kwargs.get("pred"), kwargs.get("target")
    if not isinstance(pred, Tensor) or pred.dim() != 2 or not isinstance(target, (tuple, list)) or len(target) != 2:
        return None
    label, score = target
    if not isinstance(label, Tensor) or not isinstance(score, Tensor):
        return None
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        return None
    if not score.is_floating_point() or label.shape != pred.shape[:1] or score.shape != pred.shape[:1]:
        return None
    return label.long(), score


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """QualityFocalLoss on logits with a ``(label [N], score [N])`` target, weight broadcastable to
    the per-sample loss [N] in pred's dtype, ``beta`` 0 or >= 1."""
    if module.activated or not supported_exponent(module.beta):
        return False
    pred, weight = kwargs.get("pred"), kwargs.get("weight")
    target = quality_target(kwargs)
    if target is None or not same_float_dtype(pred, weight):
        return False
    if not broadcasts(weight, pred.shape[:1]):
        return False
    return plain_reducer(module, kwargs) is not None and finite(pred, weight, target[1])


def run(module: QualityFocalLoss, kwargs: Mapping[str, Any]) -> Fused:
    r"""Quality focal loss and its gradient with respect to the logits ``x`` [N, C].

    With ``p = sigmoid(x)`` and the dense target ``y`` (the row's score at its label column, 0
    elsewhere; labels outside [0, C) make the row all negative), the per-sample loss is
    ``L_n = sum_c BCE(x_nc, y_nc) m_nc^beta`` with ``m = |y - p|`` at the positive entry and ``m = p``
    at the negatives.

    Derivative per element:

    * negatives: ``BCE = x - log sigmoid(x)``, ``d/dx = p^beta [p + beta BCE (1 - p)]`` (focal's
      negative with alpha dropped);
    * the positive entry: ``d BCE/dx = p - y``, ``dm/dx = -sign(y - p) p (1 - p)``, so
      ``d/dx = (p - y) m^beta - beta BCE m^(beta-1) sign(y - p) p (1 - p)`` (``sign(0) = 0``, as
      ``abs``'s backward).

    The gradient row n is scaled by ``weight_n * loss_weight * reduction scale * upstream_n``.
    Output: the module's ([N] for 'none', else 0-d).
    """
    pred, weight = kwargs["pred"], kwargs.get("weight")
    label, score = quality_target(kwargs)
    beta = float(module.beta)
    x = pred.detach()
    num_classes = x.shape[1]

    prob, log_sigmoid, bce = sigmoid_parts(x)
    prob_beta = quality_factor(prob, beta)
    loss = bce * prob_beta

    # positives: the soft target's BCE, the transcendentals read from the [N, C] results (see the focal
    # kernel)
    rows = torch.nonzero((label >= 0) & (label < num_classes)).squeeze(1)
    cols = label[rows]
    y = score.detach()[rows].to(x.dtype)
    p = prob[rows, cols]
    bce_p = bce_soft(x[rows, cols], y, log_sigmoid[rows, cols])
    gap = y - p
    modulator = gap.abs()
    modulator_beta = quality_factor(modulator, beta)
    loss[rows, cols] = bce_p * modulator_beta

    sample_loss = loss.sum(dim=1)
    reducer = plain_reducer(module, kwargs)
    value = module.finish(sample_loss, weight, reducer.mode, reducer.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        # as the focal kernel: the BCE path (p - y) (g m^beta) plus the modulator's
        # ((g BCE) (beta m^(beta-1)) dm/dp) (1 - p) p, in autograd's order
        g = reducer.gradient_scale(module.loss_weight, weight, upstream, sample_loss).expand(sample_loss.shape)
        g_rows = g.unsqueeze(1)  # the sum's backward: each row's factor on its C columns
        grad = negatives_gradient(prob_beta, prob, bce, g_rows, beta, None, out)  # focal's, alpha dropped
        g_p = g[rows]
        grad_p = (p - y) * (modulator_beta * g_p)
        if beta != 0:  # pow's backward is zero for a zero exponent
            grad_p = grad_p + (-((bce_p * g_p) * pow_grad(modulator, beta) * gap.sign())) * (1 - p) * p
        grad[rows, cols] = grad_p
        return grad

    return Fused(value, gradient)


register(QualityFocalLoss, FusedKernel("QualityFocalLoss", supports, run, writes_into=True))
