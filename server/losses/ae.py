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

# Per embedding (E = objects x M over the batch), the sort keys, ranks and counts of the push term (a dozen
# int64 and float64 vectors of E or 3E entries) and the gathered values with their gradients; per image a
# few [B] vectors. Work units as the cost module counts them (~0.5 ns each): E log E sorts and searches.
EMBEDDING_BYTES, EMBEDDING_WORK = 320, 3_000
IMAGE_BYTES, IMAGE_WORK = 48, 400

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


def corner_positions(match: Any, batch: int, height: int, width: int) -> Tensor:
    """``match`` -> the objects' rows (image, tl_y, tl_x, br_y, br_x) [objects, 5], every value checked.

    Plain ints and floats in range are read in one pass (100,000 corner pairs took 0.9 s of Python value by
    value, and a batch of empty images a step each); anything else value by value, naming the first bad one.
    """
    images = _items(match, "", f"a list of {batch} per-image lists of corner pairs {CORNER_FORM}")
    if len(images) != batch:
        raise LossInputError(
            f"match must hold one list of corner pairs per image: {batch} for pred's batch, got {len(images)}",
            field="match",
        )
    plain = _plain_corners(images)
    if plain is not None and _in_range(plain[0], height, width):
        table, counts = plain[0].long().reshape(-1, 4), plain[1]
    else:
        checked = [_checked_corners(image, i, height, width) for i, image in enumerate(images)]
        table = torch.tensor([v for values in checked for v in values], dtype=torch.long).reshape(-1, 4)
        counts = [len(values) // 4 for values in checked]
    image_of = torch.arange(batch).repeat_interleave(torch.tensor(counts, dtype=torch.long))
    return torch.cat([image_of.unsqueeze(1), table], dim=1)


def _plain_corners(images: list[Any]) -> tuple[Tensor, list[int]] | None:
    """Every image's corner pairs as one float64 table [objects, 2, 2] and each image's count, when they
    are lists of ints and floats of that form; else None."""
    if not all(type(image) in (list, tuple) for image in images):
        return None
    pairs = [pair for image in images for pair in image]
    try:
        kinds = {type(value) for pair in pairs for corner in pair for value in corner}
        table = torch.tensor(pairs, dtype=torch.float64) if pairs else torch.empty(0, 2, 2, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    if not kinds <= {int, float} or table.shape != (len(pairs), 2, 2):
        return None
    return table, [len(image) for image in images]


def _in_range(table: Tensor, height: int, width: int) -> bool:
    """Integral coordinates inside the maps (a float64 holds every int below 2**53 exactly; a bigger one is
    out of range whatever its rounding)."""
    sizes = torch.tensor([height, width], dtype=torch.float64)
    return bool(((table == table.floor()) & (table >= 0) & (table < sizes)).all())


def _checked_corners(image: Any, i: int, height: int, width: int) -> list[int]:
    values = []
    for k, pair in enumerate(_items(image, f"[{i}]", f"a list of corner pairs {CORNER_FORM}")):
        corners = _items(pair, f"[{i}][{k}]", f"a corner pair {CORNER_FORM}")
        if len(corners) != 2:
            raise LossInputError(
                f"match[{i}][{k}] must be a corner pair {CORNER_FORM}, got {len(corners)} entries", field="match"
            )
        for c, corner in enumerate(corners):
            point = _items(corner, f"[{i}][{k}][{c}]", "a corner [y, x]")
            if len(point) != 2:
                raise LossInputError(
                    f"match[{i}][{k}][{c}] must be a corner [y, x], got {len(point)} entries", field="match"
                )
            values.append(_coordinate(point[0], f"[{i}][{k}][{c}][0]", height, "y"))
            values.append(_coordinate(point[1], f"[{i}][{k}][{c}][1]", width, "x"))
    return values


def _embeddings(pred: Tensor, target: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every object's embeddings, object-major: top-left [E], bottom-right [E] and the image of each [E],
    where E = objects x M (each of an object's M channels is an embedding of its own)."""
    image, tl_y, tl_x, br_y, br_x = rows.to(pred.device).unbind(1)
    # advanced indices on both sides of a slice put the objects first: [objects, M]
    tl = pred[image, :, tl_y, tl_x].reshape(-1)
    br = target[image, :, br_y, br_x].reshape(-1)
    return tl, br, image.repeat_interleave(pred.shape[1])


def _per_image(values: Tensor, image: Tensor, images: int) -> Tensor:
    return values.new_zeros(images).index_add_(0, image, values)


def push_pairs(values: Tensor, image: Tensor, images: int) -> tuple[Tensor, Tensor]:
    """Per image, ``sum_{i != j} max(0, 1 - |v_i - v_j|)`` over its embeddings, and each value's slope in
    it, for finite float64 ``values`` [E] of ``image`` [E].

    The definition compares every pair (an E x E matrix); sorted, only neighbours less than 1 apart count,
    so counts of neighbours above and below each value give the sum and its slopes in O(E log E): a pair
    i < j (ascending) adds 1 - (v_j - v_i), and each of the two orders of a pair moves v_i by +1 when v_j is
    above it, -1 below, 0 when equal (as |.| at 0 does in autograd).
    """
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    value, owner = values[order], image[order]
    # runs of an image's sorted values, each within 1 of the one before: no pair across runs counts; a value
    # is taken from its run's first (exact for the close values a pair compares, whatever their magnitude)
    starts = torch.ones_like(owner, dtype=torch.bool)
    starts[1:] = (owner[1:] != owner[:-1]) | (value[1:] - value[:-1] >= 1)
    run = starts.cumsum(0) - 1
    offset = value - value[starts][run]
    # each value, and each bound of its window, as an exact integer key (run, rank): searching those keys
    # never leaves a run
    points = torch.cat([offset, offset + 1, offset - 1]).unique()
    base = run * (points.numel() + 1)
    keys = base + torch.searchsorted(points, offset)

    def first(bound: Tensor, right: bool) -> Tensor:
        return torch.searchsorted(keys, base + torch.searchsorted(points, bound), right=right)

    index = torch.arange(value.numel(), device=value.device)
    window_end, window_start = first(offset + 1, right=False), first(offset - 1, right=True)
    ties_start, ties_end = first(offset, right=False), first(offset, right=True)
    later, earlier = window_end - index - 1, index - window_start
    # sum over pairs i < j of 1 - (v_j - v_i) = pairs + sum_i v_i (later_i - earlier_i), both orders counted
    sums = 2 * _per_image((later + offset * (later - earlier)).to(values.dtype), owner, images)
    slopes = torch.empty_like(values)
    slopes[order] = 2 * ((window_end - ties_end) - (ties_start - window_start)).to(values.dtype)
    return sums, slopes


def _push(mean: Tensor, image: Tensor, images: int) -> Tensor:
    """Per image the push sum of ``mean`` [E] (not yet divided by K (K - 1)), differentiable in ``mean``.
    An image with a non-finite embedding gets NaN with slopes of 0, as the pairwise definition's autograd
    gives (inf - inf on its diagonal; max(0, NaN) passes no gradient)."""
    values = mean.detach().to(torch.float64)
    finite = torch.isfinite(values)
    sums, slopes = push_pairs(torch.where(finite, values, 0.0), image, images)
    spoiled = _per_image((~finite).to(torch.float64), image, images) > 0
    sums = torch.where(spoiled, torch.nan, sums)
    slopes = torch.where(spoiled[image], 0.0, slopes)
    # piecewise linear in mean: the sum's value, with the slopes as its gradient (the added term is 0)
    linear = slopes.to(mean.dtype) * mean
    return sums.to(mean.dtype) + _per_image(linear - linear.detach(), image, images)


def pull_push(pred: Tensor, target: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per image [B] the pull and push losses of maps ``pred``, ``target`` [B, M, H, W] and the objects'
    ``rows`` (image, tl_y, tl_x, br_y, br_x) [objects, 5]."""
    images = pred.shape[0]
    # an image with too few embeddings gives its map's sum times 0: 0, or NaN where the map holds NaN or inf
    nothing = pred.flatten(1).sum(1) * 0.0
    if not len(rows):
        return nothing, nothing
    tl, br, image = _embeddings(pred, target, rows)
    mean = (tl + br) / 2.0
    count = torch.bincount(image, minlength=images)
    pull = _per_image((tl - mean).pow(2) + (br - mean).pow(2), image, images) / count.clamp(min=1)
    push = _push(mean, image, images) / (count * (count - 1)).clamp(min=1)
    return torch.where(count > 0, pull, nothing), torch.where(count > 1, push, nothing)


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
        """Linear in the embeddings E = corner pairs x M (``shapes['match']`` is (images, corner pairs of
        all images); without it, one object an image), and in the maps, which get gradients."""
        pred = shape_of(shapes, "pred")
        images = dim(pred, 0)
        embeddings = dim(shape_of(shapes, "match"), 1, default=images) * dim(pred, 1)
        pairs, maps = EMBEDDING_BYTES * embeddings, 2 * elements(pred) * itemsize + IMAGE_BYTES * images
        driver = "match" if pairs > maps else "pred"
        work = EMBEDDING_WORK * embeddings + 3 * elements(pred) + IMAGE_WORK * images
        return Estimate(0, pairs + maps, work, driver, driver)

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
        rows = corner_positions(match, batch, height, width)
        if batch == 0:
            return pred.sum() * 0.0, pred.sum() * 0.0
        pull, push = pull_push(pred, target, rows)
        return self.pull_weight * pull.sum(), self.push_weight * push.sum()

    def extra_repr(self) -> str:
        return f"pull_weight={self.pull_weight!r}, push_weight={self.push_weight!r}"
