"""Box geometry and box inputs, shared by the IoU family and its fused kernel.

Boxes are (x1, y1, x2, y2) in the last axis, ``pred[i]`` paired with ``target[i]`` (aligned, not all
pairs). Every function is plain element-wise torch and keeps autograd's graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks
from .errors import LossInputError

# The union's floor inside the overlap computation; IoULoss's own ``eps`` clamps the IoU instead.
OVERLAP_EPS = 1e-6


class BoxOverlap(NamedTuple):
    overlap: Tensor  # intersection area
    union: Tensor  # area1 + area2 - overlap, floored at eps


def area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def clamp_min(x: Tensor, low: float) -> Tensor:
    # float16 on CPU lacks some clamp kernels in older torch; clamping in float32 is exact.
    if x.dtype == torch.float16 and not x.is_cuda:
        return x.float().clamp(min=low).half()
    return x.clamp(min=low)


def overlap_sides(pred: Tensor, target: Tensor) -> Tensor:
    """Width and height of each pair's intersection before the clamp at 0, [..., N, 2] (negative apart)."""
    top_left = torch.maximum(pred[..., :2], target[..., :2])
    bottom_right = torch.minimum(pred[..., 2:], target[..., 2:])
    return bottom_right - top_left


def enclosing_sides(pred: Tensor, target: Tensor) -> Tensor:
    """Width and height of the smallest box enclosing each pair before any clamp, [..., N, 2]."""
    return torch.maximum(pred[..., 2:], target[..., 2:]) - torch.minimum(pred[..., :2], target[..., :2])


def overlap_wh(pred: Tensor, target: Tensor) -> Tensor:
    """Width and height of each pair's intersection, [..., N, 2]; zero where the boxes are apart."""
    return clamp_min(overlap_sides(pred, target), 0.0)


def enclosing_wh(pred: Tensor, target: Tensor, low: float) -> Tensor:
    """Width and height of the smallest box enclosing each pair, [..., N, 2], at least ``low``."""
    return clamp_min(enclosing_sides(pred, target), low)


def aligned_overlap(pred: Tensor, target: Tensor, eps: float) -> BoxOverlap:
    """Intersection and union of each pair ``pred[i]``, ``target[i]``."""
    wh = overlap_wh(pred, target)
    overlap = wh[..., 0] * wh[..., 1]
    union = area(pred) + area(target) - overlap
    return BoxOverlap(overlap, torch.clamp(union, min=eps))


def aligned_iou(pred: Tensor, target: Tensor, eps: float = OVERLAP_EPS) -> Tensor:
    """IoU of each pair, [..., N, 4] x [..., N, 4] -> [..., N]."""
    overlap, union = aligned_overlap(pred, target, eps)
    return overlap / union


def iou_eps_union(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """IoU of each pair, [N, 4] x [N, 4] -> [N], as ``overlap / (union + eps)`` (the DIoU family's)."""
    wh = overlap_wh(pred, target)
    overlap = wh[..., 0] * wh[..., 1]
    return overlap / (area(pred) + area(target) - overlap + eps)


def double_centre_offset(pred: Tensor, target: Tensor) -> Tensor:
    """Twice the offset from pred's centre to target's, (dx, dy) [N, 2]: ``(t1 + t2) - (p1 + p2)``."""
    return (target[..., :2] + target[..., 2:]) - (pred[..., :2] + pred[..., 2:])


def sizes(boxes: Tensor, eps: float) -> Tensor:
    """(w, h + eps) of each box, [N, 2]: the DIoU family takes aspect ratios with eps on heights only."""
    wh = boxes[..., 2:] - boxes[..., :2]
    return torch.stack([wh[..., 0], wh[..., 1] + eps], dim=-1)


# -- inputs ------------------------------------------------------------------------------------------


def check_boxes(pred: Tensor, target: Tensor) -> None:
    """[..., N, 4] boxes and a target of their shape."""
    checks.float_tensor("pred", pred)
    checks.tensor("target", target)
    if pred.dim() < 2 or pred.shape[-1] != 4:
        raise LossInputError(f"pred must be [N, 4] boxes (x1, y1, x2, y2), got shape {list(pred.shape)}", field="pred")
    checks.same_shape("target", target, "pred", pred)


def check_box_rows(loss: str, pred: Tensor, target: Tensor) -> None:
    """[N, 4] boxes, exactly 2-D: mmdet indexes these losses' coordinates as columns of a matrix, so
    batched [B, N, 4] boxes crash it or, for N = 4, silently mix coordinates of different boxes."""
    checks.float_tensor("pred", pred)
    checks.tensor("target", target)
    if pred.dim() != 2 or pred.shape[-1] != 4:
        raise LossInputError(
            f"{loss} takes pred as 2-D [N, 4] boxes (x1, y1, x2, y2) (flatten batched boxes to [N, 4]), "
            f"got shape {list(pred.shape)}",
            field="pred",
        )
    checks.same_shape("target", target, "pred", pred)


def box_weight(weight: Tensor | None, pred: Tensor) -> Tensor | None:
    """mmdet's weight rule of the per-box losses: [N] stays; [N, 4] (pred's shape) is averaged over the
    coordinates."""
    if weight is None or weight.dim() <= 1:
        return weight
    checks.same_shape("weight", weight, "pred", pred)
    return weight.mean(dim=-1)


def check_coordinate_weight(loss: str, weight: Tensor | None, pred: Tensor) -> None:
    """A weight for a per-coordinate [N, 4] loss: it must broadcast to pred's shape."""
    if weight is None:
        return
    checks.tensor("weight", weight)
    try:
        shape = torch.broadcast_shapes(weight.shape, pred.shape)
    except RuntimeError:
        shape = None
    if shape != pred.shape:
        raise LossInputError(
            f"{loss} returns one loss per coordinate {list(pred.shape)}: weight must be [N, 4] or [N, 1] "
            f"(broadcastable to it), got shape {list(weight.shape)}",
            field="weight",
        )
