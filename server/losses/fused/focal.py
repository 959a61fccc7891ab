"""FocalLoss's fused kernel: the sigmoid focal loss of class-index targets and its gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LossError
from ..focal import FocalLoss, focal_factor, reshape_focal_weight
from ..logits import SigmoidParts, bce_positive, sigmoid_parts
from . import (
    Fused,
    FusedKernel,
    finite,
    negatives_gradient,
    plain_reducer,
    pow_grad,
    register,
    row_blocks,
    same_float_dtype,
    supported_exponent,
)


def focal_labels(module: nn.Module, kwargs: Mapping[str, Any], check_range: bool = True) -> Tensor | None:
    """The [N] int64 labels, or None where the kernel does not apply. ``check_range=False`` (the run,
    after ``supports`` said yes) skips the range check's reduction and host sync."""
    pred, target = kwargs.get("pred"), kwargs.get("target")
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.dim() != 2:
        return None
    if target.dim() != 1 or target.shape[0] != pred.shape[0]:
        return None
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        return None
    labels = target.long()
    if check_range and labels.numel():
        low, high = torch.aminmax(labels)  # one pass and one sync instead of min() and max()
        if int(low) < 0 or int(high) > pred.shape[1]:
            return None  # the module's LossInputError, from autograd's path
    return labels


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """Sigmoid FocalLoss on logits with [N] class-index targets (C = background), weight [N], [N, C]
    or [N * C] in pred's dtype, ``gamma`` 0 or >= 1."""
    if module.activated or not supported_exponent(module.gamma):
        return False
    pred, weight = kwargs.get("pred"), kwargs.get("weight")
    if focal_labels(module, kwargs) is None or not same_float_dtype(pred, weight):
        return False
    if weight is not None:
        try:
            reshape_focal_weight(weight, torch.empty(pred.shape, device="meta"))
        except LossError:
            return False
    return plain_reducer(module, kwargs) is not None and finite(pred, weight)


class _Negatives:
    """Every entry taken as a negative (t = 0): the sigmoid parts and the focal factor ``(1 - alpha) p^gamma``."""

    def __init__(self, logits: Tensor, gamma: float, alpha: float) -> None:
        self.parts: SigmoidParts = sigmoid_parts(logits)
        self.factor = focal_factor(self.parts.prob, 1 - alpha, gamma)

    def loss(self, out: Tensor | None = None) -> Tensor:
        return torch.mul(self.parts.bce_negative, self.factor, out=out)


def run(module: FocalLoss, kwargs: Mapping[str, Any]) -> Fused:
    r"""Sigmoid focal loss and its gradient with respect to the logits ``x`` [N, C].

    With ``p = sigmoid(x)``, ``t`` the one-hot target, ``a_t = alpha t + (1 - alpha)(1 - t)`` and
    ``q = 1 - p_t = p (1 - t) + (1 - p) t``, the element-wise loss is
    ``L = a_t q^gamma BCE(x, t)``.

    Derivative. ``d BCE/dx = p - t``; ``dq/dx = (1 - 2t) p (1 - p)``. So
    ``dL/dx = a_t [(p - t) q^gamma + gamma BCE q^(gamma-1) (1 - 2t) p (1 - p)]``.

    * negatives (``t = 0``, every column but the label's): ``q = p``, ``BCE = x - log sigmoid(x)``,
      ``dL/dx = (1 - alpha) p^gamma [p + gamma BCE (1 - p)]``;
    * positives (``t = 1``, one entry per foreground row): ``q = 1 - p``,
      ``BCE = -log sigmoid(x)``, ``dL/dx = alpha [(p - 1) q^gamma - gamma BCE q^(gamma-1) p (1 - p)]``.

    The whole [N, C] block is computed as negatives (no one-hot tensor is built), then the <= N
    positive entries are recomputed on a gathered [P] vector and written back. ``gamma`` is 0 or
    >= 1, so ``q^(gamma-1)`` is finite at ``q = 0``; ``gamma = 0`` drops the focal term's derivative
    as ``pow``'s backward does.

    Output: the module's (``[N, C]`` for 'none', else 0-d). The gradient is
    ``dL/dx * weight * loss_weight * reduction scale * upstream``, the weight broadcast as mmdet's
    rule shapes it ([N] -> [N, 1], [N * C] -> [N, C]).
    """
    pred, weight = kwargs["pred"], kwargs.get("weight")
    labels = focal_labels(module, kwargs, check_range=False)
    gamma, alpha = float(module.gamma), float(module.alpha)
    x = pred.detach()
    num_classes = x.shape[1]
    blocks = row_blocks(x.shape[0], num_classes, x.device)

    # the positive entry of each foreground row (t = 1: q = 1 - p, a_t = alpha, BCE = -log sigmoid(x));
    # sigmoid and log-sigmoid are read from the [rows, C] results, not recomputed on the gathered
    # vector: torch's vectorised and scalar transcendental paths can differ in the last bit
    rows = torch.nonzero(labels < num_classes).squeeze(1)
    cols = labels[rows]
    if len(blocks) == 1:
        whole = _Negatives(x, gamma, alpha)
        loss = whole.loss()
        p, bce_p = whole.parts.prob[rows, cols], bce_positive(whole.parts.log_sigmoid[rows, cols])
    else:  # block by block: only the loss is kept whole; the gradient recomputes each block's parts
        loss = torch.empty_like(x)
        p_parts, bce_parts = [], []
        for block in blocks:
            negatives = _Negatives(x[block], gamma, alpha)
            negatives.loss(out=loss[block])
            block_rows = torch.nonzero(labels[block] < num_classes).squeeze(1)
            block_cols = labels[block][block_rows]
            p_parts.append(negatives.parts.prob[block_rows, block_cols])
            bce_parts.append(bce_positive(negatives.parts.log_sigmoid[block_rows, block_cols]))
        p, bce_p = torch.cat(p_parts), torch.cat(bce_parts)
    q = 1 - p
    focal_p = focal_factor(q, alpha, gamma)
    loss[rows, cols] = bce_p * focal_p

    if weight is not None:
        weight = reshape_focal_weight(weight, loss)
    reducer = plain_reducer(module, kwargs)
    value = module.finish(loss, weight, reducer.mode, reducer.avg_factor)

    def block_gradient(negatives: _Negatives, g: Tensor, out: Tensor | None) -> Tensor:
        # g: d(output)/d(L); a_t = 1 - alpha at the negatives
        parts = negatives.parts
        return negatives_gradient(negatives.factor, parts.prob, parts.bce_negative, g, gamma, 1 - alpha, out)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        g = reducer.gradient_scale(module.loss_weight, weight, upstream, loss)
        if len(blocks) == 1:
            grad = block_gradient(whole, g, out)
        else:
            grad = torch.empty_like(x) if out is None else out
            for block in blocks:
                g_block = g if g.dim() == 0 else g.expand(loss.shape)[block]
                block_gradient(_Negatives(x[block], gamma, alpha), g_block, grad[block])
        # an unweighted mean or sum has one factor for every element: no gather for the positives
        g_p = g.expand(rows.shape) if g.dim() == 0 else g.expand(loss.shape)[rows, cols]
        grad_p = (p - 1) * (focal_p * g_p)
        if gamma != 0:
            grad_p = grad_p + (-((g_p * bce_p) * alpha * pow_grad(q, gamma))) * (1 - p) * p
        grad[rows, cols] = grad_p
        return grad

    return Fused(value, gradient)


register(FocalLoss, FusedKernel("FocalLoss", supports, run, writes_into=True))
