"""What a careless caller passes a RemoteLoss, against a real server: the local module's numbers, or a clear error.

Each case is a way a hurried researcher calls the client. The reference for a value is plain torch math
of the loss (the local module's numbers for these inputs) or the same call made the ordinary way, so
MMDetection is not needed.
A case the client cannot make right is refused by name: the argument, what it takes and what arrived;
never a silent wrong gradient, and never torch's error from deep inside the encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losswire.client import ArgumentError, LossClient, RemoteLoss, evaluate_terms

torch.manual_seed(0)
PRED, TARGET = torch.randn(6, 4), torch.randn(6, 4)
SCORES, LABELS = torch.randn(8, 5), torch.randint(0, 6, (8,))


def smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mmdet's SmoothL1Loss (beta 1.0) without reduction: torch's own."""
    return F.smooth_l1_loss(pred, target, beta=1.0, reduction="none")


@pytest.fixture(scope="module")
def sl1(target) -> RemoteLoss:
    return RemoteLoss(dict(type="SmoothL1Loss", beta=1.0, reduction="none"), target)


@pytest.fixture(scope="module")
def focal(target) -> RemoteLoss:
    return RemoteLoss(dict(type="FocalLoss", gamma=2.0, alpha=0.25), target)


# -- autograd beyond loss.backward() -------------------------------------------------------------------------


def test_a_gradient_penalty_is_refused_not_silently_missing_its_second_derivative(sl1):
    """create_graph=True then a backward of the gradient: locally pred gets the second derivative; the server
    sends first derivatives only. With an upstream that requires grad (a learned scale) pred.grad used to stay
    None without a word, a wrong gradient; without one, torch said "element 0 of tensors does not require grad"."""
    pred, scale = PRED.clone().requires_grad_(True), torch.rand(6, 4).requires_grad_(True)
    (grad,) = torch.autograd.grad((sl1(pred, TARGET) * scale).sum(), pred, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second derivative of SmoothL1Loss .*create_graph=True"):
        (grad**2).sum().backward()
    (grad,) = torch.autograd.grad(sl1(pred, TARGET).sum(), pred, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second derivative of SmoothL1Loss"):
        (grad**2).sum().backward()


def test_create_graph_keeps_first_derivatives_and_those_through_the_upstream_gradient(sl1):
    """What create_graph=True can give remotely it still gives: the first-order values, and the derivative in
    the upstream gradient's own inputs (upstream * local, local a constant)."""
    pred, scale = PRED.clone().requires_grad_(True), torch.rand(6, 4).requires_grad_(True)
    (grad,) = torch.autograd.grad((sl1(pred, TARGET) * scale).sum(), pred, create_graph=True)
    reference = PRED.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((smooth_l1(reference, TARGET) * scale).sum(), reference)
    torch.testing.assert_close(grad.detach(), expected)
    (in_scale,) = torch.autograd.grad(grad.sum(), scale)
    (local_in_scale,) = torch.autograd.grad(smooth_l1(reference, TARGET).sum(), reference)
    torch.testing.assert_close(in_scale, local_in_scale)  # d(scale * local)/d(scale) = local


def test_a_recomputed_gradient_refuses_the_derivative_in_its_upstream_it_cannot_give(target):
    """A non-separable term (DiceLoss under 'none') comes back recomputed for the upstream gradient: numbers
    without a graph, so d(grad)/d(upstream's inputs) is not there either; torch used to say only that the
    upstream's input "appears to not have been used in the graph" (or None with allow_unused)."""
    dice = RemoteLoss(dict(type="DiceLoss", reduction="none"), target)
    pred, scale = torch.rand(4, 3, 3).requires_grad_(True), torch.rand(4).requires_grad_(True)
    (grad,) = torch.autograd.grad(
        (dice(pred, (torch.rand(4, 3, 3) > 0.5).float()) * scale).sum(), pred, create_graph=True
    )
    with pytest.raises(RuntimeError, match=r"second derivative of DiceLoss"):
        torch.autograd.grad(grad.sum(), scale)


def test_a_big_gradient_keeps_an_upstream_one_that_requires_grad(target):
    """A gradient that arrives in memory of its own (shared memory, chunks) is handed to autograd as it is when
    the upstream gradient is exactly 1; an upstream 1 that requires grad (create_graph=True) must stay a factor."""
    l1 = RemoteLoss(dict(type="L1Loss"), target)
    pred, other = torch.randn(300_000, 4).requires_grad_(True), torch.randn(300_000, 4)  # 4.8 MB: not inline
    scale = torch.tensor(1.0, requires_grad=True)
    (grad,) = torch.autograd.grad(l1(pred, other) * scale, pred, create_graph=True)
    (in_scale,) = torch.autograd.grad(grad.abs().sum(), scale)  # sum |sign(pred - other) / n| = 1
    torch.testing.assert_close(in_scale, torch.tensor(1.0))


def test_an_avg_factor_that_requires_grad_is_refused_not_silently_dropped(focal):
    """Locally an avg_factor computed from pred without detach() sends a term into pred's gradient; the server
    returns no gradient for avg_factor, so that term used to vanish."""
    pred = SCORES.clone().requires_grad_(True)
    with pytest.raises(ArgumentError, match=r"'avg_factor' requires grad .*avg_factor.detach\(\)") as error:
        focal(pred, LABELS, avg_factor=pred.sigmoid().sum())
    assert error.value.argument == "avg_factor"
    detached = focal(pred, LABELS, avg_factor=pred.sigmoid().sum().detach())  # the fix the message names
    with torch.no_grad():  # no gradient wanted: nothing is lost
        assert torch.equal(focal(pred, LABELS, avg_factor=pred.sigmoid().sum()), detached.detach())


def test_torch_compile_runs_the_remote_call_eagerly(sl1):
    """Dynamo cannot trace a gRPC call; it used to fail with an InternalTorchDynamoError from the codec."""
    compiled = torch.compile(lambda p: sl1(p * 2, TARGET).sum(), backend="eager")
    pred = PRED.clone().requires_grad_(True)
    compiled(pred).backward()
    reference = PRED.clone().requires_grad_(True)
    smooth_l1(reference * 2, TARGET).sum().backward()
    torch.testing.assert_close(pred.grad, reference.grad)


def test_torch_func_transforms_are_refused_by_name(sl1):
    with pytest.raises(RuntimeError, match=r"cannot be called under torch\.func transforms"):
        torch.func.grad(lambda p: sl1(p, TARGET).sum())(PRED.clone())


# -- tensors whose values cannot travel as they are ----------------------------------------------------------


def test_a_sparse_target_travels_dense(sl1):
    """The local module computes with a sparse target; the encoder used to fail with "unsupported memory
    format option Contiguous"."""
    pred = PRED.clone().requires_grad_(True)
    loss = sl1(pred, TARGET.to_sparse())
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), smooth_l1(PRED, TARGET))
    with pytest.raises(ArgumentError, match=r"'pred' is a torch.sparse_coo tensor that requires grad"):
        sl1(PRED.to_sparse().requires_grad_(True), TARGET)


def test_a_meta_tensor_is_refused_by_name(sl1):
    with pytest.raises(ArgumentError, match=r"'pred' is on the 'meta' device"):
        sl1(torch.empty(6, 4, device="meta"), TARGET)


def test_a_one_element_tensor_expanded_from_a_scalar_is_sent(target):
    """``torch.tensor(x).expand(1, 1)`` is contiguous with stride 0, which a byte view refuses: torch's
    "stride(-1) must be 1" came out of the encoder, for a weight or pred, and out of backward() for the
    upstream gradient of ``loss.sum()`` over one row (or none). Now each is the ordinary call's answer."""
    l1 = RemoteLoss(dict(type="L1Loss"), target)
    pred, goal = torch.randn(1, 4), torch.randn(1, 4)
    torch.testing.assert_close(l1(pred, goal, weight=torch.tensor(1.0).expand(1, 1)), l1(pred, goal))
    scalar = torch.tensor(0.3).expand(1, 1)
    torch.testing.assert_close(l1(scalar, torch.zeros(1, 1)), l1(torch.full((1, 1), 0.3), torch.zeros(1, 1)))
    dice = RemoteLoss(dict(type="DiceLoss"), target)
    for rows in (1, 0):
        masks, goal = torch.randn(rows, 3, 4, 4), (torch.rand(rows, 3, 4, 4) > 0.5).float()
        summed, upstream = masks.clone().requires_grad_(True), masks.clone().requires_grad_(True)
        dice(summed, goal, reduction_override="none").sum().backward()  # its upstream: ones, stride 0
        dice(upstream, goal, reduction_override="none").backward(torch.ones(rows))
        torch.testing.assert_close(summed.grad, upstream.grad)


def test_an_empty_reduction_override_keeps_the_configs_reduction(target):
    """mmdet: ``reduction_override if reduction_override else self.reduction``, so "" is the config's (as
    docs/semantics.md says); the client and the server refused it, naming the three reductions."""
    l1 = RemoteLoss(dict(type="L1Loss", reduction="sum"), target)
    torch.testing.assert_close(l1(PRED, TARGET, reduction_override=""), l1(PRED, TARGET))
    torch.testing.assert_close(l1(PRED, TARGET, reduction_override=""), (PRED - TARGET).abs().sum())


# -- numpy where the local module takes it, and where it does not --------------------------------------------


def test_a_zero_d_numpy_avg_factor_is_a_number(focal):
    """mmdet divides by avg_factor + eps, which a 0-d array does as well as a float."""
    expected = focal(SCORES, LABELS, avg_factor=3.0)
    torch.testing.assert_close(focal(SCORES, LABELS, avg_factor=np.array(3.0)), expected)


def test_a_numpy_array_for_a_tensor_is_refused_with_its_shape_not_its_numbers(sl1):
    with pytest.raises(ArgumentError) as error:
        sl1(PRED.numpy().repeat(100, axis=0), TARGET)
    message = str(error.value)
    assert "a numpy.ndarray of dtype float32 and shape [600, 4] (torch.from_numpy(array)" in message
    assert len(message) < 300  # the repr of the array used to follow, up to a thousand numbers


def test_numpy_numbers_in_the_config_are_plain_numbers(target, focal):
    """mmdet's FocalLoss(gamma=np.float32(2.0)) works; the config's JSON used to refuse it ("Unexpected type")."""
    remote = RemoteLoss(dict(type="FocalLoss", gamma=np.float32(2.0), alpha=np.float64(0.25)), target)
    assert torch.equal(remote(SCORES, LABELS), focal(SCORES, LABELS))
    with pytest.raises(TypeError, match=r"cfg\['gamma'\] is a object .*cannot carry"):
        RemoteLoss(dict(type="FocalLoss", gamma=object()), target)


def test_a_numpy_integer_forward_argument_is_the_int_it_holds(target):
    """CrossEntropyLoss's forward ``ignore_index`` read from an array (np.int64(255)) works locally; the
    encoder used to refuse it with protobuf's "unexpected type <class 'numpy.int64'>"."""
    loss = RemoteLoss(dict(type="CrossEntropyLoss"), target)
    labels = LABELS.clone()
    labels[:3] = 255
    expected = loss(SCORES, labels, ignore_index=255)
    torch.testing.assert_close(loss(SCORES, labels, ignore_index=np.int64(255)), expected)


# -- what is not a config, a target or a term ----------------------------------------------------------------


def test_a_config_that_is_not_a_dict_is_a_type_error_naming_cfg(target):
    with pytest.raises(TypeError, match=r"cfg must be the loss's config dict.*got a str \('FocalLoss'\)"):
        RemoteLoss("FocalLoss", target)


@pytest.mark.parametrize("wrong", [50051, ("127.0.0.1", 50051)])
def test_a_port_or_host_port_pair_is_not_a_target(wrong):
    with pytest.raises(TypeError, match=r"target must be 'host:port'"):
        RemoteLoss(dict(type="FocalLoss"), wrong, validate=False)


def test_a_url_is_not_a_target(server):
    """A URL pasted from a browser or another tool used to fail at the first call, "Misformatted domain name"."""
    with pytest.raises(ValueError, match=rf"is a URL: .*write '127.0.0.1:{server.port}'"):
        RemoteLoss(dict(type="FocalLoss"), f"http://127.0.0.1:{server.port}/", validate=False)


def test_a_closed_shared_client_is_replaced_for_the_next_module(server):
    spelling = f"localhost:{server.port}"  # a shared client of its own: the session's others stay open
    first = RemoteLoss(dict(type="L1Loss"), spelling)
    first.client.close()
    fresh = RemoteLoss(dict(type="L1Loss"), spelling)  # used to fail: "the losswire client was closed"
    torch.testing.assert_close(fresh(PRED, TARGET), (PRED - TARGET).abs().mean())
    assert fresh.client is LossClient.shared(spelling)
    with pytest.raises(ValueError, match="the losswire client was closed"):  # what the caller closed stays closed
        first(PRED, TARGET)


def test_evaluate_terms_takes_what_a_caller_means_and_names_what_it_cannot(focal, sl1):
    expected = focal(SCORES, LABELS)
    loose = evaluate_terms({"a": (focal, [SCORES, LABELS]), "b": (focal, (SCORES, LABELS), None)})
    assert torch.equal(loose["a"], expected) and torch.equal(loose["b"], expected)
    assert evaluate_terms({}) == {}
    with pytest.raises(TypeError, match=r"terms must be a dict .*got a list"):
        evaluate_terms([("a", (focal, (SCORES, LABELS), {}))])
    with pytest.raises(TypeError, match=r"term 'a' must be \(remote_loss, args, kwargs\).*got a RemoteLoss"):
        evaluate_terms({"a": focal})
