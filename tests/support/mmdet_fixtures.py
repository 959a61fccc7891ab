"""Loading and replaying the mmdet reference fixtures (``tests/reference/fixtures/mmdet_<family>.pt``).

The fixtures are data written by ``tests/reference/make_mmdet_fixtures.py`` from MMDetection 3.3
itself; the tests never need mmdet. ``test_engine_parity`` replays them in process and
``test_service_parity`` through ``RemoteLoss`` over a real server, both with the helpers here.

A loss output is a tensor, a tuple (stored as a list) or a dict of tensors; ``parts`` flattens any
of them to ``[(key, tensor)]`` so one comparison serves every loss.

Deliberate differences from mmdet (docs/semantics.md) are marked in the data (``case["ours"]``) or,
for the first fixture family, by the case id:
- ``refuse``: mmdet returns a number where we raise a LossError (e.g. a weight of shape [N, 1] on a
  per-sample loss of shape [N], which mmdet silently broadcasts to an [N, N] outer product);
- ``empty``: mmdet's mean of an empty input is NaN; ours is a zero sum with a zero gradient;
- ``float32``: mmdet computes in float32 inside a float64 call; compared at float32 tolerance.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from support.paths import FIXTURES

FIXTURE_DIR = FIXTURES
# LOSSWIRE_TEST_DEVICE=cuda replays the fixtures on the GPU (CI has none).
DEVICE = torch.device(os.environ.get("LOSSWIRE_TEST_DEVICE", "cpu"))

_CORE_QUIRKS = {
    "quirk-weight-Nx1-broadcasts": "refuse",
    "empty-0x4": "empty",
}
_CORE_FLOAT32 = ("CrossEntropyLoss/sigmoid", "CrossEntropyLoss/mask")


def load_families() -> dict[str, dict]:
    return {
        path.stem.removeprefix("mmdet_"): torch.load(path, weights_only=True)
        for path in sorted(FIXTURE_DIR.glob("mmdet_*.pt"))
    }


FAMILIES = load_families()
CASES: list[dict] = [case for data in FAMILIES.values() for case in data["cases"]]
SINGLE_CASES = [c for c in CASES if "steps" not in c]
SEQUENCE_CASES = [c for c in CASES if "steps" in c]


def difference(case: dict) -> str | None:
    """The documented deliberate difference for this case, if any."""
    if case.get("ours"):
        return case["ours"]
    for marker, kind in _CORE_QUIRKS.items():
        if marker in case["id"]:
            return kind
    if case["dtype"] == "float64" and case["id"].startswith(_CORE_FLOAT32):
        return "float32"
    return None


# Losses that compute part of a float64 call in float32, as mmdet does (DiceLoss's target, GHM's bin edges
# and label-weight sum, EQLv2's and Seesaw's float32 state). On the CPU those float32 sums add in mmdet's
# order, so the answer is float64-exact; on a GPU they add in another order and agree to float32 rounding
# (1e-7 relative, measured on an H200).
_FLOAT32_INSIDE = ("DiceLoss", "GHMC", "GHMR", "EQLV2Loss", "SeesawLoss")


def tolerance(case: dict) -> dict[str, float]:
    float32_inside = DEVICE.type != "cpu" and case["cfg"]["type"] in _FLOAT32_INSIDE
    if case["dtype"] == "float64" and difference(case) != "float32" and not float32_inside:
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=1e-5, atol=1e-6)


def parts(output: Any) -> list[tuple[str, torch.Tensor]]:
    """A loss output as ``[(key, tensor)]``: ``""`` for a tensor, ``"0", "1"`` for a tuple/list, dict keys."""
    if isinstance(output, torch.Tensor):
        return [("", output)]
    if isinstance(output, (tuple, list)):
        return [(str(i), t) for i, t in enumerate(output)]
    if isinstance(output, dict):
        return list(output.items())
    raise AssertionError(f"unexpected loss output {type(output).__name__}")


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone().to(DEVICE)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _tuples(value: Any) -> Any:
    """Stored lists of tensors are tuple targets again; lists of numbers (e.g. ``match``) stay lists."""
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    return value


def prepare(record: dict) -> tuple[list, dict, list[torch.Tensor]]:
    """Fresh inputs for one call (a case, or one step of a sequence): (args, kwargs, grad leaves)."""
    args = _clone(record["args"])
    leaves = []
    for path in record["grad_paths"]:
        parent = args
        for index in path[:-1]:
            parent = parent[index]
        parent[path[-1]] = parent[path[-1]].requires_grad_()
        leaves.append(parent[path[-1]])
    args = [_tuples(a) for a in args]
    kwargs = {k: _tuples(v) for k, v in _clone(record["kwargs"]).items()}
    return args, kwargs, leaves


def check_output(case: dict, record: dict, output: Any, leaves: list[torch.Tensor], context: str = "") -> None:
    """Compare an output and the gradients of its parts (with the recorded upstream gradients)."""
    tol = tolerance(case)
    got, want = parts(output), parts(record["output"])
    assert [k for k, _ in got] == [k for k, _ in want], f"{context}output parts {[k for k, _ in got]}"
    for (key, g), (_, w) in zip(got, want, strict=True):
        assert g.shape == w.shape, f"{context}part {key!r}: shape {list(g.shape)} != mmdet's {list(w.shape)}"
        torch.testing.assert_close(
            g.detach().cpu(), w.to(g.dtype), **tol, msg=lambda m, k=key: f"{context}part {k!r}: {m}"
        )
    if not leaves:
        return
    upstream = dict(parts(record["grad_output"]))
    live = [(t, upstream[k].to(t.dtype).to(t.device)) for k, t in got if t.requires_grad]
    if not live:
        grads: list = [None] * len(leaves)
    else:
        grads = list(torch.autograd.grad([t for t, _ in live], leaves, [u for _, u in live], allow_unused=True))
    for path, g, w in zip(record["grad_paths"], grads, record["grads"], strict=True):
        if w is None:
            assert g is None or not g.any(), f"{context}mmdet has no gradient for args{path}"
            continue
        assert g is not None, f"{context}no gradient for args{path}"
        torch.testing.assert_close(g.cpu(), w.to(g.dtype), **tol, msg=lambda m, p=path: f"{context}grad args{p}: {m}")


def check_empty(output: Any, args: list, leaves: list[torch.Tensor]) -> None:
    """Our answer for empty inputs: a zero (or empty) loss with a zero gradient of pred's shape."""
    for _, tensor in parts(output):
        assert (tensor.dim() == 0 or tensor.numel() == 0) and tensor.sum().item() == 0
    total = sum(t.sum() for _, t in parts(output))
    (grad,) = torch.autograd.grad(total, leaves[:1], allow_unused=True)
    assert grad is None or (grad.shape == args[0].shape and not grad.any())


def case_ids(cases: list[dict]) -> Iterator[str]:
    return (c["id"] for c in cases)
