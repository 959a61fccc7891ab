"""Provenance: every answer names the server's version and a digest of the implementation that computed
each loss, the same in Describe, ListLosses and Evaluate; statefulness of a config is described."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
from support.in_process import DEVICE

from losswire.server import __version__
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.dataplane import Dataplane
from losswire.server.losses import LOSSES, Registry
from losswire.server.losses.provenance import _digest, implementation_digest
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec


def test_describe_list_and_evaluate_agree_on_the_digest(client):
    described = client.describe(dict(type="FocalLoss"))
    listed = {info.name: info for info in client.list_losses().losses}
    assert described.loss.implementation.startswith("sha256:") and len(described.loss.implementation) == 71
    assert listed["FocalLoss"].implementation == described.loss.implementation
    assert listed["FocalLoss"].implementation != listed["GIoULoss"].implementation
    assert described.server_version == __version__
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(dict(type="FocalLoss")))
    codec.encode_tensor(torch.randn(4, 3), term.pred)
    codec.encode_value(torch.tensor([0, 1, 2, 3]), term.target)
    response = client.evaluate(request)
    assert response.server_version == __version__
    assert response.results[0].implementation == described.loss.implementation


@pytest.mark.parametrize(
    ("config", "stateful"),
    [
        (dict(type="SeesawLoss", num_classes=4), True),
        (dict(type="EQLV2Loss", num_classes=4), True),
        (dict(type="GHMC", momentum=0.7), True),
        (dict(type="GHMC"), False),
        (dict(type="FocalLoss"), False),
    ],
)
def test_describe_says_whether_a_config_keeps_state(client, config, stateful):
    answer = client.describe(config)
    assert answer.stateful is stateful
    assert answer.loss.stateful is (config["type"] in ("SeesawLoss", "EQLV2Loss", "GHMC"))


def test_fused_kernels_off_is_another_implementation(client):
    # on the device the client's server runs on: a digest names the device type, so a CPU server's would
    # differ from a GPU server's for every loss
    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device=DEVICE, fused_kernels=False))
    try:
        off = server.dataplane.implementation
        on = {info.name: info.implementation for info in client.list_losses().losses}
        assert off("FocalLoss") != on["FocalLoss"]  # a fused kernel answers it when on
        assert off("L2Loss") == on["L2Loss"]  # no fused kernel: the same code either way
    finally:
        server.stop(0)


def test_on_a_gpu_a_compiled_closed_form_is_part_of_the_implementation():
    """The digests a GPU server would give (files hashed, nothing run on the device): --gpu-kernels changes
    the implementation of a loss whose fused kernel has a closed form, and of no other."""
    on, off = (Dataplane(torch.device("cuda"), gpu_kernels=flag) for flag in (True, False))
    assert on.implementation("FocalLoss") != off.implementation("FocalLoss")
    assert on.implementation("CrossEntropyLoss") == off.implementation("CrossEntropyLoss")  # no closed form


def test_a_changed_source_changes_the_digest(tmp_path):
    source = tmp_path / "provenance_plugin.py"
    body = """
        import torch
        from losswire.server.losses import WeightedLoss

        class ScaledL1(WeightedLoss):
            def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return self.finish((pred - target).abs() * {scale}, None, self.reduction, None)
        """
    registry = Registry("provenance-test")
    digests = []
    for scale in (1.0, 2.0):
        source.write_text(textwrap.dedent(body.format(scale=scale)))
        spec = importlib.util.spec_from_file_location("provenance_plugin", source)
        module = importlib.util.module_from_spec(spec)
        sys.modules["provenance_plugin"] = module
        try:
            spec.loader.exec_module(module)
            registry.register_module(module=module.ScaledL1, force=True)
            _digest.cache_clear()
            digests.append(implementation_digest(registry, "ScaledL1", fused_file=None, device_type="cpu"))
        finally:
            sys.modules.pop("provenance_plugin", None)
    assert digests[0] != digests[1]
    assert implementation_digest(LOSSES, "L1Loss", fused_file=None, device_type="cpu") != implementation_digest(
        LOSSES, "L1Loss", fused_file=None, device_type="cuda"
    )
