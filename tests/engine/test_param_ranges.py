"""Declared parameter ranges: described in ParamSpec, enforced by config validation with a
LossConfigError that names the parameter, the range and the value -- never an OverflowError or a
TypeError, whatever number arrives (beyond int64, beyond float64, inf, NaN)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from losswire.server.losses import LOSSES, Bounds, LossConfigError, ParamSpec, build_loss

# (loss, parameter) -> its declared range, as ParamSpec describes it
DECLARED = {
    ("GHMC", "bins"): Bounds(1),
    ("GHMR", "bins"): Bounds(1),
    ("GHMC", "momentum"): Bounds(0, 1, exclusive_maximum=True),
    ("GHMR", "mu"): Bounds(0, exclusive_minimum=True),
    ("SeesawLoss", "num_classes"): Bounds(1),
    ("SeesawLoss", "eps"): Bounds(0, exclusive_minimum=True),
    ("EQLV2Loss", "num_classes"): Bounds(1),
    ("EQLV2Loss", "alpha"): Bounds(0),
    ("CrossEntropyCustomLoss", "num_classes"): Bounds(1),
    ("FocalCustomLoss", "num_classes"): Bounds(1),
    ("FocalLoss", "alpha"): Bounds(0, 1),
    ("FocalLoss", "gamma"): Bounds(0),
    ("QualityFocalLoss", "beta"): Bounds(0),
    ("VarifocalLoss", "alpha"): Bounds(0),
    ("GaussianFocalLoss", "gamma"): Bounds(0),
    ("SmoothL1Loss", "beta"): Bounds(0, exclusive_minimum=True),
    ("BalancedL1Loss", "alpha"): Bounds(0, exclusive_minimum=True),
    ("IoULoss", "eps"): Bounds(0, exclusive_minimum=True),
    ("GIoULoss", "eps"): Bounds(0),
    ("DIoULoss", "eps"): Bounds(0),
    ("BoundedIoULoss", "beta"): Bounds(0, exclusive_minimum=True),
    ("EIoULoss", "smooth_point"): Bounds(0, exclusive_minimum=True),
    ("KnowledgeDistillationKLDivLoss", "T"): Bounds(1),
    ("DiceLoss", "eps"): Bounds(0),
}


@pytest.mark.parametrize(("loss", "name"), sorted(DECLARED))
def test_ranges_are_described(loss, name):
    spec = LOSSES.describe(loss).param(name)
    assert spec.bounds == DECLARED[loss, name]
    as_dict = next(p for p in LOSSES.describe(loss).to_dict()["params"] if p["name"] == name)
    assert {k: as_dict[k] for k in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")} == {
        "minimum": spec.minimum,
        "maximum": spec.maximum,
        "exclusive_minimum": spec.exclusive_minimum,
        "exclusive_maximum": spec.exclusive_maximum,
    }


def test_unbounded_parameters_say_so():
    spec = LOSSES.describe("FocalLoss").param("loss_weight")
    assert spec.bounds is None and spec.minimum is None and spec.maximum is None
    assert ParamSpec("x", "float", 0.0).bounds is None


@pytest.mark.parametrize(
    ("cfg", "field", "message"),
    [
        (dict(type="GHMC", bins=0), "bins", r"GHMC.bins must be >= 1, got 0"),
        (dict(type="GHMC", momentum=1.0), "momentum", r"GHMC.momentum must be in \[0, 1\), got 1.0"),
        (dict(type="GHMC", momentum=-0.1), "momentum", r"in \[0, 1\), got -0.1"),
        (dict(type="FocalLoss", alpha=1.5), "alpha", r"FocalLoss.alpha must be in \[0, 1\], got 1.5"),
        (dict(type="FocalLoss", gamma=-1), "gamma", r"FocalLoss.gamma must be >= 0, got -1"),
        (dict(type="SeesawLoss", num_classes=0), "num_classes", r"SeesawLoss.num_classes must be >= 1, got 0"),
        (dict(type="IoULoss", eps=0.0), "eps", r"IoULoss.eps must be > 0, got 0.0"),
        (dict(type="GIoULoss", eps=-1e-6), "eps", r"GIoULoss.eps must be >= 0, got -1e-06"),
        (dict(type="KnowledgeDistillationKLDivLoss", T=0.5), "T", r"T must be >= 1, got 0.5"),
        (dict(type="VarifocalLoss", alpha=-0.1), "alpha", r"VarifocalLoss.alpha must be >= 0, got -0.1"),
        (dict(type="FocalCustomLoss", num_classes=-1), "num_classes", r"num_classes must be >= 1, got -1"),
    ],
)
def test_values_outside_their_range_are_refused(cfg, field, message):
    with pytest.raises(LossConfigError, match=message) as info:
        build_loss(cfg)
    assert info.value.field == field


HUGE = [2**63, 2**64 + 1, 1e19, 1e308, -(2**63) - 1]


@pytest.mark.parametrize("value", HUGE, ids=repr)
@pytest.mark.parametrize(
    ("loss", "name"), [("GHMC", "bins"), ("SeesawLoss", "num_classes"), ("EQLV2Loss", "num_classes")]
)
def test_integers_beyond_int64_are_config_errors(loss, name, value):
    with pytest.raises(LossConfigError, match=rf"{loss}.{name} must be an int64") as info:
        build_loss({"type": loss, name: value})
    assert info.value.field == name


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=repr)
def test_non_finite_numbers_are_config_errors(value):
    with pytest.raises(LossConfigError, match="bins must be a int") as info:
        build_loss(dict(type="GHMC", bins=value))
    assert info.value.field == "bins"
    for cfg, field in (
        (dict(type="FocalLoss", gamma=value), "gamma"),
        (dict(type="L1Loss", loss_weight=value), "loss_weight"),
        (dict(type="CrossEntropyLoss", class_weight=[1.0, value]), "class_weight"),
    ):
        with pytest.raises(LossConfigError, match="must be finite") as info:
            build_loss(cfg)
        assert info.value.field == field


def test_an_int_beyond_float64_for_a_float_parameter():
    with pytest.raises(LossConfigError, match=r"FocalLoss.gamma must be finite, got int 1000") as info:
        build_loss(dict(type="FocalLoss", gamma=10**400))
    assert info.value.field == "gamma"


def test_balanced_l1_overflowing_exponent():
    """``e^(gamma/alpha)`` beyond float64 is a config error, not an OverflowError."""
    with pytest.raises(LossConfigError, match=r"gamma / alpha must be at most") as info:
        build_loss(dict(type="BalancedL1Loss", gamma=1e300, alpha=1e-300))
    assert info.value.field == "gamma"


def test_the_boundary_values_themselves():
    build_loss(dict(type="FocalLoss", alpha=0.0, gamma=0.0))
    build_loss(dict(type="FocalLoss", alpha=1.0))
    build_loss(dict(type="GHMC", bins=1, momentum=0.0))
    build_loss(dict(type="KnowledgeDistillationKLDivLoss", T=1))
    build_loss(dict(type="GIoULoss", eps=0.0))
    assert build_loss(dict(type="GHMC", bins=2.0)).bins == 2  # a JSON number
    with pytest.raises(LossConfigError, match="must be > 0"):
        build_loss(dict(type="SmoothL1Loss", beta=0))


def test_bounds_render():
    assert str(Bounds(1)) == ">= 1"
    assert str(Bounds(0, exclusive_minimum=True)) == "> 0"
    assert str(Bounds(0, 1)) == "in [0, 1]"
    assert str(Bounds(0, 1, exclusive_maximum=True)) == "in [0, 1)"
    assert str(Bounds(maximum=5)) == "<= 5"
    assert 0.5 in Bounds(0, 1) and 1 not in Bounds(0, 1, exclusive_maximum=True) and -1 not in Bounds(0)


def test_semantics_lists_every_declared_range():
    """docs/semantics.md's "Parameter ranges" table names every bounded parameter with its range."""
    text = (Path(__file__).parents[2] / "docs" / "semantics.md").read_text()
    table = text[text.index("## Parameter ranges") :].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| `")
    ]
    listed = {(loss.strip(), name.strip("`"), bounds) for name, bounds, losses, _ in rows for loss in losses.split(",")}
    for description in LOSSES.descriptions():
        for spec in description.params:
            if spec.bounds is not None:
                expected = str(spec.bounds).removeprefix("in ")
                assert (description.name, spec.name, expected) in listed, (description.name, spec.name, expected)
