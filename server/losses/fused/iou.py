"""GIoULoss's fused kernel: the family's GIoU forward, and its backward in closed form."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..boxes import box_weight
from ..iou import GIoULoss, GIoUParts, giou_parts
from . import (
    ClosedForm,
    Fused,
    FusedKernel,
    answered,
    broadcasts,
    finite,
    plain_reducer,
    register,
    row_blocks,
    same_float_dtype,
    scalar,
    unshortcut_reducer,
)


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """GIoU on [..., N, 4] boxes with target of pred's shape and dtype, weight [N] (broadcastable to
    the per-box loss) or pred's shape, not taking mmdet's zero-weight shortcut; ``eps > 0``."""
    pred, target, weight = kwargs.get("pred"), kwargs.get("target"), kwargs.get("weight")
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.dim() < 2 or pred.shape[-1] != 4:
        return False
    if target.shape != pred.shape or not same_float_dtype(pred, target, weight) or not module.eps > 0:
        return False
    if unshortcut_reducer(module, kwargs) is None:
        return False
    if weight is not None and weight.dim() > 1 and weight.shape != pred.shape:
        return False
    return broadcasts(box_weight(weight, pred), pred.shape[:-1]) and finite(pred, target, weight)


def run(module: GIoULoss, kwargs: Mapping[str, Any]) -> Fused:
    r"""GIoU loss and its gradient with respect to the predicted boxes ``p`` [..., N, 4] (x1, y1, x2, y2).

    Forward: the family's ``giou_parts``, per box pair (``t`` the target; per axis, x and y side by side
    as [..., N, 2]): intersection sides ``o = clamp(min(p2, t2) - max(p1, t1), 0)``, ``I = o_x o_y``;
    union ``U = clamp(A_p + A_t - I, eps)`` with ``A_p = (p2 - p1)_x (p2 - p1)_y``; enclosing sides
    ``e = clamp(max(p2, t2) - min(p1, t1), 0)``, ``E = clamp(e_x e_y, eps)``; ``L = 1 - (I / U - (E - U) / E)``.

    Backward in closed form, written as the module's graph would propagate it:

    * ``dL/dI = -1/U``, ``dL/dU = I/U^2 - 1/E``, ``dL/dE = 1/E - (E - U)/E^2`` (= U/E^2);
    * the clamps pass the gradient where their input is >= the floor (clamp's backward);
      ``U_raw = A_p + A_t - I`` adds ``-dL/dU`` to ``dL/dI`` and gives ``dL/dA_p = dL/dU``;
    * ``dI/do_x = o_y``, ``dE/de_x = e_y`` (and y); ``dA_p/dp2_x = (p2 - p1)_y = -dA_p/dp1_x``;
    * ``min``/``max`` route the side's gradient to the coordinate that wins, half to each at a tie
      (autograd's ``maximum``/``minimum`` backward).

    So ``dL/dp2 = g_A h + g_o [p2 < t2] + g_e [p2 > t2]`` and
    ``dL/dp1 = -(g_A h + g_o [p1 > t1] + g_e [p1 < t1])`` per axis, with ``h`` the other axis's side
    of ``p``, ``g_o = dL/dI o_other``, ``g_e = dL/dE e_other`` (ties weighted 1/2).

    Each box's gradient is scaled by ``weight * loss_weight * reduction scale * upstream`` (an
    [N, 4] weight is averaged over the coordinates first, as mmdet does). Output: the module's
    ([..., N] for 'none', else 0-d).
    """
    pred, target, weight = kwargs["pred"], kwargs["target"], kwargs.get("weight")
    eps = float(module.eps)
    p, t = pred.detach(), target.detach()
    blocks = row_blocks(p[..., 0].numel(), 4, p.device)
    if len(blocks) == 1:
        parts = giou_parts(p, t, eps)
        loss = parts.loss
    else:  # block by block over the boxes: only the loss is kept whole; the gradient recomputes
        p, t = p.reshape(-1, 4), t.reshape(-1, 4)
        loss = torch.empty(p.shape[0], dtype=p.dtype, device=p.device)
        for block in blocks:
            loss[block] = giou_parts(p[block], t[block], eps).loss
        loss = loss.view(pred.shape[:-1])

    weight = box_weight(weight, pred)
    reducer = plain_reducer(module, kwargs)
    value = module.finish(loss, weight, reducer.mode, reducer.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        grad_giou = -reducer.gradient_scale(module.loss_weight, weight, upstream, loss).expand(loss.shape)
        if len(blocks) == 1:
            return _backward(p, t, eps, parts, grad_giou, out)
        grad = torch.empty_like(p) if out is None else out.view(-1, 4)
        grad_giou = grad_giou.reshape(-1)
        for block in blocks:
            pb, tb = p[block], t[block]
            _backward(pb, tb, eps, giou_parts(pb, tb, eps), grad_giou[block], grad[block])
        return grad.view(pred.shape) if out is None else out

    return Fused(value, gradient)


def _routed(grad: Tensor, a: Tensor, b: Tensor, minimum: bool) -> Tensor:
    """The share of ``grad`` (the gradient of ``min(a, b)`` or ``max(a, b)``) that reaches ``a``, as
    autograd's ``minimum``/``maximum`` backward routes it: all where ``a`` wins, half at a tie."""
    loses = a > b if minimum else a < b
    return torch.where(a == b, grad / 2, grad).masked_fill_(loses, 0)


def _backward(
    p: Tensor, t: Tensor, eps: float | Tensor, parts: GIoUParts, grad_giou: Tensor, out: Tensor | None
) -> Tensor:
    """d(output)/d(p) from ``grad_giou`` = -d(output)/d(L) of each box (see run)."""
    p1, p2, t1, t2 = p[..., :2], p[..., 2:], t[..., :2], t[..., 2:]
    overlap, union, enclose = parts.overlap, parts.union, parts.enclose
    # Each backward step below is the module graph's, in its order (see run), so the rounding is
    # autograd's bit for bit: chaotic training loops (examples/toy_training.py) amplify even one-ulp
    # differences in the box gradient.
    grad_overlap = grad_giou / union
    grad_union = -grad_giou * ((overlap / union) / union)
    grad_num = -grad_giou / enclose
    grad_enclose = (grad_giou * (((enclose - union) / enclose) / enclose)).add_(grad_num)
    grad_union = (grad_union - grad_num).masked_fill_(parts.union_raw < eps, 0)
    grad_enclose = grad_enclose.masked_fill_(parts.enclose_raw < eps, 0)
    grad_overlap = grad_overlap - grad_union
    # per axis [..., N, 2]: d L / d (side) is d L / d (area) times the other axis's side
    grad_o = (grad_overlap.unsqueeze(-1) * parts.overlap_wh.flip(-1)).masked_fill_(parts.overlap_raw < 0, 0)
    grad_e = (grad_enclose.unsqueeze(-1) * parts.enclose_wh.flip(-1)).masked_fill_(parts.enclose_raw_wh < 0, 0)
    grad_area = grad_union.unsqueeze(-1) * (p2 - p1).flip(-1)  # d A_p / d p2 = the other axis's side
    grad_p2 = _routed(grad_o, p2, t2, minimum=True) + _routed(grad_e, p2, t2, minimum=False) + grad_area
    grad_p1 = _routed(-grad_o, p1, t1, minimum=False) + _routed(-grad_e, p1, t1, minimum=True) - grad_area
    if out is None:
        return torch.cat([grad_p1, grad_p2], dim=-1)
    return torch.cat([grad_p1, grad_p2], dim=-1, out=out)


def closed_form(pred: Tensor, target: Tensor, eps: Tensor, box_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``run``'s loss per box [..., N] and its gradient times ``box_scale`` (per box, or 0-d) as one
    function (``ClosedForm``): the family's forward and ``_backward``, traced into one pass."""
    parts = giou_parts(pred, target, eps)
    return parts.loss, _backward(pred, target, eps, parts, -box_scale.expand(parts.loss.shape), None)


def bind(module: GIoULoss, kwargs: Mapping[str, Any], function: Callable[..., tuple[Tensor, Tensor]]) -> Fused:
    pred, target = kwargs["pred"].detach(), kwargs["target"].detach()
    weight = box_weight(kwargs.get("weight"), pred)
    reducer = plain_reducer(module, kwargs)
    box_scale = reducer.gradient_scale(module.loss_weight, weight, None, pred[..., 0])  # the loss's shape
    loss, grad = function(pred, target, scalar(module.eps, pred), box_scale)
    return answered(module.finish(loss, weight, reducer.mode, reducer.avg_factor), grad)


register(GIoULoss, FusedKernel("GIoULoss", supports, run, writes_into=True, one_pass=ClosedForm(closed_form, bind)))
