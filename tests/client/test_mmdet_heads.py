"""Drop-in gaps met training real mmdet 3.3 heads through ``type='RemoteLoss'``, each closed and checked.

Heads here are built by mmengine's real registry. ``LevelHead`` is what mmdet's anchor heads do with their
losses: one call per FPN level with ``avg_factor=`` (``AnchorHead.loss_by_feat_single`` through
``multi_apply``). Where mmdet's own classes are needed (``DynamicRoIHead``, ``RetinaHead``, mmdet's GHM
modules) the test takes the ``mmdet_models`` fixture and is skipped without MMDetection. losswire's
engine in this process (a local module of the same config) is the reference otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from losswire.client import RemoteLoss
from losswire.client.targets import TARGET_ENV
from losswire.server.losses import LOSSES

try:
    from mmengine.config import ConfigDict
    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS, Registry
except ImportError:  # the optional dependency: required in CI, a skip elsewhere
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("mmengine is not installed: pip install -e '.[test]'", allow_module_level=True)

import losswire.client.mmdet as adapter

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

HEADS = Registry("model", parent=MODELS, scope="losswire_heads_test")
LEVELS = ((8, 8), (4, 4), (2, 2))  # three FPN levels of one image
CLASSES = 4


@HEADS.register_module()
class LevelHead(nn.Module):
    """The loss-facing part of mmdet's AnchorHead: the classifier and box losses once per level."""

    def __init__(self, loss_cls: Mapping, loss_bbox: Mapping) -> None:
        super().__init__()
        self.loss_cls, self.loss_bbox = HEADS.build(loss_cls), HEADS.build(loss_bbox)

    def loss(self, levels: list[dict[str, Tensor]], avg_factor: float) -> dict[str, list[Tensor]]:
        losses: dict[str, list[Tensor]] = {"loss_cls": [], "loss_bbox": []}
        for level in levels:
            losses["loss_cls"].append(
                self.loss_cls(level["cls_score"], level["labels"], level["label_weights"], avg_factor=avg_factor)
            )
            losses["loss_bbox"].append(
                self.loss_bbox(level["bbox_pred"], level["bbox_targets"], level["bbox_weights"], avg_factor=avg_factor)
            )
        return losses


def level_batches(step: int) -> list[dict[str, Tensor]]:
    """One image's anchors per level (as mmdet flattens them), labels one-hot for the GHM losses."""
    generator = torch.Generator().manual_seed(100 + step)
    levels = []
    for height, width in LEVELS:
        anchors = height * width * 3
        labels = torch.randint(0, CLASSES + 1, (anchors,), generator=generator)
        positive = (labels < CLASSES).float()[:, None]
        levels.append(
            {
                "cls_score": torch.randn(anchors, CLASSES, generator=generator, requires_grad=True),
                "labels": torch.nn.functional.one_hot(labels, CLASSES + 1)[:, :CLASSES].float(),
                "label_weights": (torch.rand(anchors, CLASSES, generator=generator) > 0.1).float(),
                "bbox_pred": torch.randn(anchors, 4, generator=generator, requires_grad=True),
                "bbox_targets": torch.randn(anchors, 4, generator=generator) * 0.1,
                "bbox_weights": positive.expand(anchors, 4).contiguous(),
            }
        )
    return levels


GHM_CLS = dict(bins=30, momentum=0.75, use_sigmoid=True, loss_weight=1.0)  # configs/ghm's RetinaNet
GHM_BBOX = dict(mu=0.02, bins=10, momentum=0.7, loss_weight=10.0)


def ghm_head(target: str) -> LevelHead:
    return HEADS.build(
        dict(
            type="LevelHead",
            loss_cls=dict(type="RemoteLoss", loss="GHMC", target=target, **GHM_CLS),
            loss_bbox=dict(type="RemoteLoss", loss="GHMR", target=target, **GHM_BBOX),
        )
    )


# -- 1. a forward taking **kwargs (GHMC) takes what the head passes -----------------------------------


def assert_head_follows_local_ghm(head: Any, avg_factor: float, steps: int = 3) -> tuple[nn.Module, nn.Module]:
    """``steps`` training steps of ``head``: every level's remote GHMC and GHMR losses equal one local
    module of each, called level by level with ``avg_factor``. Returns the local modules."""
    local_cls, local_bbox = LOSSES.build(dict(type="GHMC", **GHM_CLS)), LOSSES.build(dict(type="GHMR", **GHM_BBOX))
    for step in range(steps):
        remote = head.loss(level_batches(step), avg_factor=avg_factor)
        for index, level in enumerate(level_batches(step)):
            cls = local_cls(level["cls_score"], level["labels"], level["label_weights"], avg_factor=avg_factor)
            bbox = local_bbox(level["bbox_pred"], level["bbox_targets"], level["bbox_weights"], avg_factor=avg_factor)
            torch.testing.assert_close(remote["loss_cls"][index], cls, rtol=1e-6, atol=0, msg=f"{step}/{index}")
            torch.testing.assert_close(remote["loss_bbox"][index], bbox, rtol=1e-6, atol=0, msg=f"{step}/{index}")
    return local_cls, local_bbox


def test_ghm_losses_take_avg_factor_as_the_local_modules_do(target):
    """Every anchor head passes avg_factor=; mmdet's GHMC takes **kwargs and ignores it, GHMR takes it."""
    head = ghm_head(target)
    assert_head_follows_local_ghm(head, avg_factor=37.0)


def test_other_keywords_reach_a_kwargs_forward_and_are_refused_elsewhere(target):
    ghmc = RemoteLoss(dict(type="GHMC"), target)
    level = level_batches(0)[0]
    args = (level["cls_score"], level["labels"], level["label_weights"])
    plain = ghmc(*args)
    torch.testing.assert_close(ghmc(*args, avg_factor=5.0, anything=torch.ones(3), flag=True), plain)
    focal = RemoteLoss(dict(type="FocalLoss"), target)
    with pytest.raises(TypeError, match=r"FocalLoss: got an unexpected keyword argument 'anything'"):
        focal(level["cls_score"], level["labels"], anything=1)


# -- 3. a stateful loss keeps its state for the life of the module -------------------------------------


def test_ghm_state_carries_across_levels_and_steps_as_in_one_local_module(target):
    """RetinaHead with GHMR(momentum=0.7) calls its loss once per level: mmdet's module carries acc_sum
    across those calls (the first step's losses were up to 27x off when each call started afresh)."""
    head = ghm_head(target)
    local_cls, local_bbox = assert_head_follows_local_ghm(head, avg_factor=11.0)
    torch.testing.assert_close(head.loss_bbox.session_state()["acc_sum"], local_bbox.acc_sum)
    torch.testing.assert_close(head.loss_cls.session_state()["acc_sum"], local_cls.acc_sum)
    assert head.loss_bbox.last_session_step == 3 * len(LEVELS)


# -- 2. the module is an instance of mmdet's class (with mmdet) ------------------------------------------


def test_dynamic_roi_head_builds_and_its_beta_reaches_the_server(mmdet_models, target):
    """configs/dynamic_rcnn: DynamicRoIHead asserts isinstance(loss_bbox, SmoothL1Loss) and sets
    loss_bbox.beta to the median of its beta history during training."""
    from mmdet.models.losses import SmoothL1Loss
    from mmdet.registry import MODELS as MMDET_MODELS

    roi_head = MMDET_MODELS.build(
        dict(
            type="DynamicRoIHead",
            bbox_roi_extractor=dict(
                type="SingleRoIExtractor",
                roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                out_channels=8,
                featmap_strides=[4],
            ),
            bbox_head=dict(
                type="Shared2FCBBoxHead",
                in_channels=8,
                fc_out_channels=16,
                roi_feat_size=7,
                num_classes=3,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="RemoteLoss", loss="SmoothL1Loss", beta=1.0, loss_weight=1.0, target=target),
            ),
            train_cfg=ConfigDict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.4, neg_iou_thr=0.4, min_pos_iou=0.4),
                sampler=dict(type="RandomSampler", num=8, pos_fraction=0.25),
                pos_weight=-1,
                dynamic_rcnn=dict(iou_topk=75, beta_topk=10, update_iter_interval=1, initial_iou=0.4, initial_beta=1.0),
            ),
        )
    )
    loss_bbox = roi_head.bbox_head.loss_bbox
    assert isinstance(loss_bbox, SmoothL1Loss) and isinstance(loss_bbox, RemoteLoss)
    assert type(loss_bbox).__name__ == "RemoteSmoothL1Loss" and loss_bbox.beta == 1.0
    roi_head.iou_history, roi_head.beta_history = [0.5], list(np.float64([0.3, 0.25, 0.4]))
    _, new_beta = roi_head.update_hyperparameters()  # sets loss_bbox.beta = np.median(...) (a numpy float)
    assert new_beta == pytest.approx(0.3) and loss_bbox.cfg["beta"] == pytest.approx(0.3)
    pred, goal = torch.randn(16, 4, requires_grad=True), torch.randn(16, 4)
    local_pred = pred.detach().clone().requires_grad_()
    remote, local = loss_bbox(pred, goal), SmoothL1Loss(beta=0.3)(local_pred, goal)
    remote.backward()
    local.backward()
    torch.testing.assert_close(remote, local.detach())
    torch.testing.assert_close(pred.grad, local_pred.grad)


def test_the_module_passes_the_isinstance_checks_of_its_mmdet_class(mmdet_models, target):
    from mmdet.models.losses import GHMR, QualityFocalLoss, SmoothL1Loss

    qfl = MODELS.build(dict(type="RemoteLoss", loss="mmdet.QualityFocalLoss", use_sigmoid=True, target=target))
    assert isinstance(qfl, QualityFocalLoss) and not isinstance(qfl, SmoothL1Loss)
    ghmr = MODELS.build(dict(type="RemoteLoss", loss=dict(type="GHMR", momentum=0.7), target=target))
    assert isinstance(ghmr, GHMR) and ghmr.momentum == 0.7 and ghmr.mu == 0.02  # the server's default
    assert not ghmr.state_dict()  # mmdet's buffers (acc_sum) are the server's: the module holds none


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is not None, reason="mmdet is installed")
def test_without_mmdet_the_module_is_a_remote_loss_alone(target):
    loss = MODELS.build(dict(type="RemoteLoss", loss="SmoothL1Loss", target=target))
    assert type(loss) is adapter.MMDetRemoteLoss and adapter.mmdet_class("SmoothL1Loss") is None


def test_retina_head_with_ghm_gives_mmdets_losses(mmdet_models, target):
    """mmdet's own RetinaHead (configs/ghm) with remote GHMC / GHMR(momentum) against the same head with
    mmdet's local losses: loss_by_feat over 5 levels, two steps, and the parameter gradients."""
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.structures.bbox import HorizontalBoxes  # noqa: F401 - registers the box type
    from mmengine.structures import InstanceData

    def head(loss_cls: dict, loss_bbox: dict):
        return MMDET_MODELS.build(
            dict(
                type="RetinaHead",
                num_classes=3,
                in_channels=8,
                stacked_convs=1,
                feat_channels=8,
                anchor_generator=dict(
                    type="AnchorGenerator",
                    octave_base_scale=4,
                    scales_per_octave=3,
                    ratios=[0.5, 1.0, 2.0],
                    strides=[8, 16, 32, 64, 128],
                ),
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                loss_cls=loss_cls,
                loss_bbox=loss_bbox,
                train_cfg=ConfigDict(
                    assigner=dict(
                        type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1
                    ),
                    sampler=dict(type="PseudoSampler"),
                    allowed_border=-1,
                    pos_weight=-1,
                    debug=False,
                ),
            )
        )

    torch.manual_seed(0)
    local = head(dict(type="GHMC", **GHM_CLS), dict(type="GHMR", **GHM_BBOX))
    remote = head(
        dict(type="RemoteLoss", loss="GHMC", target=target, **GHM_CLS),
        dict(type="RemoteLoss", loss="GHMR", target=target, **GHM_BBOX),
    )
    remote.load_state_dict(local.state_dict(), strict=False)  # same weights; mmdet's GHM buffers stay local
    metas = [dict(img_shape=(128, 128), pad_shape=(128, 128), scale_factor=(1.0, 1.0))]
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        feats = [torch.randn(1, 8, 128 // s, 128 // s, generator=generator) for s in (8, 16, 32, 64, 128)]
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 120.0, 100.0]])
        gt = [InstanceData(bboxes=boxes, labels=torch.tensor([0, 2]))]
        want = local.loss_by_feat(*local(feats), gt, metas)
        got = remote.loss_by_feat(*remote(feats), gt, metas)
        for key in ("loss_cls", "loss_bbox"):
            for level, (w, g) in enumerate(zip(want[key], got[key], strict=True)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=f"step {step} {key} level {level}")
    torch.testing.assert_close(remote.loss_bbox.session_state()["acc_sum"], local.loss_bbox.acc_sum)


# -- 7 and 9: the default target, and the run's log names what computes each loss ------------------------


def test_the_adapter_dials_losswire_target_by_default(monkeypatch, target):
    monkeypatch.setenv(TARGET_ENV, target)
    loss = MODELS.build(dict(type="RemoteLoss", loss="L1Loss"))  # no target: the environment's
    assert loss.client.target == target and loss.loss_weight == 1.0  # described by that server


def test_the_run_log_names_each_loss_type_once(target):
    logger = MMLogger.get_instance(f"losswire-provenance-{uuid.uuid4().hex}")  # a new run's logger
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # mmengine logs its registry lookups too
    logger.addHandler(handler)
    try:
        for _ in range(2):
            focal = MODELS.build(dict(type="RemoteLoss", loss="FocalLoss", use_sigmoid=True, target=target))
        MODELS.build(dict(type="RemoteLoss", loss="L1Loss", target=target))
    finally:
        logger.removeHandler(handler)
    lines = [line for line in lines if line.startswith("losswire")]
    assert len(lines) == 2, lines
    assert lines[0] == (
        f"losswire: FocalLoss is computed by the losswire server at {target} "
        f"(losswire {focal.server_version}, implementation {focal.implementation})"
    )
    assert focal.implementation.startswith("sha256:") and "L1Loss" in lines[1]
