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

Written once here: ``Reducer`` (the reduction rules, and the factor their derivative divides by, which
the fused kernels read), ``WeightedLoss`` (the base of every built-in loss: ``finish``, the
declarations ``stateful`` / ``stochastic`` and the default ``estimate``) and ``PairwiseLoss`` (the one
``forward(pred, target, weight, avg_factor, reduction_override)`` of the losses of a prediction against
a target: each writes only its checks, its kernel and its weight rule).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from . import checks, cost
from .cost import Estimate, Shapes
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


@dataclasses.dataclass(frozen=True)
class Reducer:
    """One call's reduction, resolved: the mode and the checked ``avg_factor``.

    The one home of the reduction rules: what the forward returns (``__call__``) and what a mean divides
    by (``divisor``), which the fused kernels' gradients read too (``gradient_scale``).
    """

    mode: str  # "none", "mean" or "sum"
    avg_factor: float | Tensor | None = None

    @classmethod
    def resolve(cls, mode: str, avg_factor: Any) -> Reducer:
        """Check ``avg_factor``; refuse it with ``sum`` (it replaces the element count of a mean)."""
        avg_factor = check_avg_factor(avg_factor)
        if avg_factor is not None and mode == "sum":
            raise LossInputError(
                "avg_factor can not be used with reduction='sum': avg_factor replaces the element count "
                "of a 'mean'; use reduction 'mean' with avg_factor, or 'sum' without it",
                field="avg_factor",
            )
        return cls(mode, avg_factor)

    def divisor(self, numel: int) -> float | Tensor | None:
        """What a mean of ``numel`` losses divides their sum by: the count, or ``avg_factor + eps``
        (float32's eps whatever the dtype, as mmdet); None where nothing is divided (none, sum, empty)."""
        if self.mode != "mean" or numel == 0:
            return None
        return numel if self.avg_factor is None else self.avg_factor + AVG_FACTOR_EPS

    def __call__(self, loss: Tensor) -> Tensor:
        if self.mode == "none":
            return loss
        if loss.numel() == 0:
            return loss.sum()  # zero with a gradient, where mean() would give NaN
        if self.mode == "sum":
            return loss.sum()
        if self.avg_factor is None:
            return loss.mean()  # mean's own kernel: its rounding is mmdet's
        return loss.sum() / self.divisor(loss.numel())

    def gradient_scale(
        self, loss_weight: float, weight: Tensor | None, upstream: Tensor | None, loss: Tensor
    ) -> Tensor:
        """d(output)/d(element-wise loss) of ``loss_weight * self(loss * weight)``, times the upstream
        gradient (None: ones), for a kernel that derives the rest itself.

        The steps and their order are autograd's backward through ``WeightedLoss.finish``: the upstream
        times ``loss_weight``, divided as the mean divides, times the (broadcast) weight; so the factor
        rounds as autograd's. 0-d unless weighted or the upstream is element-wise (reduction 'none').
        """
        factor = upstream if upstream is not None else torch.ones((), dtype=loss.dtype, device=loss.device)
        factor = factor * loss_weight
        divisor = self.divisor(loss.numel())
        if divisor is not None:
            factor = factor / divisor
        if weight is not None:
            factor = factor * weight
        return factor


def reduce_loss(loss: Tensor, reduction: str, avg_factor: float | Tensor | None) -> Tensor:
    """Step 4 of the pipeline: reduction with avg_factor (see ``Reducer``)."""
    return Reducer.resolve(reduction, avg_factor)(loss)


def weight_reduce_loss(
    loss: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Steps 3-4 of the pipeline: element-wise weight, then reduction with avg_factor."""
    reducer = Reducer.resolve(reduction, avg_factor)
    return reducer(apply_weight(loss, weight))


def no_positive_weight(weight: Tensor) -> bool:
    """Where mmdet's box losses take their zero-weight shortcut: no entry of the weight is positive."""
    return not (weight.numel() and bool((weight > 0).any()))


def zero_weight_shortcut(pred: Tensor, weight: Tensor | None) -> Tensor | None:
    """mmdet's early exit for box losses when no weight is positive: ``(pred * weight).sum()``.

    The scalar is returned for every reduction and is not scaled by ``loss_weight`` (it is zero
    unless a weight is negative). Returns None when the shortcut does not apply.
    """
    if weight is None:
        return None
    checks.tensor("weight", weight)
    if not no_positive_weight(weight):
        return None
    if pred.dim() == weight.dim() + 1:
        weight = weight.unsqueeze(1)
    checks.broadcasts_to("weight", weight, "pred", pred)
    return (pred * weight).sum()


def float32_rounded(values: Tensor, dtype: torch.dtype) -> Tensor:
    """MMDetection casts cross-entropy weights (and sigmoid-mode labels) to float32; round the same
    way so float64 results agree bit for bit, but keep the loss in ``dtype``."""
    return values.float().to(dtype)


@functools.cache
def input_names(cls: type) -> tuple[str, ...]:
    """The forward's argument names of a loss class, in order (``self`` left out)."""
    parameters = inspect.signature(cls.forward).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD)[1:]


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
    # whether this configured module does. ``schema.shareable`` reads both, and ``stochastic``.
    stateful: ClassVar[bool] = False
    # Whether the forward draws random numbers (from ``self.rng``, which a caller may set per call).
    stochastic: ClassVar[bool] = False
    # The cost model of ``estimate``: the peak working memory of one forward + backward in copies of the
    # first input's bytes, and its element operations per element (calibrated per loss: see cost.py).
    working_copies: ClassVar[float] = cost.DEFAULT_WORKING_COPIES
    work_per_element: ClassVar[int] = cost.DEFAULT_WORK_PER_ELEMENT

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, "reduction")
        self.loss_weight = float(loss_weight)

    @classmethod
    def estimate(cls, params: Mapping[str, Any], shapes: Shapes | None, itemsize: int) -> Estimate:
        """What this config and these input shapes cost (see ``cost``): no buffers, and a working set of
        ``working_copies`` copies of the first input. Losses with larger terms override it."""
        first = next(iter(input_names(cls)), "pred")  # a forward of *args names nothing
        return cost.proportional(first, shapes, itemsize, cls.working_copies, cls.work_per_element)

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
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}


class PairwiseLoss(WeightedLoss):
    """A loss of ``pred`` against ``target`` with mmdet's forward, written once for every such loss:

        forward(pred, target, weight=None, avg_factor=None, reduction_override=None)

    1. the reduction is resolved (``reduction_override`` wins) and ``pred`` checked (``check_pred``);
    2. the box losses' zero-weight shortcut, where the class takes it (``weight_shortcut``);
    3. ``prepare`` checks ``target`` against ``pred`` and normalises both (dtype, one-hot...);
    4. ``kernel`` computes the element- or sample-wise loss, the class's own math;
    5. ``shape_weight`` applies the class's weight rule (mmdet reshapes or averages some weights);
    6. ``finish``: weight, reduction with ``avg_factor``, ``loss_weight``.

    A class whose inputs are named otherwise (``cls_score``, ``soft_label``) or ordered otherwise
    (DiceLoss) writes its own ``forward`` with mmdet's signature and calls ``evaluate``.
    """

    # mmdet's shortcut ``(pred * weight).sum()`` when no weight is positive: "never", "always", or
    # "reduced" (only for 'mean' and 'sum', as IoULoss)
    weight_shortcut: ClassVar[Literal["never", "always", "reduced"]] = "never"

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        return self.evaluate(pred, target, weight, avg_factor, reduction_override)

    def evaluate(
        self,
        pred: Any,
        target: Any,
        weight: Tensor | None,
        avg_factor: AvgFactor,
        reduction_override: ReductionOverride,
    ) -> Tensor:
        """Steps 1-6 above."""
        reduction = self.resolve_reduction(reduction_override)
        pred = self.check_pred(pred)
        if self.shortcut_for(reduction):
            shortcut = zero_weight_shortcut(pred, weight)
            if shortcut is not None:
                return shortcut
        pred, target = self.prepare(pred, target)
        loss = self.kernel(pred, target)
        return self.finish(loss, self.shape_weight(weight, loss, pred), reduction, avg_factor)

    def shortcut_for(self, reduction: str) -> bool:
        """Whether this loss takes mmdet's zero-weight shortcut under ``reduction`` (when no weight is > 0)."""
        return self.weight_shortcut == "always" or (self.weight_shortcut == "reduced" and reduction != "none")

    def takes_shortcut(self, reduction: str, weight: Tensor | None) -> bool:
        """Whether this call's answer is the zero-weight shortcut's ``(pred * weight).sum()``."""
        return self.shortcut_for(reduction) and weight is not None and no_positive_weight(weight)

    def check_pred(self, pred: Any) -> Tensor:
        """``pred`` must be a floating-point tensor: the input the gradient is taken of."""
        return checks.float_tensor(input_names(type(self))[0], pred)

    def prepare(self, pred: Tensor, target: Any) -> tuple[Tensor, Any]:
        """Check ``target`` (by default: a tensor of pred's shape); return both as the kernel takes them."""
        pred_name, target_name = input_names(type(self))[:2]
        checks.tensor(target_name, target)
        checks.same_shape(target_name, target, pred_name, pred)
        return pred, target

    def kernel(self, pred: Tensor, target: Any) -> Tensor:
        """The element- or sample-wise loss (weight, reduction and loss_weight come after)."""
        raise NotImplementedError

    def shape_weight(self, weight: Tensor | None, loss: Tensor, pred: Tensor) -> Tensor | None:
        """mmdet's weight rule of this loss; by default the weight as given (it broadcasts to the loss)."""
        return weight
