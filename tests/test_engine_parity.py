"""Parity with real MMDetection 3.3 numbers.

The fixtures are data produced by ``tests/reference/make_mmdet_fixtures.py`` from mmdet itself
(see its docstring for the reference environment); this test run does not need mmdet. For every
case we rebuild the loss from the same config, call it with the same arguments, and compare the
output and the gradients (w.r.t. pred, and float targets where mmdet's is defined) with the same
upstream gradient. Where mmdet raised, we must raise a typed LossError instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from losswire.server.losses import LossError, build_loss

FIXTURES = Path(__file__).parent / "reference" / "fixtures" / "mmdet_core.pt"
DATA = torch.load(FIXTURES, weights_only=True)
CASES = DATA["cases"]

# Deliberate differences from mmdet, listed in docs/semantics.md:
# - a weight of shape [N, 1] on a per-sample loss of shape [N] makes mmdet broadcast to an [N, N]
#   outer product and reduce that; we refuse the weight with a LossInputError naming both shapes.
SILENT_BROADCAST = "quirk-weight-Nx1-broadcasts"
# - empty inputs: mmdet's mean gives NaN (and its L1-family 'none' a 0-d zero); ours is a zero sum
#   with a zero gradient, and 'none' keeps the element-wise (empty) shape.
EMPTY = "empty-0x4"
# mmdet's sigmoid / mask cross-entropy casts labels to float32, so for float64 inputs its numbers
# carry float32 rounding; ours stay in float64 and are compared at float32 tolerance.
FLOAT32_INSIDE_MMDET = ("CrossEntropyLoss/sigmoid", "CrossEntropyLoss/mask")


def _tolerance(case: dict) -> dict:
    if case["dtype"] == "float64" and not case["id"].startswith(FLOAT32_INSIDE_MMDET):
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=1e-5, atol=1e-6)


# LOSSWIRE_TEST_DEVICE=cuda replays the fixtures on the GPU (CI has none).
DEVICE = torch.device(os.environ.get("LOSSWIRE_TEST_DEVICE", "cpu"))


def _to_device(value):
    if isinstance(value, torch.Tensor):
        return value.to(DEVICE)
    if isinstance(value, list):
        return [_to_device(v) for v in value]
    return value


def _get(args: list, path: list[int]):
    value = args
    for index in path:
        value = value[index]
    return value


def _prepare(case: dict) -> tuple[list, dict, list[torch.Tensor]]:
    """Clone the stored inputs, turn lists back into tuples, mark the grad leaves."""

    def clone(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, list):
            return [clone(v) for v in value]
        return value

    args = clone(case["args"])
    args = _to_device(args)
    leaves = []
    for path in case["grad_paths"]:
        parent = _get(args, path[:-1])
        parent[path[-1]] = parent[path[-1]].requires_grad_()
        leaves.append(parent[path[-1]])
    args = [tuple(a) if isinstance(a, list) else a for a in args]
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _to_device(case["kwargs"]).items()}
    return args, kwargs, leaves


def test_fixture_file_is_from_mmdet_33():
    assert DATA["mmdet_version"] == "3.3.0"
    assert len(CASES) > 500
    names = {c["cfg"]["type"] for c in CASES}
    assert names == {
        "CrossEntropyLoss",
        "FocalLoss",
        "QualityFocalLoss",
        "DistributionFocalLoss",
        "L1Loss",
        "SmoothL1Loss",
        "MSELoss",
        "BalancedL1Loss",
        "IoULoss",
        "GIoULoss",
    }


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_mmdet(case):
    args, kwargs, leaves = _prepare(case)
    if case["error"] is not None or SILENT_BROADCAST in case["id"]:
        with pytest.raises(LossError):
            build_loss(case["cfg"])(*args, **kwargs)
        return
    module = build_loss(case["cfg"])
    out = module(*args, **kwargs)
    if EMPTY in case["id"]:
        assert (out.dim() == 0 or out.numel() == 0) and out.sum().item() == 0
        (grad,) = torch.autograd.grad(out.sum(), leaves[:1])
        assert grad.shape == args[0].shape
        return
    expected = case["output"]
    tol = _tolerance(case)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.detach().cpu(), expected.to(out.dtype), **tol)
    if not leaves:
        return
    grads = torch.autograd.grad(out, leaves, case["grad_output"].to(out.dtype).to(DEVICE), allow_unused=True)
    for path, got, want in zip(case["grad_paths"], grads, case["grads"], strict=True):
        if want is None:
            assert got is None or not got.any(), f"mmdet has no gradient for args{path}"
            continue
        assert got is not None, f"no gradient for args{path}"
        torch.testing.assert_close(got.cpu(), want.to(got.dtype), **tol, msg=lambda m, p=path: f"grad args{p}: {m}")
