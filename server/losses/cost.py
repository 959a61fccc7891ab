"""What a config and its input shapes cost, known before anything is built or allocated.

Each loss declares ``estimate(params, shapes, itemsize) -> Estimate`` next to its math (a classmethod;
the default, in ``pipeline.WeightedLoss``, is a calibrated multiple of the input bytes). ``params`` is
the validated config with its defaults filled in, ``shapes`` maps a forward input's name to its shape
(None: the module alone), ``itemsize`` is the floating-point inputs' element size in bytes. An estimate
is plain integer arithmetic on those numbers: it never builds the module nor allocates a tensor, so a
server can compare it with its budgets in microseconds, also for a config of ``num_classes=1e8``.

``Registry.estimate(config, shapes)`` validates the config and calls the loss's estimate.

Calibration: the memory constants are peak resident memory (VmHWM) of real forwards + backwards,
measured in a subprocess per case; ``tests/engine/test_estimates.py`` measures them again (a slow test),
holds each estimate to [0.5, 4] times the measured peak and lists the ratios (1.0 to 2.7 here). The work
constants make a unit about half a nanosecond of one core's time on the machine measured (a 2-core VM:
0.3 to 1.5 ns per unit across the losses' forward + backward, one intra-op thread): a rough guide for
a time budget, not a promise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import LossInputError

# A shape per forward input name; a tuple input (QualityFocalLoss's (label, score)) may give one per member.
Shape = Sequence[int]
Shapes = Mapping[str, Shape | Sequence[Shape]]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The memory (and work) one configured loss implies.

    ``module_bytes``: the peak of building the module, most of which it holds afterwards (GHM's bins,
    EQLv2's and Seesaw's per-class buffers). ``forward_bytes``: the peak working memory of one forward and
    backward for the given shapes, beyond the inputs themselves (gradients included); 0 without shapes.
    ``work``: element operations of that forward and backward, roughly (see the module docstring). ``parameter``
    names the config key or forward input that drives the larger of the two byte counts (the one a
    refusal should name); ``module_parameter`` and ``forward_parameter`` name each one's.
    """

    module_bytes: int
    forward_bytes: int
    work: int
    module_parameter: str
    forward_parameter: str

    @property
    def parameter(self) -> str:
        return self.module_parameter if self.module_bytes >= self.forward_bytes else self.forward_parameter

    @property
    def total_bytes(self) -> int:
        return self.module_bytes + self.forward_bytes


def elements(shape: Shape | None) -> int:
    """The number of elements of a shape (0 for None)."""
    return 0 if shape is None else math.prod(shape)


def cells(shape: Shape | None) -> int:
    """The elements of a shape, counting a zero-size axis as one (0 for None): what a loss's output per
    row of it holds, and so what its working set scales with. An input of shape [N, 0] carries no bytes,
    but its loss per row (reduction 'none', or before the mean) has N elements."""
    return 0 if shape is None else math.prod(max(d, 1) for d in shape)


def shape_of(shapes: Shapes | None, name: str) -> tuple[int, ...] | None:
    """The shape given for input ``name`` (the first member's for a tuple input), or None."""
    if not shapes or name not in shapes:
        return None
    shape = shapes[name]
    if shape and not isinstance(shape[0], int):  # a tuple input: one shape per member
        shape = shape[0]
    return tuple(shape)


def dim(shape: tuple[int, ...] | None, axis: int, default: int = 0) -> int:
    """``shape[axis]``, or ``default`` where the shape is unknown or has no such axis."""
    if shape is None or not -len(shape) <= axis < len(shape):
        return default
    return shape[axis]


def check_shapes(shapes: Any) -> dict[str, Any]:
    """Shapes as the estimates read them: names to tuples of non-negative ints (or tuples of those)."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise LossInputError(f"shapes must map input names to shapes, got {type(shapes).__name__}", field="shapes")
    checked: dict[str, Any] = {}
    for name, shape in shapes.items():
        if isinstance(shape, Sequence) and shape and all(_is_shape(s) for s in shape):
            checked[str(name)] = tuple(tuple(int(d) for d in s) for s in shape)
        elif _is_shape(shape):
            checked[str(name)] = tuple(int(d) for d in shape)
        else:
            raise LossInputError(
                f"shapes[{name!r}] must be a shape (non-negative integers), got {shape!r}", field="shapes"
            )
    return checked


def _is_shape(value: Any) -> bool:
    return isinstance(value, Sequence) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


# The default cost model, of a loss that declares none (a plugin's module): no buffers, and a forward +
# backward whose peak is this many copies of the first input (the engine's losses measure 3 to 20).
DEFAULT_WORKING_COPIES, DEFAULT_WORK_PER_ELEMENT = 16.0, 40


def proportional(
    name: str,
    shapes: Shapes | None,
    itemsize: int,
    working_copies: float = DEFAULT_WORKING_COPIES,
    work_per_element: int = DEFAULT_WORK_PER_ELEMENT,
) -> Estimate:
    """The estimate of a loss without buffers whose working set is ``working_copies`` copies of input
    ``name`` (the element-wise losses: every intermediate has the first input's shape; a zero-size axis
    counts as one, see ``cells``)."""
    count = cells(shape_of(shapes, name))
    return Estimate(0, math.ceil(working_copies * count * itemsize), work_per_element * count, name, name)


def with_config_terms(
    base: Estimate, shapes: Shapes | None, module_bytes: int, forward_bytes: int, work: int, parameter: str
) -> Estimate:
    """``base`` (the element-wise working set) plus what config key ``parameter`` sizes: ``module_bytes``
    held by the module, and ``forward_bytes`` / ``work`` more per forward (none without shapes). The
    forward's larger term names its parameter."""
    if shapes is None:
        return Estimate(module_bytes, 0, 0, parameter, parameter)
    driver = parameter if forward_bytes > base.forward_bytes else base.forward_parameter
    return Estimate(module_bytes, base.forward_bytes + forward_bytes, base.work + work, parameter, driver)
