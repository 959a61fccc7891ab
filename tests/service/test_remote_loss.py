"""RemoteLoss over a real server equals the in-process engine: forward and backward, for every
loss and mode, every reduction, with and without weight and avg_factor."""

from __future__ import annotations

import itertools

import pytest
import torch
from support.loss_cases import Sample, samples

from losswire.client import RemoteLoss, evaluate_terms
from losswire.server.losses import build_loss

SAMPLES = list(samples(torch.float32, seed=3))


def _calls(sample: Sample):
    reductions = sample.supports_reductions
    for reduction, use_weight, avg_factor in itertools.product(reductions, (False, True), (None, 2.5)):
        if sample.cfg.get("use_mask"):
            if avg_factor is not None or not use_weight:
                continue  # mask mode: mean only, and its "weight" slot holds the class indices
        elif avg_factor is not None and reduction == "sum":
            continue  # an error, tested in test_service_errors
        yield reduction, use_weight, avg_factor


def _leaves(sample: Sample):
    """Fresh copies of pred and the target, with requires_grad on pred and float targets."""
    pred, target = sample.args
    pred = pred.clone().requires_grad_()
    if isinstance(target, tuple):
        target = tuple(t.clone().requires_grad_() if t.is_floating_point() else t.clone() for t in target)
    elif target.is_floating_point() and sample.float_target:
        target = target.clone().requires_grad_()
    return pred, target


def _grads(pred, target):
    items = [pred, *(target if isinstance(target, tuple) else (target,))]
    return [t.grad for t in items if t.requires_grad]


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_remote_equals_local(sample: Sample, target: str):
    remote = RemoteLoss(sample.cfg, target=target)
    local = build_loss(sample.cfg)
    for reduction, use_weight, avg_factor in _calls(sample):
        kwargs = {"avg_factor": avg_factor}
        if not sample.cfg.get("use_mask"):
            kwargs["reduction_override"] = reduction
        weight = sample.weight if use_weight else None
        results = []
        for module in (local, remote):
            pred, tgt = _leaves(sample)
            out = module(pred, tgt, weight, **kwargs)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)) if out.dim() else None
            out.backward(upstream)
            results.append((out.detach(), _grads(pred, tgt)))
        (want, want_grads), (got, got_grads) = results
        context = f"{sample.id} reduction={reduction} weight={use_weight} avg_factor={avg_factor}"
        assert got.dtype == want.dtype and got.shape == want.shape, context
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m, c=context: f"{c}: {m}")
        assert len(got_grads) == len(want_grads) >= 1
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=lambda m, c=context: f"{c} grad: {m}")


def test_float64_and_half_round_trip(target: str):
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        pred = torch.randn(5, 4, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, 5, (5,), dtype=torch.int32)  # any integer dtype travels
        out = RemoteLoss(dict(type="FocalLoss"), target=target)(pred, labels)
        assert out.dtype == dtype
        out.backward()
        assert pred.grad.dtype == dtype
        ref_pred = pred.detach().clone().requires_grad_()
        build_loss(dict(type="FocalLoss"))(ref_pred, labels).backward()
        torch.testing.assert_close(pred.grad, ref_pred.grad)


def test_signature_is_mmdets(target: str):
    ce = RemoteLoss(dict(type="CrossEntropyLoss"), target=target)
    assert ce.input_names == ["cls_score", "label", "weight", "avg_factor", "reduction_override", "ignore_index"]
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 2, 1])
    # keyword names and positions as mmdet's module takes them
    a = ce(cls_score=logits, label=labels, ignore_index=2)
    b = ce(logits, labels, None, None, None, 2)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, build_loss(dict(type="CrossEntropyLoss"))(logits, labels, ignore_index=2))
    with pytest.raises(TypeError):
        ce(logits, labels, bogus=1)
    with pytest.raises(TypeError):
        ce(logits)


def test_several_terms_in_one_round_trip(target: str):
    torch.manual_seed(0)
    cls_score = torch.randn(8, 5, requires_grad=True)
    labels = torch.randint(0, 6, (8,))
    boxes = torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 6], [2, 2, 3, 3], [0, 0, 2, 2]])
    bbox_pred = (boxes + 0.3 * torch.randn(4, 4)).requires_grad_()
    dfl_pred = torch.randn(16, 8, requires_grad=True)
    dfl_target = torch.rand(16) * 6.5
    loss_cls = RemoteLoss(dict(type="QualityFocalLoss", loss_weight=1.0), target=target)
    loss_bbox = RemoteLoss(dict(type="GIoULoss", loss_weight=2.0), target=target)
    loss_dfl = RemoteLoss(dict(type="DistributionFocalLoss", loss_weight=0.25), target=target)
    score = torch.rand(8)
    losses = evaluate_terms(
        {
            "loss_cls": (loss_cls, (cls_score, (labels, score)), {"avg_factor": 4.0}),
            "loss_bbox": (loss_bbox, (bbox_pred, boxes), {}),
            "loss_dfl": (loss_dfl, (dfl_pred, dfl_target), {"reduction_override": "sum"}),
        }
    )
    assert list(losses) == ["loss_cls", "loss_bbox", "loss_dfl"]
    sum(losses.values()).backward()

    local = [
        (build_loss(loss.cfg), args, kwargs)
        for loss, args, kwargs in [
            (loss_cls, (cls_score, (labels, score)), {"avg_factor": 4.0}),
            (loss_bbox, (bbox_pred, boxes), {}),
            (loss_dfl, (dfl_pred, dfl_target), {"reduction_override": "sum"}),
        ]
    ]
    leaves = [t.detach().clone().requires_grad_() for t in (cls_score, bbox_pred, dfl_pred)]
    total = 0
    for (module, args, kwargs), leaf, name in zip(local, leaves, losses, strict=True):
        value = module(leaf, *args[1:], **kwargs)
        torch.testing.assert_close(losses[name].detach(), value.detach())
        total = total + value
    total.backward()
    for remote_leaf, leaf in zip((cls_score, bbox_pred, dfl_pred), leaves, strict=True):
        torch.testing.assert_close(remote_leaf.grad, leaf.grad)


def test_no_grad_requests_no_gradients(target: str, client):
    pred = torch.randn(4, 3, requires_grad=True)
    loss = RemoteLoss(dict(type="FocalLoss"), target=target)
    with torch.no_grad():
        out = loss(pred, torch.tensor([0, 1, 2, 3]))
    assert not out.requires_grad
    eval_pred = torch.randn(4, 3)  # no requires_grad: nothing to differentiate
    assert not loss(eval_pred, torch.tensor([0, 1, 2, 3])).requires_grad


def test_server_reports_timings_and_device(client, server):
    from losswire.v1 import loss_service_pb2 as pb
    from losswire.wire import codec

    request = pb.EvaluateRequest()
    term = request.terms.add(name="loss")
    codec.encode_config({"type": "L1Loss"}, term.config)
    codec.encode_tensor(torch.ones(3, 4), term.pred)
    codec.encode_value(torch.zeros(3, 4), term.target)
    response = client.evaluate(request)
    assert response.device == str(server.device)
    assert response.timings.compute_ms > 0 and response.timings.decode_ms >= 0 and response.timings.encode_ms >= 0
    result = response.results[0]
    assert result.name == "loss" and result.output == "scalar" and result.separable
    assert codec.decode_tensor(result.loss, "loss").item() == 1.0
    torch.testing.assert_close(codec.decode_tensor(result.gradients["pred"], "g"), torch.full((3, 4), 1 / 12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_on_the_caller_side(target: str):
    pred = torch.randn(6, 4, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5, (6,), device="cuda")
    out = RemoteLoss(dict(type="FocalLoss", reduction="none"), target=target)(pred, labels)
    assert out.is_cuda and out.shape == (6, 4)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert pred.grad.is_cuda
    ref = pred.detach().clone().requires_grad_()
    build_loss(dict(type="FocalLoss", reduction="none"))(ref, labels).backward(upstream)
    torch.testing.assert_close(pred.grad, ref.grad)


def test_remote_loss_pickles_and_deep_copies(target: str):
    import copy
    import pickle

    loss = RemoteLoss(dict(type="SmoothL1Loss", beta=0.5), target=target)
    pred, goal = torch.randn(3, 4), torch.randn(3, 4)
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert clone.cfg == loss.cfg and clone.client.target == target
        torch.testing.assert_close(clone(pred, goal), loss(pred, goal))


def test_a_changed_config_is_sent_changed(target: str):
    """The encoded config is cached per module: editing ``cfg`` in place, or a value of another type
    (1.0 -> 2.0, a nested list), is what the next call sends."""
    cfg = dict(type="CrossEntropyLoss", class_weight=[1.0, 1.0, 1.0, 1.0])
    loss = RemoteLoss(cfg, target=target)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 2, 1])
    first = loss(logits, labels)
    torch.testing.assert_close(first, build_loss(cfg)(logits, labels))
    loss.cfg["loss_weight"] = 2.0
    torch.testing.assert_close(loss(logits, labels), 2 * first)
    loss.cfg["class_weight"][0] = 3.0  # nested, in place
    expected = build_loss(dict(loss.cfg))(logits, labels)
    torch.testing.assert_close(loss(logits, labels), expected)
    assert not torch.allclose(expected, 2 * first)


def test_binding_errors_are_mmdets(target: str):
    """The quick binding of common calls refuses what Signature.bind refuses, with its TypeError."""
    focal = RemoteLoss(dict(type="FocalLoss"), target=target)
    pred, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(focal(pred, labels, None, 2.0), focal(pred, labels, avg_factor=2.0))
    torch.testing.assert_close(focal(pred, target=labels), focal(pred, labels))
    with pytest.raises(TypeError, match="multiple values"):
        focal(pred, labels, target=labels)
    with pytest.raises(TypeError, match="missing"):
        focal(pred, weight=None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        focal(pred, labels, sample_labels=labels)  # a sampler's argument, without a sampler
    with pytest.raises(TypeError, match="too many"):
        focal(pred, labels, None, None, None, None)
