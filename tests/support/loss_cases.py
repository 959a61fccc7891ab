"""Representative inputs for every built-in loss and mode, shared by the engine and service tests.

Each ``Sample`` is one way of calling a loss (a config, positional inputs, a valid element-wise
weight). Inputs stay away from the losses' kinks (ties, the Smooth L1 threshold, touching boxes)
so that finite differences and ``gradcheck`` are meaningful.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

N, C = 6, 5


@dataclasses.dataclass
class Sample:
    id: str
    cfg: dict[str, Any]
    args: tuple[Any, ...]  # positional forward inputs, pred first
    weight: Tensor | None  # a valid weight for the weight slot (None: the loss takes none there)
    float_target: bool = False  # the second input holds float tensors with a defined gradient
    supports_reductions: tuple[str, ...] = ("none", "mean", "sum")
    # finite differences cross a discontinuity in the target (e.g. QFL's "target != 0" mask)
    gradcheck_target: bool = True


def cloned(value: Any) -> Any:
    """A loss input cloned, so that one call cannot change what the next sees: a tensor, a tuple of them
    (a ``(labels, score)`` target), or a dict of inputs by name; anything else as it is."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(cloned(v) for v in value)
    if isinstance(value, dict):
        return {name: cloned(v) for name, v in value.items()}
    return value


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _rand(g: torch.Generator, *shape: int, dtype: torch.dtype) -> Tensor:
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)


def _labels(g: torch.Generator, n: int, high: int) -> Tensor:
    return torch.randint(0, high, (n,), generator=g)


def boxes(g: torch.Generator, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Target boxes and predictions that partly overlap them (some pairs apart), x1 < x2, y1 < y2."""
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 10
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4 + 1
    target = torch.cat([xy, xy + wh], dim=1)
    shift = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 3
    shift[-1] += 7.3  # one pair far apart: IoU 0, GIoU < 0
    grow = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.6 + 0.7
    pred = torch.cat([xy + shift, xy + shift + wh * grow], dim=1)
    return pred.to(dtype), target.to(dtype)


def _regression(name: str, extra: dict[str, Any]) -> Callable[[torch.dtype, int], list[Sample]]:
    def build(dtype: torch.dtype, seed: int) -> list[Sample]:
        g = _gen(seed)
        pred = _randn(g, N, 4, dtype=dtype)
        target = pred + (_rand(g, N, 4, dtype=torch.float64) * 2.2 + 0.05).to(dtype) * torch.sign(
            _randn(g, N, 4, dtype=dtype)
        )
        weight = _rand(g, N, 4, dtype=dtype) + 0.1
        cfg = {"type": name, **extra}
        return [Sample(f"{name}", cfg, (pred, target), weight, float_target=True)]

    return build


def _cross_entropy(dtype: torch.dtype, seed: int) -> list[Sample]:
    g = _gen(seed)
    logits = _randn(g, N, C, dtype=dtype)
    labels = _labels(g, N, C)
    sig_labels = _labels(g, N, C + 1)  # C = background
    soft = _rand(g, N, C, dtype=dtype)
    masks = _randn(g, N, C, 3, 3, dtype=dtype)
    mask_target = _rand(g, N, 3, 3, dtype=dtype)
    roi_labels = _labels(g, N, C)
    w_sample = _rand(g, N, dtype=dtype) + 0.1
    ce = {"type": "CrossEntropyLoss"}
    return [
        Sample("CE/softmax", ce, (logits, labels), w_sample),
        Sample(
            "CE/softmax/class_weight", {**ce, "class_weight": [0.5, 1.0, 1.5, 2.0, 0.8]}, (logits, labels), w_sample
        ),
        Sample("CE/sigmoid/index", {**ce, "use_sigmoid": True}, (logits, sig_labels), w_sample),
        # mmdet rounds sigmoid-mode labels to float32 (and so do we): finite differences of 1e-6
        # in the label drown in that rounding, so gradcheck checks pred only.
        Sample(
            "CE/sigmoid/soft",
            {**ce, "use_sigmoid": True},
            (logits, soft),
            soft + 0.2,
            float_target=True,
            gradcheck_target=False,
        ),
        Sample(
            "CE/mask",
            {**ce, "use_mask": True},
            (masks, mask_target),
            roi_labels,
            float_target=True,
            supports_reductions=("mean",),
        ),
    ]


def _focal(dtype: torch.dtype, seed: int) -> list[Sample]:
    g = _gen(seed)
    logits = _randn(g, N, C, dtype=dtype)
    index = _labels(g, N, C + 1)
    soft = _rand(g, N, C, dtype=dtype)
    prob = _rand(g, N, C, dtype=dtype) * 0.9 + 0.05
    w = _rand(g, N, dtype=dtype) + 0.1
    fl = {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}
    return [
        Sample("Focal/index", fl, (logits, index), w),
        Sample("Focal/soft", {**fl, "gamma": 1.5}, (logits, soft), _rand(g, N, C, dtype=dtype), float_target=True),
        Sample("Focal/activated", {**fl, "activated": True}, (prob, index), w),
    ]


def _quality_focal(dtype: torch.dtype, seed: int) -> list[Sample]:
    g = _gen(seed)
    logits = _randn(g, N, C, dtype=dtype)
    label = _labels(g, N, C + 1)
    score = _rand(g, N, dtype=dtype) * 0.9 + 0.05
    dense = torch.zeros(N, C, dtype=dtype)
    dense[torch.arange(N), _labels(g, N, C)] = (_rand(g, N, dtype=torch.float64) * 0.8 + 0.1).to(dtype)
    prob = _rand(g, N, C, dtype=dtype) * 0.9 + 0.05
    w = _rand(g, N, dtype=dtype) + 0.1
    qfl = {"type": "QualityFocalLoss"}
    return [
        Sample("QFL/tuple", qfl, (logits, (label, score)), w, float_target=True),
        Sample("QFL/dense", {**qfl, "beta": 1.5}, (logits, dense), w, float_target=True, gradcheck_target=False),
        Sample("QFL/activated", {**qfl, "activated": True}, (prob, (label, score)), w, float_target=True),
    ]


def _dfl(dtype: torch.dtype, seed: int) -> list[Sample]:
    g = _gen(seed)
    bins = 8
    logits = _randn(g, N, bins, dtype=dtype)
    dist = (torch.randint(0, bins - 1, (N,), generator=g) + _rand(g, N, dtype=torch.float64) * 0.8 + 0.1).to(dtype)
    return [
        Sample(
            "DFL", {"type": "DistributionFocalLoss"}, (logits, dist), _rand(g, N, dtype=dtype) + 0.1, float_target=True
        )
    ]


def _iou(name: str, extra: dict[str, Any]) -> Callable[[torch.dtype, int], list[Sample]]:
    def build(dtype: torch.dtype, seed: int) -> list[Sample]:
        g = _gen(seed)
        pred, target = boxes(g, N, dtype)
        if name == "IoULoss":  # log/linear IoU have no gradient where boxes do not overlap
            pred, target = pred[:-1], target[:-1]
        weight = _rand(g, pred.shape[0], dtype=dtype) + 0.1
        tag = "/".join(f"{k}={v}" for k, v in extra.items())
        return [Sample(f"{name}/{tag}".rstrip("/"), {"type": name, **extra}, (pred, target), weight, float_target=True)]

    return build


BUILDERS: dict[str, list[Callable[[torch.dtype, int], list[Sample]]]] = {
    "L1Loss": [_regression("L1Loss", {})],
    "SmoothL1Loss": [_regression("SmoothL1Loss", {"beta": 0.5})],
    "MSELoss": [_regression("MSELoss", {})],
    "BalancedL1Loss": [_regression("BalancedL1Loss", {"alpha": 0.5, "gamma": 1.5, "beta": 1.0})],
    "CrossEntropyLoss": [_cross_entropy],
    "FocalLoss": [_focal],
    "QualityFocalLoss": [_quality_focal],
    "DistributionFocalLoss": [_dfl],
    "IoULoss": [_iou("IoULoss", {"mode": m}) for m in ("linear", "square", "log")],
    "GIoULoss": [_iou("GIoULoss", {})],
}


def samples(dtype: torch.dtype = torch.float64, seed: int = 0) -> Iterator[Sample]:
    for builders in BUILDERS.values():
        for build in builders:
            yield from build(dtype, seed)
