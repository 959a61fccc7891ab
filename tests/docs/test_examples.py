"""The examples: toy_training.py trains with RemoteLoss exactly as with the in-process losses, and
plugins/poly_loss.py is served by ``losswire serve --plugin poly_loss``."""

from __future__ import annotations

import os
import sys

import grpc
import pytest
import torch
import torch.nn.functional as F
from support.examples import import_example
from support.paths import EXAMPLES

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.losses import build_loss

pytestmark = pytest.mark.slow  # server subprocesses

EXAMPLE = EXAMPLES / "toy_training.py"


@pytest.fixture(scope="module")
def toy():
    yield from import_example(EXAMPLE, "losswire_example_toy_training")


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


# -- examples/plugins/poly_loss.py: a documented plugin, served by a real `losswire serve` ----------------

PLUGIN_DIR = EXAMPLES / "plugins"


@pytest.fixture(scope="module")
def poly_server():
    from support.servers import ServerProcess, serve_cmd, server_env

    env = server_env(PYTHONPATH=os.pathsep.join(p for p in (str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")) if p))
    process = ServerProcess(serve_cmd("--host", "127.0.0.1", "--port", "0", "--plugin", "poly_loss"), env)
    try:
        yield process.wait_started()
    finally:
        process.close()


def test_the_example_plugin_is_listed_with_its_parameters(poly_server):
    client = LossClient(poly_server.target, timeout=30)
    info = {loss.name: loss for loss in client.list_losses().losses}["PolyLoss"]
    assert [(p.name, p.type) for p in info.params] == [
        ("epsilon", "float"),
        ("reduction", "str"),
        ("loss_weight", "float"),
    ]
    assert [i.name for i in info.inputs] == ["pred", "target", "weight", "avg_factor", "reduction_override"]
    assert info.output == "sample" and "Poly-1" in info.summary
    assert "plugin poly_loss registered PolyLoss" in poly_server.log()


def test_the_example_plugin_computes_poly1_remotely(poly_server):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (6,), generator=g)
    weight = torch.rand(6, generator=g)
    loss = RemoteLoss(dict(type="PolyLoss", epsilon=2.0), poly_server.target)(logits, labels, weight, avg_factor=3.0)
    loss.backward()
    # Poly-1 from its definition, with torch's own cross-entropy and softmax
    ref_logits = logits.detach().clone().requires_grad_()
    per_sample = F.cross_entropy(ref_logits, labels, reduction="none") + 2.0 * (
        1 - ref_logits.softmax(1)[torch.arange(6), labels]
    )
    ref = (per_sample * weight).sum() / (3.0 + torch.finfo(torch.float32).eps)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_a_request_never_imports_code(remote_client):
    """Only --plugin imports modules: a type naming a module, dotted path or file is just an unknown loss."""
    for name in ("poly_loss.PolyLoss", "poly_loss", "os.system", "examples/plugins/poly_loss.py", "__import__"):
        with pytest.raises(RemoteLossError) as caught:
            remote_client.describe({"type": name})
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert "unknown loss type" in caught.value.details
    assert "poly_loss" not in sys.modules
