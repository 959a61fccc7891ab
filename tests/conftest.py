"""Shared fixtures: a real losswire server on an ephemeral loopback port, in this process.

``LOSSWIRE_TEST_DEVICE=cuda`` runs that server's losses on the GPU (CI has none: cpu by default).
"""

from __future__ import annotations

import os

import pytest

from losswire.client import LossClient
from losswire.server.app import LosswireServer, ServerConfig


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
