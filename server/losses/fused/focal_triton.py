"""FocalLoss's closed form (``focal.closed_form``) as one hand-written Triton kernel, for float32 on a GPU.

``torch.compile`` turned the closed form into a per-row kernel that reached 8 % of the HBM roofline on an
H200 (80 classes in 128 lanes, a tensor-exponent ``pow``). This kernel is one pass over the flat
[N * C] logits: each program reads its block of logits (and the labels and weights of its rows, which
stay in cache), writes the gradient, and writes one partial sum of the weighted loss (or, for 'none', the
element-wise loss). 8 bytes per element for a float32 pred: the roofline's count. On an H200 it ran at
46 % of the roofline at 1 GiB (1.12 ms against the compiled kernel's 6.33), the whole term 12x autograd
(docs/performance.md, "On a GPU").

Same arguments and results as ``focal.closed_form`` (``ClosedForm.handwritten``), with one difference
its ``bind`` allows: for a reduced loss the first result is one partial sum per program, not per row
(``bind`` only adds them). Config values stay 0-d tensors, read by the kernel, so nothing is copied to the
host and no value compiles anew. This module imports Triton: the engine loads it only on a GPU
(``compiled.OnePass``), and a CPU install never does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048
# offsets past int32 need 64-bit index arithmetic, which is slower: only where the tensor needs it
INT32_ELEMENTS = 2**31 - BLOCK
WEIGHT_NONE, WEIGHT_ROW, WEIGHT_ELEMENT = 0, 1, 2


@triton.jit
def _focal_kernel(
    x_ptr, labels_ptr, weight_ptr, gamma_ptr, alpha_ptr, scale_ptr, grad_ptr, loss_ptr,
    numel, num_classes,
    weight_kind: tl.constexpr, elementwise: tl.constexpr, wide: tl.constexpr, gamma_two: tl.constexpr,
    block: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    if wide:
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
    if gamma_two:  # mmdet's default, by multiplies
        q_gamma = q * q
        d_q_gamma = 2.0 * q
    else:  # by exp2/log2, with torch's values at q = 0 (0^0 = 1; the fused kernels take gamma = 0 or
        # gamma >= 1 only, where the derivative is finite)
        log_q = tl.log2(q)
        q_gamma = tl.where(q > 0.0, tl.exp2(gamma * log_q), tl.where(gamma == 0.0, 1.0, 0.0))
        d_q_gamma = tl.where(q > 0.0, gamma * tl.exp2((gamma - 1.0) * log_q), tl.where(gamma == 1.0, 1.0, 0.0))
        d_q_gamma = tl.where(gamma == 0.0, 0.0, d_q_gamma)
    loss = a * q_gamma * bce
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
    else:
        tl.store(loss_ptr + program, tl.sum(tl.where(inside, loss * w, 0.0), axis=0))


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
) -> tuple[Tensor, Tensor]:
    """``focal.closed_form`` in one kernel: ``x`` [N, C] float32, ``labels`` [N] (C: background),
    ``weight`` 0-d (none), [N, 1] or [N, C]; ``gamma``, ``alpha``, ``scale`` 0-d. ``rows``: the first
    result holds partial sums of ``L * weight`` (one per program), else it is ``L`` [N, C].

    ``gamma_two``: the caller knows on the host that gamma is 2, and the kernel squares instead of
    ``exp2(gamma log2 q)``. The server does not pass it yet (its bind has gamma as a tensor): the
    prototype this kernel grew from ran 1.45x faster with it on an H200, in another run than the
    server's kernel; ``bench/triton_focal.py`` times both in one run."""
    x, labels = x.contiguous(), labels.contiguous()
    numel, num_classes = x.numel(), x.shape[1]
    if weight.dim() == 0:
        kind = WEIGHT_NONE
    elif weight.numel() == x.shape[0]:
        kind = WEIGHT_ROW
    else:
        kind = WEIGHT_ELEMENT
        weight = weight.expand_as(x)
    weight = weight.contiguous()
    grid = (triton.cdiv(numel, BLOCK),)
    grad = torch.empty_like(x)
    loss = torch.empty_like(x) if not rows else x.new_empty(grid[0])
    if numel:
        _focal_kernel[grid](
            x, labels, weight, gamma, alpha, scale.reshape(()), grad, loss, numel, num_classes,
            weight_kind=kind, elementwise=not rows, wide=numel > INT32_ELEMENTS, gamma_two=gamma_two, block=BLOCK,
        )  # fmt: skip
    return loss, grad
