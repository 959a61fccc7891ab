"""A losswire server in the test's own process, on an ephemeral loopback port (the conftest's shared
``server`` is one; tests that need settings of their own start another), and whether it holds nothing."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig

DEVICE = os.environ.get("LOSSWIRE_TEST_DEVICE", "cpu")


@contextlib.contextmanager
def running_server(registry: Any = None, grace: float = 0, **settings: Any) -> Iterator[LosswireServer]:
    """A started server with ``settings`` (ServerConfig fields) over ``registry`` (None: every loss);
    stopped, with ``grace`` seconds for calls in flight, when the block ends."""
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "device": "cpu", **settings})
    server = LosswireServer(config) if registry is None else LosswireServer(config, registry=registry)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=grace)


def nothing_held(server: LosswireServer, seconds: float = 30) -> bool:
    """Whether the server's memory budget, big-call slots and lane bookkeeping are all given back within
    ``seconds`` (awaited: the server notices a call's end on its own time)."""
    deadline = time.monotonic() + seconds
    while server.dataplane.budget.held or server.dataplane.slots.in_use or server.lanes.held:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # a condition, polled
    return True
