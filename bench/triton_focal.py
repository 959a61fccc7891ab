"""FocalLoss's hand-written Triton kernel (``losses/fused/focal_triton.py``), by hand: checked against
autograd, and timed with and without its gamma = 2 specialisation (``gamma_two``, which the server passes
where the module's gamma is 2), and at other launch shapes (``block``, ``num_warps``).

    python bench/triton_focal.py                       # on a GPU: check against autograd, time it
    TRITON_INTERPRET=1 python bench/triton_focal.py    # on the CPU: Triton's interpreter, checks only

The kernel reads the config from 0-d tensors and returns the sum of the weighted loss (or the
element-wise loss for 'none'); ``focal_loss_and_grad`` turns that into the module's answer with the
server's own bind (``losses/fused/focal.py``). ``bench/gpu.py``'s ``triton`` section runs ``check`` and
``time_ms``.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import Tensor

from losswire.server.losses import build_loss
from losswire.server.losses.focal import FocalLoss
from losswire.server.losses.fused.focal import bind
from losswire.server.losses.fused.focal_triton import closed_form


def focal_loss_and_grad(
    x: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    gamma: float = 2.0,
    alpha: float = 0.25,
    loss_weight: float = 1.0,
    reduction: str = "mean",
    avg_factor: float | None = None,
    gamma_two: bool = False,
    module: FocalLoss | None = None,
    **launch: int,
) -> tuple[Tensor, Tensor]:
    """mmdet's ``FocalLoss(gamma, alpha, loss_weight, reduction)(x, labels, weight, avg_factor)`` and its
    gradient with respect to ``x`` (for an upstream of ones), by the kernel through the server's own
    ``bind`` (``module``: one built already, so that a timing leaves building out; ``launch``: the kernel's
    ``block`` and ``num_warps``)."""
    if module is None:
        module = build_loss({"type": "FocalLoss", "gamma": gamma, "alpha": alpha, "loss_weight": loss_weight})
    call = {"pred": x, "target": labels, "weight": weight, "avg_factor": avg_factor, "reduction_override": reduction}
    answer = bind(module, call, functools.partial(closed_form, gamma_two=gamma_two, **launch))
    return answer.loss, answer.gradient(None)


def autograd_reference(x: Tensor, labels: Tensor, weight: Tensor | None, **config) -> tuple[Tensor, Tensor]:
    """The same through losswire's own FocalLoss module under autograd (itself checked against mmdet)."""
    reduction, avg_factor = config.pop("reduction", "mean"), config.pop("avg_factor", None)
    module = build_loss({"type": "FocalLoss", **config})
    pred = x.detach().clone().requires_grad_()
    loss = module(pred, labels, weight=weight, avg_factor=avg_factor, reduction_override=reduction)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), pred.grad


def check(device: str, rows: int = 3001, classes: int = 80) -> float:
    """The largest difference from autograd, relative to the largest value, over the configs covered,
    with and without the gamma = 2 specialisation."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, classes, generator=gen) * 4).to(device)
    labels = torch.randint(0, classes + 1, (rows,), generator=gen).to(device)
    worst = 0.0
    for weight_shape in (None, (rows,), (rows, classes)):
        weight = None if weight_shape is None else torch.rand(weight_shape, generator=gen).to(device)
        for gamma, reduction, avg_factor in [(2.0, "mean", 100.0), (1.5, "mean", None), (0.0, "sum", None),
                                              (1.0, "none", None), (2.0, "none", None)]:  # fmt: skip
            config = {"gamma": gamma, "alpha": 0.25, "loss_weight": 0.5, "reduction": reduction}
            slow = autograd_reference(x, labels, weight, avg_factor=avg_factor, **config)
            for gamma_two in {False, gamma == 2.0}:
                fast = focal_loss_and_grad(x, labels, weight, avg_factor=avg_factor, gamma_two=gamma_two, **config)
                for got, want in zip(fast, slow, strict=True):
                    scale = float(want.abs().max()) or 1.0
                    worst = max(worst, float((got - want).abs().max()) / scale)
    return worst


def time_ms(rows: int, classes: int = 80, repeats: int = 20, gamma_two: bool = False) -> float:
    """Median milliseconds of one loss + gradient pass (gamma 2, mean, avg_factor, no weight) on CUDA."""
    x = torch.randn(rows, classes, device="cuda") * 3
    labels = torch.randint(0, classes + 1, (rows,), device="cuda")

    module = build_loss({"type": "FocalLoss"})

    def run() -> None:
        focal_loss_and_grad(x, labels, avg_factor=1000.0, gamma_two=gamma_two, module=module)

    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"largest difference from autograd (relative): {check(device):.2e}")
    if device == "cuda":
        for mib in (64, 256, 1024):
            rows = mib * (1 << 20) // (80 * 4)
            general, two = time_ms(rows), time_ms(rows, gamma_two=True)
            print(f"{mib} MiB: {general:.3f} ms, gamma = 2 specialised {two:.3f} ms ({general / two:.2f}x)")
