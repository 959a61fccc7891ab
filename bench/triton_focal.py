"""A prototype: FocalLoss's loss and gradient as one hand-written Triton kernel (by hand, not a test).

The compiled closed form (``losses.fused.focal.closed_form`` under ``torch.compile``) reached 7-8 % of
the HBM roofline on an H200. This kernel, written for the fewest bytes, reached 63-67 %: one pass over the
flat [N * C] logits, each program reading its block of logits (and the labels and weights of its rows,
which stay in cache), writing the gradient and one partial sum of the weighted loss; the host adds the
partial sums. 8 bytes per element for a float32 pred, the roofline's count. The server's kernel,
``losses/fused/focal_triton.py``, grew from it; this one differs in what the server's does not do yet:
gamma = 2 specialised to a multiply (``gamma_two``), config values passed as Python numbers. ``bench/gpu.py``
times it beside the server's kernel, to measure that specialisation.

    python bench/triton_focal.py                       # on a GPU: check against autograd, time it
    TRITON_INTERPRET=1 python bench/triton_focal.py    # on the CPU: Triton's interpreter, checks only

Covers what the benchmark sends: sigmoid FocalLoss of class-index labels (C = background), float32
logits, weight None, [N] or [N, C], reduction 'mean' (with or without ``avg_factor``), 'sum' or 'none'.
"""

from __future__ import annotations

import statistics
import time

import torch
import triton
import triton.language as tl
from torch import Tensor

WEIGHT_NONE, WEIGHT_ROW, WEIGHT_ELEMENT = 0, 1, 2
BLOCK = 2048
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps  # mmdet divides by avg_factor + eps


@triton.jit
def _focal_kernel(
    x_ptr, labels_ptr, weight_ptr, grad_ptr, loss_ptr, partial_ptr,
    numel, num_classes, gamma, alpha, scale,
    weight_kind: tl.constexpr, elementwise: tl.constexpr, gamma_two: tl.constexpr, block: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0) * block + tl.arange(0, block)
    inside = offsets < numel
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    row = offsets // num_classes
    label = tl.load(labels_ptr + row, mask=inside, other=-1)
    t = (label == offsets - row * num_classes).to(tl.float32)
    p = tl.sigmoid(x)
    q = p + t * (1.0 - 2.0 * p)
    a = (1.0 - alpha) + t * (2.0 * alpha - 1.0)
    bce = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + tl.exp(-tl.abs(x)))
    if gamma_two:
        q_gamma = q * q
        d_q_gamma = 2.0 * q
    else:  # q^gamma through exp2/log2; gamma is 0 or >= 1 (FocalLoss's fused kernels take no other)
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
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(inside, loss * w, 0.0), axis=0))


def focal_loss_and_grad(
    x: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    gamma: float = 2.0,
    alpha: float = 0.25,
    loss_weight: float = 1.0,
    reduction: str = "mean",
    avg_factor: float | None = None,
) -> tuple[Tensor, Tensor]:
    """mmdet's ``FocalLoss(gamma, alpha, loss_weight, reduction)(x, labels, weight, avg_factor)`` and its
    gradient with respect to ``x`` (for an upstream of ones)."""
    x = x.contiguous()
    numel, num_classes = x.numel(), x.shape[1]
    kind = WEIGHT_NONE if weight is None else (WEIGHT_ROW if weight.numel() == x.shape[0] else WEIGHT_ELEMENT)
    weight = x if weight is None else weight.contiguous()  # a pointer the kernel never reads
    divisor = (numel if avg_factor is None else avg_factor + AVG_FACTOR_EPS) if reduction == "mean" else 1.0
    scale = loss_weight / divisor if reduction != "none" else loss_weight
    grid = (triton.cdiv(numel, BLOCK),)
    grad = torch.empty_like(x)
    elementwise = reduction == "none"
    loss = torch.empty_like(x) if elementwise else x.new_empty(grid[0])
    _focal_kernel[grid](
        x, labels, weight, grad, loss, loss, numel, num_classes, float(gamma), float(alpha), float(scale),
        weight_kind=kind, elementwise=elementwise, gamma_two=gamma == 2.0, block=BLOCK,
    )  # fmt: skip
    if elementwise:
        if kind != WEIGHT_NONE:  # mmdet's focal weight: [N] per row ([N, 1]), or one per element
            loss = loss * (weight.view(-1, 1) if kind == WEIGHT_ROW else weight.view_as(loss))
        return loss_weight * loss, grad
    return loss_weight * (loss.sum() / divisor), grad


def autograd_reference(x: Tensor, labels: Tensor, weight: Tensor | None, **config) -> tuple[Tensor, Tensor]:
    """The same through losswire's own FocalLoss module under autograd (itself checked against mmdet)."""
    from losswire.server.losses import build_loss

    reduction, avg_factor = config.pop("reduction", "mean"), config.pop("avg_factor", None)
    module = build_loss({"type": "FocalLoss", **config})
    pred = x.detach().clone().requires_grad_()
    loss = module(pred, labels, weight=weight, avg_factor=avg_factor, reduction_override=reduction)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), pred.grad


def check(device: str, rows: int = 3001, classes: int = 80) -> float:
    """The largest difference from autograd, relative to the largest value, over the configs covered."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, classes, generator=gen) * 4).to(device)
    labels = torch.randint(0, classes + 1, (rows,), generator=gen).to(device)
    worst = 0.0
    for weight_shape in (None, (rows,), (rows, classes)):
        weight = None if weight_shape is None else torch.rand(weight_shape, generator=gen).to(device)
        for gamma, reduction, avg_factor in [(2.0, "mean", 100.0), (1.5, "mean", None), (0.0, "sum", None),
                                              (1.0, "none", None), (2.0, "none", None)]:  # fmt: skip
            config = {"gamma": gamma, "alpha": 0.25, "loss_weight": 0.5, "reduction": reduction}
            fast = focal_loss_and_grad(x, labels, weight, avg_factor=avg_factor, **config)
            slow = autograd_reference(x, labels, weight, avg_factor=avg_factor, **config)
            for got, want in zip(fast, slow, strict=True):
                scale = float(want.abs().max()) or 1.0
                worst = max(worst, float((got - want).abs().max()) / scale)
    return worst


def time_ms(rows: int, classes: int = 80, repeats: int = 20) -> float:
    """Median milliseconds of one loss + gradient pass (mean, avg_factor, no weight) on CUDA."""
    x = torch.randn(rows, classes, device="cuda") * 3
    labels = torch.randint(0, classes + 1, (rows,), device="cuda")
    for _ in range(3):
        focal_loss_and_grad(x, labels, avg_factor=1000.0)
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        focal_loss_and_grad(x, labels, avg_factor=1000.0)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"largest difference from autograd (relative): {check(device):.2e}")
    if device == "cuda":
        for mib in (64, 256, 1024):
            print(f"{mib} MiB: {time_ms(mib * (1 << 20) // (80 * 4)):.3f} ms")
