"""The client's exception: a failed call, with the server's status code, message and field."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from losswire.wire.protocol import NO_RETRY


class RemoteLossError(RuntimeError):
    """A losswire call failed. ``code`` is the gRPC status code, ``details`` the server's message,
    ``field`` the offending request field when the server named one (e.g. ``terms[0].target``)."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None, busy: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field
        # RESOURCE_EXHAUSTED that passes (the server is busy), not a limit: the server sent no
        # "do not retry" pushback (grpc-retry-pushback-ms: -1)
        self.busy = busy

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> RemoteLossError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        field = None
        try:
            status = rpc_status.from_call(error)
        except (ValueError, AttributeError):
            status = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                if bad_request.field_violations:
                    field = bad_request.field_violations[0].field
        if _over_message_limit(code, details) and "Received" in details:  # the server's limit, not this side's
            details += (
                "; the server takes at most that many bytes in one message (losswire serve "
                "--max-request-message-bytes, 64 MiB by default): bigger requests go by EvaluateStream (LossClient "
                "streams from stream_threshold, 8 MiB by default)"
            )
        return cls(code, details or "", field, is_busy(error))


def is_busy(error: grpc.RpcError) -> bool:
    """A RESOURCE_EXHAUSTED that passes (the server is busy): without the server's "do not retry"
    pushback (grpc-retry-pushback-ms: -1), which a size limit carries."""
    code = error.code() if hasattr(error, "code") else None
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    if _over_message_limit(code, error.details() if hasattr(error, "details") else ""):
        return False  # gRPC's own refusal of a message over a size limit carries no pushback: never passes
    trailers = dict(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else {}
    return trailers.get(NO_RETRY[0]) != NO_RETRY[1]


class ImplementationMismatchError(RemoteLossError):
    """A server computes a loss with another implementation than the one this module was pinned to
    (``RemoteLoss(cfg, expect='sha256:...')``): its numbers may differ, so none of them is used.

    ``loss`` is the loss's type, ``expected`` the pinned digest, ``found`` the server's (``""`` when
    the server named none), ``where`` the answer that carried it (``Describe``, ``Evaluate``)."""

    def __init__(self, loss: str, expected: str, found: str, target: str, where: str) -> None:
        digest = found or "no implementation digest"
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{loss}: the server at {target} answered {where} with implementation {digest}, but this RemoteLoss "
            f"expects {expected} (expect=); its numbers may differ from the pinned implementation's. Pin the "
            "new digest after checking it, or point target= at a server running the pinned one",
            "implementation",
        )
        self.loss, self.expected, self.found = loss, expected, found


def check_implementation(loss: str, expected: str | None, found: str, target: str, where: str) -> None:
    """Refuse an answer computed by another implementation than the ``expected`` digest (None: any)."""
    if expected is not None and found != expected:
        raise ImplementationMismatchError(loss, expected, found, target, where)


class ArgumentError(RemoteLossError, TypeError, ValueError):
    """A forward argument the loss does not accept, refused by the client before anything is sent.

    It is a RemoteLossError with the code the server would answer (INVALID_ARGUMENT, ``field`` the
    argument's name), and a TypeError / ValueError as a local module's refusal would be."""

    def __init__(self, loss: str, argument: str, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, f"{loss}: argument {argument!r} {message}", argument)
        self.loss, self.argument = loss, argument


def _over_message_limit(code: grpc.StatusCode, details: str | None) -> bool:
    """gRPC's refusal of a message bigger than a side's limit ("Received message larger than max (N vs. M)")."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in (details or "")
