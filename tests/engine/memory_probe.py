"""Measures the peak memory of building a loss and of one forward + backward, for the estimates' calibration.

Run as a script (tests/engine/test_estimates.py does, in a fresh process): ``memory_probe.py CASE...``
prints one JSON object per case: ``{"case", "module_bytes", "forward_bytes", "estimate": {...}}``.

The peak is the process's resident high-water mark (``VmHWM``), reset before each step by writing 5 to
``/proc/self/clear_refs`` (Linux >= 4.0), minus the resident size at the reset: what the step allocated
and touched on top of what was there. torch's CPU tensors come from malloc, so the caller sets
``MALLOC_MMAP_THRESHOLD_`` low: every tensor is then its own mapping, returned to the system when freed,
and a step cannot hide its peak in memory an earlier step freed. One intra-op thread, as small terms run.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from losswire.server.losses import LOSSES

Case = tuple[dict[str, Any], Callable[[], tuple[tuple[Any, ...], dict[str, tuple[int, ...]]]]]
N, C = 100_000, 80  # 8M elements: 32 MB of float32 logits


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n: int, c: int) -> torch.Tensor:
    return torch.randn(n, c, generator=_gen())


def _labels(n: int, high: int) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=_gen(1))


def _boxes(n: int, seed: int = 2) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=_gen(seed)) * 10
    return torch.cat([corner, corner + torch.rand(n, 2, generator=_gen(seed + 1)) * 5 + 0.5], dim=1)


def _pairwise(n: int, width: int = 4) -> tuple[tuple[Any, ...], dict[str, tuple[int, ...]]]:
    pred, target = torch.randn(n, width, generator=_gen()), torch.randn(n, width, generator=_gen(1))
    return (pred, target), {"pred": (n, width), "target": (n, width)}


def _box_pair(n: int) -> tuple[tuple[Any, ...], dict[str, tuple[int, ...]]]:
    return (_boxes(n), _boxes(n, 7)), {"pred": (n, 4), "target": (n, 4)}


def _classes(n: int, c: int, background: bool = True) -> tuple[tuple[Any, ...], dict[str, tuple[int, ...]]]:
    return (_logits(n, c), _labels(n, c + 1 if background else c)), {"pred": (n, c), "target": (n,)}


def _ae(batch: int, side: int, objects: int) -> tuple[tuple[Any, ...], dict[str, tuple[int, ...]]]:
    maps = torch.randn(batch, 1, side, side, generator=_gen()), torch.randn(batch, 1, side, side, generator=_gen(1))
    rows = torch.randint(0, side, (batch, objects, 4), generator=_gen(2)).tolist()
    match = [[[[a, b], [c, d]] for a, b, c, d in image] for image in rows]
    shapes = {"pred": (batch, 1, side, side), "target": (batch, 1, side, side), "match": (batch, batch * objects)}
    return (*maps, match), shapes


CASES: dict[str, Case] = {
    "AssociativeEmbeddingLoss/maps": ({"type": "AssociativeEmbeddingLoss"}, lambda: _ae(8, 1024, 4)),
    "AssociativeEmbeddingLoss/objects": ({"type": "AssociativeEmbeddingLoss"}, lambda: _ae(1, 64, 200_000)),
    "AssociativeEmbeddingLoss/images": ({"type": "AssociativeEmbeddingLoss"}, lambda: _ae(200_000, 1, 1)),
    "AssociativeEmbeddingLoss/empty": ({"type": "AssociativeEmbeddingLoss"}, lambda: _ae(400_000, 1, 0)),
    "BalancedL1Loss": ({"type": "BalancedL1Loss"}, lambda: _pairwise(2 * N)),
    "BoundedIoULoss": ({"type": "BoundedIoULoss"}, lambda: _box_pair(2 * N)),
    "CIoULoss": ({"type": "CIoULoss"}, lambda: _box_pair(2 * N)),
    "DIoULoss": ({"type": "DIoULoss"}, lambda: _box_pair(2 * N)),
    "EIoULoss": ({"type": "EIoULoss"}, lambda: _box_pair(2 * N)),
    "SIoULoss": ({"type": "SIoULoss"}, lambda: _box_pair(2 * N)),
    "GIoULoss": ({"type": "GIoULoss"}, lambda: _box_pair(2 * N)),
    "IoULoss": ({"type": "IoULoss"}, lambda: _box_pair(2 * N)),
    "CrossEntropyLoss": (
        {"type": "CrossEntropyLoss"},
        lambda: ((_logits(N, C), _labels(N, C)), {"cls_score": (N, C), "label": (N,)}),
    ),
    "CrossEntropyLoss/sigmoid": (
        {"type": "CrossEntropyLoss", "use_sigmoid": True},
        lambda: ((_logits(N, C), _labels(N, C + 1)), {"cls_score": (N, C), "label": (N,)}),
    ),
    "CrossEntropyLoss/mask": (
        {"type": "CrossEntropyLoss", "use_mask": True},
        lambda: (
            (torch.randn(64, 8, 112, 112, generator=_gen()), torch.rand(64, 112, 112), _labels(64, 8)),
            {"cls_score": (64, 8, 112, 112), "label": (64, 112, 112), "weight": (64,)},
        ),
    ),
    "CrossEntropyCustomLoss": (
        {"type": "CrossEntropyCustomLoss", "num_classes": C - 1},
        lambda: ((_logits(N, C), _labels(N, C)), {"cls_score": (N, C), "label": (N,)}),
    ),
    "DiceLoss": (
        {"type": "DiceLoss"},
        lambda: (
            (torch.randn(64, 256, 256), torch.rand(64, 256, 256)),
            {"pred": (64, 256, 256), "target": (64, 256, 256)},
        ),
    ),
    "DistributionFocalLoss": (
        {"type": "DistributionFocalLoss"},
        lambda: ((_logits(4 * N, 17), torch.rand(4 * N) * 15.9), {"pred": (4 * N, 17), "target": (4 * N,)}),
    ),
    "EQLV2Loss": (
        {"type": "EQLV2Loss", "num_classes": C - 1},
        lambda: ((_logits(N, C), _labels(N, C)), {"cls_score": (N, C), "label": (N,)}),
    ),
    "FocalLoss": ({"type": "FocalLoss"}, lambda: _classes(N, C)),
    "FocalLoss/dense": (
        {"type": "FocalLoss"},
        lambda: ((_logits(N, C), torch.rand(N, C)), {"pred": (N, C), "target": (N, C)}),
    ),
    "FocalCustomLoss": ({"type": "FocalCustomLoss", "num_classes": C}, lambda: _classes(N, C)),
    "GHMC": (
        {"type": "GHMC"},
        lambda: (
            (_logits(N, C), (torch.rand(N, C) > 0.9).float(), torch.ones(N, C)),
            {"pred": (N, C), "target": (N, C), "label_weight": (N, C)},
        ),
    ),
    "GHMR": (
        {"type": "GHMR"},
        lambda: ((*_pairwise(2 * N)[0], torch.ones(2 * N, 4)), {"pred": (2 * N, 4), "label_weight": (2 * N, 4)}),
    ),
    "GaussianFocalLoss": (
        {"type": "GaussianFocalLoss"},
        lambda: ((torch.rand(8, 80, 128, 128), torch.rand(8, 80, 128, 128)), {"pred": (8, 80, 128, 128)}),
    ),
    "KnowledgeDistillationKLDivLoss": (
        {"type": "KnowledgeDistillationKLDivLoss"},
        lambda: ((_logits(N, C), _logits(N, C)), {"pred": (N, C), "soft_label": (N, C)}),
    ),
    "L1Loss": ({"type": "L1Loss"}, lambda: _pairwise(2 * N)),
    "MSELoss": ({"type": "MSELoss"}, lambda: _pairwise(2 * N)),
    "SmoothL1Loss": ({"type": "SmoothL1Loss"}, lambda: _pairwise(2 * N)),
    "L2Loss": (
        {"type": "L2Loss", "neg_pos_ub": 3},
        lambda: ((torch.rand(2000, 4000), (torch.rand(2000, 4000) > 0.95).float()), {"pred": (2000, 4000)}),
    ),
    "MarginL2Loss": (
        {"type": "MarginL2Loss", "neg_pos_ub": 3, "hard_mining": True},
        lambda: ((torch.rand(2000, 4000), (torch.rand(2000, 4000) > 0.95).float()), {"pred": (2000, 4000)}),
    ),
    "MultiPosCrossEntropyLoss": (
        {"type": "MultiPosCrossEntropyLoss"},
        lambda: ((torch.randn(2000, 4000), (torch.rand(2000, 4000) > 0.9).float()), {"cls_score": (2000, 4000)}),
    ),
    "QualityFocalLoss": (
        {"type": "QualityFocalLoss"},
        lambda: ((_logits(N, C), (_labels(N, C + 1), torch.rand(N))), {"pred": (N, C), "target": ((N,), (N,))}),
    ),
    "SeesawLoss": (
        {"type": "SeesawLoss", "num_classes": C},
        lambda: ((_logits(N, C + 2), _labels(N, C + 1)), {"cls_score": (N, C + 2), "labels": (N,)}),
    ),
    "TripletLoss": (
        {"type": "TripletLoss"},
        lambda: ((torch.randn(2000, 128), _labels(2000, 100)), {"inputs": (2000, 128), "targets": (2000,)}),
    ),
    "VarifocalLoss": (
        {"type": "VarifocalLoss"},
        lambda: ((_logits(N, C), torch.rand(N, C) * (torch.rand(N, C) > 0.9)), {"pred": (N, C), "target": (N, C)}),
    ),
    # the pathological configs of the estimates' tests, at a quarter of their size (linear in it) or, where
    # quadratic, at half of it
    "GHMC/bins": ({"type": "GHMC", "bins": 62_500_000}, lambda: ((), {})),
    "EQLV2Loss/num_classes": ({"type": "EQLV2Loss", "num_classes": 25_000_000}, lambda: ((), {})),
    "SeesawLoss/num_classes": ({"type": "SeesawLoss", "num_classes": 25_000_000}, lambda: ((), {})),
    "SeesawLoss/table": (
        {"type": "SeesawLoss", "num_classes": 4000},
        lambda: ((_logits(1, 4002), torch.zeros(1, dtype=torch.long)), {"cls_score": (1, 4002), "labels": (1,)}),
    ),
    "GHMC/bins-forward": (
        {"type": "GHMC", "bins": 25_000_000, "momentum": 0.5},
        lambda: (
            (_logits(1000, C), (torch.rand(1000, C) > 0.9).float(), torch.ones(1000, C)),
            {"pred": (1000, C), "target": (1000, C), "label_weight": (1000, C)},
        ),
    ),
    "EQLV2Loss/num_classes-forward": (
        {"type": "EQLV2Loss", "num_classes": 5_000_000},
        lambda: ((_logits(2, 5_000_001), _labels(2, 5_000_000)), {"cls_score": (2, 5_000_001), "label": (2,)}),
    ),
    "SeesawLoss/num_classes-forward": (
        {"type": "SeesawLoss", "num_classes": 5_000_000, "p": 0.0},
        lambda: ((_logits(2, 5_000_002), _labels(2, 5_000_000)), {"cls_score": (2, 5_000_002), "labels": (2,)}),
    ),
    "TripletLoss/batch": (
        {"type": "TripletLoss"},
        lambda: ((torch.randn(4000, 1), _labels(4000, 1000)), {"inputs": (4000, 1), "targets": (4000,)}),
    ),
}

# The pathological configs at their full size (about 1 to 2 GiB each): measured by hand for the record
# (``memory_probe.py GHMC/bins/full ...``), not by the test.
CASES.update(
    {
        "GHMC/bins/full": ({"type": "GHMC", "bins": 250_000_000}, lambda: ((), {})),
        "EQLV2Loss/num_classes/full": ({"type": "EQLV2Loss", "num_classes": 100_000_000}, lambda: ((), {})),
        "SeesawLoss/num_classes/full": ({"type": "SeesawLoss", "num_classes": 100_000_000}, lambda: ((), {})),
        "SeesawLoss/table/full": (
            {"type": "SeesawLoss", "num_classes": 8000},
            lambda: ((_logits(1, 8002), torch.zeros(1, dtype=torch.long)), {"cls_score": (1, 8002), "labels": (1,)}),
        ),
        "TripletLoss/batch/full": (
            {"type": "TripletLoss"},
            lambda: ((torch.randn(8000, 1), _labels(8000, 1000)), {"inputs": (8000, 1), "targets": (8000,)}),
        ),
    }
)
FULL_SIZE = tuple(name for name in CASES if name.endswith("/full"))


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak(step: Callable[[], Any]) -> tuple[Any, int]:
    """``step()``'s result and the resident memory it added at its peak."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status("VmRSS")
    result = step()
    return result, _status("VmHWM") - before


def _forward_backward(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    output = module(*args)
    parts = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
    total = sum(part.sum() for part in parts)
    torch.autograd.grad(total, [args[0]])


def _as(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return tuple(_as(v, dtype) for v in value) if isinstance(value, tuple) else value


def measure(case: str) -> dict[str, Any]:
    """``case`` is a name of CASES, with ``@float64`` for float64 inputs."""
    name, _, dtype = case.partition("@")
    cfg, build = CASES[name]
    args, shapes = build()
    itemsize = 8 if dtype == "float64" else 4
    if args:
        args = tuple(_as(a, torch.float64) for a in args) if dtype == "float64" else args
        args = (args[0].requires_grad_(), *args[1:])
    module, module_bytes = _peak(lambda: LOSSES.build(cfg))
    forward_bytes = 0
    if args:
        _, forward_bytes = _peak(lambda: _forward_backward(module, args))
    estimate = LOSSES.estimate(cfg, shapes or None, itemsize=itemsize)
    return {
        "case": case,
        "module_bytes": module_bytes,
        "forward_bytes": forward_bytes,
        "estimate": {
            "module_bytes": estimate.module_bytes,
            "forward_bytes": estimate.forward_bytes,
            "parameter": estimate.parameter,
        },
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in sys.argv[1:]:
        print(json.dumps(measure(case)), flush=True)
