"""The fused kernels' closed forms (``FusedKernel.one_pass``), compiled into one pass each for a GPU.

On a GPU the family kernels launch one kernel per torch op, and each op writes its intermediate to device
memory: a FocalLoss term reads and writes its [N, C] tensor a dozen times and runs far under the memory
bandwidth. A closed form is the same loss and gradient as one function of the inputs; ``torch.compile``
(Inductor, which emits Triton kernels on CUDA) fuses it into kernels that read pred, target and weight
once and write the gradient and one loss per row. What answers is unchanged: the family kernel's
``supports`` decides first, so a closed form sees only inputs its family kernel would answer, and the
loss is the module's (see each ``bind``). Values and gradients are autograd's to float32 rounding, not bit
for bit: compiled code adds in its own order. tests/engine/test_gpu_kernels.py checks the closed forms on
any device and the compiled kernels on CUDA.

Shapes: the rows (dim 0 of every input) are dynamic, the other dimensions (classes, box coordinates) are
compiled in, so one compilation serves every batch size and config value (scalars travel as 0-d
tensors); a new input layout (a weight of another rank, the 'none' reduction, another class count)
compiles once more. The first call of each costs 0.1-11 s (measured on an H200). A kernel that fails to
compile (no Triton, a compiler error) is off for the process after one warning, and the family kernel
answers. A config value the inputs' dtype cannot hold is declined (``DeclinedError``): the family kernel
answers that call, as it answers it on the CPU, and the closed form stays on.

A closed form may also be written by hand (``ClosedForm.handwritten``: FocalLoss's ``focal_triton``,
QualityFocalLoss's ``gfocal_triton``): one Triton kernel that moves the fewest bytes, 8x the compiled one's
speed for FocalLoss on an H200. It answers float32 terms wherever it imports, with the same fallback; float64
terms, and shapes it declines before launching (``DeclinedError``), keep the compiled closed form.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LossError
from . import FUSED_KERNELS, ClosedForm, DeclinedError, Fused, FusedKernel, ValuesNotCovered

log = logging.getLogger(__name__)

# compilations one closed form may have (input layouts: weight rank x dtype x reduced or not x class
# counts), over dynamo's default of 8
RECOMPILE_LIMIT = 32


def compiled_source(cls: type) -> tuple[Path, ...]:
    """This module's file, and the hand-written kernel's, where the fused kernel of loss class ``cls`` has a
    closed form (part of the loss's provenance on a GPU, where the closed form answers), else nothing."""
    kernel = FUSED_KERNELS.get(cls)
    if kernel is None or kernel.one_pass is None:
        return ()
    handwritten, here = kernel.one_pass.handwritten, Path(__file__).resolve()
    return (here,) + ((here.with_name(f"{handwritten.stem}.py"),) if handwritten else ())


class OnePass:
    """The compiled closed forms of one process, compiled on first use, each off for good if it fails.

    ``compile=False`` runs the closed forms as plain torch ops; ``devices``: the device types they answer
    on (the CPU's family kernels are autograd's bit for bit and faster there: only the tests add it);
    ``handwritten`` (default: ``compile``): a closed form's hand-written kernel answers float32 terms in
    its place, where it has one and it imports (Triton).
    """

    def __init__(
        self, compile: bool = True, devices: tuple[str, ...] = ("cuda",), handwritten: bool | None = None
    ) -> None:
        self.compile, self.devices = compile, devices
        self.handwritten = compile if handwritten is None else handwritten
        self._compiled: dict[Callable, Callable] = {}
        self._by_hand: dict[str, Callable | None] = {}
        self._broken: set[str] = set()  # losses whose closed form failed: the family kernel answers them
        self._off_by_hand: set[str] = set()  # losses whose hand-written kernel failed: the compiled form answers
        # one caller at a time: compiling is not thread-safe, and a call only launches the GPU's work
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # terms each closed form answered (tests and benchmarks)
        self.calls_by_hand: Counter[str] = Counter()  # ... of them, by its hand-written kernel

    def answer(self, kernel: FusedKernel, module: nn.Module, kwargs: Mapping[str, Any], pred: Tensor) -> Fused | None:
        """``kernel``'s closed form's answer to a term ``kernel.supports``, on ``pred``'s device, or None: a
        device it does not answer on, no closed form, one that failed before or fails now (then it is off
        for the process, and the family kernel answers), inputs it declines, or a term evaluated on an
        event loop. Out of memory is raised: it is the server's condition, not the kernel's."""
        if not self._may_answer(kernel, pred):
            return None
        return self._run(kernel, module, kwargs, self._kernel_by_hand(kernel, pred), checked=True)

    def answer_unchecked(
        self, kernel: FusedKernel, module: nn.Module, kwargs: Mapping[str, Any], pred: Tensor
    ) -> Fused | None:
        """``answer`` before ``kernel.supports`` has read the values, where a hand-written kernel answers:
        it checks them as it runs (``HandWritten``), so ``covers`` (shapes, dtypes, config) is asked here
        instead. None where no such kernel answers this term, or where the values are not its: the caller
        then asks ``supports``, and the paths it chooses answer."""
        if kernel.covers is None or not self._may_answer(kernel, pred):
            return None
        by_hand = self._kernel_by_hand(kernel, pred)
        if by_hand is None:
            return None
        try:
            if not kernel.covers(module, kwargs):
                return None
        except LossError:
            return None
        return self._run(kernel, module, kwargs, by_hand, checked=False)

    def _may_answer(self, kernel: FusedKernel, pred: Tensor) -> bool:
        form = kernel.one_pass
        if form is None or pred.device.type not in self.devices or kernel.name in self._broken:
            return False
        # a quick call, evaluated where it arrived: a first call compiles for seconds (11 s measured) and
        # the lock may wait for another call's compilation; the loop would stall every call and probe
        return not _on_event_loop()

    def _kernel_by_hand(self, kernel: FusedKernel, pred: Tensor) -> Callable | None:
        """The hand-written kernel that answers ``kernel``'s float32 terms, or None: none, not wanted, or no
        Triton here (its module is imported once)."""
        handwritten = kernel.one_pass.handwritten
        if handwritten is None or not self.handwritten or pred.dtype != torch.float32:
            return None
        if kernel.name in self._off_by_hand:
            return None
        stem = handwritten.stem
        if stem not in self._by_hand:
            try:
                self._by_hand[stem] = importlib.import_module(f"{__package__}.{stem}").closed_form
            except ImportError as error:
                log.warning("no hand-written kernel %s (%r): the compiled closed form answers", stem, error)
                self._by_hand[stem] = None
        return self._by_hand[stem]

    def _run(
        self,
        kernel: FusedKernel,
        module: nn.Module,
        kwargs: Mapping[str, Any],
        by_hand: Callable | None,
        checked: bool,
    ) -> Fused | None:
        """``kernel``'s closed form bound and run: by hand where ``by_hand``, else compiled. ``checked``:
        ``supports`` has read the values (the compiled form, which does not check them, may answer)."""
        form = kernel.one_pass
        try:
            with self._lock:
                try:
                    answer = form.bind(module, kwargs, self._function(form, module, by_hand))
                except ValuesNotCovered:
                    raise
                except DeclinedError:
                    if by_hand is None or not checked:
                        raise
                    # shapes or dtypes the hand-written kernel does not take (said before it launched):
                    # the compiled closed form's, and the hand-written kernel stays on for other calls
                    by_hand = None
                    answer = form.bind(module, kwargs, self._function(form, module, None))
                self.calls[kernel.name] += 1
                self.calls_by_hand[kernel.name] += by_hand is not None
            return answer
        except (DeclinedError, LossError):
            return None  # the caller's inputs, not the kernel: the family kernel answers (or refuses) this call
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a compiler's failure (no Triton, a backend error); covers checked the inputs
            if by_hand is not None:  # the compiled closed form may still build: it answers from the next try on
                self._off_by_hand.add(kernel.name)
                log.warning("the hand-written kernel of %s is off for this process (%r); its compiled closed form "
                            "answers", kernel.name, error)  # fmt: skip
                return None
            self._broken.add(kernel.name)
            log.warning("the compiled kernel of %s is off for this process (%r); its family kernel answers",
                        kernel.name, error)  # fmt: skip
            return None

    @property
    def off(self) -> frozenset[str]:
        """The losses whose hand-written kernel or compiled closed form failed, off for this process."""
        return frozenset(self._broken | self._off_by_hand)

    def _function(self, form: ClosedForm, module: nn.Module, by_hand: Callable | None) -> Callable:
        """What ``form.bind`` calls: the hand-written kernel with its hints, else the compiled closed form."""
        if by_hand is not None:
            return functools.partial(by_hand, **form.handwritten.hints(module))
        return self._compiled_form(form.function)

    def _compiled_form(self, function: Callable) -> Callable:
        if not self.compile:
            return function
        if function not in self._compiled:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            self._compiled[function] = _rows_dynamic(torch.compile(function, fullgraph=True))
        return self._compiled[function]


def _on_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop (the server's, answering a quick call)."""
    return asyncio._get_running_loop() is not None


def _rows_dynamic(compiled: Callable) -> Callable:
    """``compiled``, told before each call that dim 0 of its tensors (the rows) varies: compiled once for
    any number of rows, with the other dimensions fixed, which lets a row's reduction stay in registers."""

    def call(*args: Any) -> Any:
        for arg in args:
            if isinstance(arg, Tensor) and arg.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return compiled(*args)

    return call
