"""QualityFocalLoss's fused kernel: QFL of a ``(label, score)`` target and its gradient."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..gfocal import QualityFocalLoss, quality_factor
from ..logits import bce_soft, sigmoid_parts
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
    broadcasts,
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


def covers(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """What ``supports`` asks of everything but the values: QualityFocalLoss on logits with a
    ``(label [N], score [N])`` target, weight broadcastable to the per-sample loss [N] in pred's dtype,
    ``beta`` 0 or >= 1, a reduction the module takes."""
    if module.activated or not supported_exponent(module.beta):
        return False
    pred, weight = kwargs.get("pred"), kwargs.get("weight")
    if quality_target(kwargs) is None or not same_float_dtype(pred, weight):
        return False
    return broadcasts(weight, pred.shape[:1]) and plain_reducer(module, kwargs) is not None


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """``covers``, with pred, weight and score finite."""
    return covers(module, kwargs) and finite(kwargs["pred"], kwargs.get("weight"), kwargs["target"][1])


class QualityRows(RowBlocks):
    r"""Quality focal loss and its gradient with respect to the logits ``x`` [N, C], block of rows by
    block of rows (a ``RowKernel``, as ``focal.FocalRows``).

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
    Output: the module's ([N] for 'none', else 0-d), from the per-sample losses once every block is in.
    ``out``, ``checked``, ``scratch`` and ``eager``: as ``FocalRows``.
    """

    name = "QualityFocalLoss"

    def __init__(
        self,
        module: QualityFocalLoss,
        kwargs: Mapping[str, Any],
        out: Tensor | None,
        checked: bool,
        scratch: Scratch | None = None,
        eager: bool = True,
    ) -> None:
        super().__init__(module, kwargs, out, checked, eager)
        self.label, self.score = kwargs["target"]
        self.beta = float(module.beta)
        self.weight = kwargs.get("weight")
        rows = self.x.shape[0]
        self.row_weight = None if self.weight is None else self.weight.expand(rows)  # per row, for the blocks
        self.sample_loss = self.x.new_empty(rows)
        if eager:  # d(output)/d(L_n) of an upstream of ones, without the weight (0-d)
            self.scale = self.reducer.gradient_scale(module.loss_weight, None, None, self.sample_loss)

    def parts(self, block: slice) -> _QualityBlock:
        """A block's sigmoid parts, negatives' factor and positive entries."""
        x = rows_of(self.x, block)
        prob, log_sigmoid, bce = sigmoid_parts(x)
        prob_beta = quality_factor(prob, self.beta)
        label = rows_of(self.label, block).long()
        rows = torch.nonzero((label >= 0) & (label < x.shape[1])).squeeze(1)
        cols = label[rows]
        # the transcendentals read from the [rows, C] results (see the focal kernel)
        y = self.score.detach()[block][rows].to(x.dtype)
        p = prob[rows, cols]
        bce_p = bce_soft(x[rows, cols], y, log_sigmoid[rows, cols])
        gap = y - p
        modulator = gap.abs()
        if self.beta in EXACT_POWERS:
            modulator_beta = quality_factor(modulator, self.beta)
        else:  # m^beta where autograd takes it, in the dense [rows, C] modulator (see EXACT_POWERS)
            dense = prob.clone()
            dense[rows, cols] = modulator
            modulator_beta = quality_factor(dense, self.beta)[rows, cols]
        return _QualityBlock(prob, bce, prob_beta, rows, cols, y, p, bce_p, gap, modulator, modulator_beta)

    def compute_block(self, block: slice) -> None:
        weight = None if self.row_weight is None else rows_of(self.row_weight, block)
        if not self.checked and not finite(rows_of(self.x, block), weight, rows_of(self.score, block)):
            raise self.not_covered(block)
        parts = self.parts(block)
        loss = parts.bce * parts.prob_beta
        loss[parts.rows, parts.cols] = parts.bce_p * parts.modulator_beta
        torch.sum(loss, dim=1, out=rows_of(self.sample_loss, block))
        if self.eager:
            g = self.scale.expand(block.stop - block.start) if weight is None else self.scale * weight
            self.keep(self.block_gradient(parts, g, self.gradient_rows(block)))

    def block_gradient(self, parts: _QualityBlock, g: Tensor, out: Tensor | None) -> Tensor:
        """A block's gradient into ``out``; ``g``: d(output)/d(L_n) of its rows. As the focal kernel: the
        BCE path (p - y) (g m^beta) plus the modulator's ((g BCE) (beta m^(beta-1)) dm/dp) (1 - p) p, in
        autograd's order."""
        beta = self.beta
        g_rows = g.unsqueeze(1)  # the sum's backward: each row's factor on its C columns
        grad = negatives_gradient(parts.prob_beta, parts.prob, parts.bce, g_rows, beta, None, out)  # alpha dropped
        g_p = g[parts.rows]
        grad_p = (parts.p - parts.y) * (parts.modulator_beta * g_p)
        if beta != 0:  # pow's backward is zero for a zero exponent
            path = -((parts.bce_p * g_p) * pow_grad(parts.modulator, beta) * parts.gap.sign())
            grad_p = grad_p + path * (1 - parts.p) * parts.p
        grad[parts.rows, parts.cols] = grad_p
        return grad

    def value(self) -> Tensor:
        return self.module.finish(self.sample_loss, self.weight, self.reducer.mode, self.reducer.avg_factor)

    def recompute(self, upstream: Tensor | None, out: Tensor | None) -> Tensor:
        loss_weight = self.module.loss_weight
        g = self.reducer.gradient_scale(loss_weight, self.weight, upstream, self.sample_loss)
        g = g.expand(self.sample_loss.shape)
        grad = torch.empty_like(self.x) if out is None else out
        for block in self.blocks:
            self.block_gradient(self.parts(block), g[block], rows_of(grad, block))
        return grad


class _QualityBlock(NamedTuple):
    """A block's dense parts and its positive entries (label in [0, C)): see ``QualityRows.parts``."""

    prob: Tensor
    bce: Tensor
    prob_beta: Tensor
    rows: Tensor
    cols: Tensor
    y: Tensor
    p: Tensor
    bce_p: Tensor
    gap: Tensor
    modulator: Tensor
    modulator_beta: Tensor


def rows(
    module: QualityFocalLoss,
    kwargs: Mapping[str, Any],
    out: Tensor | None,
    checked: bool,
    scratch: Scratch | None = None,
) -> QualityRows:
    return QualityRows(module, kwargs, out, checked, scratch, eager=True)


def run(module: QualityFocalLoss, kwargs: Mapping[str, Any]) -> Fused:
    """The whole term at once (``supports`` said yes): every block, then the loss; the gradient after."""
    kernel = QualityRows(module, kwargs, None, checked=True, eager=False)
    kernel.advance(kernel.x.shape[0])
    return kernel.finish()


def closed_form(x: Tensor, labels: Tensor, score: Tensor, beta: Tensor, row_scale: Tensor) -> tuple[Tensor, Tensor]:
    """The per-sample loss of ``QualityRows``'s docstring [N] and its gradient, scaled per row by
    ``row_scale`` ([N] or 0-d), as one function (``ClosedForm``): ``y`` the score at the label column (0
    elsewhere), ``m = |y - p|`` there and ``p`` elsewhere, ``L_n = sum_c BCE(x, y) m^beta``,
    ``dm/dx = -sign(y - p) p (1 - p)`` at the label and ``p (1 - p)`` elsewhere."""
    positive = one_hot(labels, x) > 0
    y = torch.where(positive, score.unsqueeze(1), 0.0)
    p = torch.sigmoid(x)
    m = torch.where(positive, (y - p).abs(), p)
    bce = bce_of_logits(x, y)
    m_beta = m.pow(beta)
    d_m = torch.where(positive, -torch.sign(y - p), 1.0) * p * (1 - p)
    local = (p - y) * m_beta + bce * tensor_pow_grad(m, beta) * d_m
    return (bce * m_beta).sum(1), local * row_scale.unsqueeze(-1)


def bind(module: QualityFocalLoss, kwargs: Mapping[str, Any], function: Callable[..., tuple[Tensor, Tensor]]) -> Fused:
    x, (labels, score) = kwargs["pred"].detach(), kwargs["target"]
    reducer, weight = plain_reducer(module, kwargs), kwargs.get("weight")
    # the per-sample loss's shape, dtype and device (not x[:, 0], which C = 0 has not)
    row_scale = reducer.gradient_scale(module.loss_weight, weight, None, x.new_empty(x.shape[:1]))
    # the score in pred's dtype, as the module takes it: a float64 score made the whole answer float64
    loss, grad = function(x, labels, score.detach().to(x.dtype), scalar(module.beta, x), row_scale)
    return answered(module.finish(loss, weight, reducer.mode, reducer.avg_factor), grad)


def _kernel_hints(module: QualityFocalLoss) -> dict[str, Any]:
    """What the hand-written kernel specialises on: beta = 2 (mmdet's default) squares."""
    return {"beta_two": float(module.beta) == 2.0}


register(
    QualityFocalLoss,
    FusedKernel(
        "QualityFocalLoss",
        supports,
        run,
        writes_into=True,
        rows=rows,
        covers=covers,
        one_pass=ClosedForm(closed_form, bind, handwritten=HandWritten("gfocal_triton", _kernel_hints)),
    ),
)
