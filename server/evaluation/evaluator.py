"""Where the loss runs and the gradient is made: bind a term's inputs, sample, forward, backward.

Plain torch, no gRPC and no protobuf: the dataplane decodes a request into ``TermRequest`` objects,
hands them here and encodes the ``TermOutcome`` objects it gets back. Engine errors (``LossError``),
session errors and sampler errors pass through untouched; the front doors map them to status codes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..caches import BoundedCache, held_bytes
from ..losses import (
    LOSSES,
    LossConfigError,
    LossDescription,
    LossInputError,
    OutputKind,
    Registry,
    output_kind_of,
    shareable,
)
from ..losses import fused as fused_kernels
from ..losses.fused.compiled import OnePass
from .binding import WEIGHT_INPUTS, bind_inputs, gradient_leaves
from .errors import LossFailedError, as_memory_error, check_cancelled
from .sampling import Sample, apply_sample, build_sampler, default_labels
from .sessions import SessionStore, Transaction
from .terms import PRED, PartOutcome, TermOutcome, TermRequest, split_sampler

log = logging.getLogger(__name__)


# Terms whose pred has fewer elements run on one intra-op thread: torch's element-wise kernels stay
# serial below this size anyway (its grain size, 32768), but a few split any size across every thread
# (log_sigmoid, FocalLoss's heaviest op, uses a grain of 1). Waking the other threads for 20k elements
# costs more than they save, and when another process keeps a core busy (the trainer beside a CPU
# server) each such op waits for a descheduled thread: FocalLoss [256, 80] measured 0.18 ms on one
# thread and ~8 ms on two on a 2-core machine with one core taken.
SERIAL_MAX_ELEMENTS = 32768

MODULE_CACHE_SIZE = 256
# of what the cached modules hold: a GHMC of bins=7e6 holds 28 MB, so 256 distinct ones held 7 GB
MODULE_CACHE_BYTES = 64 << 20

# What a loss's own code raises on inputs it did not foresee (a torch op refusing a value, an int too
# big for int64...): the inputs' fault, answered as a LossFailedError (``_answered_as_input_errors``)
# whether autograd's path or a fused kernel met it
FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError, OverflowError)


def module_bytes(module: nn.Module, config_bytes: int) -> int:
    """About what a built module holds: its tensors, and its config's values again as Python objects (a
    class_weight's list: 32 bytes a number where the config's key, ``config_bytes``, holds 8)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) + 4 * config_bytes


def _inputs_fault(error: Exception) -> bool:
    """Whether ``error`` (one of ``FORWARD_ERRORS``) is the inputs' fault, not the engine's own error
    (which passes as it is) nor out of memory (the server's condition)."""
    if isinstance(error, (LossInputError, LossConfigError, torch.OutOfMemoryError)):
        return False
    return as_memory_error(error) is error


class _answered_as_input_errors:  # noqa: N801 (used as a context manager, like a function)
    """Around a loss's own code, autograd's forward or a fused kernel alike: an error that is the inputs'
    fault (``_inputs_fault``) becomes a LossFailedError naming the loss, with the error's first line;
    the others pass as they are. A small class, not a generator context manager: it is on every call's
    path."""

    __slots__ = ("description",)

    def __init__(self, description: LossDescription) -> None:
        self.description = description

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _traceback: Any) -> bool:
        if error is None or not isinstance(error, FORWARD_ERRORS) or not _inputs_fault(error):
            return False
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LossFailedError(f"{self.description.name} failed on these inputs: {message}") from error


def _parts(output: Any, loss_name: str) -> tuple[str, list[tuple[str, Tensor]]]:
    if isinstance(output, Tensor):
        return "tensor", [("", output)]
    if isinstance(output, tuple) and output and all(isinstance(t, Tensor) for t in output):
        return "tuple", [(str(i), t) for i, t in enumerate(output)]
    if isinstance(output, Mapping) and output and all(isinstance(t, Tensor) for t in output.values()):
        return "dict", [(str(k), t) for k, t in output.items()]
    raise LossFailedError(f"{loss_name} returned a {type(output).__name__}, not a tensor, tuple or dict of tensors")


class Evaluator:
    """Evaluates decoded loss terms on one device with the losses of one registry.

    ``sessions`` holds the state of stateful losses across calls (terms naming a session);
    without a session every term gets a freshly built module.

    ``fused``: answer the terms a fused kernel supports (``losses.fused``) without autograd
    (``losswire serve --fused-kernels off`` turns it off: every term then runs under autograd).
    ``gpu_kernels``: on a GPU, answer them with their closed forms, compiled or written by hand
    (``losses.fused.compiled``; ``--gpu-kernels off``: the family kernels' torch ops).
    """

    def __init__(
        self,
        registry: Registry = LOSSES,
        sessions: SessionStore | None = None,
        fused: bool = True,
        gpu_kernels: bool = True,
    ) -> None:
        self.registry = registry
        self.sessions = sessions if sessions is not None else SessionStore(registry)
        self.fused = fused
        self.one_pass = OnePass() if gpu_kernels else None
        # terms each fused kernel's own torch ops answered (a closed form counts its own: OnePass.calls)
        self.family_calls: Counter[str] = Counter()
        self._family_lock = threading.Lock()
        # built modules of configs seen before, for the loss classes that keep nothing between calls
        # (building one costs ~30-50 us per call, a tenth of a small call's compute); see _module
        self._modules: BoundedCache[nn.Module] = BoundedCache(MODULE_CACHE_SIZE, MODULE_CACHE_BYTES)
        # the intra-op threads of big terms: torch's count when the evaluator is made (the server sets
        # --torch-threads first); small terms run on one, see SERIAL_MAX_ELEMENTS
        self.threads = torch.get_num_threads()

    def evaluate(
        self, term: TermRequest, cancelled: Callable[[], bool] | None = None, sessions: Transaction | None = None
    ) -> TermOutcome:
        """One term's loss and gradients. ``cancelled`` says whether the caller is gone: it is asked
        before the forward (after waiting for the session, if any) and before the backward."""
        return self.threaded(term, lambda: self._evaluate(term, cancelled, sessions))

    def threaded(self, term: TermRequest, work: Callable[[], Any]) -> Any:
        """``work()`` on the intra-op threads ``term`` gets (see SERIAL_MAX_ELEMENTS); out of memory
        as the server's condition (``as_memory_error``)."""
        wanted = self.threads
        if term.pred.device.type == "cpu" and term.pred.numel() < SERIAL_MAX_ELEMENTS:
            wanted = 1
        # per calling thread (OpenMP's thread count is per thread) and put back afterwards, so the
        # caller's own torch work, and the next term in this thread, keep their setting
        previous = torch.get_num_threads()
        if previous != wanted:
            torch.set_num_threads(wanted)
        try:
            return work()
        except RuntimeError as error:
            memory_error = as_memory_error(error)
            if memory_error is error:
                raise
            raise memory_error from None
        finally:
            if previous != wanted:
                torch.set_num_threads(previous)

    def _evaluate(
        self, term: TermRequest, cancelled: Callable[[], bool] | None, sessions: Transaction | None
    ) -> TermOutcome:
        config, sampler_config = split_sampler(term.config)
        description = self.registry.describe(self.registry.loss_type(config, term.config_key))
        kwargs = bind_inputs(description, term)
        with self._module(term, config, sessions) as (module, step):
            check_cancelled(cancelled, "the forward")
            kernel, answer = self._fused_kernel(term, sampler_config, module, description, kwargs)
            if kernel is not None:
                return self._evaluate_fused(kernel, term, module, description, kwargs, cancelled, answer)
            if description.stochastic and term.seed is not None:
                module.rng = np.random.RandomState(term.seed % 2**32)  # numpy seeds are 32-bit
            sampled = None
            if sampler_config is not None:
                sampled = self._sample(sampler_config, module, description, kwargs, term, cancelled)
            leaves = gradient_leaves(description, kwargs, term.gradients)
            output = self._forward(module, description, kwargs)
            structure, parts = _parts(output, description.name)
            check_cancelled(cancelled, "the backward")
            recompute = _recompute(term)
            if recompute:
                gradients, constant = self._backward(parts, leaves, self._upstream(structure, parts, term))
                per_part: list[tuple[dict[str, Tensor], frozenset[str]]] = [({}, frozenset()) for _ in parts]
            else:
                gradients, constant = {}, frozenset()
                per_part = [self._backward([part], leaves, None, keep_graph=len(parts) > 1) for part in parts]
        kind = output_kind_of(module, description)
        return TermOutcome(
            name=term.name,
            structure=structure,
            parts=[
                PartOutcome(key, tensor.detach(), grads, OutputKind.SCALAR if tensor.dim() == 0 else kind, unused)
                for (key, tensor), (grads, unused) in zip(parts, per_part, strict=True)
            ],
            gradients=gradients,
            constant=constant,
            separable=description.separable,
            sample_axis=description.sample_axis,
            session_step=step,
            sampled=sampled,
        )

    def _fused_kernel(
        self,
        term: TermRequest,
        sampler_config: Any,
        module: nn.Module,
        description: LossDescription,
        kwargs: dict[str, Any],
    ) -> tuple[fused_kernels.FusedKernel | None, fused_kernels.Fused | None]:
        """The fused kernel for this term, or None where autograd's path must run: a session or a
        sampler, gradients other than pred's alone, or inputs/config the kernel does not cover. With it,
        its answer where a GPU kernel that checks the values as it runs gave one before ``supports``
        would read them (``OnePass.answer_unchecked``), else None."""
        if not self._may_fuse(term, sampler_config):
            return None, None
        kernel = fused_kernels.FUSED_KERNELS.get(type(module))
        if kernel is not None and self.one_pass is not None and not _recompute(term):
            with _answered_as_input_errors(description):
                answer = self.one_pass.answer_unchecked(kernel, module, kwargs, term.pred)
            if answer is not None:
                return kernel, answer
        try:
            return fused_kernels.select(module, kwargs), None
        except FORWARD_ERRORS as error:
            if not _inputs_fault(error):
                raise
            # ``supports`` is a conservative predicate: inputs it cannot judge are autograd's to answer
            log.debug("term %r: fused kernel selection failed (%r); autograd's path answers", term.name, error)
            return None, None

    def _may_fuse(self, term: TermRequest, sampler_config: Any) -> bool:
        """Fused kernels are on and the term is theirs: no session, no sampler, pred's gradient alone."""
        return self.fused and not term.session and sampler_config is None and list(term.gradients) == [PRED]

    def _evaluate_fused(
        self,
        kernel: fused_kernels.FusedKernel,
        term: TermRequest,
        module: nn.Module,
        description: LossDescription,
        kwargs: dict[str, Any],
        cancelled: Callable[[], bool] | None,
        result: fused_kernels.Fused | None = None,
    ) -> TermOutcome:
        """The autograd path's TermOutcome, from a kernel that gives loss and gradient in one pass
        (``result``: its answer, where it answered already).

        With an upstream gradient (a recompute) the gradient is ``upstream * local derivative``,
        exact for the element-wise ('none') and scalar outputs these losses have."""
        recompute = _recompute(term)
        out = _gradient_out(term) if kernel.writes_into else None
        # errors of the kernel's own code are answered as autograd's path answers the module's (_forward)
        with _answered_as_input_errors(description):
            if result is None and self.one_pass is not None and not recompute:  # a GPU's closed form, if any
                result = self.one_pass.answer(kernel, module, kwargs, term.pred)
            if result is None:  # the family kernel's torch ops
                with self._family_lock:
                    self.family_calls[kernel.name] += 1
                if kernel.rows is not None and not recompute:  # block by block, in one pass
                    rows = kernel.rows(module, kwargs, out, True, term.scratch)
                    rows.advance(term.pred.shape[0])
                    result = rows.finish()
                else:
                    result = kernel.run(module, kwargs)
        fused_kernels.count_call(kernel.name)
        log.debug("term %r: %s answered by its fused kernel", term.name, kernel.name)
        check_cancelled(cancelled, "the backward")
        with _answered_as_input_errors(description):  # the gradient's closed form runs here
            return self.fused_outcome(kernel.name, term, module, description, result, out)

    def fused_answers(self) -> dict[tuple[str, str], int]:
        """Terms answered by each fused kernel (every kernel, 0 included), by loss and way: ``family`` (its
        torch ops), ``compiled`` (its closed form, compiled) or ``by hand`` (its hand-written GPU kernel)."""
        one_pass = self.one_pass
        answers = {}
        for name in sorted(k.name for k in fused_kernels.FUSED_KERNELS.values()):
            by_hand = one_pass.calls_by_hand[name] if one_pass else 0
            answers[name, "family"] = self.family_calls[name]
            answers[name, "compiled"] = (one_pass.calls[name] if one_pass else 0) - by_hand
            answers[name, "by hand"] = by_hand
        return answers

    def gpu_kernels_off(self) -> frozenset[str]:
        """The losses whose GPU kernel failed and is off for this process (the family kernel answers)."""
        return self.one_pass.off if self.one_pass else frozenset()

    def fused_outcome(
        self,
        name: str,
        term: TermRequest,
        module: nn.Module,
        description: LossDescription,
        result: fused_kernels.Fused,
        out: Tensor | None,
    ) -> TermOutcome:
        parts = [("", result.loss)]
        if term.grad_output is not None or term.grad_outputs:
            (upstream,) = self._upstream("tensor", parts, term)
            gradients, per_part = {PRED: result.gradient(upstream, out)}, {}
        else:
            gradients, per_part = {}, {PRED: result.gradient(None, out)}
        loss = result.loss
        kind = OutputKind.SCALAR if loss.dim() == 0 else output_kind_of(module, description)
        return TermOutcome(
            name=term.name,
            structure="tensor",
            parts=[PartOutcome("", loss, per_part, kind)],
            gradients=gradients,
            separable=description.separable,
            sample_axis=description.sample_axis,
            fused=name,
        )

    # -- row by row, as the inputs arrive ----------------------------------------------------------------

    def start_rows(self, term: TermRequest) -> TermRows | None:
        """A term that can be computed block by block while its inputs' rows are still arriving, started
        on its (whole-sized, partly filled) tensors; None where it cannot: no fused kernel working row by
        row covers its loss, config, shapes and dtypes, or it has a session, a sampler, an upstream
        gradient or gradients other than pred's alone. Reads no value of the inputs."""
        config, sampler_config = split_sampler(term.config)
        if not self._may_fuse(term, sampler_config) or term.replay_step is not None:
            return None
        if term.grad_output is not None or term.grad_outputs:  # a recompute: its upstream is not ones
            return None
        description = self.registry.describe(self.registry.loss_type(config, term.config_key))
        kwargs = bind_inputs(description, term)
        module = self._stateless_module(config, term.config_key, term.pred.device)
        kernel = fused_kernels.FUSED_KERNELS.get(type(module))
        if kernel is None or kernel.rows is None or kernel.covers is None or not kernel.covers(module, kwargs):
            return None
        out = _gradient_out(term)
        return TermRows(self, term, module, description, kernel, kwargs, out)

    @contextlib.contextmanager
    def _module(
        self, term: TermRequest, config: dict[str, Any], sessions: Transaction | None
    ) -> Iterator[tuple[nn.Module, int]]:
        """The module that evaluates this term, and its session step (0 without a session)."""
        device = term.pred.device
        if not term.session:
            if term.replay_step is not None:
                raise LossInputError("replay_step needs a session", field="replay_step")
            yield self._stateless_module(config, term.config_key, device), 0
            return
        opened = (
            sessions.open(term.session, config, term.replay_step, term.forward_id)
            if sessions is not None
            else self.sessions.open(term.session, config, term.replay_step, term.forward_id)
        )
        with opened as (module, step):
            yield module.to(device), step

    def _stateless_module(self, config: dict[str, Any], config_key: Any, device: torch.device) -> nn.Module:
        """A module for ``config`` outside any session: built afresh, except where the loss declares the
        module ``shareable`` (stateless and not stochastic: it holds only its config), then shared by
        every call, and thread, with an equal config.

        The cache is keyed by the config as sent and holds at most ``MODULE_CACHE_SIZE`` modules and
        ``MODULE_CACHE_BYTES`` of them (``module_bytes``), the oldest out first: clients choose the configs."""
        key = None if config_key is None else (config_key, str(device))
        module = None if key is None else self._modules.get(key)
        if module is not None:
            return module
        module = self.registry.build(config).to(device)
        if key is not None and shareable(module):
            config_bytes = held_bytes(config_key)
            self._modules.put(key, module, config_bytes + module_bytes(module, config_bytes))
        return module

    def _sample(
        self,
        sampler_config: Any,
        module: nn.Module,
        description: LossDescription,
        kwargs: dict[str, Any],
        term: TermRequest,
        cancelled: Callable[[], bool] | None = None,
    ) -> Sample:
        """Zero the weight of every sample the sampler does not keep (in ``kwargs``); a per-image loop
        stops between images once ``cancelled()`` says the caller is gone."""
        sampler = build_sampler(sampler_config)
        names = [i.name for i in description.inputs]
        slot = next((n for n in WEIGHT_INPUTS if n in names), None)
        if slot is None:
            raise LossConfigError(
                f"{description.name} takes no per-sample weight ({', '.join(WEIGHT_INPUTS)}), so it cannot be sampled",
                field="sampler",
            )
        pred = kwargs[names[0]]
        labels = term.sample_labels if term.sample_labels is not None else default_labels(kwargs.get(names[1]))
        background = sampler.background_label
        if background is None and pred.dim() < 2:
            raise LossConfigError(
                f"sampler.background_label is needed: pred {list(pred.shape)} has no class axis to infer it from",
                field="sampler.background_label",
            )
        if background is None:  # the loss knows its layout (softmax CE: C + 1 columns); else C columns
            background = int(getattr(module, "background_label", lambda p: p.shape[1])(pred))
        elementwise = output_kind_of(module, description) is OutputKind.ELEMENT and pred.dim() > 1
        kwargs[slot], sample = apply_sample(
            sampler,
            labels,
            pred,
            kwargs.get(slot),
            term.seed,
            background,
            term.sample_groups,
            elementwise,
            cancelled,
        )
        return sample

    @staticmethod
    def _forward(module: nn.Module, description: LossDescription, kwargs: dict[str, Any]) -> Any:
        with _answered_as_input_errors(description), torch.enable_grad():
            return module(**kwargs)

    @staticmethod
    def _upstream(structure: str, parts: list[tuple[str, Tensor]], term: TermRequest) -> list[Tensor]:
        """The sent upstream gradient of each part (zeros for parts not named)."""
        if structure == "tensor":
            if term.grad_outputs:
                raise LossInputError(
                    "send grad_output, not grad_outputs, for a single-tensor loss", field="grad_outputs"
                )
            sent = {"": term.grad_output}
        else:
            if term.grad_output is not None:
                raise LossInputError(
                    f"this loss returns a {structure} of {[k for k, _ in parts]}: send grad_outputs by part key",
                    field="grad_output",
                )
            unknown = sorted(set(term.grad_outputs) - {k for k, _ in parts})
            if unknown:
                raise LossInputError(
                    f"grad_outputs names parts {unknown}; this loss's parts are {[k for k, _ in parts]}",
                    field="grad_outputs",
                )
            sent = dict(term.grad_outputs)
        upstream = []
        for key, tensor in parts:
            grad = sent.get(key)
            if grad is None:
                upstream.append(torch.zeros_like(tensor))
                continue
            if grad.shape != tensor.shape:
                field = "grad_output" if structure == "tensor" else f"grad_outputs[{key}]"
                raise LossInputError(
                    f"{field} must have the loss's shape {list(tensor.shape)}, got {list(grad.shape)}", field=field
                )
            upstream.append(grad.to(tensor.dtype))
        return upstream

    @staticmethod
    def _backward(
        parts: list[tuple[str, Tensor]],
        leaves: dict[str, Tensor],
        upstream: list[Tensor] | None,
        keep_graph: bool = False,
    ) -> tuple[dict[str, Tensor], frozenset[str]]:
        """The gradients of ``leaves``, and the keys of those the parts do not depend on (autograd finds no
        path: an input the loss detaches), whose gradients are zeros: the client gives those inputs no
        gradient, as a local module does."""
        if not leaves:
            return {}, frozenset()
        if upstream is None:
            upstream = [torch.ones_like(t) for _, t in parts]
        live = [(t, g) for (_, t), g in zip(parts, upstream, strict=True) if t.requires_grad]
        if not live:
            return {key: torch.zeros_like(t) for key, t in leaves.items()}, frozenset()
        tensors = list(leaves.values())
        grads = torch.autograd.grad(
            [t for t, _ in live], tensors, [g for _, g in live], allow_unused=True, retain_graph=keep_graph
        )
        pairs = list(zip(leaves.items(), grads, strict=True))
        gradients = {key: torch.zeros_like(t) if g is None else g for (key, t), g in pairs}
        return gradients, frozenset(key for (key, _), g in pairs if g is None)


def _recompute(term: TermRequest) -> bool:
    """The term carries an upstream gradient: a recompute (the family kernels' and autograd's to answer)."""
    return term.grad_output is not None or bool(term.grad_outputs)


def _gradient_out(term: TermRequest) -> Tensor | None:
    """Where the term's caller wants a fused kernel to write pred's gradient (see ``TermRequest``)."""
    if term.gradient_out is None:
        return None
    out = term.gradient_out(term.pred.shape, term.pred.dtype)
    if out is not None and (out.shape != term.pred.shape or out.device != term.pred.device):
        return None
    return out


class TermRows:
    """A term computed block by block as its inputs' rows arrive (``Evaluator.start_rows``): the fused
    kernel's blocks and arithmetic are those of the whole-term path, so the answer is the same bit for
    bit, only earlier. Should a block's values need autograd's path (``NotFusable``), the rest waits
    for every row and ``finish`` evaluates the term as a whole; ``fell_back`` says so."""

    def __init__(
        self,
        evaluator: Evaluator,
        term: TermRequest,
        module: nn.Module,
        description: LossDescription,
        kernel: fused_kernels.FusedKernel,
        kwargs: dict[str, Any],
        out: Tensor | None,
    ) -> None:
        self.evaluator, self.term, self.module, self.description = evaluator, term, module, description
        self.kernel, self.out = kernel, out
        self.gradient = out if out is not None else torch.empty_like(term.pred)
        self.rows: fused_kernels.RowKernel | None = kernel.rows(module, kwargs, self.gradient, False, term.scratch)
        self.done = 0  # leading rows of ``gradient`` that are final

    @property
    def fell_back(self) -> bool:
        return self.rows is None

    def advance(self, rows: int) -> int:
        """Compute the blocks the first ``rows`` rows allow (on the evaluator's intra-op threads); the
        leading rows of ``gradient`` that are final (no more once fallen back)."""
        if self.rows is None:
            return self.done
        try:
            with _answered_as_input_errors(self.description):
                self.done = self.evaluator.threaded(self.term, lambda: self.rows.advance(rows))
        except fused_kernels.NotFusable as reason:
            log.debug("term %r: %s; evaluated whole once every row is in", self.term.name, reason)
            self.rows = None
        return self.done

    def finish(self, cancelled: Callable[[], bool] | None = None) -> TermOutcome:
        """Every row has arrived: the term's outcome."""
        self.advance(self.term.pred.shape[0])
        if self.rows is None:  # fell back, now or before
            return self.evaluator.evaluate(self.term, cancelled)
        with _answered_as_input_errors(self.description):
            result = self.evaluator.threaded(self.term, self.rows.finish)
        fused_kernels.count_call(self.kernel.name)
        check_cancelled(cancelled, "the backward")
        with _answered_as_input_errors(self.description):
            return self.evaluator.fused_outcome(
                self.kernel.name, self.term, self.module, self.description, result, self.out
            )
