"""Evaluation: a decoded term's loss and gradients, in plain torch (no gRPC, no protobuf).

``Evaluator`` binds a term's inputs to its loss's forward (``binding``), keeps the state of stateful
losses across calls in named sessions (``sessions``), applies a config's sampler (``sampling``), and
runs the forward and the gradient, by a fused kernel where one applies; ``Evaluator.start_rows`` computes
a term block by block while its inputs' rows are still arriving (``TermRows``).
"""

from .errors import CallCancelledError, HostOutOfMemoryError, LossFailedError, as_memory_error, is_out_of_memory
from .evaluator import Evaluator, TermRows
from .sessions import OwnerLimits, Session, SessionStore
from .terms import PRED, TARGET, PartOutcome, TermOutcome, TermRequest, split_sampler

__all__ = [
    "PRED",
    "TARGET",
    "CallCancelledError",
    "Evaluator",
    "HostOutOfMemoryError",
    "LossFailedError",
    "OwnerLimits",
    "PartOutcome",
    "Session",
    "SessionStore",
    "TermOutcome",
    "TermRequest",
    "TermRows",
    "as_memory_error",
    "is_out_of_memory",
    "split_sampler",
]
