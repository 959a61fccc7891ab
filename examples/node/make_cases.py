"""Writes the case file ``evaluate.js`` checks against: inputs, configs and what the engine computes.

The expected losses and gradients come from losswire's own engine run in this process
(``build_loss(cfg)`` + torch autograd), never from the server, so a Node call that matches them
proves the whole path: typed arrays -> protobuf bytes -> server -> protobuf bytes -> typed arrays.

    python examples/node/make_cases.py --out /tmp/cases.json
    node examples/node/evaluate.js --target 127.0.0.1:50051 --cases /tmp/cases.json

Case file format (JSON): ``{"cases": [case, ...]}``; a case holds ``name``, ``config``, the input
tensors ``pred``, ``target`` and optionally ``weight`` (each ``{"dtype", "shape", "values"}`` with the
values flat in C order), optionally ``avg_factor`` and ``reduction_override``, the ``gradients`` to
request, and either ``expect`` (``loss`` and ``gradients``, each ``{"shape", "values"}``) with
``rtol``/``atol``, or ``expect_error`` (``code``: the gRPC status name, ``field``: the field path the
server's BadRequest detail must name).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from losswire.server.losses import build_loss

# float32 on both sides, the same torch on the same kind of CPU: differences are rounding at most
RTOL, ATOL = 1e-5, 1e-6
WIRE_DTYPES = {torch.float32: "FLOAT32", torch.float64: "FLOAT64", torch.int32: "INT32", torch.int64: "INT64"}


def tensor_json(tensor: Tensor) -> dict[str, Any]:
    """A tensor as the case file stores it: dtype name, shape, values flat in C order.

    ``tolist()`` of a float32 tensor gives Python floats that hold each float32 value exactly, so the
    JSON round trip (and Node's Float32Array) reproduces the bits the engine used."""
    return {"dtype": WIRE_DTYPES[tensor.dtype], "shape": list(tensor.shape), "values": tensor.reshape(-1).tolist()}


def expected_json(tensor: Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "values": tensor.reshape(-1).tolist()}


def engine_case(
    name: str,
    config: Mapping[str, Any],
    pred: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    reduction_override: str | None = None,
    gradients: Sequence[str] = ("pred",),
) -> dict[str, Any]:
    """One checked call: the engine's loss and the gradients the server is asked for.

    The gradient of a non-scalar loss is d(sum(loss))/d(input): the server's default upstream
    gradient is all ones (``LossTerm.grad_output`` unset)."""
    leaves = {"pred": pred.clone().requires_grad_(), "target": target.clone()}
    if "target" in gradients:
        leaves["target"].requires_grad_()
    loss = build_loss(config)(
        leaves["pred"], leaves["target"], weight, avg_factor=avg_factor, reduction_override=reduction_override
    )
    loss.backward(torch.ones_like(loss))
    case: dict[str, Any] = {
        "name": name,
        "config": dict(config),
        "pred": tensor_json(pred),
        "target": tensor_json(target),
        "gradients": list(gradients),
        "expect": {
            "loss": expected_json(loss.detach()),
            "gradients": {key: expected_json(leaves[key].grad) for key in gradients},
        },
        "rtol": RTOL,
        "atol": ATOL,
    }
    if weight is not None:
        case["weight"] = tensor_json(weight)
    if avg_factor is not None:
        case["avg_factor"] = avg_factor
    if reduction_override is not None:
        case["reduction_override"] = reduction_override
    return case


def boxes(generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """Predicted and target boxes (x1, y1, x2, y2) that partly overlap; the last pair lies apart (GIoU < 0)."""
    xy = torch.rand(n, 2, generator=generator) * 10
    wh = torch.rand(n, 2, generator=generator) * 4 + 1
    target = torch.cat([xy, xy + wh], dim=1)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 3
    shift[-1] += 7.3
    grow = torch.rand(n, 2, generator=generator) * 0.6 + 0.7
    pred = torch.cat([xy + shift, xy + shift + wh * grow], dim=1)
    return pred, target


def build_cases(seed: int = 0, samples: int = 8, classes: int = 5) -> dict[str, Any]:
    """FocalLoss (mean with avg_factor; element-wise with a weight), GIoULoss (mean; per box), one error."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, classes, generator=generator)
    labels = torch.randint(0, classes + 1, (samples,), generator=generator)  # `classes` = background
    anchor_weight = torch.rand(samples, generator=generator) + 0.1
    pred_boxes, target_boxes = boxes(generator, samples)
    box_weight = torch.rand(samples, generator=generator) + 0.1
    # parameters away from their defaults, so a config that lost them on the way would not pass
    focal = {"type": "FocalLoss", "gamma": 1.5, "alpha": 0.3}
    cases = [
        engine_case("focal_mean_avg_factor", focal, logits, labels, avg_factor=3.0),
        engine_case("focal_none_weight", focal, logits, labels, weight=anchor_weight, reduction_override="none"),
        engine_case(
            "giou_mean",
            {"type": "GIoULoss", "loss_weight": 2.0},
            pred_boxes,
            target_boxes,
            weight=box_weight,
            gradients=("pred", "target"),
        ),
        engine_case(
            "giou_none",
            {"type": "GIoULoss", "reduction": "none"},
            pred_boxes,
            target_boxes,
            gradients=("pred", "target"),
        ),
        {
            "name": "unknown_loss_type",
            "config": {**focal, "type": "FocalLos"},
            "pred": tensor_json(logits),
            "target": tensor_json(labels),
            "gradients": ["pred"],
            "expect_error": {"code": "NOT_FOUND", "field": "terms[0].config.type"},
        },
    ]
    return {"cases": cases}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the case file here (default: stdout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)
    text = json.dumps(build_cases(args.seed), indent=1)
    if args.out is None:
        sys.stdout.write(text + "\n")
    else:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
