"""``shareable(module)``: may one built module serve concurrent calls with equal configs?

A loss declares it: stateful losses say ``stateful = True`` (per config: ``keeps_state()``), stochastic
ones ``stochastic = True``. The engine's declarations are checked against what a forward does to the
module (every recorded mmdet call, every loss); a plugin's class is shared only when a class of its own
declares ``stateful = False``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from support.mmdet_fixtures import DEVICE, SINGLE_CASES, case_ids
from support.mmdet_fixtures import prepare as prepare_call
from torch import Tensor, nn

from losswire.server.losses import LOSSES, WeightedLoss, build_loss, keeps_state, shareable
from losswire.server.losses.focal import FocalLoss

NOT_SHAREABLE = [
    dict(type="SeesawLoss", num_classes=4),
    dict(type="EQLV2Loss", num_classes=4),
    dict(type="GHMC", momentum=0.5),
    dict(type="GHMR", momentum=0.5),
    dict(type="L2Loss"),  # stochastic: a caller seeds module.rng per call
    dict(type="MarginL2Loss"),
]


@pytest.mark.parametrize("cfg", NOT_SHAREABLE, ids=lambda c: str(c))
def test_stateful_and_stochastic_configs_are_not_shareable(cfg):
    assert not shareable(build_loss(cfg))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_other_engine_loss_is_shareable_by_default(name):
    if name in {c["type"] for c in NOT_SHAREABLE} - {"GHMC", "GHMR"}:
        pytest.skip("stateful or stochastic whatever its config")
    params = {"num_classes": 4} if "num_classes" in [p.name for p in LOSSES.describe(name).params] else {}
    assert shareable(build_loss({"type": name, **params}))


def _state(module: nn.Module) -> dict[str, Any]:
    """Everything a forward could leave behind: buffers, parameters and plain attributes."""
    state = {f"tensor {k}": v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    state.update({k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"})
    return state


def _same(before: dict[str, Any], after: dict[str, Any]) -> bool:
    if before.keys() != after.keys():
        return False
    return all(
        torch.equal(a, b) if isinstance(a, Tensor) else type(a) is type(b) and a == b
        for a, b in zip(before.values(), after.values(), strict=True)
    )


def _one_call_per_config() -> list[dict]:
    """A recorded mmdet call (one that answered) for every config of every loss in the fixtures."""
    seen, cases = set(), []
    for case in SINGLE_CASES:
        key = repr(sorted(case["cfg"].items()))
        if case["error"] is None and case.get("ours") is None and key not in seen:
            seen.add(key)
            cases.append(case)
    return cases


CALLS = _one_call_per_config()


def test_the_calls_cover_every_loss():
    assert {c["cfg"]["type"] for c in CALLS} == set(LOSSES.names())


@pytest.mark.parametrize("case", CALLS, ids=list(case_ids(CALLS)))
def test_a_shareable_module_keeps_nothing_from_a_forward(case):
    """The declaration is true to the code: a forward leaves a shareable module exactly as it was."""
    module = build_loss(case["cfg"]).to(DEVICE)
    args, kwargs, _ = prepare_call(case)
    before = _state(module)
    module.rng = np.random.RandomState(0) if getattr(module, "stochastic", False) else None
    module(*args, **kwargs)
    if shareable(module):
        after = _state(module)
        after.pop("rng", None)
        assert _same(before, after), "a forward changed a module declared shareable"


# -- plugins ------------------------------------------------------------------------------------------


class Undeclared(WeightedLoss):
    """A plugin on the engine's base that declares nothing: its forward may keep anything."""

    def forward(self, pred: Tensor) -> Tensor:
        return self.finish(pred, None, self.reduction, None)


class Declared(WeightedLoss):
    """A plugin that declares itself stateless."""

    stateful = False

    def forward(self, pred: Tensor) -> Tensor:
        return self.finish(pred, None, self.reduction, None)


class DeclaredButStochastic(Declared):
    stochastic = True


class DeclaredStateful(WeightedLoss):
    stateful = True

    def forward(self, pred: Tensor) -> Tensor:
        return pred.sum()


class CountingL1(WeightedLoss):
    """Counts its forwards in a buffer without declaring it (as tests/support/stateful_losses.py does)."""

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, pred: Tensor) -> Tensor:
        self.calls += 1
        return self.finish(pred.abs(), None, self.reduction, None)


class PlainModule(nn.Module):
    stateful = False

    def forward(self, pred: Tensor) -> Tensor:
        return pred.sum()


class SubclassOfDeclared(Declared):
    """Inherits a plugin's own declaration: that is the plugin's word, not an engine default."""


class FocalPlugin(FocalLoss):
    """A plugin subclass of an engine class: FocalLoss's declaration says nothing of this forward."""


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (Undeclared, False),
        (Declared, True),
        (DeclaredButStochastic, False),
        (DeclaredStateful, False),
        (CountingL1, False),
        (PlainModule, True),
        (SubclassOfDeclared, True),
        (FocalPlugin, False),
    ],
)
def test_a_plugin_is_shared_only_by_its_own_declaration(cls, expected):
    assert shareable(cls()) is expected


def test_keeps_state_of_a_plugin_that_declares_nothing_reads_its_buffers():
    """A plugin inheriting WeightedLoss's default says nothing: its buffers decide (CountingL1's counter)."""
    assert keeps_state(CountingL1()) and not keeps_state(Undeclared())
    assert keeps_state(DeclaredStateful()) and not keeps_state(Declared())
    ghm = build_loss(dict(type="GHMC"))
    assert not keeps_state(ghm) and shareable(ghm)  # edges are a buffer, but nothing writes them
    assert keeps_state(build_loss(dict(type="GHMC", momentum=0.5)))
