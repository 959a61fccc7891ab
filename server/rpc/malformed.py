"""Requests whose bytes are not the protobuf message the method takes get INVALID_ARGUMENT.

grpcio parses a request before any servicer or interceptor sees it, and a parse failure leaves as
INTERNAL "Exception deserializing request!", which reads as a server bug and tells the caller
nothing. This server interceptor swaps every method's request deserializer for one that never fails:
unparsable bytes become a ``MalformedRequest``, which the wrapped method answers with INVALID_ARGUMENT
naming the message type it expected and the byte count it got (for a request stream, at its first such
message). LossService's streaming methods get ``stream_deserializer`` at registration instead
(``loss_service.add_to_server``) and refuse such a message themselves, naming where it came.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
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

    deserialize.tolerant = True  # type: ignore[attr-defined]  # its method refuses MalformedRequests itself
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


class _Malformed(Exception):  # noqa: N818 (a signal inside this module, never the caller's error)
    def __init__(self, request: MalformedRequest) -> None:
        super().__init__(request.expected)
        self.request = request


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers unparsable requests with INVALID_ARGUMENT; ``on_refused(method)`` counts them. A method
    whose deserializer is tolerant already (``stream_deserializer``) refuses them itself.

    Install it first (outermost): the interceptors after it never see a malformed request, so the
    callback is how metrics count these calls.
    """

    def __init__(self, on_refused: Callable[[str], None] | None = None) -> None:
        self.on_refused = on_refused

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        deserializer = None if handler is None else handler.request_deserializer
        if deserializer is None or getattr(deserializer, "tolerant", False):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.request_streaming:
            return self._streaming(handler, method)
        if handler.response_streaming:
            return self._unary_streaming(handler, method)
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

    def _unary_streaming(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A unary request answered by a stream (health Watch on a port without the intake)."""
        behaviour = handler.unary_stream

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, MalformedRequest):
                self._refuse(method, request, context)
                return
            if inspect.isasyncgenfunction(behaviour):
                async for message in behaviour(request, context):
                    yield message
            else:
                await behaviour(request, context)  # it writes its answers with context.write

        return grpc.unary_stream_rpc_method_handler(
            guarded, _tolerant(handler.request_deserializer), handler.response_serializer
        )

    def _streaming(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A request stream (server reflection): the first message that does not parse ends the call with
        INVALID_ARGUMENT, as a unary request does; the method never sees it."""
        behaviour = handler.stream_stream or handler.stream_unary

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    raise _Malformed(request)
                yield request

        async def streamed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for message in behaviour(checked(requests), context):
                    yield message
            except _Malformed as bad:
                self._refuse(method, bad.request, context)

        async def awaited(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behaviour(checked(requests), context)
            except _Malformed as bad:
                self._refuse(method, bad.request, context)
                return None

        tolerant = _tolerant(handler.request_deserializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(awaited, tolerant, handler.response_serializer)
        guarded = streamed if inspect.isasyncgenfunction(behaviour) else awaited
        return grpc.stream_stream_rpc_method_handler(guarded, tolerant, handler.response_serializer)

    def _refuse(self, method: str, request: MalformedRequest, context: grpc.aio.ServicerContext) -> None:
        if self.on_refused is not None:
            self.on_refused(method)
        end_with(context, to_status(malformed_error(request, "the request")))
