"""examples/toy_training.py trains with RemoteLoss exactly as with the in-process losses."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from losswire.client import LossClient, RemoteLoss
from losswire.server.app import LosswireServer, ServerConfig
from losswire.server.losses import build_loss

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toy_training.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("losswire_example_toy_training", EXAMPLE)
    assert spec is not None and spec.loader is not None, EXAMPLE
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def remote_client():
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2))
    port = server.start()
    client = LossClient(f"127.0.0.1:{port}", timeout=30)
    try:
        yield client
    finally:
        client.close()
        server.stop(0)


def test_toy_training_converges_remotely_as_locally(toy, remote_client):
    steps, seed = 150, 0
    local = toy.train(build_loss, steps, seed)
    remote = toy.train(lambda cfg: RemoteLoss(cfg, client=remote_client), steps, seed)

    assert len(local) == len(remote) == steps
    for history in (local, remote):
        assert all(value == value for value in history), "a loss was NaN"
        # the tail's worst value, not just the last, so one lucky step can not pass
        assert max(history[-20:]) < 0.25 * history[0], f"no convergence: {history[0]:.4f} -> {history[-20:]}"
    # the same math in float32 on the same CPU: the trajectories agree to rounding
    for step, (want, got) in enumerate(zip(local, remote, strict=True)):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), f"step {step}: remote {got} != local {want}"


def test_toy_training_is_reproducible(toy):
    first = toy.train(build_loss, 20, 3)
    assert toy.train(build_loss, 20, 3) == first
    assert toy.train(build_loss, 20, 4) != first
