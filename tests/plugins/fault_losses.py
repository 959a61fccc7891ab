"""Test plugin for the load and fault tests (``--plugin fault_losses``, or loaded into a test registry).

* ``GatedL1Loss`` is ``L1Loss`` whose forward counts itself and then blocks until the test opens its
  gate (:func:`open_gate`). A test can hold any number of calls in flight, know that each reached the
  loss (:func:`wait_started`), and know that a term which never started never ran, without sleeping
  and without timing assumptions. Gates live in this process: an in-process server only.
  ``GatedValuesL1Loss`` is the same, declaring its target read only as values (``value_inputs``).
  ``GatedBuildL1Loss`` blocks in its construction instead (counted on the same gates), so that work that
  builds a module without evaluating it (``Describe``) can be held too.
* ``HungryL1Loss`` is ``L1Loss`` that first allocates ``allocate_bytes`` on pred's device: with more
  than the device has, the allocator really fails (CUDA: ``torch.OutOfMemoryError``; CPU: the host
  allocator's error), as a too-large batch would. ``raise_device_oom=True`` raises
  ``torch.OutOfMemoryError`` (CUDA's out-of-memory class) on any device, so the CUDA path is tested on
  a CPU-only machine.
"""

from __future__ import annotations

import collections
import threading

import torch
from torch import Tensor

from losswire.server.losses import LOSSES, WeightedLoss
from losswire.server.losses.pipeline import AvgFactor, Reduction, ReductionOverride

GATE_TIMEOUT = 60.0  # a forgotten gate opens by itself: a broken test never hangs the server for good

_changed = threading.Condition()
_open_gates: set[str] = set()
_started: collections.Counter[str] = collections.Counter()


def open_gate(name: str) -> None:
    """Let every call blocked on gate ``name`` (and every later one) run on."""
    with _changed:
        _open_gates.add(name)
        _changed.notify_all()


def started(name: str) -> int:
    """How many forwards of ``GatedL1Loss(gate=name)`` have begun."""
    with _changed:
        return _started[name]


def wait_started(name: str, count: int, timeout: float = GATE_TIMEOUT) -> None:
    """Block until ``count`` forwards on gate ``name`` have begun (AssertionError after ``timeout``)."""
    with _changed:
        if not _changed.wait_for(lambda: _started[name] >= count, timeout):
            raise AssertionError(f"only {_started[name]} of {count} calls reached gate {name!r} within {timeout} s")


def _wait_at(gate: str) -> None:
    """Count a call as having reached ``gate``, then wait for the gate to open."""
    with _changed:
        _started[gate] += 1
        _changed.notify_all()
        _changed.wait_for(lambda: gate in _open_gates, GATE_TIMEOUT)


def _l1(loss: WeightedLoss, pred: Tensor, target: Tensor, weight, avg_factor, reduction_override) -> Tensor:
    return loss.finish((pred - target).abs(), weight, loss.resolve_reduction(reduction_override), avg_factor)


@LOSSES.register_module()
class GatedL1Loss(WeightedLoss):
    """L1 loss ``|pred - target|`` whose forward waits for its gate to open (a test plugin).

    Args:
        gate: the name of the gate to wait on (tests open it with ``open_gate``).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")

    def __init__(self, gate: str = "default", reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.gate = gate

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        _wait_at(self.gate)
        return _l1(self, pred, target, weight, avg_factor, reduction_override)


@LOSSES.register_module()
class GatedValuesL1Loss(GatedL1Loss):
    """``GatedL1Loss`` whose target is declared read only as values: the server reads it in place in a
    caller's shared memory, as it reads pred (a test plugin).

    Args:
        gate: the name of the gate to wait on (tests open it with ``open_gate``).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    value_inputs = ("pred", "target")


@LOSSES.register_module()
class GatedBuildL1Loss(WeightedLoss):
    """L1 loss whose construction counts itself and then waits for its gate to open (a test plugin).

    Args:
        gate: the name of the gate to wait on (tests open it with ``open_gate``).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")

    def __init__(self, gate: str = "default", reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        _wait_at(gate)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        return _l1(self, pred, target, weight, avg_factor, reduction_override)


@LOSSES.register_module()
class HungryL1Loss(WeightedLoss):
    """L1 loss that first allocates ``allocate_bytes`` on pred's device (a test plugin).

    Args:
        allocate_bytes: bytes to allocate (and free) before computing; more than the device holds
            fails in the allocator, as a real out-of-memory does.
        raise_device_oom: raise ``torch.OutOfMemoryError`` (CUDA's class) instead of computing.
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    differentiable = ("pred", "target")

    def __init__(
        self,
        allocate_bytes: int = 0,
        raise_device_oom: bool = False,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.allocate_bytes = int(allocate_bytes)
        self.raise_device_oom = bool(raise_device_oom)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        if self.raise_device_oom:
            # the message CUDA's caching allocator gives, as the server would see it on a GPU
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB "
                "of which 1.50 GiB is free."
            )
        if self.allocate_bytes:
            scratch = torch.empty(self.allocate_bytes, dtype=torch.uint8, device=pred.device)
            del scratch
        return _l1(self, pred, target, weight, avg_factor, reduction_override)
