"""The one pipeline every loss goes through (MMDetection's steps 2-5).

    kernel (element- or sample-wise loss, a small pure function in the loss's own file)
      -> element-wise ``weight``
      -> reduction ``none`` / ``mean`` / ``sum``, with ``avg_factor``
      -> ``loss_weight``

Semantics, exactly MMDetection 3.3's:

* ``mean`` divides ``sum(loss * weight)`` by the element count, not by ``sum(weight)``.
* ``mean`` with ``avg_factor`` gives ``sum(loss * weight) / (avg_factor + eps)``, where ``eps`` is
  float32's machine epsilon whatever the dtype; ``none`` ignores ``avg_factor``; ``sum`` with
  ``avg_factor`` is an error.
* ``reduction_override`` in ``forward`` wins over the configured ``reduction``.
* ``loss_weight`` multiplies the reduced loss.

Deliberate differences (docs/semantics.md): an empty input gives a zero loss with a gradient
instead of NaN, and a ``weight`` that would *enlarge* the loss by broadcasting is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from . import checks
from .errors import LossConfigError, LossInputError
from .schema import OutputKind

Reduction = Literal["none", "mean", "sum"]
# The types of the two inputs every loss shares; the schema reads them as "number" and "str".
AvgFactor = float | Tensor | None
ReductionOverride = Reduction | None
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
# mmdet divides by avg_factor + float32's eps, also for float64 losses.
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


def check_reduction(value: Any, field: str) -> str:
    if value not in REDUCTIONS:
        error = LossConfigError if field == "reduction" else LossInputError
        raise error(f"{field} must be one of {list(REDUCTIONS)}, got {value!r}", field=field)
    return value


def check_avg_factor(avg_factor: Any) -> float | Tensor | None:
    if avg_factor is None:
        return None
    if isinstance(avg_factor, Tensor):
        if avg_factor.numel() != 1:
            raise LossInputError(
                f"avg_factor must be a number or a one-element tensor, got {checks.describe(avg_factor)}",
                field="avg_factor",
            )
        return avg_factor
    if isinstance(avg_factor, (int, float)) and not isinstance(avg_factor, bool):
        return avg_factor
    raise LossInputError(
        f"avg_factor must be a number, got {type(avg_factor).__name__} {avg_factor!r}", field="avg_factor"
    )


def apply_weight(loss: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return loss
    checks.tensor("weight", weight)
    checks.broadcasts_to("weight", weight, "the element-wise loss", loss)
    return loss * weight


def reduce_loss(loss: Tensor, reduction: str, avg_factor: float | Tensor | None) -> Tensor:
    avg_factor = check_avg_factor(avg_factor)
    if reduction == "none":
        return loss
    if avg_factor is not None and reduction == "sum":
        raise LossInputError(
            "avg_factor can not be used with reduction='sum': avg_factor replaces the element count "
            "of a 'mean'; use reduction 'mean' with avg_factor, or 'sum' without it",
            field="avg_factor",
        )
    if loss.numel() == 0:
        return loss.sum()  # zero with a gradient, where mean() would give NaN
    if reduction == "sum":
        return loss.sum()
    if avg_factor is None:
        return loss.mean()
    return loss.sum() / (avg_factor + AVG_FACTOR_EPS)


def weight_reduce_loss(
    loss: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Steps 3-4 of the pipeline: element-wise weight, then reduction with avg_factor."""
    return reduce_loss(apply_weight(loss, weight), reduction, avg_factor)


def zero_weight_shortcut(pred: Tensor, weight: Tensor | None) -> Tensor | None:
    """mmdet's early exit for box losses when no weight is positive: ``(pred * weight).sum()``.

    The scalar is returned for every reduction and is not scaled by ``loss_weight`` (it is zero
    unless a weight is negative). Returns None when the shortcut does not apply.
    """
    if weight is None:
        return None
    checks.tensor("weight", weight)
    if weight.numel() and bool((weight > 0).any()):
        return None
    if pred.dim() == weight.dim() + 1:
        weight = weight.unsqueeze(1)
    checks.broadcasts_to("weight", weight, "pred", pred)
    return (pred * weight).sum()


class WeightedLoss(nn.Module):
    """Base class of the built-in losses: holds ``reduction`` and ``loss_weight``.

    A subclass writes ``forward`` with mmdet's exact signature, computes its element-wise loss
    with a kernel and hands it to ``self.finish``. No subclass reduces on its own.
    """

    output_kind: ClassVar[OutputKind] = OutputKind.ELEMENT
    output_variants: ClassVar[dict[str, OutputKind]] = {}
    differentiable: ClassVar[tuple[str, ...]] = ("pred",)
    # Every built-in kernel is row-separable: loss element i depends on row/element i alone.
    separable: ClassVar[bool] = True
    sample_axis: ClassVar[int] = 1
    # Whether some configs keep state across calls (buffers a forward updates); keeps_state() says
    # whether this configured module does. A stateless module may be shared by concurrent calls.
    stateful: ClassVar[bool] = False

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, "reduction")
        self.loss_weight = float(loss_weight)

    def keeps_state(self) -> bool:
        """Whether this module, as configured, carries state from one forward to the next."""
        return self.stateful

    def resolve_reduction(self, reduction_override: str | None) -> str:
        # mmdet: `reduction_override if reduction_override else self.reduction`
        if not reduction_override:
            return self.reduction
        return check_reduction(reduction_override, "reduction_override")

    def finish(
        self,
        loss: Tensor,
        weight: Tensor | None,
        reduction: str,
        avg_factor: float | Tensor | None,
    ) -> Tensor:
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def config(self) -> dict[str, Any]:
        """The config dict that rebuilds this module (``type`` excluded)."""
        import inspect

        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}
