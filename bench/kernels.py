"""Fused loss-and-gradient kernels against the autograd path, in process (by hand, not a test).

    .venv/bin/python bench/kernels.py                       # CPU
    .venv/bin/python bench/kernels.py --device cuda         # + effective bandwidth vs the HBM roofline

For each fused loss at a realistic size (FocalLoss / QualityFocalLoss [100k, 80], CrossEntropyLoss
[100k, 81], SmoothL1Loss / L1Loss / GIoULoss [100k, 4]) one term is evaluated by
``Evaluator(fused=True)`` and ``Evaluator(fused=False)`` (what the server runs: bind, build the
module, loss, gradient) alternately in the same run; the table gives the median milliseconds of
``--repeats`` calls of each, and the speed-up (autograd / fused).

``--device cuda`` also prints the fused path's effective bandwidth: the bytes a loss-and-gradient
pass must move at least (read pred, target, weight; write the gradient and a 'none' loss) over its
median time, and that as a percentage of ``--peak-gbps`` (H100 SXM HBM3: 3350 GB/s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from losswire.server.evaluation import Evaluator, TermRequest


def _boxes(n: int, device: str, gen: torch.Generator) -> Tensor:
    corner = torch.rand(n, 2, generator=gen) * 100
    size = torch.rand(n, 2, generator=gen) * 50 + 1
    return torch.cat([corner, corner + size], dim=1).to(device)


def workloads(rows: int, device: str) -> dict[str, tuple[dict, dict[str, Any]]]:
    """Loss name -> (config, TermRequest fields) at ``rows`` samples."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, 80, generator=gen) * 3).to(device)
    labels = torch.randint(0, 81, (rows,), generator=gen).to(device)
    ce_logits = (torch.randn(rows, 81, generator=gen) * 3).to(device)
    boxes, target_boxes = _boxes(rows, device, gen), _boxes(rows, device, gen)
    box_weight = torch.rand(rows, 4, generator=gen).to(device)
    return {
        "FocalLoss": (
            {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25},
            {"pred": logits, "target": labels, "avg_factor": 1000.0},
        ),
        "QualityFocalLoss": (
            {"type": "QualityFocalLoss", "beta": 2.0},
            {"pred": logits, "target": (labels, torch.rand(rows, generator=gen).to(device)), "avg_factor": 1000.0},
        ),
        "CrossEntropyLoss": ({"type": "CrossEntropyLoss"}, {"pred": ce_logits, "target": labels}),
        "SmoothL1Loss": (
            {"type": "SmoothL1Loss", "beta": 1.0 / 9},
            {"pred": boxes, "target": target_boxes, "weight": box_weight, "avg_factor": 1000.0},
        ),
        "L1Loss": (
            {"type": "L1Loss"},
            {"pred": boxes, "target": target_boxes, "weight": box_weight, "avg_factor": 1000.0},
        ),
        "GIoULoss": (
            {"type": "GIoULoss"},
            {"pred": boxes, "target": target_boxes, "weight": box_weight[:, 0].contiguous(), "avg_factor": 1000.0},
        ),
    }


def min_bytes(fields: dict[str, Any], loss: Tensor) -> int:
    """Bytes a loss-and-gradient pass must move at least: its tensor inputs once, the gradient
    (pred's size) and the loss once."""
    total = 0
    for value in fields.values():
        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, Tensor):
                total += tensor.numel() * tensor.element_size()
    pred = fields["pred"]
    return total + pred.numel() * pred.element_size() + loss.numel() * loss.element_size()


def timed(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM roofline, GB/s (H100 SXM: 3350)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    evaluators = {"fused": Evaluator(fused=True), "autograd": Evaluator(fused=False)}
    cuda = args.device.startswith("cuda")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, rows {args.rows}")
    header = f"{'loss':18s} {'pred':>11s} {'autograd ms':>12s} {'fused ms':>10s} {'speed-up':>9s}"
    print(header + (f" {'GB/s':>8s} {'% peak':>7s}" if cuda else ""))
    for name, (cfg, fields) in workloads(args.rows, args.device).items():

        def term(fields=fields, cfg=cfg, name=name) -> TermRequest:
            return TermRequest(name=name, config=cfg, **fields)

        outcome = evaluators["fused"].evaluate(term())
        assert outcome.fused == name, f"{name} did not take the fused path"
        samples: dict[str, list[float]] = {key: [] for key in evaluators}
        for i in range(args.warmup + args.repeats):
            for key, evaluator in evaluators.items():  # alternate, so both see the same machine load
                elapsed = timed(lambda evaluator=evaluator: evaluator.evaluate(term()), args.device)
                if i >= args.warmup:
                    samples[key].append(elapsed)
        auto, fast = (statistics.median(samples[k]) * 1e3 for k in ("autograd", "fused"))
        shape = "x".join(str(s) for s in fields["pred"].shape)
        line = f"{name:18s} {shape:>11s} {auto:12.2f} {fast:10.2f} {auto / fast:8.2f}x"
        if cuda:
            gbps = min_bytes(fields, outcome.loss) / (fast / 1e3) / 1e9
            line += f" {gbps:8.1f} {100 * gbps / args.peak_gbps:6.1f}%"
        print(line)


if __name__ == "__main__":
    main()
