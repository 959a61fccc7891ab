"""FocalLoss's closed form (``focal.closed_form``) as one hand-written Triton kernel, for float32 on a GPU.

``torch.compile`` turned the closed form into a per-row kernel that reached 8 % of the HBM roofline on an
H200 (80 classes in 128 lanes, a tensor-exponent ``pow``). This kernel is one pass over the flat
[N * C] logits: each program reads its block of logits (and the labels and weights of its rows, which
stay in cache), writes the gradient, and writes one partial sum of the weighted loss (and, for 'none',
the element-wise loss). 8 bytes per element for a float32 pred: the roofline's count. On an H200 its
kernels ran at 61 % of the roofline at 1 GiB (0.86 ms against the compiled kernel's 6.33), the whole term
19x autograd (docs/performance.md, "On a GPU"; blocks of 1024 elements and 4 warps were the fastest shape
there).

Same arguments and results as ``focal.closed_form`` (``ClosedForm.handwritten``), with two differences
its ``bind`` allows: for a reduced loss the first result is the whole sum of ``L * weight`` (one element,
not one per row: ``bind`` adds what it gets); and the keyword ``gamma_two`` (``HandWritten.hints``: gamma is 2, known on
the host) squares instead of ``exp2(gamma log2 q)``, as mmdet's default config asks. Config values stay
0-d tensors, read by the kernel, so nothing is copied to the host and no value compiles anew.

It checks the values ``focal.supports`` reads as it computes (``HandWritten``): a NaN or Inf in pred or
weight makes its element's ``L * weight`` NaN (an infinite logit gives ``inf - inf`` or ``inf * 0`` in the
BCE; an infinite weight ``inf * 0`` or ``inf``), and so does a label outside [0, C]; each program writes
its partial sum of ``L * weight`` whatever the reduction, and a sum that is not finite raises
``ValuesNotCovered`` (one host sync, where ``supports`` took two and read pred once more). This module
imports Triton: the engine loads it only on a GPU (``compiled.OnePass``), and a CPU install never does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ValuesNotCovered
from .by_hand import power_and_derivative

BLOCK, NUM_WARPS = 1024, 4
WEIGHT_NONE, WEIGHT_ROW, WEIGHT_ELEMENT = 0, 1, 2


@triton.jit
def _focal_kernel(
    x_ptr, labels_ptr, weight_ptr, gamma_ptr, alpha_ptr, scale_ptr, grad_ptr, loss_ptr, partials_ptr,
    numel, num_classes,
    weight_kind: tl.constexpr, elementwise: tl.constexpr, wide: tl.constexpr, gamma_two: tl.constexpr,
    block: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    if wide:  # offsets past int32 need 64-bit index arithmetic, which is slower: only where the tensor needs it
        program = program.to(tl.int64)
    offsets = program * block + tl.arange(0, block)
    inside = offsets < numel
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    row = offsets // num_classes
    label = tl.load(labels_ptr + row, mask=inside, other=-1)
    gamma, alpha, scale = tl.load(gamma_ptr), tl.load(alpha_ptr), tl.load(scale_ptr)
    # t: the one-hot label; q = p for a negative, 1 - p for the label; a: alpha's side
    t = (label == offsets - row * num_classes).to(tl.float32)
    p = tl.sigmoid(x)
    q = p + t * (1.0 - 2.0 * p)
    a = (1.0 - alpha) + t * (2.0 * alpha - 1.0)
    bce = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + tl.exp(-tl.abs(x)))
    q_gamma, d_q_gamma = power_and_derivative(q, gamma, gamma_two)
    # a label outside [0, C] (C: background) is the module's error to raise: NaN marks it (see the docstring)
    loss = tl.where((label < 0) | (label > num_classes), float("nan"), a * q_gamma * bce)
    local = a * ((p - t) * q_gamma + bce * d_q_gamma * (1.0 - 2.0 * t) * p * (1.0 - p))
    if weight_kind == 1:
        w = tl.load(weight_ptr + row, mask=inside, other=0.0)
    elif weight_kind == 2:
        w = tl.load(weight_ptr + offsets, mask=inside, other=0.0)
    else:
        w = 1.0
    tl.store(grad_ptr + offsets, local * (scale * w), mask=inside)
    if elementwise:
        tl.store(loss_ptr + offsets, loss, mask=inside)
    tl.store(partials_ptr + program, tl.sum(tl.where(inside, loss * w, 0.0), axis=0))


def closed_form(
    x: Tensor,
    labels: Tensor,
    weight: Tensor,
    gamma: Tensor,
    alpha: Tensor,
    scale: Tensor,
    rows: bool,
    *,
    gamma_two: bool = False,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> tuple[Tensor, Tensor]:
    """``focal.closed_form`` in one kernel: ``x`` [N, C] float32, ``labels`` [N] (C: background),
    ``weight`` 0-d (none), [N, 1] or [N, C]; ``gamma``, ``alpha``, ``scale`` 0-d. ``rows``: the first
    result is the sum of ``L * weight`` [1] (the programs' partial sums, added once for the check and the
    loss), else it is ``L`` [N, C].
    ``gamma_two``: gamma is 2 (the caller knows it on the host), and the kernel squares. ``block`` (a power
    of two) and ``num_warps``: the launch's shape, which ``bench/gpu.py`` sweeps.

    Raises ``ValuesNotCovered`` where pred or weight holds a NaN or Inf, a label is outside [0, C], or the
    partial sums overflow: ``supports`` then decides the call."""
    x, labels = x.contiguous(), labels.contiguous()
    numel, num_classes = x.numel(), x.shape[1]
    if not numel and labels.numel():
        raise ValuesNotCovered("no logits to check the labels against (C = 0): supports reads them")
    if weight.dim() == 0:
        kind = WEIGHT_NONE
    elif weight.numel() == x.shape[0]:
        kind = WEIGHT_ROW
    else:
        kind = WEIGHT_ELEMENT
        weight = weight.expand_as(x)
    weight = weight.contiguous()
    grid = (triton.cdiv(numel, block),)
    grad = torch.empty_like(x)
    partials = x.new_empty(grid[0])
    loss = torch.empty_like(x) if not rows else partials  # the kernel writes no element-wise loss then
    if numel:
        _focal_kernel[grid](
            x, labels, weight, gamma, alpha, scale.reshape(()), grad, loss, partials, numel, num_classes,
            weight_kind=kind, elementwise=not rows, wide=numel > 2**31 - block, gamma_two=gamma_two,
            block=block, num_warps=num_warps,
        )  # fmt: skip
    total = partials.sum()
    if not math.isfinite(total.item()):
        raise ValuesNotCovered("a NaN or Inf in pred or weight, a label outside [0, C], or a sum past float32")
    return (total.reshape(1) if rows else loss), grad
