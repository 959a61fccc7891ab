"""The one place where errors become gRPC status codes.

Every error the server raises on purpose is typed by its meaning (``server/errors.py``, the engine's
``LossError``s, the sessions' and the codec's); this module alone maps each type to a code. Each
status carries a message naming the field, plus a ``google.rpc.BadRequest`` detail with the field
path, so callers in any language can point at the offending field. A refusal no retry can cure (a
request over a size limit) carries the no-retry pushback. Caller-supplied strings are quoted at most
``MAX_QUOTED`` characters, so a megabyte of loss name never comes back in a status message.
"""

from __future__ import annotations

import logging
import traceback

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from losswire.wire.codec import CodecError, CodecLimitError
from losswire.wire.protocol import NO_RETRY

from ..errors import (
    AccessDeniedError,
    LimitExceededError,
    NotAvailableError,
    NotFoundError,
    RequestError,
    ServerBusyError,
    StreamIdleError,
    TermError,
)
from ..evaluation import CallCancelledError
from ..evaluation.sessions import (
    ReplayUnavailableError,
    SessionConflictError,
    SessionError,
    SessionLimitError,
    UnknownSessionError,
)
from ..losses import LossConfigError, LossError, UnknownLossError

log = logging.getLogger("losswire.server")

# A caller whose deadline passes cancels the call itself (RST_STREAM), a little before the server's own
# copy of the deadline (it started counting when the request arrived): a call that ends this close to
# its deadline is counted DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_SECONDS = 0.25
MAX_QUOTED = 300  # characters of a message kept; the rest is cut with a note
MAX_FIELD = 200  # characters of a field path kept

# most specific first: the first class an error is an instance of decides its code
CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode], ...] = (
    ((LimitExceededError, ServerBusyError, CodecLimitError, SessionLimitError), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((torch.OutOfMemoryError, MemoryError), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((NotFoundError, UnknownLossError, UnknownSessionError), grpc.StatusCode.NOT_FOUND),
    (AccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (StreamIdleError, grpc.StatusCode.DEADLINE_EXCEEDED),
    ((NotAvailableError, SessionConflictError, ReplayUnavailableError), grpc.StatusCode.FAILED_PRECONDITION),
    ((RequestError, LossError, CodecError, SessionError), grpc.StatusCode.INVALID_ARGUMENT),
)


def code_for(error: BaseException) -> grpc.StatusCode:
    for types, code in CODES:
        if isinstance(error, types):
            return code
    return grpc.StatusCode.INTERNAL


def is_permanent(error: BaseException) -> bool:
    """A RESOURCE_EXHAUSTED that a retry cannot cure: a request over a size limit, the session limit.

    Named one by one: running out of device memory may pass once other calls finish, and an
    overloaded or busy server answers RESOURCE_EXHAUSTED that a retry should cure.
    """
    return isinstance(error, (LimitExceededError, CodecLimitError, SessionLimitError))


def shortened(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters (a caller may send megabytes of name)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class Where:
    """How a front door names the place of an error. LossService: ``terms[1] (loss_bbox): ...`` and an
    engine error's field under the term's path (``terms[1].config.gamma``). The Open Inference Protocol
    has one term and its own field names: it overrides ``term`` and ``rename``."""

    prefix = ""  # prepended to the message of an error outside any term

    def term(self, index: int, name: str) -> tuple[str, str]:
        """(message prefix, field prefix) of an error raised by term ``index``."""
        label = f"terms[{index}]" + (f" ({shortened(name, 100)})" if name else "")
        return label, f"terms[{index}]."

    def rename(self, text: str) -> str:
        """``text`` (a message or a field path) with the dataplane's field paths in the door's words."""
        return text


def to_status(error: BaseException, where: Where | None = None) -> grpc.Status:
    """An exception -> a rich gRPC status (code, message, BadRequest field violation).

    An ``TermError`` names its term in the message and prefixes an engine error's field with the term's
    path (``terms[1].`` + ``config.gamma``); codec and request errors carry full paths already.
    """
    where = where or Where()
    prefix, term_path = where.prefix, ""
    if isinstance(error, TermError):
        (prefix, term_path), error = where.term(error.index, error.name), error.error
    code = code_for(error)
    message = str(error) or type(error).__name__
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        message = f"out of memory on the server while evaluating: {message.splitlines()[0]}"
    elif code == grpc.StatusCode.INTERNAL:
        message = f"internal error ({type(error).__name__}); the server log has the details"
    message = shortened(where.rename(message))
    if prefix:
        message = f"{prefix}: {message}"
    details = []
    field = getattr(error, "field", None)
    if field is not None:  # "" too: a config key or an input named "" is still a field to point at
        if isinstance(error, (LossConfigError, UnknownLossError)):
            field = f"{term_path}config.{field}" if field else f'{term_path}config[""]'
        elif isinstance(error, (LossError, SessionError)):
            field = term_path + field if field else f'{term_path}inputs[""]'
        field = shortened(where.rename(field), MAX_FIELD)
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(packed)
    rich = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    status = rpc_status.to_status(rich)
    if is_permanent(error):  # clients whose retry policy covers RESOURCE_EXHAUSTED send it once
        status = status._replace(trailing_metadata=(*status.trailing_metadata, NO_RETRY))
    return status


def gone_code(time_remaining: float | None) -> grpc.StatusCode:
    """How a call whose caller went away counts: DEADLINE_EXCEEDED near its deadline, else CANCELLED
    (``time_remaining`` None: the call had no deadline)."""
    expired = time_remaining is not None and time_remaining <= DEADLINE_SLACK_SECONDS
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def refusal(error: BaseException, where: Where | None, time_remaining: float | None, method: str) -> grpc.Status:
    """The status a failed call answers with, logged: a caller that went away gets CANCELLED or, near its
    deadline, DEADLINE_EXCEEDED (nobody reads it; the status is for metrics and logs)."""
    cause = error.error if isinstance(error, TermError) else error
    if isinstance(cause, CallCancelledError):
        code = gone_code(time_remaining)
        label = (where or Where()).term(error.index, error.name)[0] if isinstance(error, TermError) else ""
        message = f"{label}: {cause}" if label else str(cause)
        log.debug("%s stopped (%s): %s", method, code.name, message)
        let_go(error)
        return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message))
    status = to_status(error, where)
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("internal error in %s", method, exc_info=cause)
    else:
        log.debug("%s refused: %s", method, status.details)
    let_go(error)
    return status


def let_go(error: BaseException) -> None:
    """Drop what ``error`` holds through its tracebacks (and those of its causes): the locals of every
    frame it passed, a failed call's tensors among them, views of a caller's shared memory too.

    An exception's traceback and the frames it names often form a reference cycle, which only Python's
    cycle collector frees, whenever it next runs: until then a refused call kept its tensors, and a
    shared-memory segment stayed mapped after its caller had unregistered it (several at once, each up
    to a caller's whole share). Once the error is a status nothing needs them; the frames still running
    (the handler's own) are left as they are."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__, getattr(current, "error", None)]
