"""Parity with real MMDetection 3.3 numbers through ``RemoteLoss`` and a real server.

Every recorded mmdet case (``tests/support/mmdet_fixtures.py``) is replayed over the wire exactly as a
caller would make it: the same positional and keyword arguments, odd signatures included (GHMC's
``label_weight``, DiceLoss's argument order, GaussianFocalLoss's ``pos_inds``/``pos_labels``,
AssociativeEmbeddingLoss's ``match`` list), with the same upstream gradients on every part of a
tuple or dict output. Stateful sequences run in a server-held session, one per case, and the
session's state is compared with mmdet's after the last step. Where mmdet raised, the server
answers INVALID_ARGUMENT (or the config is refused when the module is built).
"""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from support.mmdet_fixtures import (
    SEQUENCE_CASES,
    SINGLE_CASES,
    case_ids,
    check_empty,
    check_output,
    difference,
    prepare,
)

from losswire.client import RemoteLoss, RemoteLossError

_MODULES: dict[str, RemoteLoss] = {}


def _remote(cfg: dict, target: str) -> RemoteLoss:
    """One RemoteLoss per config (a Describe round trip each), reused across cases; a stateful loss's
    module keeps its state across calls as mmdet's does, so each case of one gets a fresh module."""
    key = target + json.dumps(cfg, sort_keys=True)
    if key not in _MODULES:
        _MODULES[key] = RemoteLoss(cfg, target)
    if _MODULES[key].info.stateful:
        return RemoteLoss(cfg, target)
    return _MODULES[key]


@pytest.mark.parametrize("case", SINGLE_CASES, ids=list(case_ids(SINGLE_CASES)))
def test_remote_matches_mmdet(case, target):
    args, kwargs, leaves = prepare(case)
    if case["error"] is not None or difference(case) == "refuse":
        with pytest.raises(RemoteLossError) as caught:
            _remote(case["cfg"], target)(*args, **kwargs)
        assert caught.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), caught.value
        return
    out = _remote(case["cfg"], target)(*args, **kwargs)
    if difference(case) == "empty":
        check_empty(out, args, leaves)
        return
    check_output(case, case, out, leaves)


@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=list(case_ids(SEQUENCE_CASES)))
def test_remote_stateful_sequence_matches_mmdet(case, target):
    module = RemoteLoss(case["cfg"], target, session=f"parity/{case['id']}")
    for index, step in enumerate(case["steps"]):
        args, kwargs, leaves = prepare(step)
        check_output(case, step, module(*args, **kwargs), leaves, context=f"step {index}: ")
        assert module.last_session_step == index + 1
    state = module.reset_session()
    for name, want in case["steps"][-1]["state"].items():
        torch.testing.assert_close(state[name].cpu().to(want.dtype), want, rtol=1e-6, atol=1e-8, msg=name)


SEEDED = [r for c in SINGLE_CASES for r in c.get("numpy_seeded", ())]


@pytest.mark.parametrize("record", SEEDED, ids=[f"{r['id']}/numpy-seed-{r['numpy_seed']}" for r in SEEDED])
def test_remote_random_mining_is_mmdets_under_the_request_seed(record, target):
    """L2Loss's random negative mining: the request's seed gives mmdet's draw after np.random.seed(seed)."""
    args, kwargs, leaves = prepare(record)
    module = RemoteLoss(record["cfg"], target, seed=record["numpy_seed"])
    assert module.info.stochastic
    check_output(record, record, module(*args, **kwargs), leaves)
