"""A toy detector head trained with losswire: FocalLoss for classes, GIoULoss for boxes.

Two ``torch.nn.Linear`` heads (class logits and box deltas) learn a synthetic, exactly learnable
task with plain SGD. The losses are either evaluated by a losswire server (``RemoteLoss``: forward
and gradient cross the wire, the rest of the training loop is ordinary PyTorch) or built in this
process from the same engine (``losswire.server.losses.build_loss``), so the two runs can be compared.

    losswire serve --port 50051 &
    python examples/toy_training.py --target 127.0.0.1:50051    # losses on the server
    python examples/toy_training.py                              # on $LOSSWIRE_TARGET, else localhost:50051
    python examples/toy_training.py --local                      # the same losses in-process

``train(make_loss, steps, seed)`` returns the loss history; ``make_loss`` turns an mmdet loss config
dict into a loss module, e.g. ``functools.partial(RemoteLoss, target=...)`` or ``build_loss``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

LOSS_CLS = dict(type="FocalLoss", gamma=2.0, alpha=0.25, loss_weight=1.0)
LOSS_BBOX = dict(type="GIoULoss", loss_weight=1.0)

MakeLoss = Callable[[Mapping[str, Any]], nn.Module]


class ToyData(NamedTuple):
    features: Tensor  # [N, D]
    labels: Tensor  # [N] class indices in [0, C]; C is background
    boxes: Tensor  # [N, 4] target boxes (x1, y1, x2, y2)
    classes: int


def make_data(seed: int, samples: int = 256, features: int = 8, classes: int = 3) -> ToyData:
    """Random features; labels and boxes are fixed functions of them, so a linear head can fit both."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    labels = (x @ torch.randn(features, classes + 1, generator=generator)).argmax(dim=1)
    # box centres spread around 0, sizes around e^0.5: (cx, cy, log w, log h) linear in the features
    scale, offset = torch.tensor([0.5, 0.5, 0.1, 0.1]), torch.tensor([0.0, 0.0, 0.5, 0.5])
    deltas = x @ torch.randn(features, 4, generator=generator) * scale + offset
    return ToyData(x, labels, decode_boxes(deltas), classes)


def decode_boxes(deltas: Tensor) -> Tensor:
    """(cx, cy, log w, log h) -> (x1, y1, x2, y2): always a valid box, differentiable."""
    centre, size = deltas[:, :2], deltas[:, 2:].exp()
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


class ToyHead(nn.Module):
    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.cls = nn.Linear(features, classes)
        self.reg = nn.Linear(features, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls(x), decode_boxes(self.reg(x))


def train(make_loss: MakeLoss, steps: int = 150, seed: int = 0, lr: float = 0.1, momentum: float = 0.5) -> list[float]:
    """Full-batch SGD on the toy task; returns the total loss before each step."""
    torch.manual_seed(seed)
    data = make_data(seed)
    model = ToyHead(data.features.shape[1], data.classes)
    loss_cls, loss_bbox = make_loss(LOSS_CLS), make_loss(LOSS_BBOX)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    num_pos = float((data.labels < data.classes).sum().clamp(min=1))
    history = []
    for _ in range(steps):
        optimiser.zero_grad()
        scores, boxes = model(data.features)
        loss = loss_cls(scores, data.labels, avg_factor=num_pos) + loss_bbox(boxes, data.boxes)
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--target",
        help="losswire server address, e.g. 127.0.0.1:50051 (default: $LOSSWIRE_TARGET, else localhost:50051)",
    )
    where.add_argument("--local", action="store_true", help="evaluate the losses in this process")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.local:
        from losswire.server.losses import build_loss

        make_loss: MakeLoss = build_loss
    else:
        from losswire.client import RemoteLoss

        make_loss = functools.partial(RemoteLoss, target=args.target)
    history = train(make_loss, args.steps, args.seed)
    for step in range(0, len(history), max(1, len(history) // 10)):
        print(f"step {step:4d}  loss {history[step]:.4f}")
    print(f"final      loss {history[-1]:.4f}  (from {history[0]:.4f})")


if __name__ == "__main__":
    main()
