"""Shared fixtures: a real losswire server on an ephemeral loopback port, in this process, and server
subprocesses started as operators start them.

``LOSSWIRE_TEST_DEVICE=cuda`` runs the in-process server's losses on the GPU (CI has none: cpu by
default). Helpers that are not fixtures live in ``tests/support``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from support.servers import ServerProcess

from losswire.client import LossClient
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig


@pytest.fixture(scope="session")
def server():
    instance = LosswireServer(
        ServerConfig(host="127.0.0.1", port=0, device=os.environ.get("LOSSWIRE_TEST_DEVICE", "cpu"), max_workers=4)
    )
    instance.start()
    yield instance
    instance.stop(grace=1)


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def client(target) -> LossClient:
    return LossClient(target, timeout=30)


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str], dict[str, str]], ServerProcess]]:
    """``spawn(argv, env)`` starts a ServerProcess; each one is killed at teardown if still running."""
    started: list[ServerProcess] = []

    def start(argv: list[str], env: dict[str, str]) -> ServerProcess:
        process = ServerProcess(argv, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
