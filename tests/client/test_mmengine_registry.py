"""``type='RemoteLoss'`` in an mmengine config, built by the real mmengine registry, equals the local loss.

MMDetection cannot be installed in the test environment, so ``HEADS`` imitates its registry: a child of
mmengine's root ``MODELS`` with its own scope, as ``mmdet.registry.MODELS`` is. ``TinyHead`` is the
loss-facing part of mmdet's ``AnchorHead``: it reads ``use_sigmoid`` from the loss *config dict* to size
its classifier, builds its losses with ``MODELS.build`` and calls them as ``loss_by_feat_single`` does.
A real server (``target``) evaluates the remote losses; losswire's engine in this process is the reference.

mmengine is an optional dependency (the ``test`` extra installs it): without it this file fails under
``CI=true`` and is skipped elsewhere.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch import Tensor, nn

from losswire.client import RemoteLoss, RemoteLossError
from losswire.server.losses import LOSSES

try:
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope, Registry
except ImportError:  # the optional dependency: required in CI, a skip elsewhere
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("mmengine is not installed: pip install -e '.[test]'", allow_module_level=True)

# mmengine's build imports mmengine.model, which imports torch.distributed.optim: torch's own jit deprecations
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parents[1] / "examples" / "mmdet_config" / "retinanet_remote_loss.py"
MODULE = "losswire.client.mmdet"
SCOPE = "losswire_test"
NUM_CLASSES, IN_CHANNELS = 3, 8

# like mmdet/registry.py: MODELS = Registry('model', parent=MMENGINE_MODELS, locations=['mmdet.models'])
HEADS = Registry("model", parent=MODELS, scope=SCOPE)

# The local losses of the head, as an mmdet config writes them; every remote form below must equal them.
LOCAL_CLS = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)
LOCAL_BBOX = dict(type="SmoothL1Loss", beta=0.11, loss_weight=2.0)


@HEADS.register_module()
class TinyHead(nn.Module):
    """What mmdet's AnchorHead does with its losses, without anchors."""

    def __init__(self, in_channels: int, num_classes: int, loss_cls: Mapping, loss_bbox: Mapping) -> None:
        super().__init__()
        self.use_sigmoid_cls = loss_cls.get("use_sigmoid", False)  # AnchorHead reads the config dict
        self.cls_out_channels = num_classes if self.use_sigmoid_cls else num_classes + 1
        self.conv_cls = nn.Linear(in_channels, self.cls_out_channels)
        self.conv_reg = nn.Linear(in_channels, 4)
        self.loss_cls = HEADS.build(loss_cls)
        self.loss_bbox = HEADS.build(loss_bbox)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cls_score, bbox_pred = self.conv_cls(batch["feats"]), self.conv_reg(batch["feats"])
        return {
            "loss_cls": self.loss_cls(
                cls_score, batch["labels"], batch["label_weights"], avg_factor=batch["avg_factor"]
            ),
            "loss_bbox": self.loss_bbox(
                bbox_pred, batch["bbox_targets"], batch["bbox_weights"], avg_factor=batch["avg_factor"]
            ),
        }


def config_text(target: str, loss_cls: str, loss_bbox: str, base: str | None = None) -> str:
    """An mmengine config whose head losses are the given dict expressions (with ``{target}`` filled in)."""
    lines = [f"_base_ = {base!r}"] if base else []
    lines += [
        f"custom_imports = dict(imports=[{MODULE!r}], allow_failed_imports=False)",
        f"target = {target!r}",
        f"model = dict(type='TinyHead', in_channels={IN_CHANNELS}, num_classes={NUM_CLASSES},",
        f"             loss_cls={loss_cls}, loss_bbox={loss_bbox})",
    ]
    return "\n".join(lines) + "\n"


# The same two losses written every way a user may write them.
FORMS = {
    "flat": (
        "dict(type='RemoteLoss', loss='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0, "
        "target=target)",
        "dict(type='RemoteLoss', loss='SmoothL1Loss', beta=0.11, loss_weight=2.0, target=target)",
    ),
    "nested": (
        "dict(type='RemoteLoss', loss=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25), "
        "use_sigmoid=True, target=target)",
        "dict(type='RemoteLoss', loss=dict(type='SmoothL1Loss', beta=0.11, loss_weight=2.0), target=target, "
        "timeout=30.0, seed=3)",
    ),
    "scoped": (  # mmyolo / mmrotate configs name mmdet's losses with their scope
        "dict(type='RemoteLoss', loss='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, target=target)",
        "dict(type='RemoteLoss', loss=dict(type='mmdet.SmoothL1Loss', beta=0.11), loss_weight=2.0, target=target)",
    ),
}


def make_batch(seed: int = 0, samples: int = 64) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES + 1, (samples,), generator=generator)  # NUM_CLASSES = background
    positive = (labels < NUM_CLASSES).float()
    label_weights = (torch.rand(samples, generator=generator) > 0.1).float()  # some ignored anchors
    return {
        "feats": torch.randn(samples, IN_CHANNELS, generator=generator),
        "labels": labels,
        "label_weights": label_weights,
        "bbox_targets": torch.randn(samples, 4, generator=generator) * 0.2,
        "bbox_weights": positive[:, None].expand(samples, 4).contiguous(),
        "avg_factor": float(positive.sum()),
    }


def losses_and_grads(head: TinyHead, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    head.zero_grad()
    losses = head.loss(batch)
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in head.named_parameters()}
    return {k: v.detach() for k, v in losses.items()}, grads


def local_twin(head: TinyHead) -> TinyHead:
    """The same head (same weights) with losswire's in-process losses built from the local dicts."""
    local = copy.deepcopy(head)  # also proves a remote head deep-copies, as mmengine's EMA and runners do
    local.loss_cls, local.loss_bbox = LOSSES.build(LOCAL_CLS), LOSSES.build(LOCAL_BBOX)
    return local


def assert_head_matches_local(head: TinyHead) -> None:
    batch = make_batch()
    local_losses, local_grads = losses_and_grads(local_twin(head), batch)
    remote_losses, remote_grads = losses_and_grads(head, batch)
    assert set(remote_losses) == set(local_losses)
    for name in local_losses:
        torch.testing.assert_close(remote_losses[name], local_losses[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in local_grads:
        torch.testing.assert_close(remote_grads[name], local_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def mmdet_module():
    """losswire.client.mmdet, imported as a config's custom_imports would (a no-op when already imported)."""
    Config.fromstring(f"custom_imports = dict(imports=[{MODULE!r}], allow_failed_imports=False)\n", ".py")
    return sys.modules[MODULE]


def build_head(target: str, form: str) -> TinyHead:
    return HEADS.build(Config.fromstring(config_text(target, *FORMS[form]), ".py").model)


# -- registration and building -------------------------------------------------------------------


@pytest.mark.slow
def test_custom_imports_alone_registers_remote_loss(target):
    """In a fresh interpreter nothing but the config's custom_imports imports losswire.client.mmdet;
    the head built from the config then computes what the local losses compute."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        import test_mmengine_registry as t
        from mmengine.config import Config
        from mmengine.registry import MODELS
        before = {MODULE!r} in sys.modules or "RemoteLoss" in MODELS.module_dict
        cfg = Config.fromstring(t.config_text({target!r}, *t.FORMS["flat"]), ".py")
        head = t.HEADS.build(cfg.model)
        batch = t.make_batch()
        remote, _ = t.losses_and_grads(head, batch)
        local, _ = t.losses_and_grads(t.local_twin(head), batch)
        print(json.dumps({{
            "before": before,
            "after": {MODULE!r} in sys.modules,
            "registered": MODELS.module_dict["RemoteLoss"].__module__,
            "built": type(head.loss_cls).__module__,
            "remote": {{k: v.item() for k, v in remote.items()}},
            "local": {{k: v.item() for k, v in local.items()}},
        }}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["before"] is False, "the module was imported before the config asked for it"
    assert report["after"] is True
    assert report["registered"] == report["built"] == MODULE
    for name, value in report["local"].items():
        assert report["remote"][name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("form", sorted(FORMS))
def test_head_loss_and_gradients_equal_local(mmdet_module, target, form):
    head = build_head(target, form)
    assert isinstance(head.loss_cls, mmdet_module.MMDetRemoteLoss)
    assert isinstance(head.loss_cls, RemoteLoss)  # evaluate_terms, sessions... work on it
    assert_head_matches_local(head)


def test_base_config_switches_to_remote_by_changing_only_the_loss_dicts(mmdet_module, target, tmp_path):
    """A config inheriting the local losses from _base_ overrides type (and adds loss, target); the
    inherited parameters stay at the top level, where the head reads use_sigmoid."""
    base = tmp_path / "base.py"
    base.write_text(config_text("unused", repr(LOCAL_CLS), repr(LOCAL_BBOX)))
    child = tmp_path / "remote.py"
    child.write_text(
        "_base_ = './base.py'\n"
        f"target = {target!r}\n"
        "model = dict(loss_cls=dict(type='RemoteLoss', loss='FocalLoss', target=target),\n"
        "             loss_bbox=dict(type='RemoteLoss', loss='SmoothL1Loss', target=target))\n"
    )
    head = HEADS.build(Config.fromfile(str(child)).model)
    assert head.use_sigmoid_cls is True and head.cls_out_channels == NUM_CLASSES
    assert_head_matches_local(head)


@pytest.mark.parametrize("via", ["child registry", "root registry"])
def test_build_under_default_scope(mmdet_module, target, via):
    """As an mmdet Runner does with default_scope='mmdet': RemoteLoss, registered in the root, is found
    from the scope's registry through its parent. (overwrite_default_scope restores the global scope.)"""
    cfg = Config.fromstring(config_text(target, *FORMS["flat"]), ".py")
    with DefaultScope.overwrite_default_scope(SCOPE):
        registry = HEADS if via == "child registry" else MODELS
        head = registry.build(cfg.model)
        direct = HEADS.build(dict(type="RemoteLoss", loss="L1Loss", target=target))
    assert type(head) is TinyHead
    assert isinstance(direct, mmdet_module.MMDetRemoteLoss)  # with mmdet, also an instance of its L1Loss
    assert_head_matches_local(head)


def test_registered_in_root_registry_only_once(mmdet_module):
    assert MODELS.get("RemoteLoss") is mmdet_module.MMDetRemoteLoss
    assert HEADS.get("RemoteLoss") is mmdet_module.MMDetRemoteLoss  # through the parent
    assert "RemoteLoss" not in HEADS.module_dict


# -- what heads read from their losses -----------------------------------------------------------


def test_attributes_heads_read(mmdet_module, target):
    head = build_head(target, "nested")
    loss_cls, loss_bbox = head.loss_cls, head.loss_bbox
    assert head.use_sigmoid_cls is True and head.cls_out_channels == NUM_CLASSES
    # configured values, then the server's defaults for what the config leaves out
    assert (loss_cls.use_sigmoid, loss_cls.gamma, loss_cls.alpha) == (True, 2.0, 0.25)
    description = {p.name: p for p in LOSSES.describe("FocalLoss").params}
    assert loss_cls.loss_weight == description["loss_weight"].default
    assert loss_cls.reduction == description["reduction"].default
    assert (loss_bbox.beta, loss_bbox.loss_weight) == (0.11, 2.0)
    # what FocalLoss and SmoothL1Loss do not have, the remote module does not have either
    for name in ("custom_cls_channels", "custom_activation", "custom_accuracy", "get_activation", "use_sigmoid"):
        module = loss_bbox if name == "use_sigmoid" else loss_cls
        assert getattr(module, name, "absent") == "absent", name
    with pytest.raises(AttributeError, match="no attribute 'not_a_param'"):
        _ = loss_cls.not_a_param


def test_custom_classifier_hooks_are_mmdets_own(mmdet_module, mmdet_models, target):
    """BBoxHead asks SeesawLoss / *CustomLoss for its classifier width, activation and accuracy: with
    mmdet installed the remote module answers with mmdet's own code, as the local module does."""
    scores = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    for loss_type, channels in (("SeesawLoss", 7), ("CrossEntropyCustomLoss", 6), ("FocalCustomLoss", 5)):
        remote = MODELS.build(dict(type="RemoteLoss", loss=loss_type, num_classes=5, target=target))
        local = mmdet_models.losses.__dict__[loss_type](num_classes=5)
        assert isinstance(remote, type(local)) and isinstance(remote, RemoteLoss)
        assert remote.num_classes == 5 and isinstance(remote.num_classes, int)
        assert (remote.custom_cls_channels, remote.custom_activation, remote.custom_accuracy) == (True, True, True)
        assert remote.get_cls_channels(5) == local.get_cls_channels(5) == channels
        width = remote.get_cls_channels(5)
        torch.testing.assert_close(remote.get_activation(scores[:, :width]), local.get_activation(scores[:, :width]))
        torch.testing.assert_close(
            remote.get_accuracy(scores[:, :width], labels), local.get_accuracy(scores[:, :width], labels)
        )
    eqlv2 = MODELS.build(dict(type="RemoteLoss", loss="EQLV2Loss", num_classes=5, target=target))
    assert getattr(eqlv2, "custom_activation", False) is False  # as mmdet: EQLV2 only has get_activation
    local_eqlv2 = mmdet_models.losses.EQLV2Loss(num_classes=5)
    torch.testing.assert_close(eqlv2.get_activation(scores[:, :6]), local_eqlv2.get_activation(scores[:, :6]))


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is not None, reason="mmdet is installed: its hooks exist")
def test_without_mmdet_no_module_has_classifier_hooks(mmdet_module, target):
    """Only mmdet's heads ask for the hooks, so without mmdet there are none, and the message says why;
    a head probing ``getattr(loss, 'custom_cls_channels', False)`` reads False."""
    seesaw = MODELS.build(dict(type="RemoteLoss", loss="SeesawLoss", num_classes=5, target=target))
    assert type(seesaw) is mmdet_module.MMDetRemoteLoss
    assert getattr(seesaw, "custom_cls_channels", False) is False
    with pytest.raises(
        AttributeError, match=r"RemoteLoss\(SeesawLoss\) has no attribute 'get_cls_channels'.*MMDetection"
    ):
        _ = seesaw.get_cls_channels


def test_options_reach_the_remote_loss(mmdet_module, target):
    seesaw = MODELS.build(
        dict(type="RemoteLoss", loss="SeesawLoss", num_classes=5, target=target, session="mmengine/seesaw", seed=5)
    )
    assert (seesaw.session, seesaw.seed, seesaw.client.target) == ("mmengine/seesaw", 5, target)
    assert seesaw.cfg == {"type": "SeesawLoss", "num_classes": 5}


def test_head_changing_a_parameter_changes_what_the_server_evaluates(mmdet_module, target):
    """DynamicRoIHead sets ``bbox_head.loss_bbox.beta`` during training."""
    head = build_head(target, "flat")
    head.loss_bbox.beta = 0.05
    assert head.loss_bbox.beta == 0.05 and head.loss_bbox.cfg["beta"] == 0.05
    pred, goal = torch.randn(16, 4, requires_grad=True), torch.randn(16, 4)
    local_pred = pred.detach().clone().requires_grad_()
    remote = head.loss_bbox(pred, goal)
    local = LOSSES.build({**LOCAL_BBOX, "beta": 0.05})(local_pred, goal)
    remote.backward()
    local.backward()
    torch.testing.assert_close(remote.detach(), local.detach())
    torch.testing.assert_close(pred.grad, local_pred.grad)
    # a value the loss refuses fails at the assignment, and the config keeps its last good value
    with pytest.raises(RemoteLossError) as error:
        head.loss_bbox.reduction = "average"
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "reduction" in error.value.details
    assert head.loss_bbox.reduction == "mean" and "reduction" not in head.loss_bbox.cfg


def test_validate_false_builds_without_a_server(mmdet_module):
    """Nothing listens on port 1: with validate=False the model builds, and what the config states is
    readable; the defaults are the server's, unknown until it is asked."""
    loss = MODELS.build(
        dict(type="RemoteLoss", loss="FocalLoss", use_sigmoid=True, target="127.0.0.1:1", validate=False)
    )
    assert loss.use_sigmoid is True
    with pytest.raises(AttributeError, match="validate=False"):
        _ = loss.gamma


# -- mistakes fail at build, with a message that says what to write --------------------------------


def test_unknown_loss_type_fails_at_build(mmdet_module, target):
    cfg = Config.fromstring(
        config_text(
            target, "dict(type='RemoteLoss', loss='FocalLos', use_sigmoid=True, target=target)", FORMS["flat"][1]
        ),
        ".py",
    )
    with pytest.raises(RemoteLossError) as error:
        HEADS.build(cfg.model)
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert "'FocalLos'" in error.value.details and "FocalLoss" in error.value.details


def test_unknown_parameter_fails_at_build(mmdet_module, target):
    with pytest.raises(RemoteLossError) as error:
        MODELS.build(dict(type="RemoteLoss", loss="FocalLoss", use_sigmoid=True, gama=2.0, target=target))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "gama" in error.value.details


def test_use_sigmoid_hidden_from_the_head_is_refused(mmdet_module, target):
    loss_cls = "dict(type='RemoteLoss', loss=dict(type='FocalLoss', use_sigmoid=True), target=target)"
    cfg = Config.fromstring(config_text(target, loss_cls, FORMS["flat"][1]), ".py")
    with pytest.raises(ValueError, match=r"use_sigmoid=True is inside loss=dict\(\.\.\.\)") as error:
        HEADS.build(cfg.model)
    assert "dict(type='RemoteLoss', loss='FocalLoss', use_sigmoid=True, ...)" in str(error.value)


def test_parameter_given_twice_with_two_values_is_refused(mmdet_module, target):
    with pytest.raises(ValueError, match=r"gamma: 3\.0 in loss=dict\(\.\.\.\) vs 2\.0 at the top level"):
        MODELS.build(dict(type="RemoteLoss", loss=dict(type="FocalLoss", gamma=3.0), gamma=2.0, target=target))
    with pytest.raises(ValueError, match="needs a 'type'"):
        MODELS.build(dict(type="RemoteLoss", loss=dict(gamma=2.0), target=target))


@pytest.mark.slow
def test_import_without_mmengine_says_how_to_install_it():
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mmengine"] = None  # as if mmengine were not installed
        try:
            import {MODULE}
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("imported without mmengine")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "needs mmengine" in done.stdout and "pip install 'losswire[mmdet]'" in done.stdout


# -- the example config ------------------------------------------------------------------------------


def test_example_config_builds_and_matches_retinanet_losses(mmdet_module, target, tmp_path, monkeypatch):
    """examples/mmdet_config/retinanet_remote_loss.py without its mmdet _base_ (mmdet is not installed
    here): its import line and loss dicts build, and compute RetinaNet's local losses."""
    lines = EXAMPLE.read_text().splitlines(keepends=True)
    base_lines = [line for line in lines if line.startswith("_base_")]
    assert len(base_lines) == 1, "the example inherits RetinaNet's config from mmdet"
    config = tmp_path / EXAMPLE.name
    config.write_text("".join(line for line in lines if not line.startswith("_base_")))
    monkeypatch.setenv("LOSSWIRE_TARGET", target)
    cfg = Config.fromfile(str(config))
    assert cfg.custom_imports["imports"] == [MODULE]
    bbox_head = cfg.model.bbox_head
    head = HEADS.build(
        dict(type="TinyHead", in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, **bbox_head)  # the example's losses
    )
    assert head.loss_cls.client.target == target
    assert head.use_sigmoid_cls is True
    retinanet_cls = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)
    retinanet_bbox = dict(type="L1Loss", loss_weight=1.0)
    local = copy.deepcopy(head)
    local.loss_cls, local.loss_bbox = LOSSES.build(retinanet_cls), LOSSES.build(retinanet_bbox)
    batch = make_batch(seed=4)
    (remote_losses, remote_grads), (local_losses, local_grads) = (
        losses_and_grads(head, batch),
        losses_and_grads(local, batch),
    )
    for name in local_losses:
        torch.testing.assert_close(remote_losses[name], local_losses[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in local_grads:
        torch.testing.assert_close(remote_grads[name], local_grads[name], rtol=1e-5, atol=1e-7, msg=name)
