"""Input checks shared by the kernels: each raises ``LossInputError`` naming the field, what was
expected and what arrived, instead of the assert / IndexError deep inside torch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import LossInputError


def describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__}"


def tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise LossInputError(f"{name} must be a tensor, got {describe(value)}", field=name)
    return value


def float_tensor(name: str, value: Any) -> Tensor:
    tensor(name, value)
    if not value.is_floating_point():
        raise LossInputError(f"{name} must be a floating-point tensor, got {describe(value)}", field=name)
    return value


def index_tensor(name: str, value: Any) -> Tensor:
    """Class indices: any integer dtype is accepted and widened to int64."""
    tensor(name, value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise LossInputError(
            f"{name} must hold integer class indices (int64, int32...), got {describe(value)}",
            field=name,
        )
    return value.long()


def real_tensor(name: str, value: Any) -> Tensor:
    """Any real dtype (float, integer or bool): for inputs mmdet's arithmetic promotes to float."""
    tensor(name, value)
    if value.is_complex():
        raise LossInputError(f"{name} must be real, got {describe(value)}", field=name)
    return value


def ndim(name: str, value: Tensor, expected: int, meaning: str) -> None:
    if value.dim() != expected:
        raise LossInputError(f"{name} must be {expected}-D {meaning}, got shape {list(value.shape)}", field=name)


def same_shape(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.shape != ref.shape:
        raise LossInputError(
            f"{name} must have the shape of {ref_name} {list(ref.shape)}, got {list(value.shape)}",
            field=name,
        )


def regression_pair(pred: Tensor, target: Any) -> None:
    """A floating-point ``pred`` and a ``target`` tensor of its shape (the regression losses' inputs)."""
    float_tensor("pred", pred)
    tensor("target", target)
    same_shape("target", target, "pred", pred)


def broadcasts_to(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    """``value`` may broadcast to ``ref``'s shape but must not enlarge it."""
    try:
        shape = torch.broadcast_shapes(value.shape, ref.shape)
    except RuntimeError:
        shape = None
    if shape != ref.shape:
        raise LossInputError(
            f"{name} of shape {list(value.shape)} does not broadcast to {ref_name}'s shape {list(ref.shape)}",
            field=name,
        )


def index_range(name: str, value: Tensor, low: int, high: int, meaning: str) -> None:
    """All values in [low, high] (inclusive)."""
    if value.numel() == 0:
        return
    lo, hi = int(value.min()), int(value.max())
    if lo < low or hi > high:
        raise LossInputError(
            f"{name} values must lie in [{low}, {high}] ({meaning}), got values in [{lo}, {hi}]",
            field=name,
        )


def row_labels(name: str, labels: Any, scores: Tensor, num_classes: int) -> Tensor:
    """One class index per row of ``scores``, in [0, num_classes] (``num_classes`` = background)."""
    labels = index_tensor(name, labels)
    if labels.shape != scores.shape[:1]:
        raise LossInputError(
            f"{name} must hold one class index per row of the scores, shape [{scores.shape[0]}], "
            f"got {list(labels.shape)}",
            field=name,
        )
    index_range(name, labels, 0, num_classes, f"class indices, {num_classes} = background")
    return labels


def unit_interval(name: str, value: Tensor, expected: str) -> None:
    """Values in [0, 1]; ``expected`` says what they are (``"probabilities in [0, 1] when activated=True"``)."""
    if value.numel() and not bool(((value >= 0) & (value <= 1)).all()):
        lo, hi = float(value.detach().min()), float(value.detach().max())
        raise LossInputError(f"{name} must hold {expected}, got values in [{lo:g}, {hi:g}]", field=name)


def probabilities(name: str, value: Tensor) -> None:
    """Values in [0, 1] (``activated=True`` losses take probabilities, not logits)."""
    unit_interval(name, value, "probabilities in [0, 1] when activated=True")
