"""QualityFocalLoss's closed form (``gfocal.closed_form``) as one hand-written Triton kernel, for float32 on a
GPU.

Quality focal loss (Li et al., "Generalized Focal Loss", NeurIPS 2020): for logits ``x`` [N, C], a label
[N] (a class in [0, C) is the row's positive column; anything else, the background C or a label out of
range, leaves the row all negative, as mmdet's ``pos`` mask does) and a quality score [N],

    y = score at the positive column, 0 elsewhere;  p = sigmoid(x);  m = |y - p| there, p elsewhere
    L_n = sum_c BCE(x, y) m^beta

and its gradient ``(p - y) m^beta + BCE beta m^(beta - 1) dm/dx`` with ``dm/dx = -sign(y - p) p (1 - p)``
at the positive column and ``p (1 - p)`` elsewhere, times the row's factor (``Reducer.gradient_scale``:
weight, reduction, ``loss_weight``).

``torch.compile`` made the closed form a kernel at 12-20 % of the HBM roofline on an H200. This one reads
each logit once and writes its gradient: 8 bytes per element, the roofline's count. A program takes a tile
of whole rows (``rows`` x the class count rounded up to a power of two), so each row's sum is one
reduction in registers, and the label, score and factor of a row are read once per row.

The kernel checks the values ``gfocal.supports`` reads as it computes (``HandWritten``): a NaN or Inf
logit makes its element's loss NaN (``inf - inf`` or ``inf * 0`` in the BCE), so does a NaN or Inf score
at a positive column, and a NaN or Inf weight makes its row's factor, added to the row's check as
``0 * factor``, NaN. Each program writes the sum of its rows' checks; a total that is not finite raises
``ValuesNotCovered`` after one host sync. A score that is NaN in a row without a positive column is never
read, by this kernel or the module, and the answer is the module's.

Same arguments and results as ``gfocal.closed_form`` (``ClosedForm.handwritten``), plus the keyword
``beta_two`` (``HandWritten.hints``: beta is 2, mmdet's default, known on the host), which squares instead of
``exp2(beta log2 m)``. Rows wider than ``MAX_CLASSES`` (a tile past the registers) are declined: the
compiled closed form answers those. ``bind`` gives the score in pred's dtype. This module imports Triton:
the engine loads it only on a GPU (``compiled.OnePass``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import DeclinedError, ValuesNotCovered
from .by_hand import power_and_derivative

TILE_ELEMENTS, NUM_WARPS = 2048, 4  # a program's rows x padded classes, and its warps
MAX_CLASSES = 8192  # one row's tile in registers; wider rows are the compiled closed form's


@triton.jit
def _quality_kernel(
    x_ptr, labels_ptr, score_ptr, beta_ptr, scale_ptr, grad_ptr, rows_loss_ptr, partials_ptr,
    num_rows, num_classes,
    scale_per_row: tl.constexpr, wide: tl.constexpr, beta_two: tl.constexpr,
    tile_rows: tl.constexpr, tile_classes: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    if wide:  # offsets past int32 need 64-bit index arithmetic: only where the tensor needs it
        program = program.to(tl.int64)
    rows = program * tile_rows + tl.arange(0, tile_rows)
    columns = tl.arange(0, tile_classes)
    row_in = rows < num_rows
    inside = row_in[:, None] & (columns < num_classes)[None, :]
    offsets = rows[:, None] * num_classes + columns[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_in, other=-1)
    score = tl.load(score_ptr + rows, mask=row_in, other=0.0)
    positive = columns[None, :] == label[:, None]  # a label outside [0, C) matches no column
    y = tl.where(positive, score[:, None], 0.0)
    p = tl.sigmoid(x)
    gap = y - p
    m = tl.where(positive, tl.abs(gap), p)
    bce = tl.maximum(x, 0.0) - x * y + tl.log(1.0 + tl.exp(-tl.abs(x)))
    m_beta, d_m_beta = power_and_derivative(m, tl.load(beta_ptr), beta_two)
    sign = tl.where(gap > 0.0, 1.0, tl.where(gap < 0.0, -1.0, 0.0))
    d_m = tl.where(positive, -sign, 1.0) * p * (1.0 - p)
    local = (p - y) * m_beta + bce * d_m_beta * d_m
    if scale_per_row:
        factor = tl.load(scale_ptr + rows, mask=row_in, other=0.0)
    else:
        factor = tl.zeros((tile_rows,), dtype=tl.float32) + tl.load(scale_ptr)
    tl.store(grad_ptr + offsets, local * factor[:, None], mask=inside)
    row_loss = tl.sum(tl.where(inside, bce * m_beta, 0.0), axis=1)
    tl.store(rows_loss_ptr + rows, row_loss, mask=row_in)
    # a NaN or Inf weight reaches the check through its row's factor (0 * inf is NaN)
    tl.store(partials_ptr + program, tl.sum(tl.where(row_in, row_loss + 0.0 * factor, 0.0), axis=0))


def closed_form(
    x: Tensor,
    labels: Tensor,
    score: Tensor,
    beta: Tensor,
    row_scale: Tensor,
    *,
    beta_two: bool = False,
    tile_elements: int = TILE_ELEMENTS,
    num_warps: int = NUM_WARPS,
) -> tuple[Tensor, Tensor]:
    """``gfocal.closed_form`` in one kernel: ``x`` [N, C] float32, ``labels`` [N] int64, ``score`` [N] in
    x's dtype, ``beta`` 0-d, ``row_scale`` 0-d, [1] or [N]; returns the per-sample loss [N] and the
    gradient [N, C].
    ``beta_two``: beta is 2 (the caller knows it on the host), and the kernel squares. ``tile_elements``
    (a power of two) and ``num_warps``: the launch's shape.

    Raises ``ValuesNotCovered`` where pred, a positive row's score or the row factor (the weight) holds a
    NaN or Inf, or the sums overflow; ``DeclinedError`` for rows past ``MAX_CLASSES``."""
    num_rows, num_classes = x.shape
    if not num_classes and num_rows:
        raise ValuesNotCovered("no logits to read the labels against (C = 0): supports reads them")
    if num_classes > MAX_CLASSES:
        raise DeclinedError(f"C = {num_classes}: rows past the tile, the compiled closed form's")
    x, labels, score = x.contiguous(), labels.contiguous(), score.contiguous()
    scale_per_row = row_scale.numel() != 1
    row_scale = row_scale.contiguous() if scale_per_row else row_scale.reshape(())
    tile_classes = triton.next_power_of_2(max(num_classes, 1))
    tile_rows = max(1, tile_elements // tile_classes)
    grid = (triton.cdiv(num_rows, tile_rows),)
    grad = torch.empty_like(x)
    rows_loss = x.new_empty(num_rows)
    partials = x.new_empty(grid[0])
    if num_rows:
        _quality_kernel[grid](
            x, labels, score, beta, row_scale, grad, rows_loss, partials, num_rows, num_classes,
            scale_per_row=scale_per_row, wide=num_rows * tile_classes > 2**31 - tile_elements, beta_two=beta_two,
            tile_rows=tile_rows, tile_classes=tile_classes, num_warps=num_warps,
        )  # fmt: skip
    if not math.isfinite(partials.sum().item()):
        raise ValuesNotCovered("a NaN or Inf in pred, a positive row's score or the weight, or a sum past float32")
    return rows_loss, grad
