"""Parity with real MMDetection 3.3 numbers, in process.

For every recorded case (``tests/support/mmdet_fixtures.py`` loads them) we rebuild the loss from the same
config, call it with the same arguments, and compare every output part and the gradients with the
same upstream gradients. Where mmdet raised, we must raise a typed LossError instead. Stateful
cases replay a sequence of calls on one module and compare each step and the state after it.
"""

from __future__ import annotations

import pytest
import torch
from support.mmdet_fixtures import (
    DEVICE,
    FAMILIES,
    SEQUENCE_CASES,
    SINGLE_CASES,
    case_ids,
    check_empty,
    check_output,
    difference,
)
from support.mmdet_fixtures import prepare as prepare_call

from losswire.server.losses import LOSSES, LossError, build_loss


def test_fixtures_are_from_mmdet_33_and_cover_every_loss():
    assert "core" in FAMILIES
    for family, data in FAMILIES.items():
        assert data["mmdet_version"] == "3.3.0", family
    recorded = {c["cfg"]["type"] for data in FAMILIES.values() for c in data["cases"]}
    # every built-in loss has mmdet numbers (plugins registered by other tests are not built-ins)
    builtin = {n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("losswire.server.losses")}
    assert builtin <= recorded, f"losses without mmdet fixtures: {sorted(builtin - recorded)}"


@pytest.mark.parametrize("case", SINGLE_CASES, ids=list(case_ids(SINGLE_CASES)))
def test_matches_mmdet(case):
    args, kwargs, leaves = prepare_call(case)
    if case["error"] is not None or difference(case) == "refuse":
        with pytest.raises(LossError):
            build_loss(case["cfg"]).to(DEVICE)(*args, **kwargs)
        return
    out = build_loss(case["cfg"]).to(DEVICE)(*args, **kwargs)
    if difference(case) == "empty":
        check_empty(out, args, leaves)
        return
    check_output(case, case, out, leaves)


@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=list(case_ids(SEQUENCE_CASES)))
def test_stateful_sequence_matches_mmdet(case):
    module = build_loss(case["cfg"]).to(DEVICE)  # its state where its inputs are, as a model moves it
    for index, step in enumerate(case["steps"]):
        args, kwargs, leaves = prepare_call(step)
        out = module(*args, **kwargs)
        check_output(case, step, out, leaves, context=f"step {index}: ")
        for name, want in step["state"].items():
            got = torch.as_tensor(getattr(module, name)).detach().cpu()
            torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-6, atol=1e-8, msg=f"step {index}: {name}")
