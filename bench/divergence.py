"""Where a loss on a GPU first departs from the CPU: one recorded mmdet case (tests/support/mmdet_fixtures.py)
run on two devices with every op's output kept in order (a TorchDispatchMode), and the first op whose
floating-point outputs differ by more than ``--rtol`` of their largest value.

    python bench/divergence.py 'DiceLoss/mask-NxHxW/eps-0.1/weight-N/mean/af-none/lw-0.7/float64'
    python bench/divergence.py --devices cpu,cpu CASE ...     # checks the script itself, on any machine

It explained the float64 parity cases that agree only to float32 rounding on a GPU: the first difference
is a float32 sum that mmdet's own semantics take (docs/performance.md, "On a GPU").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.mmdet_fixtures import SINGLE_CASES, case_ids, prepare

from losswire.server.losses import build_loss

# ops that only move data: the devices run different ones (a GPU's .item() is a copy to the host)
MOVES = ("aten.lift_fresh", "aten._to_copy", "aten.copy_", "aten._local_scalar_dense")


class OpLog(TorchDispatchMode):
    """Every op's name and outputs (copied to the CPU), in the order they ran, data moves left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if not str(func).startswith(MOVES):
            kept = [o.detach().cpu().clone() if isinstance(o, torch.Tensor) else o for o in outputs]
            self.ops.append((str(func), kept))
        return out


def _to(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def op_log(case: dict, device: str) -> list[tuple[str, list[Any]]]:
    args, kwargs, _ = prepare(case)
    with OpLog() as log:
        build_loss(case["cfg"]).to(device)(*_to(args, device), **_to(kwargs, device))
    return log.ops


def first_difference(first: list, second: list, rtol: float) -> str:
    """The first op at which the two logs' floating-point outputs differ, in words."""
    for index, ((name, outs), (other, others)) in enumerate(zip(first, second, strict=False)):
        if name != other:
            return f"op {index}: the devices ran different ops ({name} / {other})"
        for a, b in zip(outs, others, strict=True):
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape == b.shape and a.numel():
                scale = float(a.double().abs().max()) or 1.0
                relative = float((a.double() - b.double()).abs().max()) / scale
                if relative > rtol:
                    return f"op {index} {name}: {relative:.2e} relative, {a.dtype}, shape {list(a.shape)}"
    return f"no op differs beyond {rtol:g} ({len(first)} / {len(second)} ops)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="case ids of tests/support/mmdet_fixtures.py")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--rtol", type=float, default=1e-13)
    args = parser.parse_args()
    first, second = args.devices.split(",")
    ids = list(case_ids(SINGLE_CASES))
    for case_id in args.cases:
        case = SINGLE_CASES[ids.index(case_id)]
        print(case_id, "->", first_difference(op_log(case, first), op_log(case, second), args.rtol))


if __name__ == "__main__":
    main()
