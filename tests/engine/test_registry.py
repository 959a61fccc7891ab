"""The registry, build_loss, config validation and the machine-readable descriptions."""

import inspect

import pytest
import torch
from torch import nn

from losswire.server.losses import (
    LOSSES,
    DuplicateLossError,
    LossConfigError,
    OutputKind,
    Registry,
    UnknownLossError,
    build_loss,
)

# MMDetection 3.3's forward signatures (names in positional order): the contract callers rely on.
MMDET_FORWARD = {
    "CrossEntropyLoss": ["cls_score", "label", "weight", "avg_factor", "reduction_override", "ignore_index"],
    "FocalLoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "QualityFocalLoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "DistributionFocalLoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "L1Loss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "SmoothL1Loss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "MSELoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "BalancedL1Loss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "IoULoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
    "GIoULoss": ["pred", "target", "weight", "avg_factor", "reduction_override"],
}
# ... and their config parameters with defaults.
MMDET_PARAMS = {
    "CrossEntropyLoss": dict(
        use_sigmoid=False,
        use_mask=False,
        reduction="mean",
        class_weight=None,
        ignore_index=None,
        loss_weight=1.0,
        avg_non_ignore=False,
    ),
    "FocalLoss": dict(use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.0, activated=False),
    "QualityFocalLoss": dict(use_sigmoid=True, beta=2.0, reduction="mean", loss_weight=1.0, activated=False),
    "DistributionFocalLoss": dict(reduction="mean", loss_weight=1.0),
    "L1Loss": dict(reduction="mean", loss_weight=1.0),
    "SmoothL1Loss": dict(beta=1.0, reduction="mean", loss_weight=1.0),
    "MSELoss": dict(reduction="mean", loss_weight=1.0),
    "BalancedL1Loss": dict(alpha=0.5, gamma=1.5, beta=1.0, reduction="mean", loss_weight=1.0),
    "IoULoss": dict(linear=False, eps=1e-6, reduction="mean", loss_weight=1.0, mode="log"),
    "GIoULoss": dict(eps=1e-6, reduction="mean", loss_weight=1.0),
}


def test_every_core_loss_is_registered():
    assert set(MMDET_FORWARD) <= set(LOSSES.names())


@pytest.mark.parametrize("name", sorted(MMDET_FORWARD))
def test_signatures_match_mmdet(name):
    cls = LOSSES.get(name)
    assert list(inspect.signature(cls.forward).parameters)[1:] == MMDET_FORWARD[name]
    description = LOSSES.describe(name)
    assert [i.name for i in description.inputs] == MMDET_FORWARD[name]
    assert {p.name: p.default for p in description.params} == MMDET_PARAMS[name]
    assert [p.name for p in description.params] == list(MMDET_PARAMS[name])


def test_description_details():
    focal = LOSSES.describe("FocalLoss").to_dict()
    assert focal["output"] == "element"
    inputs = {i["name"]: i for i in focal["inputs"]}
    assert inputs["pred"] == dict(name="pred", kind="tensor", optional=False, default=None, choices=None)
    assert inputs["weight"]["optional"] and inputs["weight"]["kind"] == "tensor"
    assert inputs["avg_factor"]["kind"] == "number"
    assert inputs["reduction_override"]["choices"] == ["none", "mean", "sum"]
    qfl = LOSSES.describe("QualityFocalLoss")
    assert qfl.inputs[1].kind == "tensor_or_tuple" and qfl.output is OutputKind.SAMPLE
    ce = LOSSES.describe("CrossEntropyLoss")
    assert ce.output_variants == {"use_sigmoid=True": OutputKind.ELEMENT, "use_mask=True": OutputKind.SCALAR}
    assert ce.param("class_weight").type == "list[float]" and ce.param("class_weight").nullable
    assert LOSSES.describe("IoULoss").param("mode").choices == ("linear", "square", "log")
    assert LOSSES.describe("GIoULoss").output is OutputKind.SAMPLE


def test_build_from_mmdet_config_does_not_modify_it():
    cfg = dict(type="FocalLoss", gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.0)
    loss = build_loss(cfg)
    assert cfg["type"] == "FocalLoss" and loss.gamma == 2.0 and loss.alpha == 0.25
    assert "gamma=2.0" in repr(loss)


def test_unknown_type_names_closest_losses():
    with pytest.raises(UnknownLossError, match="did you mean FocalLoss") as info:
        build_loss(dict(type="FocalLos"))
    assert info.value.field == "type"
    with pytest.raises(UnknownLossError, match="did you mean GIoULoss"):
        build_loss(dict(type="giouloss"))


def test_config_without_type_or_not_a_dict():
    with pytest.raises(LossConfigError, match="no 'type' key"):
        build_loss(dict(gamma=2.0))
    with pytest.raises(LossConfigError, match="must be a dict"):
        build_loss("FocalLoss")


def test_unknown_parameter_names_valid_parameters():
    with pytest.raises(LossConfigError, match=r"FocalLoss has no parameter 'gama'; valid parameters: use_sigmoid"):
        build_loss(dict(type="FocalLoss", gama=2.0))


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(type="FocalLoss", gamma="2"), r"FocalLoss.gamma must be a float, got str '2'"),
        (dict(type="FocalLoss", activated=1), r"FocalLoss.activated must be a bool, got int 1"),
        (dict(type="CrossEntropyLoss", class_weight=[1, "a"]), r"class_weight must be a list\[float\] or None"),
        (dict(type="CrossEntropyLoss", ignore_index=2.5), r"ignore_index must be a int or None, got float 2.5"),
        (dict(type="IoULoss", mode="cube"), r"IoULoss.mode must be one of \['linear', 'square', 'log'\]"),
        (dict(type="SmoothL1Loss", beta=0.0), r"SmoothL1Loss.beta must be > 0"),
        (dict(type="FocalLoss", use_sigmoid=False), r"only sigmoid focal loss"),
        (dict(type="CrossEntropyLoss", use_sigmoid=True, use_mask=True), r"exclusive"),
    ],
)
def test_ill_typed_parameters(cfg, message):
    with pytest.raises(LossConfigError, match=message):
        build_loss(cfg)


def test_json_numbers_are_normalised():
    # JSON and protobuf Struct carry every number as a double
    loss = build_loss(dict(type="CrossEntropyLoss", ignore_index=2.0, class_weight=[1, 2, 3]))
    assert loss.ignore_index == 2 and isinstance(loss.ignore_index, int)
    assert loss.class_weight == [1.0, 2.0, 3.0]


def test_register_module_forms_and_duplicates():
    registry = Registry("test")

    @registry.register_module()
    class MyLoss(nn.Module):
        """My loss."""

        def __init__(self, scale: float = 2.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return ((pred - target) * self.scale).abs().mean()

    registry.register_module(name="Alias")(MyLoss)
    registry.register_module(module=MyLoss, name="Third")
    assert registry.names() == ["Alias", "MyLoss", "Third"]
    with pytest.raises(DuplicateLossError, match="'MyLoss' is already registered"):
        registry.register_module()(MyLoss)

    class Replacement(MyLoss):
        """Replacement."""

    registry.register_module(name="MyLoss", force=True)(Replacement)
    assert registry.get("MyLoss") is Replacement
    built = registry.build(dict(type="MyLoss", scale=3))
    assert built.scale == 3.0 and registry.describe("MyLoss").param("scale").type == "float"
    with pytest.raises(TypeError, match=r"registers nn\.Module subclasses"):
        registry.register_module()(object)


def test_a_config_checked_once_is_checked_again_after_its_loss_is_replaced():
    """Registry.loss_type keeps the loss type of a valid config by its key; registering (force=True) a
    class under that name forgets what was checked, since the new class may refuse the config."""

    class Scaled(nn.Module):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.scale * (pred - target).abs().mean()

    class Plain(nn.Module):
        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return (pred - target).abs().mean()

    registry = Registry("replaced")
    registry.register_module(name="Swapped", module=Scaled)
    config = {"type": "Swapped", "scale": 2.0}
    key = ("the config's key",)
    assert registry.loss_type(config, key) == registry.loss_type(config, key) == "Swapped"
    with pytest.raises(LossConfigError, match="scale"):
        registry.loss_type({"type": "Swapped", "scale": "two"}, ("another key",))
    registry.register_module(name="Swapped", force=True, module=Plain)
    with pytest.raises(LossConfigError, match="scale"):
        registry.loss_type(config, key)


def test_inputs_read_as_values_are_declared_by_a_class_of_its_own_and_name_its_inputs():
    """``value_inputs`` (read in place in a caller's shared memory): pred always, and what a class says.
    A plugin's class inherits none from an engine base: what the base's forward does says nothing of the
    plugin's. A name that is not an input of the forward is refused when the class is registered."""
    from losswire.server.losses.smooth_l1 import L1Loss

    assert LOSSES.describe("GIoULoss").value_inputs == ("pred", "target", "weight")
    assert LOSSES.describe("KnowledgeDistillationKLDivLoss").value_inputs == ("pred", "soft_label", "weight")
    assert LOSSES.describe("FocalLoss").value_inputs == ("pred",)  # its labels index pred's classes
    assert LOSSES.describe("CrossEntropyLoss").value_inputs == ("cls_score",)
    registry = Registry("values")

    @registry.register_module()
    class Inherits(L1Loss):
        """L1 as a plugin."""

    @registry.register_module()
    class Declares(L1Loss):
        """L1 as a plugin that declares its target."""

        value_inputs = ("target",)

    assert registry.describe("Inherits").value_inputs == ("pred",)
    assert registry.describe("Declares").value_inputs == ("pred", "target")

    class Misnamed(L1Loss):
        """L1 naming an input it does not have."""

        value_inputs = ("labels",)

    with pytest.raises(TypeError, match=r"Misnamed\.value_inputs names \['labels'\], which are not inputs"):
        registry.register_module()(Misnamed)
    assert "Misnamed" not in registry.names()
