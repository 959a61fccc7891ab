"""Fused loss-and-gradient kernels for the hot losses: the loss and d(loss)/d(pred) in one pass.

The evaluator's general path builds an autograd graph in the forward and walks it back with
``torch.autograd.grad``: every intermediate of the forward is kept, and the backward re-reads it and
writes as many gradient temporaries again. For the losses a detector calls on every step the
derivative has a short closed form, so a kernel computes the element-wise loss with its family's own
forward (``giou_parts``, ``softmax_cross_entropy_parts``, ``focal_factor``...), keeps the intermediates
the derivative needs, and scales the local derivative by the pipeline's factor
(``Reducer.gradient_scale``: weight, reduction, ``loss_weight``, upstream) at the end. Vectorised torch
only, so the same code runs on CUDA tensors.

This package is the shared mechanism: the table, ``select``, the answer types and the pieces every
kernel uses. The kernels mirror the families, one module each (``focal``, ``gfocal``, ``cross_entropy``,
``regression``, ``iou``), and register themselves for their loss class with ``register``; importing
``losswire.server.losses`` imports them all.

Each kernel hands its element-wise loss to the module's own ``finish`` (weight, reduction,
``avg_factor``, ``loss_weight``), so the loss value is the module's. The gradient's closed form is
evaluated with autograd's products in autograd's order (the derivation is in each kernel's docstring),
which on the CPU (one intra-op thread, as small terms run; see ``row_blocks`` for several) makes
FocalLoss, QualityFocalLoss, L1/SmoothL1 and GIoU gradients autograd's bit for bit; CE's differs in the
last bit on some elements (torch.exp vs log_softmax's backward kernel).
tests/engine/test_fused_kernels.py checks both. The saving is the graph: no saved intermediates, no
zero-filled gradient buffers, no one-hot targets, in-place products.

FocalLoss's and QualityFocalLoss's kernels work block of rows by block of rows (``RowKernel``: each
block's loss and, for an upstream of ones, its gradient in one pass), so the same code answers a whole
term and one whose rows are still arriving (``Evaluator.start_rows``): the same blocks, the same bits.

``FUSED_KERNELS`` maps a loss *class* (an exact type: a plugin that replaces the name or subclasses it
is never fused) to its kernel and a ``supports(module, kwargs)`` predicate. ``supports`` is
conservative: anything the module would refuse (bad shapes, out-of-range labels, a bad
``reduction_override``, ``avg_factor`` with ``sum``), any input that is not finite, any dtype but
float32/float64, and any config the kernel does not cover returns False, and the evaluator runs the
module under autograd, which raises its own error or computes the answer. A kernel therefore never
raises a ``LossError`` of its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .. import checks
from ..errors import LossError
from ..pipeline import AVG_FACTOR_EPS, Reducer

FLOATS = (torch.float32, torch.float64)  # half precision keeps autograd's own rounding

# gradient(upstream, out=None): see Fused
Gradient = Callable[..., Tensor]
# scratch(shape, dtype) -> an uninitialised tensor of them (see FusedKernel.rows)
Scratch = Callable[[torch.Size, torch.dtype], Tensor]


@dataclasses.dataclass(frozen=True)
class Fused:
    """A fused kernel's answer.

    ``loss``: exactly what the module returns (its shape and dtype), detached.
    ``gradient(upstream, out=None)``: d(sum(upstream * loss))/d(pred), pred's shape and dtype;
    ``upstream`` is None for an upstream of ones (what the evaluator's default backward uses), else a
    tensor of ``loss``'s shape in its dtype (a recompute's ``grad_output``). ``out``: a tensor of
    pred's shape, dtype and device to write the gradient into (the caller's shared memory, say);
    kernels whose ``FusedKernel.writes_into`` is True return it, the others ignore it.
    """

    loss: Tensor
    gradient: Gradient


class NotFusable(Exception):  # noqa: N818 (a signal to the evaluator, not the caller's error)
    """A ``RowKernel`` met rows whose values its kernel does not cover (what ``supports`` refuses on
    the whole tensor: a non-finite input, a label out of range): the term needs autograd's path."""


class RowKernel(Protocol):
    """A fused kernel working through pred's rows in order, as they become available: the term's
    tensors are whole-sized from the start, but only their first ``rows`` rows (of every input indexed
    by pred's rows) hold their values when ``advance(rows)`` is called."""

    def advance(self, rows: int) -> int:
        """Compute what the first ``rows`` rows allow; the number of leading rows of the gradient that
        are final (``NotFusable`` where a row's values are not covered)."""

    def finish(self) -> Fused:
        """Every row in: the answer (its ``gradient(None)`` is the one written row by row)."""


@dataclasses.dataclass(frozen=True)
class FusedKernel:
    """One row of the selection table.

    ``rows(module, kwargs, out, checked, scratch)``, for kernels that work row by row, starts a
    ``RowKernel`` that computes the gradient of an upstream of ones as it goes, into ``out`` (pred's
    shape and dtype; None: a tensor of its own); ``checked``: ``supports`` has seen every value (else
    each block's are checked as they come); ``scratch(shape, dtype)``: where it takes its whole-sized
    scratch tensors (None: fresh ones).
    ``covers(module, kwargs)`` is ``supports`` without reading any value (shapes, dtypes, config only):
    whether the kernel may start on rows that have not arrived yet.
    ``one_pass``: the loss and gradient as one function of the inputs, for a GPU (see ``ClosedForm``)."""

    name: str
    supports: Callable[[nn.Module, Mapping[str, Any]], bool]
    run: Callable[[nn.Module, Mapping[str, Any]], Fused]
    writes_into: bool = False  # its gradient() writes into a given ``out`` (see Fused)
    rows: Callable[[nn.Module, Mapping[str, Any], Tensor, bool, Scratch | None], RowKernel] | None = None
    covers: Callable[[nn.Module, Mapping[str, Any]], bool] | None = None
    one_pass: ClosedForm | None = None


@dataclasses.dataclass(frozen=True)
class ClosedForm:
    """A loss and its gradient as one function of the inputs, which ``torch.compile`` turns into one pass
    over them on a GPU (``compiled.OnePass``); the family kernels' torch ops launch one kernel per op there.

    ``function(*tensors_and_flags) -> (loss, gradient)``: plain torch, no data-dependent control flow
    (scalars come as 0-d tensors, so that one compilation serves every config value).
    ``bind(module, kwargs, function) -> Fused``: the module's config and a call's inputs (those
    ``supports`` accepted) to ``function``'s arguments, and its result to the module's output.
    ``handwritten``: ``function`` written by hand for the GPU (see ``HandWritten``); on CUDA it answers
    float32 terms instead of the compiled ``function`` where it imports."""

    function: Callable[..., tuple[Tensor, Tensor]]
    bind: Callable[[nn.Module, Mapping[str, Any], Callable[..., tuple[Tensor, Tensor]]], Fused]
    handwritten: HandWritten | None = None


def _no_hints(module: nn.Module) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class HandWritten:
    """A closed form written by hand for the GPU (Triton), for float32: the ``closed_form`` of the module
    ``stem`` beside this one.

    It takes the closed form's arguments, plus the keywords ``hints(module)`` gives (config values it
    specialises on, known on the host: FocalLoss's gamma = 2), and its results are what ``bind`` reads.
    It checks, as it runs, the values ``supports`` would read (NaN or Inf in pred and weight, labels out
    of range) and raises ``ValuesNotCovered`` afterwards where one is not its: so on a GPU the evaluator
    asks ``covers`` alone before it (``compiled.OnePass.answer_unchecked``), and saves ``supports``'s
    passes over the inputs and their host syncs."""

    stem: str
    hints: Callable[[nn.Module], dict[str, Any]] = _no_hints


# The selection table, filled by ``register`` as the kernel modules are imported.
FUSED_KERNELS: dict[type, FusedKernel] = {}


def register(cls: type, kernel: FusedKernel) -> FusedKernel:
    """Make ``kernel`` answer the modules of exactly ``cls`` (a loss class registered as ``kernel.name``)."""
    taken = FUSED_KERNELS.get(cls)
    if taken is not None and taken is not kernel:
        raise ValueError(f"{cls.__qualname__} already has the fused kernel {taken.name!r}")
    FUSED_KERNELS[cls] = kernel
    return kernel


# How many terms each kernel answered in this process (tests and operators read it; the service's
# thread pool calls kernels concurrently, hence the lock).
CALLS: Counter[str] = Counter()
_CALLS_LOCK = threading.Lock()


def count_call(name: str) -> None:
    with _CALLS_LOCK:
        CALLS[name] += 1


def select(module: nn.Module, kwargs: Mapping[str, Any]) -> FusedKernel | None:
    """The fused kernel for this module and these bound inputs, or None (autograd's path).

    Looked up by the module's exact class, so subclasses and plugins registered under a built-in
    name keep their own forward.
    """
    kernel = FUSED_KERNELS.get(type(module))
    if kernel is None:
        return None
    try:
        return kernel if kernel.supports(module, kwargs) else None
    except LossError:
        return None


def kernel_source(cls: type) -> tuple[Path, ...] | None:
    """The files of the fused kernel for loss class ``cls`` (exact type), or None: its kernel module and
    this shared mechanism. Part of a loss's implementation digest (``provenance``, which adds the engine
    modules they import) when fused kernels are on."""
    kernel = FUSED_KERNELS.get(cls)
    if kernel is None:
        return None
    # resolved, as provenance names the engine's files (a symlinked install has two names for each)
    files = (inspect.getsourcefile(kernel.run), inspect.getsourcefile(sys.modules[__name__]))
    return tuple(Path(f).resolve() for f in files)


# -- what every kernel's ``supports`` asks -----------------------------------------------------------


def finite(*tensors: Tensor | None) -> bool:
    """No NaN or Inf in any of ``tensors``.

    One summing pass each instead of an ``isfinite`` mask: a NaN or Inf element makes the sum
    non-finite. A sum that overflows from finite values also reads as non-finite, which only sends
    that (absurd) input to autograd.
    """
    # the sum's value checked in Python: one torch op per tensor instead of two (sum, isfinite)
    return all(t is None or t.numel() == 0 or math.isfinite(t.sum().item()) for t in tensors)


def same_float_dtype(pred: Tensor, *others: Tensor | None) -> bool:
    """pred is float32/float64 and every other tensor has its dtype (no promotion of the loss)."""
    return pred.dtype in FLOATS and all(o is None or o.dtype == pred.dtype for o in others)


def broadcasts(weight: Tensor | None, shape: Sequence[int]) -> bool:
    """No weight, or one that broadcasts to ``shape`` without enlarging it (the pipeline's rule)."""
    if weight is None:
        return True
    try:
        checks.broadcasts_to("weight", weight, "the loss", torch.empty(shape, device="meta"))
    except LossError:
        return False
    return True


def supported_exponent(value: float) -> bool:
    """``|d|^e`` has a finite derivative at ``d = 0`` only for ``e = 0`` or ``e >= 1``; for ``0 < e < 1``
    autograd's answer there is NaN (``inf * 0``), which the kernels would not reproduce."""
    return value == 0 or value >= 1


def plain_reducer(module: nn.Module, kwargs: Mapping[str, Any], avg_factor: Any = None) -> Reducer | None:
    """The module's reduction of this call (``avg_factor``: the call's, unless given), or None where the
    module would refuse it (a bad override, ``avg_factor`` with ``sum``) or where the divisor is not an
    ordinary number (a tensor ``avg_factor``, dtype promotion with the loss: left to autograd; a
    non-finite one, or one that makes the divisor zero)."""
    try:
        mode = module.resolve_reduction(kwargs.get("reduction_override"))
        reducer = Reducer.resolve(mode, kwargs.get("avg_factor") if avg_factor is None else avg_factor)
    except LossError:
        return None
    if reducer.avg_factor is None:
        return reducer
    if isinstance(reducer.avg_factor, Tensor):
        return None
    value = float(reducer.avg_factor)
    if not math.isfinite(value) or value + AVG_FACTOR_EPS == 0:
        return None
    return Reducer(reducer.mode, value)


def unshortcut_reducer(module: nn.Module, kwargs: Mapping[str, Any]) -> Reducer | None:
    """``plain_reducer`` for the box and regression losses, None where the call's answer is mmdet's
    zero-weight shortcut (``PairwiseLoss.takes_shortcut``): autograd's path answers it."""
    reducer = plain_reducer(module, kwargs)
    if reducer is None or module.takes_shortcut(reducer.mode, kwargs.get("weight")):
        return None
    return reducer


# -- what every kernel's gradient uses ------------------------------------------------------------------


def pow_grad(base: Tensor, exponent: float) -> Tensor:
    """d(base^e)/d(base) = ``e * base^(e-1)``, the way ``pow``'s backward computes it."""
    if exponent == 2:  # base.pow(1) is an exact copy of base: one op fewer, the same bits
        return exponent * base
    return exponent * base.pow(exponent - 1)


def negatives_gradient(
    factor: Tensor,
    prob: Tensor,
    bce: Tensor,
    g: Tensor,
    exponent: float,
    scale: float | None,
    out: Tensor | None = None,
) -> Tensor:
    """``g`` times d/dx of ``L = BCE(x, 0) w p^e`` (the focal losses at a negative: ``factor = w p^e``,
    ``scale = w``, None for 1), with ``p = sigmoid(x)``: BCE's path ``(p - 0) (g w p^e)`` plus the
    factor's ``((g BCE w) (e p^(e-1))) (1 - p) p``, each product in autograd's order so that the result
    is autograd's bit for bit. ``e = 0`` drops the factor's path, as ``pow``'s backward does."""
    grad = (torch.mul(factor, g) if out is None else torch.mul(factor, g, out=out)).mul_(prob)
    if exponent != 0:
        path = torch.mul(bce, g)
        if scale is not None:
            path.mul_(scale)
        grad.add_(path.mul_(pow_grad(prob, exponent)).mul_(1 - prob).mul_(prob))
    return grad


# Powers torch computes exactly, whatever an element's place in the tensor. Any other ``q^gamma`` goes
# through a vectorised pow whose last elements (fewer than a vector loop's step) take the scalar
# ``std::pow``, which may differ in the last bit: a kernel then reads such a power at its positives from the
# block's [rows, C] tensor, where each element sits where it sits in autograd's whole-tensor pass
# (blocks hold multiples of 64 elements), not from a gathered vector whose tail depends on the block.
EXACT_POWERS = (0.0, 1.0, 2.0, 3.0)


# -- cache-sized blocks --------------------------------------------------------------------------------

# A big tensor's element-wise steps, each a pass over the whole tensor into a fresh one, are bound by
# memory: fresh intermediates of tens of MiB cost page faults and never stay in cache. Above
# BLOCKED_MIN_ELEMENTS a kernel works through blocks of about BLOCK_ELEMENTS (512 KiB per float32
# intermediate): FocalLoss [209715, 80] (64 MiB) loss + gradient on one thread took 380-405 ms whole
# and 88-97 ms in blocks of 2048 rows. Every block holds a multiple of 64 elements, so torch's vector
# loops run to its end without a scalar tail inside the tensor: on one thread each element takes the
# path it takes in a whole-tensor op, and the result is autograd's bit for bit (tested). With several
# intra-op threads torch splits each op among them at other places than autograd's whole-tensor op,
# and an element at such a split may round differently in the last bit: FocalLoss [60001, 80] on two
# threads differed from autograd in 1-2 of 4.8M gradient elements, blocked or not (whole: 0-1).
BLOCK_ELEMENTS = 1 << 17
BLOCKED_MIN_ELEMENTS = 1 << 22


def rows_of(tensor: Tensor, block: slice) -> Tensor:
    """``tensor[block]``, or ``tensor`` itself where the block is all of its rows: a small term is one
    block, and each view costs it a couple of microseconds."""
    return tensor if block.start == 0 and block.stop == tensor.shape[0] else tensor[block]


def row_blocks(rows: int, per_row: int, device: torch.device) -> list[slice]:
    """Slices of ``rows`` rows of ``per_row`` elements, each about :data:`BLOCK_ELEMENTS` elements and
    a multiple of 64 of them (the last takes the rest); one slice of everything below
    :data:`BLOCKED_MIN_ELEMENTS`, and off the CPU (a GPU's caches are not the point there, and every
    block would launch each kernel again: not measured on a GPU yet)."""
    if rows * per_row < BLOCKED_MIN_ELEMENTS or device.type != "cpu":
        return [slice(0, rows)]
    align = 64 // math.gcd(per_row, 64)  # rows per 64-element multiple
    step = max(align, BLOCK_ELEMENTS // per_row // align * align)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class RowBlocks:
    """What every ``RowKernel`` here shares: pred's rows in cache-sized blocks (``row_blocks``), computed
    in order as ``advance`` allows them; with ``eager``, the gradient of an upstream of ones kept block by
    block in ``out`` (for a term of one block, that block's own tensor); the answer once every block is
    in. A kernel gives ``compute_block(block)``, ``value()`` (its module's output, from the whole loss)
    and ``recompute(upstream, out)`` (the gradient of any other upstream, after the blocks). ``checked``:
    ``supports`` has seen every value (else a kernel checks each block's as it comes)."""

    name = ""  # the loss, in messages

    def __init__(
        self, module: nn.Module, kwargs: Mapping[str, Any], out: Tensor | None, checked: bool, eager: bool
    ) -> None:
        self.module, self.checked, self.eager = module, checked, eager
        self.x = kwargs["pred"].detach()
        self.reducer = plain_reducer(module, kwargs)
        self.blocks = row_blocks(self.x.shape[0], self.x.shape[1], self.x.device)
        self.one = len(self.blocks) == 1  # a small term: its block's results are the whole tensors, no copies
        self.out = out if out is not None or self.one or not eager else torch.empty_like(self.x)
        self.next = 0  # blocks done

    def advance(self, rows: int) -> int:
        """Compute every block within the first ``rows`` rows; the rows done so far."""
        while self.next < len(self.blocks) and self.blocks[self.next].stop <= rows:
            self.compute_block(self.blocks[self.next])
            self.next += 1
        return self.blocks[self.next - 1].stop if self.next else 0

    def compute_block(self, block: slice) -> None:
        raise NotImplementedError

    def not_covered(self, block: slice) -> NotFusable:
        return NotFusable(f"rows {block.start}-{block.stop} of {self.name}'s inputs need the general path")

    def gradient_rows(self, block: slice) -> Tensor | None:
        """Where a block's eager gradient goes: its rows of ``out`` (None: the block's own tensor, ``keep``)."""
        return None if self.out is None else rows_of(self.out, block)

    def keep(self, gradient: Tensor) -> None:
        """A one-block term's gradient, computed into a tensor of its own."""
        if self.out is None:
            self.out = gradient

    def finish(self) -> Fused:
        """The loss, once every block is in, and its gradient."""
        if self.next < len(self.blocks):
            raise ValueError(f"{self.name}: {self.advance(0)} of {self.x.shape[0]} rows computed")
        return Fused(self.value(), self.gradient)

    def value(self) -> Tensor:
        raise NotImplementedError

    def gradient(self, upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        if upstream is None and self.eager:
            return self.out
        return self.recompute(upstream, out)

    def recompute(self, upstream: Tensor | None, out: Tensor | None) -> Tensor:
        raise NotImplementedError


# -- what every closed form uses (see ClosedForm) ------------------------------------------------------


def bce_of_logits(x: Tensor, t: Tensor) -> Tensor:
    """BCE of logits ``x`` against soft targets ``t``, stable for any ``x``, in one expression."""
    return x.clamp_min(0) - x * t + torch.log1p(torch.exp(-x.abs()))


def tensor_pow_grad(base: Tensor, exponent: Tensor) -> Tensor:
    """d(base^e)/d(base) for a 0-d tensor ``e``; 0 for ``e = 0`` (``pow``'s backward), where
    ``base^(e - 1)`` may be infinite."""
    return torch.where(exponent == 0, 0.0, exponent * base.pow(exponent - 1))


def one_hot(labels: Tensor, like: Tensor) -> Tensor:
    """[N, C] in ``like``'s dtype: 1 at each row's label column; a label outside [0, C) gives a row of 0."""
    columns = torch.arange(like.shape[1], device=like.device)
    return (labels.unsqueeze(1) == columns).to(like.dtype)


class DeclinedError(Exception):
    """A closed form does not take these inputs: the family kernel answers them (and refuses what it
    refuses), and the closed form stays on for every other call."""


class ValuesNotCovered(DeclinedError):  # noqa: N818 (a signal to the evaluator, not the caller's error)
    """A hand-written kernel, which checks the values as it runs, met one that is not its (a NaN or Inf,
    a label out of range, a sum past the dtype): ``supports`` decides the call, as it decides any other."""


SCALARS_KEPT = 256  # config values kept on their devices; past it the table starts again (a bound, not an LRU)
_scalars: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}


def scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device (a closed form's config value: a tensor, so
    that one compilation serves every value). A finite value past the dtype's range is declined:
    ``torch.tensor`` would make it inf silently, where the family kernel's ops refuse it (``clamp(x,
    1e39)`` on float32: "cannot be converted ... without overflow").

    Kept per value, dtype and device: on a GPU each new one is a host-to-device copy the host waits for,
    and a config's values are the same call after call. The closed forms only read them. The key is the
    value's hex form, so -0.0 and 0.0 stay apart and a NaN finds its own."""
    value = float(value)
    key = (value.hex(), like.dtype, like.device)
    kept = _scalars.get(key)
    if kept is not None:
        return kept
    if math.isfinite(value) and abs(value) > torch.finfo(like.dtype).max:
        raise DeclinedError(f"{value!r} does not fit {like.dtype}")
    made = torch.tensor(value, dtype=like.dtype, device=like.device)
    if len(_scalars) >= SCALARS_KEPT:
        _scalars.clear()
    _scalars[key] = made
    return made


def answered(value: Tensor, grad: Tensor) -> Fused:
    """A closed form's answer: its gradient is for an upstream of ones (the evaluator sends recomputes
    to the family kernel)."""

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        if upstream is not None:
            raise ValueError("a closed form's gradient is for an upstream of ones only")
        return grad if out is None else out.copy_(grad)

    return Fused(value, gradient)
