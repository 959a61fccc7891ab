"""L1Loss's and SmoothL1Loss's fused kernel: the element-wise regression loss and its gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..smooth_l1 import L1Loss, SmoothL1Loss, l1_loss, smooth_l1_loss
from . import Fused, FusedKernel, broadcasts, finite, plain_reducer, register, same_float_dtype, unshortcut_reducer

NO_REDUCTION = 0  # aten's Reduction::None: the backward of an element-wise loss


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """L1/SmoothL1 with target of pred's shape and dtype, weight broadcastable to pred in its dtype
    and not taking mmdet's zero-weight shortcut (which answers ``(pred * weight).sum()``)."""
    pred, target, weight = kwargs.get("pred"), kwargs.get("target"), kwargs.get("weight")
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or target.shape != pred.shape:
        return False
    if not same_float_dtype(pred, target, weight):
        return False
    if unshortcut_reducer(module, kwargs) is None:
        return False
    return broadcasts(weight, pred.shape) and finite(pred, target, weight)


def run(module: L1Loss | SmoothL1Loss, kwargs: Mapping[str, Any]) -> Fused:
    r"""L1 / Smooth L1 and the gradient with respect to ``pred``, element-wise.

    With ``d = pred - target`` and ``s = weight * loss_weight * reduction scale * upstream``: L1 is
    ``|d|``, its gradient ``sign(d) s`` (0 at 0, as ``abs``'s backward). Smooth L1 is ``0.5 d^2 / beta``
    for ``|d| < beta`` else ``|d| - 0.5 beta``, its gradient ``d s / beta`` inside and ``sign(d) s``
    outside: torch's own ``smooth_l1_loss_backward`` kernel computes it in one pass from ``s``, as
    autograd's backward of the module does. Output: the module's (pred's shape for 'none', else 0-d).
    """
    pred, target, weight = kwargs["pred"], kwargs["target"], kwargs.get("weight")
    p, t = pred.detach(), target.detach()
    smooth = isinstance(module, SmoothL1Loss)
    diff = None if smooth else p - t
    loss = smooth_l1_loss(p, t, module.beta) if smooth else l1_loss(diff)
    reducer = plain_reducer(module, kwargs)
    value = module.finish(loss, weight, reducer.mode, reducer.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        scale = reducer.gradient_scale(module.loss_weight, weight, upstream, loss).expand(loss.shape)
        if smooth:  # the out= form: the plain one zero-fills its result first
            grad = torch.empty_like(p)
            return torch.ops.aten.smooth_l1_loss_backward.grad_input(
                scale, p, t, NO_REDUCTION, module.beta, grad_input=grad
            )
        return diff.sign_().mul_(scale)

    return Fused(value, gradient)


register(L1Loss, FusedKernel("L1Loss", supports, run))
register(SmoothL1Loss, FusedKernel("SmoothL1Loss", supports, run))
