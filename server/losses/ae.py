"""Associative embedding loss for grouping corner pairs (CornerNet's pull and push losses).

Newell, Huang and Deng 2017, Associative Embedding: End-to-End Learning for Joint Detection and
Grouping, https://arxiv.org/abs/1611.05424; Law and Deng 2018, CornerNet: Detecting Objects as Paired
Keypoints, https://arxiv.org/abs/1808.01244.

Shapes: ``pred`` [B, M, H, W] top-left corner embeddings, ``target`` [B, M, H, W] bottom-right corner
embeddings; ``match`` a list of B lists, one per image, of the objects' corner positions
``[[tl_y, tl_x], [br_y, br_x]]`` (integers; integral floats such as 2.0, as JSON carries them, are
accepted). Output: the tuple ``(pull, push)`` of two scalars.

Per image, as MMDetection 3.3 computes it: every object contributes its M embedding channels as M
separate one-dimensional embeddings (with M > 1 the channels of one object are grouped, and pushed
apart, like different objects). With ``e_tl``, ``e_br`` those values and ``e = (e_tl + e_br) / 2``
over the K = objects * M of them:

* ``pull = sum((e_tl - e)^2 + (e_br - e)^2) / K``;
* ``push = sum_{i != j} max(0, 1 - |e_i - e_j|) / (K (K - 1))``, and 0 when K = 1.

An image without objects gives 0 for both (with a zero gradient). The outputs are
``pull_weight * sum over images of pull`` and ``push_weight * sum over images of push``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import checks
from .cost import Estimate, Shapes, dim, elements, shape_of
from .errors import LossInputError
from .registry import LOSSES
from .schema import OutputKind

# The push term compares every embedding of an image with every other: about this many [K, K] tensors
# of pred's dtype alive at once in a forward + backward (K = objects x channels of one image).
PUSH_COPIES = 8
# Each image is a step of a Python loop whose autograd graph costs a fixed amount, whatever its maps hold:
# measured 21 KiB and ~260 us per image with one object (8 KiB and ~95 us without), one thread.
IMAGE_BYTES, IMAGE_WORK = 24 << 10, 500_000

CORNER_FORM = "[[tl_y, tl_x], [br_y, br_x]]"


def _coordinate(value: Any, where: str, size: int, axis: str) -> int:
    """One integer position in [0, size): ints, integer tensors/scalars and integral floats."""
    number: int | None = None
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    elif not isinstance(value, (bool, float)):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
    if number is None:
        raise LossInputError(
            f"match{where} must be an integer {axis} coordinate, got {type(value).__name__} {value!r}", field="match"
        )
    if not 0 <= number < size:
        raise LossInputError(
            f"match{where} must be a {axis} coordinate in [0, {size}) (the embedding map's size), got {number}",
            field="match",
        )
    return number


def _items(value: Any, where: str, expected: str) -> list[Any]:
    if isinstance(value, Tensor) and not value.is_floating_point():
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise LossInputError(f"match{where} must be {expected}, got {type(value).__name__} {value!r}", field="match")
    return list(value)


def corner_positions(match: Any, batch: int, height: int, width: int) -> list[list[tuple[int, int, int, int]]]:
    """``match`` -> per image a list of (tl_y, tl_x, br_y, br_x), every value checked."""
    images = _items(match, "", f"a list of {batch} per-image lists of corner pairs {CORNER_FORM}")
    if len(images) != batch:
        raise LossInputError(
            f"match must hold one list of corner pairs per image: {batch} for pred's batch, got {len(images)}",
            field="match",
        )
    positions = []
    for i, image in enumerate(images):
        objects = []
        for k, pair in enumerate(_items(image, f"[{i}]", f"a list of corner pairs {CORNER_FORM}")):
            corners = _items(pair, f"[{i}][{k}]", f"a corner pair {CORNER_FORM}")
            if len(corners) != 2:
                raise LossInputError(
                    f"match[{i}][{k}] must be a corner pair {CORNER_FORM}, got {len(corners)} entries", field="match"
                )
            values = []
            for c, corner in enumerate(corners):
                point = _items(corner, f"[{i}][{k}][{c}]", "a corner [y, x]")
                if len(point) != 2:
                    raise LossInputError(
                        f"match[{i}][{k}][{c}] must be a corner [y, x], got {len(point)} entries", field="match"
                    )
                values.append(_coordinate(point[0], f"[{i}][{k}][{c}][0]", height, "y"))
                values.append(_coordinate(point[1], f"[{i}][{k}][{c}][1]", width, "x"))
            objects.append(tuple(values))
        positions.append(objects)
    return positions


def pull_push(tl_map: Tensor, br_map: Tensor, objects: list[tuple[int, int, int, int]]) -> tuple[Tensor, Tensor]:
    """One image's pull and push losses; maps [M, H, W]."""
    if not objects:
        return tl_map.sum() * 0.0, tl_map.sum() * 0.0
    tl_y, tl_x, br_y, br_x = (torch.tensor(c, device=tl_map.device) for c in zip(*objects, strict=True))
    # [M, objects] -> object-major [objects * M]: each channel of each object is one embedding
    tl = tl_map[:, tl_y, tl_x].t().reshape(-1)
    br = br_map[:, br_y, br_x].t().reshape(-1)
    mean = (tl + br) / 2.0
    count = mean.numel()
    pull = ((tl - mean).pow(2) + (br - mean).pow(2)).sum() / count
    if count == 1:
        return pull, tl_map.sum() * 0.0
    off_diagonal = 1 - torch.eye(count, dtype=mean.dtype, device=mean.device)
    gaps = (mean.unsqueeze(1) - mean.unsqueeze(0)).abs()
    push = torch.relu(off_diagonal * (1 - gaps)).sum() / (count * (count - 1))
    return pull, push


@LOSSES.register_module()
class AssociativeEmbeddingLoss(nn.Module):
    """Associative embedding loss: pulls an object's two corner embeddings together, pushes objects apart.

    Args:
        pull_weight: multiplier of the pull loss (default 0.25).
        push_weight: multiplier of the push loss (default 0.25).

    Returns the tuple ``(pull, push)``; no ``weight`` or reduction.
    """

    output_kind = OutputKind.SCALAR
    differentiable = ("pred", "target")
    separable = True  # 0-d outputs
    sample_axis = 1
    stateful = False
    stochastic = False

    @classmethod
    def estimate(cls, params: Mapping[str, Any], shapes: Shapes | None, itemsize: int) -> Estimate:
        """Quadratic in one image's embeddings K = objects x M: ``shapes['match']`` is the nesting of the
        match lists, (images, the most corner pairs of one image, 2, 2); without it, one object."""
        pred = shape_of(shapes, "pred")
        objects = dim(shape_of(shapes, "match"), 1, default=1)
        count = objects * dim(pred, 1)
        images = dim(pred, 0)
        push, maps = PUSH_COPIES * count * count * itemsize, 3 * elements(pred) * itemsize
        loop = IMAGE_BYTES * images  # however small the maps: [B, M, 0, 0] brings no bytes
        driver = "match" if push > maps + loop else "pred"
        work = 10 * count * count * images + 3 * elements(pred) + IMAGE_WORK * images
        return Estimate(0, push + maps + loop, work, driver, driver)

    def __init__(self, pull_weight: float = 0.25, push_weight: float = 0.25) -> None:
        super().__init__()
        self.pull_weight = pull_weight
        self.push_weight = push_weight

    def forward(self, pred: Tensor, target: Tensor, match: list) -> tuple[Tensor, Tensor]:
        checks.float_tensor("pred", pred)
        checks.ndim("pred", pred, 4, "[B, M, H, W] top-left corner embeddings")
        checks.float_tensor("target", target)
        checks.same_shape("target", target, "pred", pred)
        batch, _, height, width = pred.shape
        positions = corner_positions(match, batch, height, width)
        if batch == 0:
            return pred.sum() * 0.0, pred.sum() * 0.0
        pull_total: Tensor | float = 0.0
        push_total: Tensor | float = 0.0
        for i, objects in enumerate(positions):
            pull, push = pull_push(pred[i], target[i], objects)
            pull_total = pull_total + self.pull_weight * pull
            push_total = push_total + self.push_weight * push
        return pull_total, push_total

    def extra_repr(self) -> str:
        return f"pull_weight={self.pull_weight!r}, push_weight={self.push_weight!r}"
