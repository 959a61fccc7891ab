"""Bearer-token authentication: a gRPC server interceptor in front of every service but health.

With tokens configured (``server/auth.py``), every call must carry ``authorization: Bearer <token>``
with one of them; anything else is answered UNAUTHENTICATED before the request is parsed or reaches a
servicer. ``grpc.health.v1.Health`` stays open: probes carry no credentials and learn nothing but
SERVING / NOT_SERVING. No message or log line ever contains a token.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from ..auth import TokenSet, bearer_token
from ..dataplane import Caller

log = logging.getLogger("losswire.server")

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})  # reachable without a token: probes have none


def token_digest(context: grpc.aio.ServicerContext) -> str:
    """A digest of the call's bearer token ("" without one): never the token itself."""
    token, _ = bearer_token(context.invocation_metadata())
    return "" if token is None else "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]


class SessionOwners:
    """Who owns the sessions a call names: with tokens on and sessions private (the default), the
    caller's token (as a digest: never the token itself); otherwise everybody ("")."""

    def __init__(self, private: bool) -> None:
        self.private = private

    def __call__(self, context: grpc.aio.ServicerContext) -> str:
        return token_digest(context) if self.private else ""


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """Who a call comes from, for shared memory: its token's digest and its gRPC connection. A region
    answers only the caller that registered it, so another connection or another token naming its handle
    finds nothing. (gRPC names a TCP connection by its peer address and port; over a Unix-socket gRPC
    connection, or through a proxy that multiplexes callers onto one connection, only the token tells
    callers apart.)"""
    return Caller(token_digest(context), context.peer() or "")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call outside ``OPEN_SERVICES`` without a valid bearer token.

    Placed after the metrics interceptor, so refused calls are counted (``code="UNAUTHENTICATED"``).
    A refused call's request is never parsed: its handler reads an empty message of the method's type.
    """

    def __init__(self, tokens: TokenSet) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        reason = self.refused(handler_call_details)
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:  # None: an unknown method, gRPC answers UNIMPLEMENTED itself
            return handler
        return _refusal(handler, handler_call_details.method, reason)

    def refused(self, handler_call_details: grpc.HandlerCallDetails) -> str | None:
        """Why the call is refused (None: it may go on)."""
        if self.open(handler_call_details):
            return None
        token, reason = bearer_token(handler_call_details.invocation_metadata)
        return None if token is not None and self.tokens.accepts(token) else reason or "invalid token"

    def token_of(self, handler_call_details: grpc.HandlerCallDetails) -> str | None:
        """The valid token the call carries (whatever its service), None if it carries none."""
        token, _ = bearer_token(handler_call_details.invocation_metadata)
        return token if token is not None and self.tokens.accepts(token) else None

    @staticmethod
    def open(handler_call_details: grpc.HandlerCallDetails) -> bool:
        """Whether the call's service is open to callers without a token (``OPEN_SERVICES``)."""
        return handler_call_details.method.lstrip("/").rsplit("/", 1)[0] in OPEN_SERVICES


def _refusal(handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without reading the request."""

    def refuse(context: grpc.aio.ServicerContext) -> None:
        log.debug("refused %s from %s: %s", method, context.peer(), reason)
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(reason)

    async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        refuse(context)

    async def refuse_streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        refuse(context)
        return
        yield  # an async generator: grpc.aio answers a streaming method's handler by iterating it

    behaviour = refuse_streaming if handler.response_streaming else refuse_unary
    streaming = (handler.request_streaming, handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[streaming]
    if handler.request_streaming or handler.request_deserializer is None:
        return factory(behaviour, request_deserializer=None, response_serializer=handler.response_serializer)
    empty = handler.request_deserializer(b"")  # an empty message of the method's request type
    return factory(behaviour, request_deserializer=lambda _data: empty, response_serializer=handler.response_serializer)
