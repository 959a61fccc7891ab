"""The one place where errors become gRPC status codes.

Each status carries a human message naming the field, plus a ``google.rpc.BadRequest`` detail
with the field path, so callers in any language can point at the offending field.
"""

from __future__ import annotations

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from losswire.wire.codec import CodecError, CodecLimitError

from .losses import LossConfigError, LossError, UnknownLossError
from .sessions import ReplayUnavailableError, SessionConflictError, SessionError, SessionLimitError, UnknownSessionError


class RequestError(ValueError):
    """A request that is malformed as a whole (no terms, duplicate names...)."""

    def __init__(
        self,
        message: str,
        field: str | None = None,
        code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
        retryable: bool = False,
    ):
        super().__init__(message)
        self.field = field
        self.code = code
        self.retryable = retryable  # a RESOURCE_EXHAUSTED that passes (the server is busy), not a size limit


def code_for(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, RequestError):
        return error.code
    if isinstance(error, (UnknownLossError, UnknownSessionError)):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, (CodecLimitError, SessionLimitError, torch.cuda.OutOfMemoryError, MemoryError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, (SessionConflictError, ReplayUnavailableError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, (LossError, CodecError, SessionError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


# gRPC's retry design (A6): a server pushback that is negative tells a retrying client not to retry
NO_RETRY = ("grpc-retry-pushback-ms", "-1")


def is_permanent(error: BaseException) -> bool:
    """A RESOURCE_EXHAUSTED that a retry cannot cure: a request over a size limit, the session limit.

    Named one by one: running out of device memory may pass once other calls finish, and an
    overloaded server (``--max-concurrent-rpcs``) answers RESOURCE_EXHAUSTED that a retry should cure.
    """
    if isinstance(error, RequestError):  # the request-size limits (server/limits.py)
        return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not error.retryable
    return isinstance(error, (CodecLimitError, SessionLimitError))


def to_status(error: BaseException, where: str = "", term_path: str = "") -> grpc.Status:
    """An exception -> a rich gRPC status (code, message, BadRequest field violation).

    ``where`` prefixes the message (``"terms[1] (loss_bbox)"``); ``term_path`` prefixes an engine
    error's field (``"terms[1]."`` + ``"target"``, or + ``"config.gamma"`` for a config error).
    Codec and request errors carry full paths already.
    """
    code = code_for(error)
    message = str(error) or type(error).__name__
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        message = f"out of memory on the server while evaluating: {message.splitlines()[0]}"
    elif code == grpc.StatusCode.INTERNAL:
        message = f"internal error ({type(error).__name__}); the server log has the details"
    if where:
        message = f"{where}: {message}"
    details = []
    field = getattr(error, "field", None)
    if field is not None:  # "" too: a config key or an input named "" is still a field to point at
        if isinstance(error, (LossConfigError, UnknownLossError)):
            field = f"{term_path}config.{field}" if field else f'{term_path}config[""]'
        elif isinstance(error, (LossError, SessionError)):
            field = term_path + field if field else f'{term_path}inputs[""]'
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(packed)
    rich = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    status = rpc_status.to_status(rich)
    if is_permanent(error):  # clients whose retry policy covers RESOURCE_EXHAUSTED send it once
        status = status._replace(trailing_metadata=(*status.trailing_metadata, NO_RETRY))
    return status
