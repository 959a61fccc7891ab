"""The fused loss-and-gradient kernels (server/losses/fused/) against the autograd path.

Every case evaluates one term twice in process, with ``Evaluator(fused=True)`` and
``Evaluator(fused=False)`` (the autograd path, itself checked against mmdet's recorded fixtures), and
requires the same TermOutcome: structure, output kind, gradient keys, loss and gradient of the same
dtype and shape, values equal within

* loss: float32 rtol 1e-6 / atol 1e-7, float64 rtol 1e-13 / atol 1e-15 (the kernels hand their
  element-wise loss to the module's own reduction, so it is in practice bit-identical);
* gradient: float32 rtol 1e-5, float64 rtol 1e-12, with atol = the same factor times the largest
  |gradient| of the case (loose enough for another device's rounding; on the CPU every kernel but
  CE is bit-identical, checked by test_bit_identical_to_autograd_except_cross_entropy).

Where the autograd path raises, the fused evaluator must raise the same error (type and message).
The cases that a kernel does not cover must fall back (``outcome.fused == ""``) and agree bit for bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.loss_cases import cloned
from torch import Tensor

from losswire.client import RemoteLoss
from losswire.server.evaluation import Evaluator, TermOutcome, TermRequest
from losswire.server.losses import LOSSES, build_loss, fused
from losswire.server.losses.focal import FocalLoss

FUSED, AUTOGRAD = Evaluator(fused=True), Evaluator(fused=False)
DTYPES = (torch.float32, torch.float64)
LOSS_TOL = {torch.float32: (1e-6, 1e-7), torch.float64: (1e-13, 1e-15)}
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
N, C = 37, 7


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _term(cfg: dict, pred: Tensor, target: Any, **fields: Any) -> TermRequest:
    fields = {k: cloned(v) for k, v in fields.items()}
    return TermRequest(name="t", config=dict(cfg), pred=pred.clone(), target=cloned(target), **fields)


def _gradient(outcome: TermOutcome) -> Tensor:
    (part,) = outcome.parts
    return {**part.gradients, **outcome.gradients}["pred"]


def _assert_same_outcome(auto: TermOutcome, fast: TermOutcome) -> None:
    assert (fast.structure, fast.separable, fast.sample_axis) == (auto.structure, auto.separable, auto.sample_axis)
    assert [(p.key, p.output, sorted(p.gradients)) for p in fast.parts] == [
        (p.key, p.output, sorted(p.gradients)) for p in auto.parts
    ]
    assert sorted(fast.gradients) == sorted(auto.gradients)
    assert (fast.loss.dtype, fast.loss.shape) == (auto.loss.dtype, auto.loss.shape)
    rtol, atol = LOSS_TOL[auto.loss.dtype]
    torch.testing.assert_close(fast.loss, auto.loss, rtol=rtol, atol=atol)
    grad_auto, grad_fast = _gradient(auto), _gradient(fast)
    assert (grad_fast.dtype, grad_fast.shape) == (grad_auto.dtype, grad_auto.shape)
    rtol = GRAD_RTOL[grad_auto.dtype]
    scale = float(grad_auto.abs().max()) if grad_auto.numel() else 0.0
    torch.testing.assert_close(grad_fast, grad_auto, rtol=rtol, atol=rtol * scale)


def compare(make: Callable[[], TermRequest], expect_fused: bool) -> TermOutcome | None:
    """Evaluate ``make()`` on both paths; the same outcome, or the same error. Returns the fused outcome."""
    try:
        auto = AUTOGRAD.evaluate(make())
    except Exception as error:  # any error must be reproduced as is
        with pytest.raises(type(error)) as caught:
            FUSED.evaluate(make())
        assert str(caught.value) == str(error)
        assert getattr(caught.value, "field", None) == getattr(error, "field", None)
        return None
    fast = FUSED.evaluate(make())
    assert auto.fused == ""
    if expect_fused:
        assert fast.fused, "the fused kernel did not run"
    _assert_same_outcome(auto, fast)
    return fast


def _logits(dtype: torch.dtype, n: int = N, c: int = C, seed: int = 0) -> Tensor:
    return (torch.randn(n, c, generator=_gen(seed), dtype=torch.float64) * 4).to(dtype)


def _labels(n: int = N, high: int = C + 1, seed: int = 1) -> Tensor:
    return torch.randint(0, high, (n,), generator=_gen(seed))


def _boxes(dtype: torch.dtype, n: int = N, seed: int = 2) -> Tensor:
    corner = torch.rand(n, 2, generator=_gen(seed), dtype=torch.float64) * 10
    size = torch.rand(n, 2, generator=_gen(seed + 1), dtype=torch.float64) * 5 + 0.5
    return torch.cat([corner, corner + size], dim=1).to(dtype)


REDUCTIONS = ("mean", "sum", "none")
AVG_FACTORS = (None, 0.0, 7.5)


# -- FocalLoss -----------------------------------------------------------------------------------------


def _focal_weight(kind: str, dtype: torch.dtype) -> Tensor | None:
    shapes = {"none": None, "N": (N,), "NC": (N, C), "flat": (N * C,)}
    shape = shapes[kind]
    return None if shape is None else torch.rand(shape, generator=_gen(5), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.5), (1.0, 0.75), (1.5, 0.25), (3.0, 0.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_matches_autograd(dtype, gamma, alpha, reduction):
    pred, labels = _logits(dtype), _labels()
    for weight_kind, avg_factor, loss_weight in itertools.product(("none", "N", "NC", "flat"), AVG_FACTORS, (1.0, 0.5)):
        cfg = {"type": "FocalLoss", "gamma": gamma, "alpha": alpha, "loss_weight": loss_weight}
        weight = _focal_weight(weight_kind, dtype)

        def make(cfg=cfg, weight=weight, avg_factor=avg_factor):
            return _term(cfg, pred, labels, weight=weight, avg_factor=avg_factor, reduction_override=reduction)

        compare(make, expect_fused=not (reduction == "sum" and avg_factor is not None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_focal_extreme_logits_and_label_dtypes(dtype):
    pred = torch.tensor([[40.0, -40.0, 0.0], [-120.0, 120.0, 17.0], [1e-3, -20.0, 30.0]], dtype=dtype)
    for labels in (torch.tensor([0, 1, 3]), torch.tensor([3, 3, 3], dtype=torch.int32), torch.tensor([2, 0, 1])):
        for reduction in REDUCTIONS:
            compare(
                lambda labels=labels, r=reduction: _term({"type": "FocalLoss"}, pred, labels, reduction_override=r),
                True,
            )


# -- QualityFocalLoss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [2.0, 1.0, 0.0, 3.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_qfl_matches_autograd(dtype, beta, reduction):
    pred = _logits(dtype)
    labels = _labels(high=C + 2) - 1  # -1 and C + 1 are negatives too, as in the module
    scores = torch.rand(N, generator=_gen(3), dtype=dtype)
    scores[:3] = torch.sigmoid(pred[torch.arange(3), labels[:3].clamp(0, C - 1)])  # |y - p| = 0: sign(0)
    for use_weight, avg_factor, loss_weight in itertools.product((False, True), AVG_FACTORS, (1.0, 2.0)):
        cfg = {"type": "QualityFocalLoss", "beta": beta, "loss_weight": loss_weight}
        weight = torch.rand(N, generator=_gen(4), dtype=dtype) if use_weight else None

        def make(cfg=cfg, weight=weight, avg_factor=avg_factor):
            return _term(
                cfg, pred, (labels, scores), weight=weight, avg_factor=avg_factor, reduction_override=reduction
            )

        compare(make, expect_fused=not (reduction == "sum" and avg_factor is not None))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e30])
def test_qfl_reads_a_score_only_where_its_row_has_a_positive_column(value):
    """mmdet's quality_focal_loss reads ``score[pos]`` alone: a row whose label is the background, or out of
    range, is all negative whatever its score. So a NaN or Inf there changes nothing (a NaN or Inf in a
    positive row does, as in mmdet)."""
    pred, labels = _logits(torch.float64), _labels(high=C + 2) - 1
    scores = torch.rand(N, generator=_gen(3), dtype=torch.float64)
    negative = [i for i in range(N) if not 0 <= int(labels[i]) < C][:3]
    positive = next(i for i in range(N) if 0 <= int(labels[i]) < C)
    changed = scores.clone()
    changed[negative] = value
    cfg = {"type": "QualityFocalLoss", "beta": 2.0}
    for evaluator in (AUTOGRAD, FUSED):
        want = evaluator.evaluate(_term(cfg, pred, (labels, scores), reduction_override="none"))
        got = evaluator.evaluate(_term(cfg, pred, (labels, changed), reduction_override="none"))
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
        torch.testing.assert_close(_gradient(got), _gradient(want), rtol=0, atol=0)
        changed_positive = scores.clone()
        changed_positive[positive] = float("nan")
        loss = evaluator.evaluate(_term(cfg, pred, (labels, changed_positive), reduction_override="none")).loss
        assert loss[positive].isnan() and loss.isnan().sum() == 1


# -- CrossEntropyLoss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("class_weight", [None, [0.5, 1.0, 2.0, 0.0, 1.5, 3.0, 0.25]])
@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_matches_autograd(dtype, reduction, class_weight, avg_non_ignore):
    pred = _logits(dtype)
    labels = _labels(high=C)
    labels[::5] = -100
    labels[1::7] = 2
    ignore_options = [
        ({}, {}),
        ({"ignore_index": 2}, {}),
        ({}, {"ignore_index": 2}),
        ({"ignore_index": 4}, {"ignore_index": -100}),
    ]
    for (cfg_ignore, call_ignore), use_weight, avg_factor in itertools.product(
        ignore_options, (False, True), AVG_FACTORS
    ):
        cfg = {
            "type": "CrossEntropyLoss",
            "class_weight": class_weight,
            "avg_non_ignore": avg_non_ignore,
            "loss_weight": 0.7,
            **cfg_ignore,
        }
        weight = torch.rand(N, generator=_gen(6), dtype=dtype) if use_weight else None

        def make(cfg=cfg, weight=weight, avg_factor=avg_factor, inputs=call_ignore):
            return _term(
                cfg, pred, labels, weight=weight, avg_factor=avg_factor, reduction_override=reduction, inputs=inputs
            )

        compare(make, expect_fused=not (reduction == "sum" and avg_factor is not None))


def test_cross_entropy_all_ignored_and_label_weight_rounding():
    pred = _logits(torch.float64)
    ignored = torch.full((N,), -100)
    odd_weight = torch.full((N,), 0.1, dtype=torch.float64)  # 0.1 is not a float32: mmdet rounds it
    for cfg in ({"type": "CrossEntropyLoss", "avg_non_ignore": True}, {"type": "CrossEntropyLoss"}):
        compare(lambda cfg=cfg: _term(cfg, pred, ignored), True)
        compare(lambda cfg=cfg: _term(cfg, pred, _labels(high=C), weight=odd_weight), True)


# -- SmoothL1Loss / L1Loss ----------------------------------------------------------------------------


REGRESSION_WEIGHTS = ("none", "N4", "N1", "4", "scalar")


def _regression_weight(kind: str, dtype: torch.dtype) -> Tensor | None:
    shapes = {"none": None, "N4": (N, 4), "N1": (N, 1), "4": (4,), "scalar": ()}
    shape = shapes[kind]
    if shape is None:
        return None
    weight = torch.rand(shape, generator=_gen(7), dtype=dtype)
    return weight.masked_fill(weight < 0.3, 0.0) if weight.dim() else weight + 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "cfg", [{"type": "L1Loss"}, {"type": "SmoothL1Loss"}, {"type": "SmoothL1Loss", "beta": 0.11}], ids=str
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_regression_matches_autograd(dtype, cfg, reduction):
    pred, target = _boxes(dtype), _boxes(dtype, seed=9)
    target[:4] = pred[:4]  # d = 0
    if "beta" in cfg:
        target[4, 0] = pred[4, 0] - cfg["beta"]  # |d| == beta: the boundary
    for weight_kind, avg_factor, loss_weight in itertools.product(REGRESSION_WEIGHTS, AVG_FACTORS, (1.0, 3.0)):
        full = {**cfg, "loss_weight": loss_weight}
        weight = _regression_weight(weight_kind, dtype)

        def make(full=full, weight=weight, avg_factor=avg_factor):
            return _term(full, pred, target, weight=weight, avg_factor=avg_factor, reduction_override=reduction)

        compare(make, expect_fused=not (reduction == "sum" and avg_factor is not None))


# -- GIoULoss ----------------------------------------------------------------------------------------


def _giou_boxes(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    pred, target = _boxes(dtype), _boxes(dtype, seed=11)
    target[0] = pred[0]  # identical
    target[1] = pred[1] + torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype) * (pred[1, 2] - pred[1, 0])  # touching
    target[2] = pred[2] + 50  # disjoint
    pred[3, 2] = pred[3, 0]  # zero width
    pred[4], target[4] = torch.tensor([0.0, 0, 2, 2], dtype=dtype), torch.tensor([1.0, 0, 3, 2], dtype=dtype)  # ties
    pred[5], target[5] = (
        torch.tensor([1.0, 1, 1, 1], dtype=dtype),
        torch.tensor([1.0, 1, 1, 1], dtype=dtype),
    )  # empty boxes
    # touching along x (intersection width exactly 0), union != enclosing area
    pred[6], target[6] = torch.tensor([0.0, 0, 2, 2], dtype=dtype), torch.tensor([2.0, 0, 4, 3], dtype=dtype)
    # union == enclosing area == 0.5: exactly the floor when eps = 0.5 (clamp's backward passes at equality)
    pred[7], target[7] = torch.tensor([0.0, 0, 1, 0.5], dtype=dtype), torch.tensor([0.0, 0, 0.5, 0.5], dtype=dtype)
    return pred, target


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_giou_matches_autograd(dtype, eps, reduction):
    pred, target = _giou_boxes(dtype)
    weights = {
        "none": None,
        "N": torch.rand(N, generator=_gen(12), dtype=dtype),
        "N4": torch.rand(N, 4, generator=_gen(13), dtype=dtype),
    }
    for weight, avg_factor, loss_weight in itertools.product(weights.values(), AVG_FACTORS, (1.0, 2.0)):
        cfg = {"type": "GIoULoss", "eps": eps, "loss_weight": loss_weight}

        def make(cfg=cfg, weight=weight, avg_factor=avg_factor):
            return _term(cfg, pred, target, weight=weight, avg_factor=avg_factor, reduction_override=reduction)

        compare(make, expect_fused=not (reduction == "sum" and avg_factor is not None))


def test_giou_batched_boxes():
    pred, target = _boxes(torch.float64, n=12).view(3, 4, 4), _boxes(torch.float64, n=12, seed=5).view(3, 4, 4)
    for reduction in REDUCTIONS:
        compare(lambda r=reduction: _term({"type": "GIoULoss"}, pred, target, reduction_override=r), True)


# -- shared edge cases -------------------------------------------------------------------------------


def _cases(dtype: torch.dtype, n: int) -> list[tuple[dict, Tensor, Any]]:
    """One call of each fused loss with ``n`` rows."""
    pred, boxes = _logits(dtype, n=n), _boxes(dtype, n=n)
    labels = _labels(n=n)
    return [
        ({"type": "FocalLoss"}, pred, labels),
        ({"type": "QualityFocalLoss"}, pred, (labels, torch.rand(n, generator=_gen(3), dtype=dtype))),
        ({"type": "CrossEntropyLoss"}, pred, labels.clamp(max=C - 1)),
        ({"type": "SmoothL1Loss"}, boxes, _boxes(dtype, n=n, seed=7)),
        ({"type": "L1Loss"}, boxes, _boxes(dtype, n=n, seed=7)),
        ({"type": "GIoULoss"}, boxes, _boxes(dtype, n=n, seed=7)),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batches(dtype, reduction):
    for cfg, pred, target in _cases(dtype, 0):
        for avg_factor in (None, 3.0):
            fast = compare(
                lambda c=cfg, p=pred, t=target, a=avg_factor: _term(
                    c, p, t, reduction_override=reduction, avg_factor=a
                ),
                True,
            )
            assert fast is None or fast.loss.numel() == 0 or float(fast.loss) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upstream_gradient_of_a_recompute(dtype):
    for cfg, pred, target in _cases(dtype, N):
        for reduction in REDUCTIONS:
            shape = AUTOGRAD.evaluate(_term(cfg, pred, target, reduction_override=reduction)).loss.shape
            upstream = torch.randn(shape, generator=_gen(21), dtype=dtype)
            fast = compare(
                lambda c=cfg, p=pred, t=target, r=reduction, u=upstream: _term(
                    c, p, t, reduction_override=r, grad_output=u
                ),
                True,
            )
            assert fast.gradients and not fast.parts[0].gradients
            # a wrong upstream shape is the same error on both paths
            compare(
                lambda c=cfg, p=pred, t=target, r=reduction: _term(
                    c, p, t, reduction_override=r, grad_output=torch.ones(3, 5)
                ),
                True,
            )


def test_errors_are_the_autograd_paths():
    pred = _logits(torch.float32)
    boxes = _boxes(torch.float32)
    bad = [
        ({"type": "FocalLoss"}, pred, torch.full((N,), C + 1), {}),  # label beyond background
        ({"type": "FocalLoss"}, pred, torch.full((N,), -1), {}),
        ({"type": "FocalLoss"}, pred, _labels()[:5], {}),  # wrong length
        ({"type": "FocalLoss"}, pred, _labels(), {"weight": torch.ones(N + 1)}),
        ({"type": "FocalLoss"}, pred, _labels(), {"avg_factor": 2.0, "reduction_override": "sum"}),
        ({"type": "FocalLoss"}, pred, _labels(), {"reduction_override": "median"}),
        ({"type": "QualityFocalLoss"}, pred, (_labels(),), {}),
        ({"type": "QualityFocalLoss"}, pred, (_labels(), torch.ones(N, dtype=torch.int64)), {}),
        ({"type": "CrossEntropyLoss"}, pred, torch.full((N,), C), {}),  # no background column in softmax CE
        ({"type": "CrossEntropyLoss", "class_weight": [1.0, 2.0]}, pred, _labels(high=C), {}),
        ({"type": "CrossEntropyLoss"}, pred, _labels(high=C), {"weight": torch.ones(N, 2)}),
        ({"type": "SmoothL1Loss"}, boxes, boxes[:, :2], {}),
        ({"type": "L1Loss"}, boxes, boxes, {"weight": torch.ones(N, 3)}),
        ({"type": "GIoULoss"}, boxes[:, :3], boxes[:, :3], {}),
        ({"type": "GIoULoss"}, boxes, boxes, {"weight": torch.ones(N, 2)}),
    ]
    for cfg, p, target, fields in bad:
        before = sum(fused.CALLS.values())
        assert compare(lambda c=cfg, p=p, t=target, f=fields: _term(c, p, t, **f), False) is None, cfg
        assert sum(fused.CALLS.values()) == before


def _fallback(make: Callable[[], TermRequest]) -> None:
    """The fused evaluator runs autograd's path for this term: the very same numbers."""
    auto, fast = AUTOGRAD.evaluate(make()), FUSED.evaluate(make())
    assert fast.fused == ""
    torch.testing.assert_close(fast.loss, auto.loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(_gradient(fast), _gradient(auto), rtol=0, atol=0, equal_nan=True)


def test_uncovered_inputs_fall_back_to_autograd():
    pred, labels, boxes = _logits(torch.float32), _labels(), _boxes(torch.float32)
    with_nan, with_inf = pred.clone(), boxes.clone()
    with_nan[3, 2], with_inf[1, 1] = float("nan"), float("inf")
    soft = torch.rand(N, C, generator=_gen(1))
    falls_back = [
        ({"type": "FocalLoss"}, with_nan, labels, {}),  # not finite
        ({"type": "GIoULoss"}, with_inf, boxes, {}),
        ({"type": "FocalLoss"}, pred.half(), labels, {}),  # half precision
        ({"type": "FocalLoss"}, pred, soft, {}),  # dense soft targets
        ({"type": "FocalLoss", "gamma": 0.5}, pred, labels, {}),  # d q^gamma / dq infinite at 0
        ({"type": "FocalLoss", "activated": True}, torch.sigmoid(pred), labels, {}),
        ({"type": "FocalLoss"}, pred, labels, {"weight": torch.rand(N, dtype=torch.float64)}),  # promotes the loss
        ({"type": "FocalLoss"}, pred, labels, {"gradients": ["pred", "pred"]}),  # not exactly ["pred"]
        ({"type": "QualityFocalLoss"}, pred, soft, {}),
        ({"type": "CrossEntropyLoss", "use_sigmoid": True}, pred, labels, {}),
        ({"type": "CrossEntropyLoss"}, pred, soft.softmax(dim=1), {}),  # probability labels
        ({"type": "SmoothL1Loss"}, boxes, boxes + 1, {"weight": torch.zeros(N, 4)}),  # mmdet's zero-weight shortcut
        ({"type": "SmoothL1Loss"}, boxes, boxes.double(), {}),
        ({"type": "GIoULoss"}, boxes, boxes + 1, {"weight": -torch.ones(N)}),
        ({"type": "GIoULoss"}, boxes, boxes + 1, {"avg_factor": torch.tensor(3.0)}),
        ({"type": "L1Loss"}, boxes, boxes + 1, {"gradients": ["pred", "target"]}),
    ]
    for cfg, p, target, fields in falls_back:
        _fallback(lambda c=cfg, p=p, t=target, f=fields: _term(c, p, t, **f))


def test_sampler_and_switch_fall_back():
    pred, labels = _logits(torch.float32), _labels(high=C)
    cfg = {"type": "CrossEntropyLoss", "sampler": {"type": "RandomSampler", "num": 16, "pos_fraction": 0.25}}
    _fallback(lambda: _term(cfg, pred, labels, seed=3))
    term = _term({"type": "FocalLoss"}, pred, labels)
    assert Evaluator(fused=False).evaluate(term).fused == ""
    assert Evaluator().evaluate(term).fused != ""


def test_a_subclass_under_a_builtin_name_is_not_fused():
    """Only the exact classes of the table are fused: a plugin replacing FocalLoss keeps its forward."""

    class DoubledFocal(FocalLoss):
        def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
            return 2 * super().forward(pred, target, weight, avg_factor, reduction_override)

    registry = LOSSES.copy("test")
    registry.register_module(name="FocalLoss", force=True, module=DoubledFocal)
    pred, labels = _logits(torch.float64), _labels()
    plugin = Evaluator(registry, fused=True).evaluate(_term({"type": "FocalLoss"}, pred, labels))
    builtin = FUSED.evaluate(_term({"type": "FocalLoss"}, pred, labels))
    assert plugin.fused == "" and builtin.fused == "FocalLoss"
    torch.testing.assert_close(plugin.loss, 2 * builtin.loss)


def test_the_table_names_registered_losses():
    for cls, kernel in fused.FUSED_KERNELS.items():
        assert LOSSES.get(kernel.name) is cls


# -- through the real server -------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(6), ids=["focal", "qfl", "ce", "smooth_l1", "l1", "giou"])
def test_the_server_answers_with_the_fused_kernel(index, target):
    cfg, pred, tgt = _cases(torch.float32, 64)[index]
    name = cfg["type"]
    for reduction in REDUCTIONS:
        results = []
        for module in (build_loss(cfg), RemoteLoss(cfg, target=target)):
            leaf = pred.clone().requires_grad_()
            before = fused.CALLS[name]
            out = module(leaf, cloned(tgt), reduction_override=reduction)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), leaf.grad, fused.CALLS[name] - before))
        (local, local_grad, _), (remote, remote_grad, calls) = results
        assert calls == 1, f"{name} did not run its fused kernel on the server"
        torch.testing.assert_close(remote, local, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(remote_grad, local_grad, rtol=1e-5, atol=1e-5 * float(local_grad.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_to_autograd_except_cross_entropy(dtype):
    """Every kernel but CE replays autograd's backward products in autograd's order, so on the CPU
    its gradient is autograd's bit for bit (remote == local with rtol=0 in test_scale_out, and the
    chaotic toy training of test_examples, rely on it). CE's exp differs from log_softmax's backward
    kernel in the last bit on some elements: it keeps the tolerances above."""
    for cfg, pred, target in _cases(dtype, 300):
        if cfg["type"] == "CrossEntropyLoss":
            continue
        for reduction, avg_factor in (("mean", None), ("mean", 7.0), ("sum", None), ("none", None)):
            auto, fast = (
                evaluator.evaluate(_term(cfg, pred, target, reduction_override=reduction, avg_factor=avg_factor))
                for evaluator in (AUTOGRAD, FUSED)
            )
            assert fast.fused == cfg["type"]
            assert torch.equal(fast.loss, auto.loss), cfg
            assert torch.equal(_gradient(fast), _gradient(auto)), (cfg, reduction, avg_factor)


def test_shared_modules_follow_the_config():
    """The evaluator shares one module per config for the stateless classes: a changed config (a
    value, a type: 2 and 2.0 differ, as do True and 1) gets a module of its own, never the cached one."""
    evaluator = Evaluator()
    pred, labels = _logits(torch.float64), _labels()
    configs = [
        {"type": "FocalLoss", "gamma": 2.0},
        {"type": "FocalLoss", "gamma": 2.0, "loss_weight": 3.0},
        {"type": "FocalLoss", "gamma": 0.0},
        {"type": "FocalLoss", "gamma": 2.0},
    ]
    for cfg in configs * 2:
        shared = evaluator.evaluate(_term(cfg, pred, labels))
        fresh = Evaluator().evaluate(_term(cfg, pred, labels))
        assert torch.equal(shared.loss, fresh.loss) and torch.equal(_gradient(shared), _gradient(fresh))
    cached = {type(module).__name__ for module in evaluator._modules.values()}
    assert len(evaluator._modules) == 3 and cached == {"FocalLoss"}
    # a plugin's class under a built-in name is built for every call, never shared
    registry = LOSSES.copy("test-shared")

    class Counting(FocalLoss):
        built = 0

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            Counting.built += 1

    registry.register_module(name="FocalLoss", force=True, module=Counting)
    plugin = Evaluator(registry)
    for _ in range(3):
        plugin.evaluate(_term({"type": "FocalLoss"}, pred, labels))
    assert Counting.built == 3 and not plugin._modules


def test_small_terms_run_on_one_intra_op_thread():
    """A term under SERIAL_MAX_ELEMENTS computes on one intra-op thread, a big one on the evaluator's
    count; the calling thread's own setting is back afterwards either way."""
    from losswire.server.evaluation.evaluator import SERIAL_MAX_ELEMENTS
    from losswire.server.losses.smooth_l1 import L1Loss

    seen = []

    class ThreadRecorder(L1Loss):
        def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
            seen.append(torch.get_num_threads())
            return super().forward(pred, target, weight, avg_factor, reduction_override)

    registry = LOSSES.copy("test-threads")
    registry.register_module(name="ThreadRecorder", module=ThreadRecorder)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        evaluator = Evaluator(registry)
        assert evaluator.threads == 2
        torch.set_num_threads(3)  # the caller's own setting, which the evaluator must leave alone
        for numel in (8, SERIAL_MAX_ELEMENTS):
            pred = torch.randn(numel, dtype=torch.float64)
            evaluator.evaluate(_term({"type": "ThreadRecorder"}, pred, torch.zeros_like(pred)))
            assert torch.get_num_threads() == 3
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_focal_loss_in_row_blocks_is_the_whole_tensor_pass_bit_for_bit(dtype, monkeypatch):
    """Above BLOCKED_MIN_ELEMENTS FocalLoss works through cache-sized row blocks (each a multiple of
    64 elements, so no vector loop ends inside the tensor): on one thread, autograd's bits exactly,
    for every reduction, weight shape and an upstream gradient. Small block sizes stand in for the
    real ones; C = 7 makes blocks of rows whose element counts need the alignment."""
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(fused, "BLOCKED_MIN_ELEMENTS", 2000)
    n = 1003  # 7021 elements: 8 blocks of 128 rows (896 elements) and the rest
    blocks = fused.row_blocks(n, C, torch.device("cpu"))
    assert len(blocks) == 8 and all((b.stop - b.start) * C % 64 == 0 for b in blocks[:-1])
    assert fused.row_blocks(n, C, torch.device("meta")) == [slice(0, n)]  # blocks on the CPU only
    pred, labels = _logits(dtype, n=n), _labels(n=n)
    weights = (None, torch.rand(n, generator=_gen(5), dtype=dtype), torch.rand(n, C, generator=_gen(6), dtype=dtype))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cfg in ({"type": "FocalLoss"}, {"type": "FocalLoss", "gamma": 1.5, "alpha": 0.4, "loss_weight": 2.0}):
            for (reduction, avg_factor), weight in itertools.product(
                (("mean", None), ("mean", 7.0), ("sum", None), ("none", None)), weights
            ):
                fields = {"weight": weight, "reduction_override": reduction, "avg_factor": avg_factor}
                auto, fast = (e.evaluate(_term(cfg, pred, labels, **fields)) for e in (AUTOGRAD, FUSED))
                assert fast.fused == "FocalLoss"
                assert torch.equal(fast.loss, auto.loss), (cfg, reduction, avg_factor)
                assert torch.equal(_gradient(fast), _gradient(auto)), (cfg, reduction, avg_factor, weight is None)
            upstream = torch.rand(n, C, generator=_gen(8), dtype=dtype)
            fields = {"reduction_override": "none", "grad_output": upstream}
            auto, fast = (e.evaluate(_term(cfg, pred, labels, **fields)) for e in (AUTOGRAD, FUSED))
            assert torch.equal(_gradient(fast), _gradient(auto))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quality_focal_loss_in_row_blocks_is_autograd_bit_for_bit(dtype, monkeypatch):
    """QualityFocalLoss through cache-sized row blocks, as FocalLoss: on one thread, autograd's bits for
    every reduction, with a per-sample weight, an exact and a general beta, and an upstream gradient."""
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(fused, "BLOCKED_MIN_ELEMENTS", 2000)
    n = 1003
    assert len(fused.row_blocks(n, C, torch.device("cpu"))) == 8
    pred = _logits(dtype, n=n)
    labels = _labels(n=n, high=C + 2) - 1  # -1 and C are negatives too
    scores = torch.rand(n, generator=_gen(3), dtype=dtype)
    weights = (None, torch.rand(n, generator=_gen(5), dtype=dtype))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cfg in ({"type": "QualityFocalLoss"}, {"type": "QualityFocalLoss", "beta": 1.5, "loss_weight": 2.0}):
            for (reduction, avg_factor), weight in itertools.product(
                (("mean", None), ("mean", 7.0), ("sum", None), ("none", None)), weights
            ):
                fields = {"weight": weight, "reduction_override": reduction, "avg_factor": avg_factor}
                auto, fast = (e.evaluate(_term(cfg, pred, (labels, scores), **fields)) for e in (AUTOGRAD, FUSED))
                assert fast.fused == "QualityFocalLoss"
                assert torch.equal(fast.loss, auto.loss), (cfg, reduction, avg_factor)
                assert torch.equal(_gradient(fast), _gradient(auto)), (cfg, reduction, avg_factor, weight is None)
            upstream = torch.rand(n, generator=_gen(8), dtype=dtype)
            fields = {"reduction_override": "none", "grad_output": upstream}
            auto, fast = (e.evaluate(_term(cfg, pred, (labels, scores), **fields)) for e in (AUTOGRAD, FUSED))
            assert torch.equal(_gradient(fast), _gradient(auto))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_giou_loss_in_row_blocks_is_autograd_bit_for_bit(dtype, monkeypatch):
    """GIoULoss over blocks of boxes (flat and batched boxes, every reduction, [N] and [N, 4] weights,
    an upstream gradient): autograd's bits, its arithmetic being exact-rounded element-wise steps."""
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(fused, "BLOCKED_MIN_ELEMENTS", 2000)
    n = 1001
    cfg = {"type": "GIoULoss", "loss_weight": 2.0}
    for pred, target in (
        (_boxes(dtype, n=n), _boxes(dtype, n=n, seed=7)),
        (_boxes(dtype, n=2 * n).view(2, n, 4), _boxes(dtype, n=2 * n, seed=7).view(2, n, 4)),
    ):
        boxes = pred.shape[:-1]
        assert len(fused.row_blocks(pred[..., 0].numel(), 4, pred.device)) > 1
        weights = [None, torch.rand(pred.shape, generator=_gen(6), dtype=dtype)]
        if pred.dim() == 2:  # a per-box weight is mmdet's for [N, 4] boxes only
            weights.append(torch.rand(boxes, generator=_gen(5), dtype=dtype))
        for (reduction, avg_factor), weight in itertools.product(
            (("mean", None), ("mean", 7.0), ("sum", None), ("none", None)), weights
        ):
            fields = {"weight": weight, "reduction_override": reduction, "avg_factor": avg_factor}
            auto, fast = (e.evaluate(_term(cfg, pred, target, **fields)) for e in (AUTOGRAD, FUSED))
            assert fast.fused == "GIoULoss"
            assert torch.equal(fast.loss, auto.loss), (reduction, avg_factor)
            assert torch.equal(_gradient(fast), _gradient(auto)), (reduction, avg_factor, pred.dim())
        fields = {"reduction_override": "none", "grad_output": torch.rand(boxes, generator=_gen(8), dtype=dtype)}
        auto, fast = (e.evaluate(_term(cfg, pred, target, **fields)) for e in (AUTOGRAD, FUSED))
        assert torch.equal(_gradient(fast), _gradient(auto))
