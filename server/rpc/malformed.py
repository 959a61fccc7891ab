"""Requests whose bytes are not the protobuf message the method takes get INVALID_ARGUMENT.

grpcio parses a request before any servicer or interceptor sees it, and a parse failure leaves as
INTERNAL "Exception deserializing request!", which reads as a server bug and tells the caller
nothing. This server interceptor swaps every unary method's request deserializer for one that never
fails: unparsable bytes become a ``MalformedRequest``, which the wrapped method answers with
INVALID_ARGUMENT naming the message type it expected and the byte count it got. A streaming method
gets ``stream_deserializer`` at registration instead (``loss_service.add_to_server``) and refuses such a
message itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grpc

from ..errors import RequestError
from .calls import end_with
from .status import to_status


@dataclasses.dataclass(frozen=True)
class MalformedRequest:
    """What arrives instead of a request whose bytes did not parse."""

    expected: str  # the message type, "losswire.v1.EvaluateRequest"
    size: int
    reason: str


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # generated stubs pass ``Message.FromString``
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


def _tolerant(deserializer: Callable[[bytes], Any], expected: str | None = None) -> Callable[[bytes], Any]:
    expected = expected or _type_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, or anything else the parser raises: the bytes are bad
            return MalformedRequest(expected, len(data), str(error) or type(error).__name__)

    return deserialize


def stream_deserializer(deserializer: Callable[[bytes], Any], expected: str) -> Callable[[bytes], Any]:
    """For a streaming method, whose messages this interceptor cannot see one by one: a deserializer
    that hands the method a ``MalformedRequest`` for unparsable bytes (see :func:`malformed_error`)."""
    return _tolerant(deserializer, expected)


def malformed_error(message: MalformedRequest, where: str, field: str | None = None) -> RequestError:
    return RequestError(
        f"{where} is not a valid {message.expected}: its {message.size} bytes do not parse as that protobuf "
        f"message ({message.reason})",
        field=field,
    )


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers unparsable unary requests with INVALID_ARGUMENT; ``on_refused(method)`` counts them.

    Install it first (outermost): the interceptors after it never see a malformed request, so the
    callback is how metrics count these calls.
    """

    def __init__(self, on_refused: Callable[[str], None] | None = None) -> None:
        self.on_refused = on_refused

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        behaviour = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                return self._refuse(method, request, context)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _refuse(self, method: str, request: MalformedRequest, context: grpc.aio.ServicerContext) -> None:
        if self.on_refused is not None:
            self.on_refused(method)
        end_with(context, to_status(malformed_error(request, "the request")))
