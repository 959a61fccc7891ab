"""A channel whose calls wait for their server when the connection says so (gRPC's wait-for-ready).

:class:`~losswire.client.channels.Connection` decides, call by call, whether a call waits for a lost
server (one that answered before: a restart) or fails at once (a target never reached); every call on
its channel (the stub's, and the streams the transports open) gets that decision unless it sets
``wait_for_ready`` itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc


class WaitingChannel(grpc.Channel):
    """``channel`` whose calls wait for the server (gRPC's ``wait_for_ready``) as ``decide()`` says when
    they do not set it themselves, and that refuses calls once closed (a ValueError, as gRPC's own
    closed channel does: gRPC crashes the process when an interceptor, such as the bearer token's, makes
    a call on a closed channel). Given a WaitingChannel, the same channel with another decision (closing
    either closes both)."""

    def __init__(self, channel: grpc.Channel, decide: Callable[[], bool]) -> None:
        if isinstance(channel, WaitingChannel):  # another decision on the same channel: closed together
            self._channel, self._closed = channel._channel, channel._closed
        else:
            self._channel, self._closed = channel, threading.Event()
        self._decide = decide

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _callable(self, kind: str, method: str, *args: Any, **kwargs: Any) -> _WaitingCallable:
        self._check_open()
        return _WaitingCallable(getattr(self._channel, kind)(method, *args, **kwargs), self)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ValueError("Cannot invoke RPC: the losswire client was closed")

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._callable("unary_unary", method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._callable("unary_stream", method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._callable("stream_unary", method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._callable("stream_stream", method, *args, **kwargs)

    def subscribe(self, callback: Callable, try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable) -> None:
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> WaitingChannel:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _WaitingCallable:
    """One method of a :class:`WaitingChannel`: gRPC's multi-callable, ``wait_for_ready`` filled in."""

    def __init__(self, multicallable: Any, channel: WaitingChannel) -> None:
        self._multicallable, self._channel = multicallable, channel

    def _invoke(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        self._channel._check_open()
        if kwargs.get("wait_for_ready") is None:
            kwargs["wait_for_ready"] = self._channel._decide()
        return getattr(self._multicallable, name)(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("__call__", args, kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("with_call", args, kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("future", args, kwargs)
