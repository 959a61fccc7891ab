"""The fused kernels' closed forms, compiled for a GPU (server/losses/fused/compiled.py), against autograd.

Each case evaluates one term with an evaluator whose one-pass kernels answer, and with
``Evaluator(fused=False)`` (autograd, itself checked against mmdet's recorded fixtures), and requires
the same loss and gradient (shape, dtype, values to rounding) and that the one-pass kernel answered.

* On the CPU the closed forms run uncompiled (``OnePass(compile=False, devices=("cpu",))``), in float64
  and float32: this checks their math and their binding of every config (reductions, ``avg_factor``,
  weights of every shape, ``loss_weight``) on any machine.
* On CUDA (skipped without one) the compiled kernels run as the server runs them, in float32, against
  autograd on the same GPU; FocalLoss's hand-written Triton kernel (``focal_triton.py``) too, and with
  ``TRITON_INTERPRET=1`` (and Triton installed) under Triton's interpreter on the CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from support.loss_cases import cloned
from torch import Tensor

from losswire.server.evaluation import Evaluator, TermOutcome, TermRequest
from losswire.server.losses import fused
from losswire.server.losses.fused.compiled import OnePass

N, C = 53, 9
REDUCTIONS = ("mean", "sum", "none")
AVG_FACTORS = (None, 7.5)
CUDA = torch.cuda.is_available()
# (device, dtype, path): what a case runs on; path: "plain" torch ops, "compiled", or "by hand" (a
# hand-written kernel where the loss has one, else compiled on CUDA and plain on the CPU)
SETUPS = [("cpu", torch.float64, "plain"), ("cpu", torch.float32, "plain")]
if CUDA:
    SETUPS.append(("cuda", torch.float32, "compiled"))
TRITON = importlib.util.find_spec("triton") is not None
NEEDS_KERNEL_BY_HAND = pytest.mark.skipif(
    not TRITON or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and CUDA, or Triton's interpreter (TRITON_INTERPRET=1)",
)
BY_HAND = pytest.param("cuda" if CUDA else "cpu", torch.float32, "by hand", marks=NEEDS_KERNEL_BY_HAND, id="by hand")
BY_HAND_LOSSES = ("FocalLoss", "QualityFocalLoss")  # the losses with a hand-written kernel
LOSS_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}
GRAD_RTOL = {torch.float64: 1e-11, torch.float32: 5e-5}

AUTOGRAD = Evaluator(fused=False)


def _one_pass_evaluator(device: str, path: str) -> Evaluator:
    evaluator = Evaluator(fused=True)
    compiled = device == "cuda" and path != "plain"
    evaluator.one_pass = OnePass(compile=compiled, devices=(device,), handwritten=path == "by hand")
    return evaluator


EVALUATORS: dict[tuple[str, str], Evaluator] = {}


def _evaluator(device: str, path: str) -> Evaluator:
    key = (device, path)
    if key not in EVALUATORS:
        EVALUATORS[key] = _one_pass_evaluator(device, path)
    return EVALUATORS[key]


def _gradient(outcome: TermOutcome) -> Tensor:
    (part,) = outcome.parts
    return {**part.gradients, **outcome.gradients}["pred"]


def check(name: str, config: dict, device: str, dtype: torch.dtype, path: str, **fields: Any) -> None:
    """``config`` on ``fields`` (tensors already on the device): the one-pass answer is autograd's."""

    def term() -> TermRequest:
        return TermRequest(name="t", config=dict(config), **{k: cloned(v) for k, v in fields.items()})

    evaluator = _evaluator(device, path)
    before, by_hand = evaluator.one_pass.calls[name], evaluator.one_pass.calls_by_hand[name]
    fast, auto = evaluator.evaluate(term()), AUTOGRAD.evaluate(term())
    assert evaluator.one_pass.calls[name] == before + 1, f"{name}'s one-pass kernel did not answer {config}"
    expected_by_hand = by_hand + (path == "by hand" and name in BY_HAND_LOSSES)
    assert evaluator.one_pass.calls_by_hand[name] == expected_by_hand, f"{name} by hand: {config}"
    assert (fast.loss.shape, fast.loss.dtype) == (auto.loss.shape, auto.loss.dtype)
    scale = float(auto.loss.abs().max()) if auto.loss.numel() else 0.0
    rtol = LOSS_RTOL[dtype]
    torch.testing.assert_close(fast.loss, auto.loss, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=str(config))
    grad_fast, grad_auto = _gradient(fast), _gradient(auto)
    assert (grad_fast.shape, grad_fast.dtype, grad_fast.device) == (grad_auto.shape, grad_auto.dtype, grad_auto.device)
    rtol = GRAD_RTOL[dtype]
    scale = float(grad_auto.abs().max())
    torch.testing.assert_close(grad_fast, grad_auto, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=str(config))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(device: str, dtype: torch.dtype, seed: int = 0) -> Tensor:
    return (torch.randn(N, C, generator=_gen(seed), dtype=torch.float64) * 4).to(device, dtype)


def _rand(shape: tuple[int, ...], device: str, dtype: torch.dtype, seed: int) -> Tensor:
    return torch.rand(shape, generator=_gen(seed), dtype=torch.float64).to(device, dtype)


def _boxes(device: str, dtype: torch.dtype, seed: int) -> Tensor:
    corner = torch.rand(N, 2, generator=_gen(seed), dtype=torch.float64) * 10
    size = torch.rand(N, 2, generator=_gen(seed + 1), dtype=torch.float64) * 5 + 0.5
    return torch.cat([corner, corner + size], dim=1).to(device, dtype)


def _reductions() -> Iterator[tuple[str, float | None]]:
    """Every reduction with every avg_factor it takes ('sum' refuses one)."""
    for reduction, avg_factor in itertools.product(REDUCTIONS, AVG_FACTORS):
        if not (reduction == "sum" and avg_factor is not None):
            yield reduction, avg_factor


@pytest.mark.parametrize("device,dtype,path", [*SETUPS, BY_HAND], ids=str)
def test_focal(device, dtype, path):
    pred = _logits(device, dtype)
    labels = torch.randint(0, C + 1, (N,), generator=_gen(1)).to(device)
    weights = {"none": None, "N": (N,), "NC": (N, C), "flat": (N * C,)}
    for (gamma, alpha), weight_kind, (reduction, avg_factor) in itertools.product(
        [(2.0, 0.25), (0.0, 0.5), (1.5, 0.75)], weights, _reductions()
    ):
        shape = weights[weight_kind]
        weight = None if shape is None else _rand(shape, device, dtype, 5)
        config = {"type": "FocalLoss", "gamma": gamma, "alpha": alpha, "loss_weight": 0.5}
        check(
            "FocalLoss", config, device, dtype, path,
            pred=pred, target=labels, weight=weight, avg_factor=avg_factor, reduction_override=reduction,
        )  # fmt: skip


@pytest.mark.parametrize("device,dtype,path", [*SETUPS, BY_HAND], ids=str)
def test_quality_focal(device, dtype, path):
    pred = _logits(device, dtype)
    labels = (torch.randint(0, C + 2, (N,), generator=_gen(1)) - 1).to(device)  # -1 and C + 1: negatives
    scores = _rand((N,), device, dtype, 3)
    for beta, use_weight, (reduction, avg_factor) in itertools.product((2.0, 1.0, 0.0), (False, True), _reductions()):
        weight = _rand((N,), device, dtype, 4) if use_weight else None
        config = {"type": "QualityFocalLoss", "beta": beta, "loss_weight": 2.0}
        check(
            "QualityFocalLoss", config, device, dtype, path,
            pred=pred, target=(labels, scores), weight=weight, avg_factor=avg_factor, reduction_override=reduction,
        )  # fmt: skip


SATURATED = 800.0  # a logit whose sigmoid is exactly 1 (and -800's exactly 0) in float64 as in float32
EXPONENTS = {"FocalLoss": "gamma", "QualityFocalLoss": "beta"}


def _base_zero_fields(name: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Half the logits saturated on their label's side: FocalLoss's base q (1 - p at the label, p elsewhere)
    and QFL's m (p at a negative column) exactly 0. QFL's positive columns: +-SATURATED with a score of
    exactly 1 or 0, and 0 with a score of 0.5, where m = |score - p| is 0 and BCE log 2 (not 0)."""
    labels = torch.randint(0, C + 1, (N,), generator=_gen(1))
    t = torch.nn.functional.one_hot(labels, C + 1)[:, :C].bool()
    saturated = _rand((N, C), "cpu", torch.float64, 2) < 0.5
    pred = torch.where(saturated, torch.where(t, SATURATED, -SATURATED), _logits("cpu", torch.float64))
    if name == "FocalLoss":
        return _on(device, {"pred": pred.to(dtype), "target": labels})
    cycle = torch.arange(N) % 3
    at_label, score = torch.tensor([SATURATED, -SATURATED, 0.0])[cycle], torch.tensor([1.0, 0.0, 0.5])[cycle]
    pred = torch.where(t, at_label[:, None], pred)
    return _on(device, {"pred": pred.to(dtype), "target": (labels, score.to(dtype))})


@pytest.mark.parametrize("device,dtype,path", [*SETUPS, BY_HAND], ids=str)
@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("name", BY_HAND_LOSSES)
def test_a_base_of_zero_takes_torch_s_powers(name, exponent, device, dtype, path):
    """A base exactly 0 (a saturated sigmoid; QFL's score equal to it) with exponent 0 or 1, which random
    logits never reach: ``power_and_derivative``'s values there (0^0 = 1, and no NaN from 0 * log2 0 in
    the power or derivative) against autograd's. QFL's logit 0 with score 0.5 reads 0^0 into the loss;
    elsewhere every factor of the power and its derivative is 0 there, so only a NaN would show."""
    fields = _base_zero_fields(name, device, dtype)
    config = {"type": name, EXPONENTS[name]: exponent}
    for reduction, avg_factor in _reductions():
        check(name, config, device, dtype, path, **fields, avg_factor=avg_factor, reduction_override=reduction)


@pytest.mark.parametrize("device,dtype,path", SETUPS, ids=str)
def test_giou(device, dtype, path):
    pred, target = _boxes(device, dtype, 2), _boxes(device, dtype, 4)
    for weight_shape, (reduction, avg_factor) in itertools.product((None, (N,), (N, 4)), _reductions()):
        weight = None if weight_shape is None else _rand(weight_shape, device, dtype, 8) + 0.1
        check(
            "GIoULoss", {"type": "GIoULoss", "loss_weight": 2.0}, device, dtype, path,
            pred=pred, target=target, weight=weight, avg_factor=avg_factor, reduction_override=reduction,
        )  # fmt: skip


def test_the_cpu_keeps_its_family_kernels():
    """A server's default: one-pass kernels answer on a GPU only (the CPU's family kernels are
    autograd's bit for bit, and faster there)."""
    evaluator = Evaluator()
    term = TermRequest(
        name="t", config={"type": "FocalLoss"}, pred=_logits("cpu", torch.float32), target=torch.zeros(N).long()
    )
    assert evaluator.evaluate(term).fused == "FocalLoss"
    assert sum(evaluator.one_pass.calls.values()) == 0


def test_a_term_evaluated_on_an_event_loop_gets_the_family_kernel():
    """A quick call is evaluated on the server's event loop, where a closed form's first call (a
    compilation of seconds) would stall every other call: there the family kernel answers."""
    evaluator = _evaluator("cpu", "plain")
    pred, labels = _logits("cpu", torch.float32), torch.randint(0, C + 1, (N,), generator=_gen(1))

    def term() -> TermRequest:
        return TermRequest(name="t", config={"type": "FocalLoss"}, pred=pred.clone(), target=labels.clone())

    async def on_the_loop() -> TermOutcome:
        return evaluator.evaluate(term())

    before = evaluator.one_pass.calls["FocalLoss"]
    answer = asyncio.run(on_the_loop())
    assert answer.fused == "FocalLoss" and evaluator.one_pass.calls["FocalLoss"] == before
    evaluator.evaluate(term())  # off the loop: the closed form
    assert evaluator.one_pass.calls["FocalLoss"] == before + 1


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_big_focal_term_on_cuda_matches_autograd():
    """Sizes where the compiled kernels split their reductions: FocalLoss [262144, 80] (80 MiB)."""
    gen = torch.Generator().manual_seed(9)
    pred = (torch.randn(262144, 80, generator=gen) * 3).cuda()
    labels = torch.randint(0, 81, (262144,), generator=gen).cuda()
    for path in ("compiled", "by hand"):
        config = {"type": "FocalLoss"}
        check("FocalLoss", config, "cuda", torch.float32, path, pred=pred, target=labels, avg_factor=1000.0)


class _RecordingOnePass(OnePass):
    """The closed forms, uncompiled on the CPU, with the arguments each call passed them kept."""

    def __init__(self) -> None:
        super().__init__(compile=False, devices=("cpu",))
        self.arguments: dict[str, list[tuple]] = {}

    def _compiled_form(self, function):
        def call(*args):
            self.arguments.setdefault(function.__module__.rsplit(".", 1)[-1], []).append(args)
            return function(*args)

        return call


def _closed_form_terms(dtype: torch.dtype = torch.float32, **config: Any) -> dict[str, TermRequest]:
    """One term of each loss with a closed form; ``config`` (name -> extra config) for some of them."""
    logits, boxes = _logits("cpu", dtype), _boxes("cpu", dtype, 2)
    labels = torch.randint(0, C + 1, (N,), generator=_gen(1))
    fields = {
        "FocalLoss": {"pred": logits, "target": labels},
        "QualityFocalLoss": {"pred": logits, "target": (labels, _rand((N,), "cpu", dtype, 3))},
        "GIoULoss": {"pred": boxes, "target": _boxes("cpu", dtype, 4)},
    }
    return {
        name: TermRequest(name="t", config={"type": name, **config.get(name, {})}, **cloned(inputs))
        for name, inputs in fields.items()
    }


def test_config_values_reach_a_closed_form_as_tensors():
    """A Python number passed to a compiled function is compiled in as a constant: each new value (a
    caller's eps, gamma, beta) would compile again, for seconds, under the lock every GPU call takes."""
    evaluator = Evaluator(fused=True)
    evaluator.one_pass = recording = _RecordingOnePass()
    for name, term in _closed_form_terms().items():
        evaluator.evaluate(term)
        assert recording.calls[name] == 1, name
    assert set(recording.arguments) == {"focal", "gfocal", "iou"}
    for family, calls in recording.arguments.items():
        for args in calls:
            loose = [type(a).__name__ for a in args if not isinstance(a, (Tensor, bool))]
            assert not loose, f"{family}'s closed form was passed {loose}"


def test_a_config_value_is_made_once_per_dtype_and_device_and_the_table_is_bounded(monkeypatch):
    """On a GPU each new config tensor is a copy the host waits for, so a value is kept: the same object
    for the same value, dtype and device, a new one for any other (-0.0 is not 0.0), never more than
    ``SCALARS_KEPT`` of them."""
    monkeypatch.setattr(fused, "_scalars", {})
    like = torch.zeros(3)
    gamma = fused.scalar(2.0, like)
    assert fused.scalar(2, like) is gamma and gamma.dtype == torch.float32 and float(gamma) == 2.0
    as_double = fused.scalar(2.0, like.double())
    assert as_double is not gamma and as_double.dtype == torch.float64
    assert torch.signbit(fused.scalar(-0.0, like)) and not torch.signbit(fused.scalar(0.0, like))
    assert fused.scalar(float("nan"), like).isnan() and fused.scalar(float("inf"), like).isinf()
    with pytest.raises(fused.DeclinedError, match="does not fit"):
        fused.scalar(1e39, like)
    monkeypatch.setattr(fused, "SCALARS_KEPT", 4)
    for value in range(10):
        assert float(fused.scalar(value + 0.5, like)) == value + 0.5
        assert len(fused._scalars) <= 4


@pytest.mark.parametrize(
    "name,config",
    [("GIoULoss", {"eps": 1e39}), ("FocalLoss", {"gamma": 1e39}), ("QualityFocalLoss", {"beta": -1e39})],
    ids=["GIoULoss eps", "FocalLoss gamma", "QualityFocalLoss beta"],
)
def test_a_config_value_past_the_dtype_gets_the_family_kernel_s_answer_and_the_closed_form_stays_on(name, config):
    """float32 cannot hold 1e39: torch.tensor would make it inf without a word, where the family kernel's
    ops refuse it (or compute with it) as autograd does. The call gets autograd's outcome, and the
    closed form still answers the next good call: one caller's config does not switch it off."""
    evaluator = _one_pass_evaluator("cpu", "plain")

    def outcome(evaluator: Evaluator, term: TermRequest) -> Any:
        try:
            return evaluator.evaluate(term).loss
        except Exception as error:
            return type(error), str(error)

    got = outcome(evaluator, _closed_form_terms(**{name: config})[name])
    want = outcome(AUTOGRAD, _closed_form_terms(**{name: config})[name])
    if isinstance(want, Tensor):
        torch.testing.assert_close(got, want, equal_nan=True)
    else:
        assert got == want
    assert evaluator.one_pass.calls[name] == 0 and not evaluator.one_pass._broken
    evaluator.evaluate(_closed_form_terms()[name])
    assert evaluator.one_pass.calls[name] == 1


@pytest.mark.parametrize("name", ["FocalLoss", "QualityFocalLoss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_pred_without_classes_gets_the_module_s_answer_and_the_closed_form_stays_on(name, reduction):
    """pred [N, 0] passes ``covers`` (its shapes agree): a closed form's binding that indexed a column of
    it failed, and the failure, taken for the compiler's, switched the kernel off for every caller."""
    evaluator = _one_pass_evaluator("cpu", "plain")
    labels = torch.ones(N, dtype=torch.long)
    target = labels if name == "FocalLoss" else (labels, _rand((N,), "cpu", torch.float32, 3))
    fields = {"pred": torch.empty(N, 0), "target": target, "weight": _rand((N,), "cpu", torch.float32, 4)}
    got = _outcome(evaluator, {"type": name}, fields, reduction)
    expected = _outcome(AUTOGRAD, {"type": name}, fields, reduction)
    if isinstance(expected[0], type):
        assert got == expected
    else:
        torch.testing.assert_close(got, expected)
    assert not evaluator.one_pass._broken, "a caller's input switched the closed form off"
    before = evaluator.one_pass.calls[name]
    evaluator.evaluate(_closed_form_terms()[name])
    assert evaluator.one_pass.calls[name] == before + 1


def _odd_inputs() -> dict[str, tuple[str, dict[str, Any]]]:
    """Inputs the closed forms cover that are easy to get wrong: no rows, one row, narrow label dtypes, a
    transposed pred, weights of one element, a tensor avg_factor, a score in another dtype, batched boxes."""
    gen = _gen(11)
    labels = torch.randint(0, C + 1, (N,), generator=gen)
    cases: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in ("FocalLoss", "QualityFocalLoss"):

        def target(labels: Tensor, name: str = name) -> Any:
            return labels if name == "FocalLoss" else (labels, torch.rand(labels.shape[0], generator=gen))

        def logits(rows: int = N) -> Tensor:
            return torch.randn(rows, C, generator=gen) * 3

        cases |= {
            f"{name}, no rows": (name, {"pred": torch.empty(0, C), "target": target(labels[:0])}),
            f"{name}, one row": (name, {"pred": logits(1), "target": target(labels[:1])}),
            f"{name}, int32 labels": (name, {"pred": logits(), "target": target(labels.int())}),
            f"{name}, uint8 labels": (name, {"pred": logits(), "target": target(labels.to(torch.uint8))}),
            f"{name}, transposed pred": (name, {"pred": logits().t().contiguous().t(), "target": target(labels)}),
            f"{name}, weight [1]": (name, {"pred": logits(), "target": target(labels), "weight": torch.rand(1)}),
            f"{name}, 0-d weight": (name, {"pred": logits(), "target": target(labels), "weight": torch.rand(())}),
            f"{name}, tensor avg_factor": (
                name,
                {"pred": logits(), "target": target(labels), "avg_factor": torch.tensor(3.5)},
            ),
        }
    for dtype in (torch.float64, torch.float16):
        score = torch.rand(N, generator=gen).to(dtype)
        cases[f"QualityFocalLoss, {dtype} score"] = (
            "QualityFocalLoss",
            {"pred": torch.randn(N, C, generator=gen), "target": (labels, score)},
        )
    boxes = _boxes("cpu", torch.float32, 12), _boxes("cpu", torch.float32, 14)
    cases |= {
        "GIoULoss, no rows": ("GIoULoss", {"pred": torch.empty(0, 4), "target": torch.empty(0, 4)}),
        "GIoULoss, batched": (
            "GIoULoss",
            {"pred": boxes[0][:52].reshape(4, 13, 4), "target": boxes[1][:52].reshape(4, 13, 4)},
        ),
        "GIoULoss, [N, 4] weight": ("GIoULoss", {"pred": boxes[0], "target": boxes[1], "weight": torch.rand(N, 4)}),
    }
    return cases


@pytest.mark.parametrize("path", ["plain", pytest.param("by hand", marks=NEEDS_KERNEL_BY_HAND)])
@pytest.mark.parametrize("case", list(_odd_inputs()))
def test_odd_inputs_get_autograd_s_answer_in_its_dtypes_and_leave_the_closed_forms_on(case, path):
    """Each closed form (and hand-written kernel) answers these as autograd does, in the same dtype (a
    float64 score made QFL's closed form answer a float32 pred in float64), and none of them switches a
    kernel off for the other callers."""
    device = "cuda" if CUDA and path == "by hand" else "cpu"
    evaluator = _one_pass_evaluator(device, path)
    name, fields = _odd_inputs()[case]
    fields = _on(device, fields)
    for reduction in ("mean", "none"):
        got = _outcome(evaluator, {"type": name}, fields, reduction)
        expected = _outcome(AUTOGRAD, {"type": name}, fields, reduction)
        if isinstance(expected[0], type):
            assert got == expected
            continue
        assert [t.dtype for t in got] == [t.dtype for t in expected], reduction
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6, msg=reduction)
    assert not evaluator.gpu_kernels_off()  # (a closed form that does not cover one leaves it to the others)


def test_the_evaluator_counts_which_kernel_answered():
    """What ``losswire_fused_terms_total`` reads: a closed form's answers as ``compiled``, the family
    kernel's as ``family``; no GPU kernel off."""
    evaluator = _one_pass_evaluator("cpu", "plain")
    pred, labels = _logits("cpu", torch.float32), torch.randint(0, C + 1, (N,), generator=_gen(1))
    evaluator.evaluate(TermRequest(name="t", config={"type": "FocalLoss"}, pred=pred.clone(), target=labels))
    evaluator.evaluate(TermRequest(name="t", config={"type": "L1Loss"}, pred=pred.clone(), target=pred + 1))
    answers = evaluator.fused_answers()
    assert answers["FocalLoss", "compiled"] == 1 and answers["FocalLoss", "family"] == 0
    assert answers["L1Loss", "family"] == 1 and answers["L1Loss", "compiled"] == 0
    assert {kernel for _, kernel in answers} == {"family", "compiled", "by hand"}
    assert evaluator.gpu_kernels_off() == frozenset()


@pytest.mark.skipif(
    not TRITON or os.environ.get("TRITON_INTERPRET") == "1" or CUDA,
    reason="needs Triton installed on a machine without CUDA, outside its interpreter",
)
def test_a_hand_written_kernel_that_fails_is_off_for_the_process_and_the_compiled_form_answers(caplog):
    """The hand-written kernel launched on CPU tensors without Triton's interpreter fails as a kernel does
    that its compiler refuses: the call gets the (here uncompiled) closed form's answer, one warning names
    the loss, and the hand-written kernel stays off (``losswire_gpu_kernel_off``) while the closed form
    answers every call."""
    evaluator = Evaluator(fused=True)
    evaluator.one_pass = OnePass(compile=False, devices=("cpu",), handwritten=True)
    pred, labels = _logits("cpu", torch.float32), torch.randint(0, C + 1, (N,), generator=_gen(1))

    def term() -> TermRequest:
        return TermRequest(name="t", config={"type": "FocalLoss"}, pred=pred.clone(), target=labels.clone())

    with caplog.at_level("WARNING"):
        got = evaluator.evaluate(term())
    torch.testing.assert_close(got.loss, AUTOGRAD.evaluate(term()).loss)
    assert evaluator.gpu_kernels_off() == {"FocalLoss"}
    assert [r for r in caplog.records if "hand-written kernel of FocalLoss is off" in r.getMessage()]
    evaluator.evaluate(term())
    assert evaluator.one_pass.calls["FocalLoss"] == 2 and evaluator.one_pass.calls_by_hand["FocalLoss"] == 0
    assert evaluator.fused_answers()["FocalLoss", "family"] == 0


def test_a_closed_form_that_fails_is_off_for_the_process_and_the_family_kernel_answers(caplog, monkeypatch):
    """A closed form whose compilation fails (no C compiler, a backend error: here a stand-in that raises)
    is off for the process: the call gets the family kernel's answer, one warning names the loss."""
    evaluator = _one_pass_evaluator("cpu", "plain")

    def failing(function):
        def compiled(*args, **kwargs):
            raise RuntimeError("a backend compiler error")

        return compiled

    monkeypatch.setattr(evaluator.one_pass, "_compiled_form", failing)
    term = _closed_form_terms()["QualityFocalLoss"]
    with caplog.at_level("WARNING"):
        got = evaluator.evaluate(term)
    torch.testing.assert_close(got.loss, AUTOGRAD.evaluate(_closed_form_terms()["QualityFocalLoss"]).loss)
    assert evaluator.gpu_kernels_off() == {"QualityFocalLoss"}
    assert [r for r in caplog.records if "compiled kernel of QualityFocalLoss is off" in r.getMessage()]
    evaluator.evaluate(_closed_form_terms()["QualityFocalLoss"])
    assert evaluator.fused_answers()["QualityFocalLoss", "family"] == 2
    assert evaluator.one_pass.calls["QualityFocalLoss"] == 0


def _with_value(tensor: Tensor, index: tuple[int, ...], value: float) -> Tensor:
    changed = tensor.clone()
    changed[index] = value
    return changed


def _uncovered_focal_values() -> dict[str, dict[str, Any]]:
    """FocalLoss inputs whose shapes, dtypes and config the kernel covers, and one value it does not."""
    pred, labels = _logits("cpu", torch.float32, 4), torch.randint(0, C + 1, (N,), generator=_gen(5))
    weight = _rand((N,), "cpu", torch.float32, 6)
    fields = {"pred": pred, "target": labels, "weight": weight}
    return {
        "NaN logit": {**fields, "pred": _with_value(pred, (3, 2), float("nan"))},
        "+Inf logit": {**fields, "pred": _with_value(pred, (N - 1, C - 1), float("inf"))},
        "-Inf logit": {**fields, "pred": _with_value(pred, (0, 0), float("-inf"))},
        "Inf weight": {**fields, "weight": _with_value(weight, (7,), float("inf"))},
        "NaN weight": {**fields, "weight": _with_value(weight, (8,), float("nan"))},
        "label past C": {**fields, "target": _with_value(labels, (5,), C + 1)},
        "negative label": {**fields, "target": _with_value(labels, (N - 1,), -1)},
        "no classes": {"pred": torch.empty(N, 0), "target": torch.ones(N, dtype=torch.long)},
    }


def _uncovered_quality_values() -> dict[str, dict[str, Any]]:
    """The same for QualityFocalLoss: a score is read at a row's positive column only (row 3's here)."""
    pred, labels = _logits("cpu", torch.float32, 4), torch.randint(0, C + 1, (N,), generator=_gen(5))
    labels[3] = 2
    scores, weight = _rand((N,), "cpu", torch.float32, 7), _rand((N,), "cpu", torch.float32, 6)
    fields = {"pred": pred, "target": (labels, scores), "weight": weight}
    return {
        "NaN logit": {**fields, "pred": _with_value(pred, (3, 2), float("nan"))},
        "+Inf logit": {**fields, "pred": _with_value(pred, (N - 1, C - 1), float("inf"))},
        "-Inf logit": {**fields, "pred": _with_value(pred, (0, 0), float("-inf"))},
        "NaN score": {**fields, "target": (labels, _with_value(scores, (3,), float("nan")))},
        "Inf score": {**fields, "target": (labels, _with_value(scores, (3,), float("inf")))},
        "Inf weight": {**fields, "weight": _with_value(weight, (7,), float("inf"))},
        "NaN weight": {**fields, "weight": _with_value(weight, (8,), float("nan"))},
        "no classes": {"pred": torch.empty(N, 0), "target": (torch.ones(N, dtype=torch.long), scores)},
    }


UNCOVERED = {  # loss: (its config, its uncovered values)
    "FocalLoss": ({"gamma": 2.0}, _uncovered_focal_values),
    "QualityFocalLoss": ({"beta": 2.0}, _uncovered_quality_values),
}


def _on(device: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) for k, v in fields.items()}


def _good_fields(name: str, device: str) -> dict[str, Any]:
    labels = torch.zeros(N, dtype=torch.long, device=device)
    target = labels if name == "FocalLoss" else (labels, torch.full((N,), 0.5, device=device))
    return {"pred": _logits(device, torch.float32), "target": target}


@NEEDS_KERNEL_BY_HAND
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name,case", [(name, case) for name, (_, values) in UNCOVERED.items() for case in values()])
def test_values_the_hand_written_kernel_does_not_cover_get_autograd_s_answer(name, case, reduction):
    """The hand-written kernel answers before ``supports`` reads the values: a NaN or Inf in pred, weight or
    a read score, or a label out of range, it finds as it runs, and the call gets autograd's answer (a NaN,
    or the module's error), as on the family kernel's path; the kernel stays on and answers the next call."""
    device = "cuda" if CUDA else "cpu"
    evaluator = _evaluator(device, "by hand")
    settings, values = UNCOVERED[name]
    fields, config = _on(device, values()[case]), {"type": name, **settings}
    before = evaluator.one_pass.calls_by_hand[name]
    got, expected = _outcome(evaluator, config, fields, reduction), _outcome(AUTOGRAD, config, fields, reduction)
    if isinstance(expected[0], type):
        assert got == expected
    else:
        torch.testing.assert_close(got, expected, equal_nan=True)
    assert evaluator.one_pass.calls_by_hand[name] == before, "the kernel answered a value it does not cover"
    assert evaluator.gpu_kernels_off() == frozenset()
    evaluator.evaluate(TermRequest(name="t", config=dict(config), **_good_fields(name, device)))
    assert evaluator.one_pass.calls_by_hand[name] == before + 1


def _outcome(which: Evaluator, config: dict, fields: dict[str, Any], reduction: str) -> Any:
    """The loss and pred's gradient of ``fields``, or the error's kind and message."""
    term = TermRequest(name="t", config=dict(config), reduction_override=reduction, **cloned(fields))
    try:
        got = which.evaluate(term)
    except Exception as error:  # the module's own refusal, compared by kind and message
        return type(error), str(error)
    return got.loss, _gradient(got)


@NEEDS_KERNEL_BY_HAND
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_score_the_module_never_reads_is_the_quality_kernel_s_to_answer(value):
    """A NaN or Inf score in a row without a positive column (label C, -1 or past C) is never read, by
    mmdet's loss or ours: the hand-written kernel answers, with the module's finite answer."""
    device = "cuda" if CUDA else "cpu"
    evaluator = _evaluator(device, "by hand")
    fields = _uncovered_quality_values()["NaN score"]
    labels, scores = fields["target"]
    labels, scores = _with_value(labels, (3,), C), _with_value(scores, (3,), value)
    fields = _on(device, {**fields, "target": (labels, scores)})
    config = {"type": "QualityFocalLoss", "beta": 2.0}
    before = evaluator.one_pass.calls_by_hand["QualityFocalLoss"]
    got, expected = _outcome(evaluator, config, fields, "none"), _outcome(AUTOGRAD, config, fields, "none")
    assert evaluator.one_pass.calls_by_hand["QualityFocalLoss"] == before + 1
    assert not expected[0].isnan().any()
    torch.testing.assert_close(got, expected, rtol=LOSS_RTOL[torch.float32], atol=1e-6)


@NEEDS_KERNEL_BY_HAND
@pytest.mark.parametrize("name", BY_HAND_LOSSES)
def test_the_hand_written_kernel_answers_without_supports_reading_the_values(name, monkeypatch):
    """``supports``'s passes over pred, weight and score and FocalLoss's label range check (each a host
    sync) are what a hand-written kernel saves: they run on the family kernel's path, not on the kernel's."""
    from losswire.server.losses.fused import focal, gfocal

    family = focal if name == "FocalLoss" else gfocal
    reads: list[str] = []
    finite = family.finite
    monkeypatch.setattr(family, "finite", lambda *t: reads.append("finite") or finite(*t))
    if name == "FocalLoss":
        labels_in_range = focal.labels_in_range
        monkeypatch.setattr(focal, "labels_in_range", lambda *a: reads.append("labels") or labels_in_range(*a))
    device = "cuda" if CUDA else "cpu"
    fields = _good_fields(name, device)

    def term() -> TermRequest:
        return TermRequest(name="t", config={"type": name}, **cloned(fields))

    by_hand = _evaluator(device, "by hand")
    before = by_hand.one_pass.calls_by_hand[name]
    by_hand.evaluate(term())
    assert by_hand.one_pass.calls_by_hand[name] == before + 1 and reads == []
    Evaluator(fused=True, gpu_kernels=False).evaluate(term())
    assert sorted(set(reads)) == (["finite", "labels"] if name == "FocalLoss" else ["finite"])


@NEEDS_KERNEL_BY_HAND
@pytest.mark.parametrize("name", BY_HAND_LOSSES)
@pytest.mark.parametrize("rows,classes", [(700, 9), (300, 41), (3, 3000), (5000, 1), (129, 80)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_hand_written_kernel_across_its_blocks(name, rows, classes, reduction):
    """Rows that straddle the hand-written kernels' blocks (FocalLoss: 1024 elements of the flat logits;
    QualityFocalLoss: tiles of whole rows, the classes padded to a power of two), a row longer than a
    block, one class, a class count whose 1/C rounds down in float32 (41: a row found by reciprocal instead
    of a division would need a correction there): each element finds its row and column (its label, its
    score, its row's weight) as autograd does."""
    device = "cuda" if CUDA else "cpu"
    gen = _gen(rows)
    pred = (torch.randn(rows, classes, generator=gen) * 4).to(device)
    labels = torch.randint(0, classes + 1, (rows,), generator=gen).to(device)
    weight = torch.rand(rows, generator=gen).to(device)
    if name == "FocalLoss":
        config, target = {"type": name, "gamma": 2.0, "alpha": 0.25}, labels
    else:
        config, target = {"type": name, "beta": 2.0}, (labels, torch.rand(rows, generator=gen).to(device))
    check(name, config, device, torch.float32, "by hand", pred=pred, target=target, weight=weight,
          reduction_override=reduction)  # fmt: skip


@NEEDS_KERNEL_BY_HAND
def test_rows_wider_than_the_quality_kernel_s_tile_are_the_compiled_closed_form_s():
    """Past ``MAX_CLASSES`` a row's tile would not fit the registers: the kernel declines before it
    launches, the compiled closed form answers, and the kernel stays on."""
    from losswire.server.losses.fused import gfocal_triton

    device = "cuda" if CUDA else "cpu"
    evaluator = _evaluator(device, "by hand")
    classes = gfocal_triton.MAX_CLASSES + 1
    gen = _gen(classes)
    labels = torch.tensor([0, classes - 1, classes]).to(device)
    fields = {"pred": torch.randn(3, classes, generator=gen).to(device), "target": (labels, torch.rand(3).to(device))}
    before = evaluator.one_pass.calls_by_hand["QualityFocalLoss"], evaluator.one_pass.calls["QualityFocalLoss"]
    got = _outcome(evaluator, {"type": "QualityFocalLoss"}, fields, "none")
    torch.testing.assert_close(got, _outcome(AUTOGRAD, {"type": "QualityFocalLoss"}, fields, "none"))
    after = evaluator.one_pass.calls_by_hand["QualityFocalLoss"], evaluator.one_pass.calls["QualityFocalLoss"]
    assert after == (before[0], before[1] + 1) and not evaluator.gpu_kernels_off()
    # declined before ``supports`` read the values: the compiled form, which does not check them, must not
    # answer a NaN (autograd does, as on the family kernel's path)
    fields = {**fields, "pred": _with_value(fields["pred"], (1, 5), float("nan"))}
    term = TermRequest(name="t", config={"type": "QualityFocalLoss"}, reduction_override="none", **cloned(fields))
    assert evaluator.evaluate(term).fused == ""
    assert evaluator.one_pass.calls["QualityFocalLoss"] == after[1]
