"""Out of memory during a call: the call's memory released, the server left able to serve the next one."""

from __future__ import annotations

import logging

import torch

from ..evaluation import as_memory_error, is_out_of_memory

log = logging.getLogger("losswire.server")


def released_if_out_of_memory(error: BaseException, where: str) -> BaseException:
    """``error`` as a memory error when it is one (the CPU allocator's RuntimeError included); after an
    out-of-memory, free the failed call's intermediates (the traceback's frames hold the autograd graph)
    and, on CUDA, hand the allocator's cached blocks back to the driver, so the next call, or another
    process on the GPU, starts from the memory really in use."""
    error = as_memory_error(error)
    if not is_out_of_memory(error):
        return error
    error.__traceback__ = None
    error.__context__ = error.__cause__ = None
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    log.warning("%s: out of memory, answered RESOURCE_EXHAUSTED: %s", where or "call", str(error).splitlines()[0])
    return error
