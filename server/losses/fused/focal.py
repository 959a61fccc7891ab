"""FocalLoss's fused kernel: the sigmoid focal loss of class-index targets and its gradient."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import LossError
from ..focal import FocalLoss, focal_factor, reshape_focal_weight
from ..logits import SigmoidParts, bce_positive, sigmoid_parts
from ..pipeline import Reducer
from . import (
    EXACT_POWERS,
    ClosedForm,
    Fused,
    FusedKernel,
    HandWritten,
    RowBlocks,
    Scratch,
    answered,
    bce_of_logits,
    finite,
    negatives_gradient,
    one_hot,
    plain_reducer,
    pow_grad,
    register,
    rows_of,
    same_float_dtype,
    scalar,
    supported_exponent,
    tensor_pow_grad,
)


def focal_labels(module: nn.Module, kwargs: Mapping[str, Any], check_range: bool = True) -> Tensor | None:
    """The [N] integer labels (as sent: ``long()`` per block), or None where the kernel does not apply.
    ``check_range=False`` (the run, after ``supports`` said yes; or rows that have not arrived yet) skips
    the range check's reduction and host sync."""
    pred, target = kwargs.get("pred"), kwargs.get("target")
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.dim() != 2:
        return None
    if target.dim() != 1 or target.shape[0] != pred.shape[0]:
        return None
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        return None
    if check_range and not labels_in_range(target, pred.shape[1]):
        return None  # the module's LossInputError, from autograd's path
    return target


def labels_in_range(labels: Tensor, num_classes: int) -> bool:
    """Every label in [0, C] (C: background)."""
    if not labels.numel():
        return True
    low, high = torch.aminmax(labels)  # one pass and one sync instead of min() and max()
    return int(low) >= 0 and int(high) <= num_classes


def covers(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """What ``supports`` asks of everything but the values: sigmoid FocalLoss on logits with [N]
    class-index targets (C = background), weight [N], [N, C] or [N * C] in pred's dtype, ``gamma`` 0 or
    >= 1, a reduction the module takes."""
    if module.activated or not supported_exponent(module.gamma):
        return False
    pred, weight = kwargs.get("pred"), kwargs.get("weight")
    if focal_labels(module, kwargs, check_range=False) is None or not same_float_dtype(pred, weight):
        return False
    if weight is not None:
        try:
            reshape_focal_weight(weight, torch.empty(pred.shape, device="meta"))
        except LossError:
            return False
    return plain_reducer(module, kwargs) is not None


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """``covers``, with labels in [0, C] and pred and weight finite."""
    if not covers(module, kwargs):
        return False
    pred, target = kwargs["pred"], kwargs["target"]
    return labels_in_range(target, pred.shape[1]) and finite(pred, kwargs.get("weight"))


class _Negatives:
    """Every entry taken as a negative (t = 0): the sigmoid parts and the focal factor ``(1 - alpha) p^gamma``."""

    def __init__(self, logits: Tensor, gamma: float, alpha: float) -> None:
        self.parts: SigmoidParts = sigmoid_parts(logits)
        self.factor = focal_factor(self.parts.prob, 1 - alpha, gamma)

    def loss(self, out: Tensor | None = None) -> Tensor:
        return torch.mul(self.parts.bce_negative, self.factor, out=out)


class FocalRows(RowBlocks):
    r"""Sigmoid focal loss and its gradient with respect to the logits ``x`` [N, C], block of rows by
    block of rows (a ``RowKernel``).

    With ``p = sigmoid(x)``, ``t`` the one-hot target, ``a_t = alpha t + (1 - alpha)(1 - t)`` and
    ``q = 1 - p_t = p (1 - t) + (1 - p) t``, the element-wise loss is
    ``L = a_t q^gamma BCE(x, t)``.

    Derivative. ``d BCE/dx = p - t``; ``dq/dx = (1 - 2t) p (1 - p)``. So
    ``dL/dx = a_t [(p - t) q^gamma + gamma BCE q^(gamma-1) (1 - 2t) p (1 - p)]``.

    * negatives (``t = 0``, every column but the label's): ``q = p``, ``BCE = x - log sigmoid(x)``,
      ``dL/dx = (1 - alpha) p^gamma [p + gamma BCE (1 - p)]``;
    * positives (``t = 1``, one entry per foreground row): ``q = 1 - p``,
      ``BCE = -log sigmoid(x)``, ``dL/dx = alpha [(p - 1) q^gamma - gamma BCE q^(gamma-1) p (1 - p)]``.

    Each block of rows (``row_blocks``) is computed as negatives (no one-hot tensor is built), then its
    positive entries are recomputed on a gathered vector and written back. ``gamma`` is 0 or >= 1, so
    ``q^(gamma-1)`` is finite at ``q = 0``; ``gamma = 0`` drops the focal term's derivative as
    ``pow``'s backward does.

    Output: the module's (``[N, C]`` for 'none', else 0-d), from the whole element-wise loss once every
    block is in. The gradient is ``dL/dx * weight * loss_weight * reduction scale * upstream``, the
    weight broadcast as mmdet's rule shapes it ([N] -> [N, 1], [N * C] -> [N, C]). ``eager``: the
    gradient of an upstream of ones is computed with each block, into ``out`` when given (its rows final
    as ``advance`` says); else by ``Fused.gradient`` afterwards, for any upstream.

    ``checked``: ``supports`` has seen every value; else each block's labels and finiteness are checked
    as it comes, and ``NotFusable`` ends the kernel at the first that fails.
    """

    name = "FocalLoss"

    def __init__(
        self,
        module: FocalLoss,
        kwargs: Mapping[str, Any],
        out: Tensor | None,
        checked: bool,
        scratch: Scratch | None = None,
        eager: bool = True,
    ) -> None:
        super().__init__(module, kwargs, out, checked, eager)
        self.target = kwargs["target"]
        self.gamma, self.alpha = float(module.gamma), float(module.alpha)
        # the element-wise loss, whole (the module's reduction reads it at the end)
        self.loss = None if self.one and scratch is None else self.whole_tensor(scratch)
        weight = kwargs.get("weight")
        self.weight = None if weight is None else reshape_focal_weight(weight, self.x)  # the loss's shape
        if eager:  # d(output)/d(L) of an upstream of ones, without the weight (0-d)
            self.scale = self.reducer.gradient_scale(module.loss_weight, None, None, self.x)

    def whole_tensor(self, scratch: Scratch | None) -> Tensor:
        return torch.empty_like(self.x) if scratch is None else scratch(self.x.shape, self.x.dtype)

    def compute_block(self, block: slice) -> None:
        x, weight = rows_of(self.x, block), None if self.weight is None else rows_of(self.weight, block)
        if not self.checked and not (labels_in_range(rows_of(self.target, block), x.shape[1]) and finite(x, weight)):
            raise self.not_covered(block)
        negatives = _Negatives(x, self.gamma, self.alpha)
        loss = negatives.loss(out=None if self.loss is None else rows_of(self.loss, block))
        self.loss = loss if self.loss is None else self.loss
        positives = self.positives(block, negatives)
        loss[positives.rows, positives.cols] = positives.bce * positives.focal
        if self.eager:
            g = self.scale if weight is None else self.scale * weight
            self.keep(self.block_gradient(negatives, positives, g, self.gradient_rows(block)))

    def positives(self, block: slice, negatives: _Negatives) -> _Positives:
        # the positive entry of each foreground row (t = 1: q = 1 - p, a_t = alpha, BCE = -log sigmoid(x));
        # sigmoid and log-sigmoid are read from the block's results, not recomputed on the gathered
        # vector: torch's vectorised and scalar transcendental paths can differ in the last bit
        labels = rows_of(self.target, block).long()
        rows = torch.nonzero(labels < self.x.shape[1]).squeeze(1)
        cols = labels[rows]
        p = negatives.parts.prob[rows, cols]
        q = 1 - p
        bce = bce_positive(negatives.parts.log_sigmoid[rows, cols])
        if self.gamma in EXACT_POWERS:
            focal = focal_factor(q, self.alpha, self.gamma)
        else:  # q^gamma where autograd takes it, in the [rows, C] tensor: see EXACT_POWERS
            focal = self.alpha * (1 - negatives.parts.prob).pow(self.gamma)[rows, cols]
        return _Positives(rows, cols, p, q, bce, focal)

    def block_gradient(self, negatives: _Negatives, positives: _Positives, g: Tensor, out: Tensor | None) -> Tensor:
        """A block's gradient, into ``out`` when given: ``g`` is d(output)/d(L) there (0-d, or
        broadcasting to it)."""
        gamma, alpha, parts = self.gamma, self.alpha, negatives.parts
        grad = negatives_gradient(negatives.factor, parts.prob, parts.bce_negative, g, gamma, 1 - alpha, out)
        p, q, bce = positives.p, positives.q, positives.bce
        # an unweighted mean or sum has one factor for every element: no gather for the positives
        g_p = g.expand(positives.rows.shape) if g.dim() == 0 else g.expand(grad.shape)[positives.rows, positives.cols]
        grad_p = (p - 1) * (positives.focal * g_p)
        if gamma != 0:
            grad_p = grad_p + (-((g_p * bce) * alpha * pow_grad(q, gamma))) * (1 - p) * p
        grad[positives.rows, positives.cols] = grad_p
        return grad

    def value(self) -> Tensor:
        return self.module.finish(self.loss, self.weight, self.reducer.mode, self.reducer.avg_factor)

    def recompute(self, upstream: Tensor | None, out: Tensor | None) -> Tensor:
        g = self.reducer.gradient_scale(self.module.loss_weight, self.weight, upstream, self.loss)
        grad = torch.empty_like(self.x) if out is None else out
        for block in self.blocks:
            negatives = _Negatives(rows_of(self.x, block), self.gamma, self.alpha)
            g_block = g if g.dim() == 0 else g.expand(self.loss.shape)[block]
            self.block_gradient(negatives, self.positives(block, negatives), g_block, rows_of(grad, block))
        return grad


class _Positives(NamedTuple):
    """A block's positive entries (t = 1): where, ``p``, ``q = 1 - p``, BCE and ``alpha q^gamma``."""

    rows: Tensor
    cols: Tensor
    p: Tensor
    q: Tensor
    bce: Tensor
    focal: Tensor


def rows(
    module: FocalLoss, kwargs: Mapping[str, Any], out: Tensor | None, checked: bool, scratch: Scratch | None = None
) -> FocalRows:
    return FocalRows(module, kwargs, out, checked, scratch, eager=True)


def run(module: FocalLoss, kwargs: Mapping[str, Any]) -> Fused:
    """The whole term at once (``supports`` said yes): every block, then the loss; the gradient after."""
    kernel = FocalRows(module, kwargs, None, checked=True, eager=False)
    kernel.advance(kernel.x.shape[0])
    return kernel.finish()


def closed_form(
    x: Tensor, labels: Tensor, weight: Tensor, gamma: Tensor, alpha: Tensor, scale: Tensor, rows: bool
) -> tuple[Tensor, Tensor]:
    """The loss of ``FocalRows``'s docstring and its gradient ``dL/dx * scale * weight`` as one function
    (``ClosedForm``): with ``t`` the one-hot labels, ``q = p + t (1 - 2p)``, ``a = (1 - alpha) + t (2 alpha - 1)``,
    ``L = a q^gamma BCE(x, t)``, ``dL/dx = a [(p - t) q^gamma + gamma q^(gamma-1) BCE (1 - 2t) p (1 - p)]``.
    ``rows``: the first output is each row's sum of ``L * weight`` [N] (a reduced loss), else ``L`` [N, C]."""
    t = one_hot(labels, x)
    p = torch.sigmoid(x)
    q = p + t * (1 - 2 * p)
    a = (1 - alpha) + t * (2 * alpha - 1)
    bce = bce_of_logits(x, t)
    q_gamma = q.pow(gamma)
    loss = a * q_gamma * bce
    local = a * ((p - t) * q_gamma + bce * tensor_pow_grad(q, gamma) * (1 - 2 * t) * p * (1 - p))
    return ((loss * weight).sum(1) if rows else loss), local * (scale * weight)


def bind(module: FocalLoss, kwargs: Mapping[str, Any], function: Callable[..., tuple[Tensor, Tensor]]) -> Fused:
    x, labels = kwargs["pred"].detach(), kwargs["target"]
    reducer = plain_reducer(module, kwargs)
    weight = kwargs.get("weight")
    weight = None if weight is None else reshape_focal_weight(weight, x)
    scale = reducer.gradient_scale(module.loss_weight, None, None, x)
    rows = reducer.mode != "none"
    weights = weight if weight is not None else scalar(1.0, x)
    loss, grad = function(x, labels, weights, scalar(module.gamma, x), scalar(module.alpha, x), scale, rows)
    value = _reduced(module, reducer, loss, x.numel()) if rows else module.finish(loss, weight, "none", None)
    return answered(value, grad)


def _reduced(module: FocalLoss, reducer: Reducer, row_losses: Tensor, numel: int) -> Tensor:
    """``loss_weight * reduce(L * weight)`` from partial sums of ``L * weight`` (per row, or the one sum of the
    hand-written kernel; ``numel``: L's elements): what the module's ``finish`` gives, added in another
    order."""
    total = row_losses.sum()
    divisor = reducer.divisor(numel)
    return module.loss_weight * (total if divisor is None else total / divisor)


def _kernel_hints(module: FocalLoss) -> dict[str, Any]:
    """What the hand-written kernel specialises on: gamma = 2 (mmdet's default) squares."""
    return {"gamma_two": float(module.gamma) == 2.0}


register(
    FocalLoss,
    FusedKernel(
        "FocalLoss",
        supports,
        run,
        writes_into=True,
        rows=rows,
        covers=covers,
        one_pass=ClosedForm(closed_form, bind, handwritten=HandWritten("focal_triton", _kernel_hints)),
    ),
)
