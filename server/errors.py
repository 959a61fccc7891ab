"""Typed refusals of the server's own making, transport-free.

Each class says what went wrong in the caller's terms; the gRPC front doors map it to a status code in
one place (``rpc/status.py``). ``field`` names the request field at fault (``terms[0].pred.shape``),
so a caller in any language can point at it without parsing the message.

The engine's errors (``losses.LossError``), the sessions' (``evaluation.sessions.SessionError``) and
the codec's (``wire.codec.CodecError``) are typed the same way and mapped in the same place.
"""

from __future__ import annotations


class RequestError(ValueError):
    """The request is malformed (no terms, a name repeated, a field of the wrong kind...)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LimitExceededError(RequestError):
    """The request is over one of this server's limits or budgets: fine for another server, too big
    for this one, and too big on every retry (a final refusal)."""


class ServerBusyError(RequestError):
    """The server cannot take this call now (its big-call slots are taken); the same call may pass later."""


class NotFoundError(RequestError):
    """The request names something this server does not have (a model, a region, a version)."""


class AccessDeniedError(RequestError):
    """The request names something that is not the caller's to use."""


class StreamIdleError(RequestError):
    """A caller kept a request stream open without sending anything for longer than the server allows."""


class NotAvailableError(RequestError):
    """The request needs a feature this server has turned off (shared memory)."""


class TermError(Exception):
    """``error`` arose while decoding or evaluating term ``index`` (named ``name``) of a request: the
    front door says where, in its own protocol's words."""

    def __init__(self, index: int, name: str, error: BaseException) -> None:
        super().__init__(str(error))
        self.index, self.name, self.error = index, name, error
