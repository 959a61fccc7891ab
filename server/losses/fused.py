"""Fused loss-and-gradient kernels for the hot losses: the loss and d(loss)/d(pred) in one pass.

The evaluator's general path builds an autograd graph in the forward and walks it back with
``torch.autograd.grad``: every intermediate of the forward is kept, and the backward re-reads it and
writes as many gradient temporaries again. For the losses a detector calls on every step the
derivative has a short closed form, so a kernel here computes the element-wise loss and its local
derivative side by side from the same intermediates, without a graph, and scales the derivative by
the weight / reduction / ``loss_weight`` / upstream factors at the end. Vectorised torch only, so the
same code runs on CUDA tensors.

Each kernel mirrors the arithmetic of the module it replaces (the same torch primitives where they
set the rounding: ``x - logsigmoid(x)`` for BCE with a zero target, ``log_softmax`` for CE, mmdet's
``1 - p`` for the focal ``1 - p_t``...) and hands its element-wise loss to the module's own
``finish`` (weight, reduction, ``avg_factor``, ``loss_weight``), so the loss value is the module's.
The gradient's closed form is evaluated with autograd's products in autograd's order (the derivation
is in each docstring), which on the CPU (one intra-op thread, as small terms run; see
``row_blocks`` for several) makes FocalLoss, QualityFocalLoss, L1/SmoothL1 and GIoU gradients
autograd's bit for bit; CE's differs in the last bit on some elements (torch.exp vs
log_softmax's backward kernel). tests/engine/test_fused_kernels.py checks both. The saving is the graph:
no saved intermediates, no zero-filled gradient buffers, no one-hot targets, in-place products.

The selection table ``FUSED_KERNELS`` maps a loss *class* (an exact type: a plugin that replaces the
name or subclasses it is never fused) to its kernel and a ``supports(module, kwargs)`` predicate.
``supports`` is conservative: anything the module would refuse (bad shapes, out-of-range labels, a
bad ``reduction_override``, ``avg_factor`` with ``sum``), any input that is not finite, any dtype but
float32/float64, and any config the kernel does not cover returns False, and the evaluator runs the
module under autograd, which raises its own error or computes the answer. A kernel therefore never
raises a ``LossError`` of its own.

Adding a kernel is one line in ``FUSED_KERNELS``: ``LossClass: FusedKernel("name", supports, run)``
with ``run(module, kwargs) -> Fused`` (the loss, and a function of the upstream gradient that
returns d(sum(upstream * loss))/d(pred)).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .cross_entropy import DEFAULT_IGNORE_INDEX, CrossEntropyLoss, float32_rounded
from .errors import LossError
from .focal import FocalLoss, reshape_focal_weight
from .gfocal import QualityFocalLoss
from .iou import GIoULoss, box_weight
from .pipeline import AVG_FACTOR_EPS, check_avg_factor
from .smooth_l1 import L1Loss, SmoothL1Loss

FLOATS = (torch.float32, torch.float64)  # half precision keeps autograd's own rounding

# gradient(upstream, out=None): see Fused
Gradient = Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class Fused:
    """A fused kernel's answer.

    ``loss``: exactly what the module returns (its shape and dtype), detached.
    ``gradient(upstream, out=None)``: d(sum(upstream * loss))/d(pred), pred's shape and dtype;
    ``upstream`` is None for an upstream of ones (what the evaluator's default backward uses), else a
    tensor of ``loss``'s shape in its dtype (a recompute's ``grad_output``). ``out``: a tensor of
    pred's shape, dtype and device to write the gradient into (the caller's shared memory, say);
    kernels whose ``FusedKernel.writes_into`` is True return it, the others ignore it.
    """

    loss: Tensor
    gradient: Gradient


@dataclasses.dataclass(frozen=True)
class FusedKernel:
    """One row of the selection table."""

    name: str
    supports: Callable[[nn.Module, Mapping[str, Any]], bool]
    run: Callable[[nn.Module, Mapping[str, Any]], Fused]
    writes_into: bool = False  # its gradient() writes into a given ``out`` (see Fused)


# How many terms each kernel answered in this process (tests and operators read it; the service's
# thread pool calls kernels concurrently, hence the lock).
CALLS: Counter[str] = Counter()
_CALLS_LOCK = threading.Lock()


def count_call(name: str) -> None:
    with _CALLS_LOCK:
        CALLS[name] += 1


# -- shared pieces ----------------------------------------------------------------------------------


def _finite(*tensors: Tensor | None) -> bool:
    """No NaN or Inf in any of ``tensors``.

    One summing pass each instead of an ``isfinite`` mask: a NaN or Inf element makes the sum
    non-finite. A sum that overflows from finite values also reads as non-finite, which only sends
    that (absurd) input to autograd.
    """
    # the sum's value checked in Python: one torch op per tensor instead of two (sum, isfinite)
    return all(t is None or t.numel() == 0 or math.isfinite(t.sum().item()) for t in tensors)


@dataclasses.dataclass(frozen=True)
class Reduction:
    """The resolved reduction of one call and what it divides the weighted loss's sum by."""

    mode: str  # "none", "mean" or "sum"
    avg_factor: float | None
    divisor: float | int | None  # numel for a plain mean, avg_factor + eps with avg_factor, else None


def _reduction(module: nn.Module, kwargs: Mapping[str, Any], numel: int) -> Reduction | None:
    """The pipeline's reduction for ``numel`` element-wise losses, or None where the module would
    refuse it (bad override, ``avg_factor`` with ``sum``) or where its value is not an ordinary
    number (a tensor ``avg_factor``, a non-finite one, or one that makes the divisor zero)."""
    try:
        mode = module.resolve_reduction(kwargs.get("reduction_override"))
        avg_factor = check_avg_factor(kwargs.get("avg_factor"))
    except LossError:
        return None
    if isinstance(avg_factor, Tensor):
        return None  # dtype promotion with the loss: leave it to autograd
    if avg_factor is not None:
        avg_factor = float(avg_factor)
        if not math.isfinite(avg_factor) or avg_factor + AVG_FACTOR_EPS == 0:
            return None
    if mode == "none":
        return Reduction(mode, avg_factor, None)
    if mode == "sum":
        return None if avg_factor is not None else Reduction(mode, None, None)
    if numel == 0:  # the pipeline sums an empty loss (zero) instead of NaN
        return Reduction(mode, avg_factor, None)
    return Reduction(mode, avg_factor, numel if avg_factor is None else avg_factor + AVG_FACTOR_EPS)


def _output_factor(
    loss_weight: float, reduction: Reduction, weight: Tensor | None, upstream: Tensor | None, like: Tensor
) -> Tensor:
    """d(output)/d(element-wise loss) before the kernel's local derivative: the upstream gradient
    times ``loss_weight``, divided as the reduction divides, times the (broadcast) weight.

    The steps and their order are those of autograd's backward through the module's ``finish``
    (``loss_weight * reduce(loss * weight)``), so the factor rounds as autograd's. With reduction
    'none' the upstream has the loss's shape; otherwise the factor is 0-d unless weighted.
    """
    factor = upstream if upstream is not None else torch.ones((), dtype=like.dtype, device=like.device)
    factor = factor * loss_weight
    if reduction.divisor is not None:
        factor = factor / reduction.divisor
    if weight is not None:
        factor = factor * weight
    return factor


def _same_float_dtype(pred: Tensor, *others: Tensor | None) -> bool:
    """pred is float32/float64 and every other tensor has its dtype (no promotion of the loss)."""
    return pred.dtype in FLOATS and all(o is None or o.dtype == pred.dtype for o in others)


def _has_positive(weight: Tensor | None) -> bool:
    """False where the box losses' zero-weight shortcut (``(pred * weight).sum()``) applies."""
    return weight is None or (weight.numel() > 0 and bool((weight > 0).any()))


def _supported_exponent(value: float) -> bool:
    """``|d|^e`` has a finite derivative at ``d = 0`` only for ``e = 0`` or ``e >= 1``; for ``0 < e < 1``
    autograd's answer there is NaN (``inf * 0``), which the kernels would not reproduce."""
    return value == 0 or value >= 1


def _pow_grad(base: Tensor, exponent: float) -> Tensor:
    """d(base^e)/d(base) = ``e * base^(e-1)``, the way ``pow``'s backward computes it."""
    if exponent == 2:  # base.pow(1) is an exact copy of base: one op fewer, the same bits
        return exponent * base
    return exponent * base.pow(exponent - 1)


# -- cache-sized blocks --------------------------------------------------------------------------------

# A big tensor's element-wise steps, each a pass over the whole tensor into a fresh one, are bound by
# memory: fresh intermediates of tens of MiB cost page faults and never stay in cache. Above
# BLOCKED_MIN_ELEMENTS a kernel works through blocks of about BLOCK_ELEMENTS (512 KiB per float32
# intermediate): FocalLoss [209715, 80] (64 MiB) loss + gradient on one thread took 380-405 ms whole
# and 88-97 ms in blocks of 2048 rows. Every block holds a multiple of 64 elements, so torch's vector
# loops run to its end without a scalar tail inside the tensor: on one thread each element takes the
# path it takes in a whole-tensor op, and the result is autograd's bit for bit (tested). With several
# intra-op threads torch splits each op among them at other places than autograd's whole-tensor op,
# and an element at such a split may round differently in the last bit: FocalLoss [60001, 80] on two
# threads differed from autograd in 1-2 of 4.8M gradient elements, blocked or not (whole: 0-1).
BLOCK_ELEMENTS = 1 << 17
BLOCKED_MIN_ELEMENTS = 1 << 22


def row_blocks(rows: int, per_row: int, device: torch.device) -> list[slice]:
    """Slices of ``rows`` rows of ``per_row`` elements, each about :data:`BLOCK_ELEMENTS` elements and
    a multiple of 64 of them (the last takes the rest); one slice of everything below
    :data:`BLOCKED_MIN_ELEMENTS`, and off the CPU (a GPU's caches are not the point there, and every
    block would launch each kernel again: not measured on a GPU yet)."""
    if rows * per_row < BLOCKED_MIN_ELEMENTS or device.type != "cpu":
        return [slice(0, rows)]
    align = 64 // math.gcd(per_row, 64)  # rows per 64-element multiple
    step = max(align, BLOCK_ELEMENTS // per_row // align * align)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


# -- FocalLoss ---------------------------------------------------------------------------------------


def _focal_labels(module: nn.Module, kwargs: Mapping[str, Any], check_range: bool = True) -> Tensor | None:
    """The [N] int64 labels, or None where the kernel does not apply. ``check_range=False`` (the run,
    after ``focal_supports`` said yes) skips the range check's reduction and host sync."""
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


def focal_supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """Sigmoid FocalLoss on logits with [N] class-index targets (C = background), weight [N], [N, C]
    or [N * C] in pred's dtype, ``gamma`` 0 or >= 1."""
    if module.activated or not _supported_exponent(module.gamma):
        return False
    pred, weight = kwargs.get("pred"), kwargs.get("weight")
    if _focal_labels(module, kwargs) is None or not _same_float_dtype(pred, weight):
        return False
    if weight is not None:
        try:
            reshape_focal_weight(weight, torch.empty(pred.shape, device="meta"))
        except LossError:
            return False
    return _reduction(module, kwargs, pred.numel()) is not None and _finite(pred, weight)


def focal_run(module: FocalLoss, kwargs: Mapping[str, Any]) -> Fused:
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
    labels = _focal_labels(module, kwargs, check_range=False)
    gamma, alpha = float(module.gamma), float(module.alpha)
    x = pred.detach()
    num_classes = x.shape[1]
    blocks = row_blocks(x.shape[0], num_classes, x.device)

    def negatives(block: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """t = 0 everywhere: p, log sigmoid(x), BCE = x - log sigmoid(x) (exactly as
        binary_cross_entropy_with_logits computes it for a zero target) and a_t q^gamma."""
        prob = torch.sigmoid(block)
        log_sigmoid = F.logsigmoid(block)
        return prob, log_sigmoid, block - log_sigmoid, torch.mul(prob.pow(gamma), 1 - alpha)

    # the positive entry of each foreground row (t = 1: q = 1 - p, a_t = alpha, BCE = -log sigmoid(x));
    # sigmoid and log-sigmoid are read from the [rows, C] results, not recomputed on the gathered
    # vector: torch's vectorised and scalar transcendental paths can differ in the last bit
    rows = torch.nonzero(labels < num_classes).squeeze(1)
    cols = labels[rows]
    if len(blocks) == 1:
        prob, log_sigmoid, bce, focal = negatives(x)
        loss = bce * focal
        p, bce_p = prob[rows, cols], -log_sigmoid[rows, cols]
    else:  # block by block: only the loss is kept whole; the gradient recomputes each block's parts
        loss = torch.empty_like(x)
        p_parts, bce_parts = [], []
        for block in blocks:
            prob, log_sigmoid, bce, focal = negatives(x[block])
            torch.mul(bce, focal, out=loss[block])
            block_rows = torch.nonzero(labels[block] < num_classes).squeeze(1)
            block_cols = labels[block][block_rows]
            p_parts.append(prob[block_rows, block_cols])
            bce_parts.append(-log_sigmoid[block_rows, block_cols])
        p, bce_p = torch.cat(p_parts), torch.cat(bce_parts)
    q = 1 - p
    focal_p = alpha * q.pow(gamma)
    loss[rows, cols] = bce_p * focal_p

    if weight is not None:
        weight = reshape_focal_weight(weight, loss)
    reduction = _reduction(module, kwargs, loss.numel())
    value = module.finish(loss, weight, reduction.mode, reduction.avg_factor)

    def negatives_gradient(parts: tuple[Tensor, Tensor, Tensor, Tensor], g: Tensor, out: Tensor | None) -> Tensor:
        # g: d(output)/d(L); then the two paths from x, each product in autograd's order so the result
        # is autograd's bit for bit: BCE's (p - t) (g a_t q^gamma), and the focal term's
        # ((g BCE a_t) (gamma q^(gamma-1)) (dq/dp)) (1 - p) p
        prob, _, bce, focal = parts
        grad = (torch.mul(focal, g) if out is None else torch.mul(focal, g, out=out)).mul_(prob)
        if gamma != 0:  # pow's backward is zero for a zero exponent
            grad.add_(torch.mul(bce, g).mul_(1 - alpha).mul_(_pow_grad(prob, gamma)).mul_(1 - prob).mul_(prob))
        return grad

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        g = _output_factor(module.loss_weight, reduction, weight, upstream, loss)
        if len(blocks) == 1:
            grad = negatives_gradient((prob, log_sigmoid, bce, focal), g, out)
        else:
            grad = torch.empty_like(x) if out is None else out
            for block in blocks:
                g_block = g if g.dim() == 0 else g.expand(loss.shape)[block]
                negatives_gradient(negatives(x[block]), g_block, grad[block])
        # an unweighted mean or sum has one factor for every element: no gather for the positives
        g_p = g.expand(rows.shape) if g.dim() == 0 else g.expand(loss.shape)[rows, cols]
        grad_p = (p - 1) * (focal_p * g_p)
        if gamma != 0:
            grad_p = grad_p + (-((g_p * bce_p) * alpha * _pow_grad(q, gamma))) * (1 - p) * p
        grad[rows, cols] = grad_p
        return grad

    return Fused(value, gradient)


# -- QualityFocalLoss ----------------------------------------------------------------------------------


def _qfl_target(kwargs: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
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


def qfl_supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """QualityFocalLoss on logits with a ``(label [N], score [N])`` target, weight broadcastable to
    the per-sample loss [N] in pred's dtype, ``beta`` 0 or >= 1."""
    if module.activated or not _supported_exponent(module.beta):
        return False
    pred, weight = kwargs.get("pred"), kwargs.get("weight")
    target = _qfl_target(kwargs)
    if target is None or not _same_float_dtype(pred, weight):
        return False
    if weight is not None:
        try:
            checks.broadcasts_to("weight", weight, "the loss", torch.empty(pred.shape[:1], device="meta"))
        except LossError:
            return False
    return _reduction(module, kwargs, pred.shape[0]) is not None and _finite(pred, weight, target[1])


def qfl_run(module: QualityFocalLoss, kwargs: Mapping[str, Any]) -> Fused:
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
    label, score = _qfl_target(kwargs)
    beta = float(module.beta)
    x = pred.detach()
    num_classes = x.shape[1]

    prob = torch.sigmoid(x)
    log_sigmoid = F.logsigmoid(x)
    bce = x - log_sigmoid
    prob_beta = prob.pow(beta)
    loss = bce * prob_beta

    # positives: BCE(x, y) = (1 - y) x - log sigmoid(x), the transcendentals read from the [N, C]
    # results (see focal_run)
    rows = torch.nonzero((label >= 0) & (label < num_classes)).squeeze(1)
    cols = label[rows]
    xp = x[rows, cols]
    y = score.detach()[rows].to(x.dtype)
    p = prob[rows, cols]
    bce_p = (1 - y) * xp - log_sigmoid[rows, cols]
    gap = y - p
    modulator = gap.abs()
    modulator_beta = modulator.pow(beta)
    loss[rows, cols] = bce_p * modulator_beta

    sample_loss = loss.sum(dim=1)
    reduction = _reduction(module, kwargs, sample_loss.numel())
    value = module.finish(sample_loss, weight, reduction.mode, reduction.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        # as focal_run: the BCE path (p - y) (g m^beta) plus the modulator's
        # ((g BCE) (beta m^(beta-1)) dm/dp) (1 - p) p, in autograd's order
        g = _output_factor(module.loss_weight, reduction, weight, upstream, sample_loss).expand(sample_loss.shape)
        g_rows = g.unsqueeze(1)  # the sum's backward: each row's factor on its C columns
        grad = (torch.mul(prob_beta, g_rows) if out is None else torch.mul(prob_beta, g_rows, out=out)).mul_(prob)
        g_p = g[rows]
        grad_p = (p - y) * (modulator_beta * g_p)
        if beta != 0:  # pow's backward is zero for a zero exponent
            grad.add_(torch.mul(bce, g_rows).mul_(_pow_grad(prob, beta)).mul_(1 - prob).mul_(prob))
            grad_p = grad_p + (-((bce_p * g_p) * _pow_grad(modulator, beta) * gap.sign())) * (1 - p) * p
        grad[rows, cols] = grad_p
        return grad

    return Fused(value, gradient)


# -- CrossEntropyLoss (softmax) ----------------------------------------------------------------------


def _ce_ignore_index(module: CrossEntropyLoss, kwargs: Mapping[str, Any]) -> int:
    ignore_index = kwargs.get("ignore_index")
    if ignore_index is None:
        ignore_index = module.ignore_index
    return DEFAULT_IGNORE_INDEX if ignore_index is None else int(ignore_index)


def ce_supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """Softmax CrossEntropyLoss on [N, C] logits with [N] integer labels (each in [0, C) or the
    ignore_index), ``class_weight`` of length C, weight broadcastable to [N]."""
    if module.use_sigmoid or module.use_mask:
        return False
    pred, label, weight = kwargs.get("cls_score"), kwargs.get("label"), kwargs.get("weight")
    if not isinstance(pred, Tensor) or not isinstance(label, Tensor) or pred.dim() != 2 or pred.dtype not in FLOATS:
        return False
    num, num_classes = pred.shape
    if num_classes == 0 or label.shape != (num,):
        return False
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        return False
    if module.class_weight is not None and len(module.class_weight) != num_classes:
        return False
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            return False
        try:
            checks.broadcasts_to("weight", weight, "the loss", torch.empty((num,), device="meta"))
        except LossError:
            return False
    labels = label.long()
    ignore_index = _ce_ignore_index(module, kwargs)
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(outside.any()):
        return False
    return _reduction(module, kwargs, num) is not None and _finite(pred, weight)


def ce_run(module: CrossEntropyLoss, kwargs: Mapping[str, Any]) -> Fused:
    r"""Softmax cross-entropy and its gradient with respect to the logits ``x`` [N, C].

    ``L_n = -w_{y_n} log softmax(x_n)_{y_n}`` (``w`` the class weight, 1 without one), 0 where
    ``y_n`` is the ignore_index.

    Derivative: ``d(-log softmax(x)_y)/dx_j = softmax(x)_j - [j = y]``, so row n of the gradient is
    ``s_n (softmax(x_n) - onehot(y_n))`` with ``s_n = w_{y_n} * weight_n * loss_weight * reduction
    scale * upstream_n``, and 0 for ignored rows.

    The loss is read from ``log_softmax`` (so it rounds as the module's); its buffer becomes the
    gradient in place, ``exp(log_softmax(x)) * s`` (what log_softmax's backward computes), then
    ``-s`` is added at the label column (``scatter_add``; no one-hot tensor). On the CPU this is
    about autograd's speed: log_softmax's forward and backward are already fused aten kernels.

    The reduction is the module's: ``avg_non_ignore`` with 'mean' and no avg_factor divides by the
    count of non-ignored labels; the label weight is rounded through float32 as mmdet does.
    Output: the module's ([N] for 'none', else 0-d).
    """
    pred, weight = kwargs["cls_score"], kwargs.get("weight")
    x = pred.detach()
    labels = kwargs["label"].long()
    ignore_index = _ce_ignore_index(module, kwargs)
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)

    log_prob = torch.log_softmax(x, dim=1)
    loss = -log_prob.gather(1, safe.unsqueeze(1)).squeeze(1)
    class_weight = None
    if module.class_weight is not None:
        class_weight = x.new_tensor(module.class_weight)[safe]
        loss = loss * class_weight
    loss = loss.masked_fill(~valid, 0)
    if weight is not None:
        weight = float32_rounded(weight, loss.dtype)

    reduction = _reduction(module, kwargs, loss.numel())
    avg_factor = module._averaging_count(reduction.mode, reduction.avg_factor, labels.numel() - (~valid).sum())
    if avg_factor is not None and reduction.mode == "mean" and loss.numel():
        reduction = Reduction(reduction.mode, avg_factor, float(avg_factor) + AVG_FACTOR_EPS)
    value = module.finish(loss, weight, reduction.mode, reduction.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        # the module's backward order: masked_fill, then the class weight
        scale = _output_factor(module.loss_weight, reduction, weight, upstream, loss).expand(loss.shape)
        scale = scale.masked_fill(~valid, 0)
        if class_weight is not None:
            scale = scale * class_weight
        scale = scale.unsqueeze(1)  # [N, 1]
        grad = log_prob.exp_().mul_(scale)  # s * softmax, in log_prob's buffer
        return grad.scatter_add_(1, safe.unsqueeze(1), -scale)  # - s at the label

    return Fused(value, gradient)


# -- SmoothL1Loss / L1Loss ------------------------------------------------------------------------------


def regression_supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """L1/SmoothL1 with target of pred's shape and dtype, weight broadcastable to pred in its dtype
    with a positive entry (otherwise mmdet's ``(pred * weight).sum()`` shortcut applies)."""
    pred, target, weight = kwargs.get("pred"), kwargs.get("target"), kwargs.get("weight")
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or target.shape != pred.shape:
        return False
    if not _same_float_dtype(pred, target, weight):
        return False
    if weight is not None:
        try:
            checks.broadcasts_to("weight", weight, "pred", pred)
        except LossError:
            return False
        if not _has_positive(weight):
            return False
    return _reduction(module, kwargs, pred.numel()) is not None and _finite(pred, target, weight)


def regression_run(module: L1Loss | SmoothL1Loss, kwargs: Mapping[str, Any]) -> Fused:
    r"""L1 / Smooth L1 and the gradient with respect to ``pred``, element-wise.

    With ``d = pred - target``: L1 is ``|d|``, ``dL/dd = sign(d)`` (0 at 0, as ``abs``'s backward).
    Smooth L1 is ``0.5 d^2 / beta`` for ``|d| < beta`` else ``|d| - 0.5 beta``, so
    ``dL/dd = d / beta`` inside and ``sign(d)`` outside, i.e. ``clamp(d / beta, -1, 1)``: for
    ``|d| >= beta`` the rounded ``d / beta`` is already ``>= 1`` in magnitude.

    The gradient is ``dL/dd * weight * loss_weight * reduction scale * upstream``.
    Output: the module's (pred's shape for 'none', else 0-d).
    """
    pred, target, weight = kwargs["pred"], kwargs["target"], kwargs.get("weight")
    x, t = pred.detach(), target.detach()
    diff = x - t
    if isinstance(module, SmoothL1Loss):
        loss = F.smooth_l1_loss(x, t, reduction="none", beta=module.beta)
        grad = diff.div_(module.beta).clamp_(-1, 1)
    else:
        loss = diff.abs()
        grad = diff.sign_()
    reduction = _reduction(module, kwargs, loss.numel())
    value = module.finish(loss, weight, reduction.mode, reduction.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        return grad.mul_(_output_factor(module.loss_weight, reduction, weight, upstream, loss))

    return Fused(value, gradient)


# -- GIoULoss ------------------------------------------------------------------------------------------


def giou_supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """GIoU on [..., N, 4] boxes with target of pred's shape and dtype, weight [N] (broadcastable to
    the per-box loss) or pred's shape, with a positive entry; ``eps > 0``."""
    pred, target, weight = kwargs.get("pred"), kwargs.get("target"), kwargs.get("weight")
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.dim() < 2 or pred.shape[-1] != 4:
        return False
    if target.shape != pred.shape or not _same_float_dtype(pred, target, weight) or not module.eps > 0:
        return False
    if weight is not None:
        if not _has_positive(weight):
            return False
        if weight.dim() > 1 and weight.shape != pred.shape:
            return False
        try:
            checks.broadcasts_to(
                "weight", box_weight(weight, pred), "the loss", torch.empty(pred.shape[:-1], device="meta")
            )
        except LossError:
            return False
    return _reduction(module, kwargs, pred.shape[:-1].numel()) is not None and _finite(pred, target, weight)


def _routed(grad: Tensor, a: Tensor, b: Tensor, minimum: bool) -> Tensor:
    """The share of ``grad`` (the gradient of ``min(a, b)`` or ``max(a, b)``) that reaches ``a``, as
    autograd's ``minimum``/``maximum`` backward routes it: all where ``a`` wins, half at a tie."""
    loses = a > b if minimum else a < b
    return torch.where(a == b, grad / 2, grad).masked_fill_(loses, 0)


def giou_run(module: GIoULoss, kwargs: Mapping[str, Any]) -> Fused:
    r"""GIoU loss and its gradient with respect to the predicted boxes ``p`` [..., N, 4] (x1, y1, x2, y2).

    Forward, per box pair (``t`` the target; per axis, x and y side by side as [..., N, 2]):

    * intersection sides ``o = clamp(min(p2, t2) - max(p1, t1), 0)``, ``I = o_x o_y``;
    * union ``U = clamp(A_p + A_t - I, eps)`` with ``A_p = (p2 - p1)_x (p2 - p1)_y``;
    * enclosing sides ``e = clamp(max(p2, t2) - min(p1, t1), 0)``, ``E = clamp(e_x e_y, eps)``;
    * ``L = 1 - (I / U - (E - U) / E)``.

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
        parts = _giou_forward(p, t, eps)
        loss = parts.loss
    else:  # block by block over the boxes: only the loss is kept whole; the gradient recomputes
        p, t = p.reshape(-1, 4), t.reshape(-1, 4)
        loss = torch.empty(p.shape[0], dtype=p.dtype, device=p.device)
        for block in blocks:
            loss[block] = _giou_forward(p[block], t[block], eps).loss
        loss = loss.view(pred.shape[:-1])

    weight = box_weight(weight, pred)
    reduction = _reduction(module, kwargs, loss.numel())
    value = module.finish(loss, weight, reduction.mode, reduction.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        grad_giou = -_output_factor(module.loss_weight, reduction, weight, upstream, loss).expand(loss.shape)
        if len(blocks) == 1:
            return _giou_backward(p, t, eps, parts, grad_giou, out)
        grad = torch.empty_like(p) if out is None else out.view(-1, 4)
        grad_giou = grad_giou.reshape(-1)
        for block in blocks:
            pb, tb = p[block], t[block]
            _giou_backward(pb, tb, eps, _giou_forward(pb, tb, eps), grad_giou[block], grad[block])
        return grad.view(pred.shape) if out is None else out

    return Fused(value, gradient)


class _GIoUParts(NamedTuple):
    """The forward's intermediates the backward reads (see giou_run), and the element-wise loss."""

    overlap_raw: Tensor
    overlap_wh: Tensor
    enclose_raw_wh: Tensor
    enclose_wh: Tensor
    pred_wh: Tensor
    overlap: Tensor
    union_raw: Tensor
    union: Tensor
    enclose_raw: Tensor
    enclose: Tensor
    loss: Tensor


def _giou_forward(p: Tensor, t: Tensor, eps: float) -> _GIoUParts:
    """The forward of giou_run for boxes ``p`` and targets ``t``."""
    p1, p2, t1, t2 = p[..., :2], p[..., 2:], t[..., :2], t[..., 2:]
    inner_lo, inner_hi = torch.maximum(p1, t1), torch.minimum(p2, t2)
    outer_lo, outer_hi = torch.minimum(p1, t1), torch.maximum(p2, t2)
    overlap_raw = inner_hi - inner_lo
    overlap_wh = overlap_raw.clamp(min=0.0)
    enclose_raw_wh = outer_hi - outer_lo
    enclose_wh = enclose_raw_wh.clamp(min=0.0)
    pred_wh, target_wh = p2 - p1, t2 - t1

    overlap = overlap_wh[..., 0] * overlap_wh[..., 1]
    union_raw = pred_wh[..., 0] * pred_wh[..., 1] + target_wh[..., 0] * target_wh[..., 1] - overlap
    union = union_raw.clamp(min=eps)
    enclose_raw = enclose_wh[..., 0] * enclose_wh[..., 1]
    enclose = enclose_raw.clamp(min=eps)
    loss = 1 - (overlap / union - (enclose - union) / enclose)
    return _GIoUParts(
        overlap_raw,
        overlap_wh,
        enclose_raw_wh,
        enclose_wh,
        pred_wh,
        overlap,
        union_raw,
        union,
        enclose_raw,
        enclose,
        loss,
    )


def _giou_backward(
    p: Tensor, t: Tensor, eps: float, parts: _GIoUParts, grad_giou: Tensor, out: Tensor | None
) -> Tensor:
    """d(output)/d(p) from ``grad_giou`` = -d(output)/d(L) of each box (see giou_run)."""
    overlap_raw, overlap_wh, enclose_raw_wh, enclose_wh, pred_wh, overlap, union_raw, union, enclose_raw, enclose, _ = (
        parts
    )
    p1, p2, t1, t2 = p[..., :2], p[..., 2:], t[..., :2], t[..., 2:]
    # Each backward step below is the module graph's, in its order (see giou_run), so the rounding
    # is autograd's bit for bit: chaotic training loops (examples/toy_training.py) amplify even
    # one-ulp differences in the box gradient.
    grad_overlap = grad_giou / union
    grad_union = -grad_giou * ((overlap / union) / union)
    grad_num = -grad_giou / enclose
    grad_enclose = (grad_giou * (((enclose - union) / enclose) / enclose)).add_(grad_num)
    grad_union = (grad_union - grad_num).masked_fill_(union_raw < eps, 0)
    grad_enclose = grad_enclose.masked_fill_(enclose_raw < eps, 0)
    grad_overlap = grad_overlap - grad_union
    # per axis [..., N, 2]: d L / d (side) is d L / d (area) times the other axis's side
    grad_o = (grad_overlap.unsqueeze(-1) * overlap_wh.flip(-1)).masked_fill_(overlap_raw < 0, 0)
    grad_e = (grad_enclose.unsqueeze(-1) * enclose_wh.flip(-1)).masked_fill_(enclose_raw_wh < 0, 0)
    grad_area = grad_union.unsqueeze(-1) * pred_wh.flip(-1)
    grad_p2 = _routed(grad_o, p2, t2, minimum=True) + _routed(grad_e, p2, t2, minimum=False) + grad_area
    grad_p1 = _routed(-grad_o, p1, t1, minimum=False) + _routed(-grad_e, p1, t1, minimum=True) - grad_area
    if out is None:
        return torch.cat([grad_p1, grad_p2], dim=-1)
    return torch.cat([grad_p1, grad_p2], dim=-1, out=out)


# -- the selection table -------------------------------------------------------------------------------

FUSED_KERNELS: dict[type, FusedKernel] = {
    FocalLoss: FusedKernel("FocalLoss", focal_supports, focal_run, writes_into=True),
    QualityFocalLoss: FusedKernel("QualityFocalLoss", qfl_supports, qfl_run, writes_into=True),
    CrossEntropyLoss: FusedKernel("CrossEntropyLoss", ce_supports, ce_run),
    SmoothL1Loss: FusedKernel("SmoothL1Loss", regression_supports, regression_run),
    L1Loss: FusedKernel("L1Loss", regression_supports, regression_run),
    GIoULoss: FusedKernel("GIoULoss", giou_supports, giou_run, writes_into=True),
}


def select(module: nn.Module, kwargs: Mapping[str, Any]) -> FusedKernel | None:
    """The fused kernel for this module and these bound inputs, or None (autograd's path).

    Looked up by the module's exact class, so subclasses and plugins registered under a built-in
    name keep their own forward.
    """
    kernel = FUSED_KERNELS.get(type(module))
    if kernel is None:
        return None
    try:
        return kernel if kernel.supports(module, kwargs) else None
    except LossError:
        return None


def kernel_source(cls: type) -> Path | None:
    """The file of the fused kernel for loss class ``cls`` (exact type), or None: part of a loss's
    implementation digest (``provenance``) when fused kernels are on."""
    kernel = FUSED_KERNELS.get(cls)
    return None if kernel is None else Path(inspect.getsourcefile(kernel.run))
