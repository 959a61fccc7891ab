"""What can go wrong while a term is evaluated, besides the engine's own ``LossError``s: the loss failing
on its inputs in a way it did not foresee, the caller going away, the host running out of memory."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..losses import LossInputError


class LossFailedError(LossInputError):
    """A loss raised something other than a LossError on these inputs (e.g. a plugin's torch error)."""


class CallCancelledError(Exception):
    """The caller is gone (it cancelled, or its deadline passed), so the rest of the work is skipped.

    Raised between stages, never inside a kernel: a forward that has begun runs to its end. A session
    term rolls its state back, as after any failed forward, so a forward whose answer nobody receives
    is not applied.
    """


class HostOutOfMemoryError(MemoryError):
    """The host allocator refused memory.

    On the CPU torch raises a bare ``RuntimeError`` for that (CUDA has ``torch.OutOfMemoryError``);
    as a ``MemoryError`` it is answered RESOURCE_EXHAUSTED, like a device out-of-memory, instead of
    passing for a loss that failed on its inputs.
    """


CPU_ALLOCATOR_REFUSED = "can't allocate memory"  # DefaultCPUAllocator's message; no exception class of its own


def as_memory_error(error: BaseException) -> BaseException:
    """``error`` itself, or a HostOutOfMemoryError when it is the CPU allocator's out-of-memory error."""
    text = str(error)
    if type(error) is RuntimeError and CPU_ALLOCATOR_REFUSED in text:
        detail = text[text.index(CPU_ALLOCATOR_REFUSED) :].splitlines()[0]
        return HostOutOfMemoryError(f"host memory: {detail}")
    return error


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError))


def check_cancelled(cancelled: Callable[[], bool] | None, stage: str) -> None:
    """Raise CallCancelledError when the caller is gone; ``stage`` names the work that is skipped."""
    if cancelled is not None and cancelled():
        raise CallCancelledError(f"the caller is gone; skipped {stage}")
