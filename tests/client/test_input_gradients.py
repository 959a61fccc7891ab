"""Every floating-point tensor input that requires grad gets its gradient, as autograd gives it locally:
a ``weight`` or ``label_weights`` (learned loss weights, a head that weights by a differentiable score)."""

from __future__ import annotations

import pytest
import torch

from losswire.client import RemoteLoss, evaluate_terms
from losswire.server.losses import LOSSES

# (config, pred shape, weight name and shape, target): weights of each kind of loss output
CASES = {
    "element-wise": (dict(type="SmoothL1Loss", beta=0.5), (6, 4), (6, 4), "boxes"),
    "per-sample": (dict(type="CrossEntropyLoss"), (6, 5), (6,), "labels"),
    "per-sample, sigmoid": (dict(type="FocalLoss"), (6, 5), (6, 5), "labels"),
    "giou": (dict(type="GIoULoss"), (6, 4), (6,), "boxes"),
}


def target_for(kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "labels":
        return torch.randint(0, 5, (6,), generator=generator)
    corners = torch.rand(6, 2, generator=generator) * 10
    return torch.cat([corners, corners + 1 + torch.rand(6, 2, generator=generator) * 5], dim=1)


def inputs(case: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, pred_shape, weight_shape, kind = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    target = target_for(kind, generator)
    pred = target + torch.rand(pred_shape, generator=generator) if kind == "boxes" else torch.randn(pred_shape)
    return pred, target, torch.rand(weight_shape, generator=generator) + 0.1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_weight_gets_its_gradient(target, case, reduction):
    cfg = {**CASES[case][0], "reduction": reduction}
    pred, goal, weight = inputs(case)
    remote_pred, remote_weight = pred.clone().requires_grad_(), weight.clone().requires_grad_()
    local_pred, local_weight = pred.clone().requires_grad_(), weight.clone().requires_grad_()
    remote = RemoteLoss(cfg, target)(remote_pred, goal, remote_weight)
    local = LOSSES.build(cfg)(local_pred, goal, local_weight)
    upstream = torch.rand_like(local)  # any upstream gradient, not only ones
    (remote * upstream).sum().backward()
    (local * upstream).sum().backward()
    assert remote_weight.grad is not None, "the weight's gradient was dropped"
    torch.testing.assert_close(remote_weight.grad, local_weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(remote_pred.grad, local_pred.grad, rtol=1e-5, atol=1e-7)


def test_a_broadcast_weight_gets_the_exact_gradient_of_any_upstream(target):
    """A weight of shape [N, 1] on an element-wise [N, 4] loss: each weight element scales four loss
    elements, so the upstream gradient cannot be applied locally; the client recomputes exactly."""
    cfg = dict(type="SmoothL1Loss", reduction="none")
    pred, goal = torch.randn(6, 4), torch.randn(6, 4)
    weight = torch.rand(6, 1)
    remote_weight, local_weight = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    upstream = torch.rand(6, 4)
    (RemoteLoss(cfg, target)(pred, goal, remote_weight) * upstream).sum().backward()
    (LOSSES.build(cfg)(pred, goal, local_weight) * upstream).sum().backward()
    torch.testing.assert_close(remote_weight.grad, local_weight.grad)


def test_seesaws_label_weights_and_several_terms(target):
    """A weight under another name (SeesawLoss's label_weights), in one round trip with another term."""
    seesaw_cfg, l1_cfg = dict(type="SeesawLoss", num_classes=4), dict(type="L1Loss")
    generator = torch.Generator().manual_seed(3)
    scores, labels = torch.randn(8, 6, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    label_weights, box_weights = torch.rand(8, generator=generator), torch.rand(8, 4, generator=generator)
    boxes, box_targets = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    leaves = {name: t.clone().requires_grad_() for name, t in (("lw", label_weights), ("bw", box_weights))}
    seesaw, l1 = (
        RemoteLoss(seesaw_cfg, target, session=f"grad/{torch.randint(0, 2**31, ()).item()}"),
        RemoteLoss(l1_cfg, target),
    )
    remote = evaluate_terms(
        {
            "loss_cls": (seesaw, (scores, labels, leaves["lw"]), {}),
            "loss_bbox": (l1, (boxes, box_targets, leaves["bw"]), {}),
        }
    )
    (remote["loss_cls"]["loss_cls_classes"] + remote["loss_bbox"]).backward()
    local_leaves = {name: t.clone().requires_grad_() for name, t in (("lw", label_weights), ("bw", box_weights))}
    local_cls = LOSSES.build(seesaw_cfg)(scores, labels, local_leaves["lw"])
    (local_cls["loss_cls_classes"] + LOSSES.build(l1_cfg)(boxes, box_targets, local_leaves["bw"])).backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, local_leaves[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_no_gradient_is_asked_for_what_does_not_require_it(target):
    """A weight that does not require grad, or integer labels, ask for nothing more than pred's."""
    loss = RemoteLoss(dict(type="CrossEntropyLoss"), target)
    pred = torch.randn(4, 3, requires_grad=True)
    loss(pred, torch.tensor([0, 1, 2, 0]), torch.ones(4)).backward()
    assert pred.grad is not None
    with torch.no_grad():
        assert not loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(4, requires_grad=True)).requires_grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_input_the_loss_detaches_gets_no_gradient_as_locally(target, reduction):
    """KnowledgeDistillationKLDivLoss detaches its soft_label (the teacher's logits). Computed outside
    ``torch.no_grad()``, it requires grad: locally the teacher then gets no gradient at all (``.grad`` stays
    None); remotely it got zeros, which an optimizer with weight decay or momentum would act on. The
    student's gradient is the local module's either way."""
    config = dict(type="KnowledgeDistillationKLDivLoss", T=2, reduction=reduction)
    generator = torch.Generator().manual_seed(0)
    features, student = torch.randn(6, 8, generator=generator), torch.randn(6, 5, generator=generator)
    grads = []
    for loss in (RemoteLoss(config, target), LOSSES.build(config)):
        teacher = torch.nn.Linear(8, 5)
        torch.nn.init.constant_(teacher.weight, 0.1)
        torch.nn.init.constant_(teacher.bias, -0.2)
        pred = student.clone().requires_grad_(True)
        out = loss(pred, teacher(features))
        out.backward(torch.rand(out.shape, generator=torch.Generator().manual_seed(1)))
        assert teacher.weight.grad is None and teacher.bias.grad is None, type(loss).__name__
        grads.append(pred.grad)
    torch.testing.assert_close(*grads)
