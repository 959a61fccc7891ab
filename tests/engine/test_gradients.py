"""Gradients (torch.autograd.gradcheck in float64), dtypes and devices for every loss and mode."""

import pytest
import torch
from support.loss_cases import Sample, samples

from losswire.server.losses import LOSSES, build_loss, output_kind_of

SAMPLES = list(samples(torch.float64))
IDS = [s.id for s in SAMPLES]


def _float_leaves(value):
    """The float tensors in a target (a tensor or a tuple of tensors)."""
    items = value if isinstance(value, tuple) else (value,)
    return [t for t in items if t.is_floating_point()]


def _with_leaves(value, leaves):
    if isinstance(value, tuple):
        it = iter(leaves)
        return tuple(next(it) if t.is_floating_point() else t for t in value)
    return leaves[0]


def _call(sample: Sample, module, pred, target, reduction, weight=True, avg_factor=None):
    kwargs = dict(reduction_override=reduction, avg_factor=avg_factor)
    if sample.cfg.get("use_mask"):
        kwargs.pop("reduction_override")
    return module(pred, target, sample.weight if weight else None, **kwargs)


@pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
def test_gradcheck(sample: Sample):
    module = build_loss(dict(sample.cfg, loss_weight=0.7))
    pred, target = sample.args
    leaves = _float_leaves(target) if sample.float_target and sample.gradcheck_target else []
    for reduction in sample.supports_reductions:
        for avg_factor in (None, 2.5) if reduction == "mean" and not sample.cfg.get("use_mask") else (None,):

            def fn(p, *target_leaves, reduction=reduction, avg_factor=avg_factor):
                t = _with_leaves(target, list(target_leaves)) if target_leaves else target
                return _call(sample, module, p, t, reduction, avg_factor=avg_factor)

            inputs = [pred.clone().requires_grad_()] + [t.clone().requires_grad_() for t in leaves]
            assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
def test_low_precision_close_to_float64(sample: Sample, dtype):
    module = build_loss(sample.cfg)
    low = next(s for s in samples(dtype) if s.id == sample.id)
    pred64 = sample.args[0].clone().requires_grad_()
    pred = low.args[0].clone().requires_grad_()
    reduction = sample.supports_reductions[0] if sample.cfg.get("use_mask") else "mean"
    ref = _call(sample, module, pred64, sample.args[1], reduction)
    out = _call(low, module, pred, low.args[1], reduction)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.sum().backward()
    ref.sum().backward()
    assert pred.grad.dtype == dtype and torch.isfinite(pred.grad).all()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(pred.grad.double(), pred64.grad, **tol)


@pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
def test_outputs_follow_the_reduction(sample: Sample):
    module = build_loss(sample.cfg)
    pred, target = sample.args
    if sample.cfg.get("use_mask"):
        assert _call(sample, module, pred, target, "mean").shape == (1,)
        return
    none = _call(sample, module, pred, target, "none")
    kind = output_kind_of(module, LOSSES.describe(sample.cfg["type"]))
    expected = {"element": pred.shape, "sample": pred.shape[:1]}[kind.value]
    assert none.shape == expected
    assert _call(sample, module, pred, target, "sum").shape == ()
    torch.testing.assert_close(_call(sample, module, pred, target, "sum"), none.sum())
    torch.testing.assert_close(_call(sample, module, pred, target, "mean"), none.mean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
def test_cuda_matches_cpu(sample: Sample):
    module = build_loss(sample.cfg)

    def to_cuda(value):
        if isinstance(value, tuple):
            return tuple(to_cuda(v) for v in value)
        return value.cuda() if isinstance(value, torch.Tensor) else value

    pred, target = sample.args
    reduction = "mean"
    cpu = _call(sample, module, pred, target, reduction)
    cuda_sample = Sample(sample.id, sample.cfg, to_cuda(sample.args), to_cuda(sample.weight))
    gpu = _call(cuda_sample, module, to_cuda(pred), to_cuda(target), reduction)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu)
