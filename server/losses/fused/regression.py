"""L1Loss's and SmoothL1Loss's fused kernel: the element-wise regression loss and its gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..smooth_l1 import L1Loss, SmoothL1Loss, l1_loss, smooth_l1_loss
from . import Fused, FusedKernel, broadcasts, finite, plain_reducer, register, same_float_dtype


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """L1/SmoothL1 with target of pred's shape and dtype, weight broadcastable to pred in its dtype
    and not taking mmdet's zero-weight shortcut (which answers ``(pred * weight).sum()``)."""
    pred, target, weight = kwargs.get("pred"), kwargs.get("target"), kwargs.get("weight")
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or target.shape != pred.shape:
        return False
    if not same_float_dtype(pred, target, weight):
        return False
    reducer = plain_reducer(module, kwargs)
    if reducer is None or module.takes_shortcut(reducer.mode, weight):
        return False
    return broadcasts(weight, pred.shape) and finite(pred, target, weight)


def run(module: L1Loss | SmoothL1Loss, kwargs: Mapping[str, Any]) -> Fused:
    r"""L1 / Smooth L1 and the gradient with respect to ``pred``, element-wise.

    With ``d = pred - target``: L1 is ``|d|``, ``dL/dd = sign(d)`` (0 at 0, as ``abs``'s backward).
    Smooth L1 is ``0.5 d^2 / beta`` for ``|d| < beta`` else ``|d| - 0.5 beta``, so
    ``dL/dd = d / beta`` inside and ``sign(d)`` outside, i.e. ``clamp(d / beta, -1, 1)``: for
    ``|d| >= beta`` the rounded ``d / beta`` is already ``>= 1`` in magnitude.

    The gradient is ``dL/dd * weight * loss_weight * reduction scale * upstream``.
    Output: the module's (pred's shape for 'none', else 0-d).
    """
    pred, target, weight = kwargs["pred"], kwargs["target"], kwargs.get("weight")
    diff = pred.detach() - target.detach()
    if isinstance(module, SmoothL1Loss):
        loss = smooth_l1_loss(diff, module.beta)
        grad = diff.div_(module.beta).clamp_(-1, 1)
    else:
        loss = l1_loss(diff)
        grad = diff.sign_()
    reducer = plain_reducer(module, kwargs)
    value = module.finish(loss, weight, reducer.mode, reducer.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        return grad.mul_(reducer.gradient_scale(module.loss_weight, weight, upstream, loss))

    return Fused(value, gradient)


register(L1Loss, FusedKernel("L1Loss", supports, run))
register(SmoothL1Loss, FusedKernel("SmoothL1Loss", supports, run))
