"""An answer is bytes from the wire too: a faulty or hostile server cannot make the client allocate
what it declares, hand autograd a gradient of another shape, or fail with a bare Python error.

Through the wire: a hostile server stands between the client and a real losswire server (``Tampering``:
every call goes to the real one, and its answer is altered on the way back). Then the rules of
``client.answers.check_answer`` one by one, on hand-made answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
import torch

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.client.answers import LOSS_SLACK_BYTES, check_answer, check_shared_answer
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks

Tamper = Callable[[pb.EvaluateResponse], None]
StreamTamper = Callable[[pb.EvaluateResponse], Iterator[pb.EvaluateChunk]]
STREAMED_ROWS = 8192  # a [8192, 4] float32 pred (128 KiB) travels in chunks


class Tampering(pb_grpc.LossServiceServicer):
    """A hostile server: Describe and Evaluate go to a real losswire server; ``tamper`` alters the
    answers of forwards (a backward's recompute, with an upstream gradient, is answered honestly), and
    ``stream`` makes the messages EvaluateStream answers with."""

    def __init__(self, real: pb_grpc.LossServiceStub, tamper: Tamper | None, stream: StreamTamper | None) -> None:
        self.real, self.tamper, self.stream = real, tamper, stream

    def Describe(self, request, context):  # noqa: N802
        return self.real.Describe(request, timeout=30)

    def Evaluate(self, request, context):  # noqa: N802
        response = self.real.Evaluate(request, timeout=30)
        if self.tamper is not None and not any(term.HasField("grad_output") for term in request.terms):
            self.tamper(response)
        return response

    def EvaluateStream(self, messages, context):  # noqa: N802
        header = next(messages).request
        assembler = chunks.StreamAssembler(header)
        for message in messages:
            assembler.add(message.chunk)
        chunks.fill_streamed(header, assembler.finish())
        header.ClearField("early_gradients")
        yield from self.stream(self.real.Evaluate(header, timeout=30))


@contextlib.contextmanager
def hostile(server, tamper: Tamper | None = None, stream: StreamTamper | None = None) -> Iterator[str]:
    """The address of a ``Tampering`` server in front of the test session's real one."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        proxy = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_LossServiceServicer_to_server(Tampering(pb_grpc.LossServiceStub(channel), tamper, stream), proxy)
        port = proxy.add_insecure_port("127.0.0.1:0")
        proxy.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            proxy.stop(grace=None)


def l1_round_trip(target: str, rows: int = 64, **client_options) -> torch.Tensor:
    """L1Loss (reduction none) of a [rows, 4] pred, backward; returns pred's gradient."""
    client = LossClient(target, timeout=10, shared_memory="off", **client_options)
    try:
        pred = torch.randn(rows, 4, requires_grad=True)
        RemoteLoss(dict(type="L1Loss", reduction="none"), client=client)(pred, torch.randn(rows, 4)).sum().backward()
        return pred.grad
    finally:
        client.close()


def gradient(response: pb.EvaluateResponse) -> pb.Tensor:
    return response.results[0].gradients["pred"]


def extra_leading_axis(response: pb.EvaluateResponse) -> None:
    """pred's gradient as [2, 64, 4]: autograd would sum it to [64, 4], twice the true gradient."""
    grad = gradient(response)
    grad.shape.insert(0, 2)
    grad.data = grad.data * 2


def integer_gradient(response: pb.EvaluateResponse) -> None:
    grad = gradient(response)
    grad.dtype, grad.data = pb.INT64, grad.data * 2


def no_results(response: pb.EvaluateResponse) -> None:
    response.ClearField("results")


def integer_loss(response: pb.EvaluateResponse) -> None:
    loss = response.results[0].loss
    loss.dtype, loss.data = pb.INT64, loss.data * 2


def unasked_gradient(response: pb.EvaluateResponse) -> None:
    response.results[0].gradients["target"].CopyFrom(gradient(response))


def short_loss_data(response: pb.EvaluateResponse) -> None:
    loss = response.results[0].loss
    loss.data = loss.data[:-4]


@pytest.mark.parametrize(
    "tamper, field, words",
    [
        (extra_leading_axis, "results[0].gradients[pred]", "must have its input's shape [64, 4] and dtype FLOAT32"),
        (integer_gradient, "results[0].gradients[pred]", "got [64, 4] and INT64"),
        (no_results, "results", "the answer holds 0 results for 1 terms"),
        (integer_loss, "results[0].loss", "must be a floating-point tensor, got INT64"),
        (unasked_gradient, "results[0].gradients[target]", "the request asked for no gradient of 'target'"),
        (short_loss_data, "results[0].loss", "results[0].loss.data must hold 256 x 4 = 1024 bytes"),
    ],
)
def test_an_answer_the_request_cannot_have_is_refused_naming_its_field(server, tamper, field, words):
    with hostile(server, tamper) as target, pytest.raises(RemoteLossError) as refused:
        l1_round_trip(target)
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    assert refused.value.field == field
    assert "a malformed answer" in refused.value.details and words in refused.value.details


def test_a_sample_axis_the_loss_does_not_have_is_not_trusted_the_gradient_is_recomputed(server):
    """GIoULoss (reduction none) answers one loss per box and [N, 4] gradients; a sample axis it cannot
    have (7) would fail inside backward (IndexError). The client recomputes the gradient exactly instead."""

    def sample_axis_7(response: pb.EvaluateResponse) -> None:
        response.results[0].sample_axis = 7

    boxes = torch.rand(32, 4) * 10
    pred = torch.cat([boxes[:, :2], boxes[:, :2] + 1 + boxes[:, 2:]], 1)
    goal = pred + torch.rand(32, 4)
    weights = torch.rand(32)
    grads = []
    for tamper in (None, sample_axis_7):
        with hostile(server, tamper) as target:
            client = LossClient(target, timeout=10, shared_memory="off")
            leaf = pred.clone().requires_grad_()
            (RemoteLoss(dict(type="GIoULoss", reduction="none"), client=client)(leaf, goal) * weights).sum().backward()
            client.close()
            grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])  # the exact recompute rounds as the server does


def test_a_stream_that_ends_without_its_response_is_a_data_loss(server):
    with hostile(server, stream=lambda response: iter(())) as target, pytest.raises(RemoteLossError) as refused:
        l1_round_trip(target, rows=STREAMED_ROWS, stream_threshold=1)
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    assert "the stream ended without a response" in refused.value.details


def test_a_streamed_answer_declaring_a_huge_gradient_is_refused_before_anything_is_allocated(server):
    """A gradient declared [2**32] float32 (16 GiB) and streamed: refused from its declaration, so no
    buffer of that size is ever taken from the client's pool."""

    def huge(response: pb.EvaluateResponse) -> Iterator[pb.EvaluateChunk]:
        grad = gradient(response)
        grad.ClearField("data")
        grad.shape[:] = [2**32]
        yield pb.EvaluateChunk(response=response)
        yield pb.EvaluateChunk(chunk=pb.TensorChunk(tensor="results[0].gradients[pred]", offset=0, data=b"\0" * 64))

    taken = []
    with hostile(server, stream=huge) as target:
        client = LossClient(target, timeout=10, shared_memory="off", stream_threshold=1)
        original = client.buffers.take
        client.buffers.take = lambda nbytes: taken.append(nbytes) or original(nbytes)
        pred = torch.randn(STREAMED_ROWS, 4, requires_grad=True)
        with pytest.raises(RemoteLossError) as refused:
            RemoteLoss(dict(type="L1Loss"), client=client)(pred, torch.randn(STREAMED_ROWS, 4)).backward()
        client.close()
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    assert refused.value.field == "results[0].gradients[pred]"
    assert f"must have its input's shape [{STREAMED_ROWS}, 4]" in refused.value.details
    assert all(nbytes < 1 << 20 for nbytes in taken)


# -- the rules, one by one -------------------------------------------------------------------------------


def request_of(*gradients: str, pred_shape=(8, 4), dtype=pb.FLOAT32) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    term = request.terms.add()
    term.pred.dtype, term.pred.shape[:] = dtype, list(pred_shape)
    term.target.tensor.dtype, term.target.tensor.shape[:] = dtype, list(pred_shape)
    term.gradients.extend(gradients)
    return request


def answer_of(loss_shape=(), gradients: dict[str, list[int]] | None = None) -> pb.EvaluateResponse:
    response = pb.EvaluateResponse()
    result = response.results.add()
    result.loss.dtype, result.loss.shape[:] = pb.FLOAT32, list(loss_shape)
    for key, shape in (gradients or {}).items():
        result.gradients[key].dtype, result.gradients[key].shape[:] = pb.FLOAT32, shape
    return response


def refusal(request: pb.EvaluateRequest, response: pb.EvaluateResponse) -> RemoteLossError:
    with pytest.raises(RemoteLossError) as refused:
        check_answer(request, response)
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    return refused.value


def test_an_honest_answer_passes():
    check_answer(request_of("pred", "target"), answer_of((8, 4), {"pred": [8, 4], "target": [8, 4]}))
    check_answer(request_of(), answer_of((), {"pred": [8, 4]}))  # no gradients named: pred's


def test_a_gradient_named_by_the_loss_s_own_input_name_must_match_one_of_the_term_s_tensors():
    """A raw caller may ask for ``cls_score`` (the loss's name of pred): the client does not know which
    tensor that is, so the gradient must have the shape and dtype of one of the term's tensors."""
    check_answer(request_of("cls_score"), answer_of((), {"cls_score": [8, 4]}))
    refused = refusal(request_of("cls_score"), answer_of((), {"cls_score": [8, 5]}))
    assert "the shape and dtype of one of the term's tensors" in refused.details


def test_parts_must_have_distinct_keys_and_a_known_structure():
    response = answer_of()
    result = response.results[0]
    result.structure = "tuple"
    for _ in range(2):
        result.parts.add(key="0").loss.CopyFrom(pb.Tensor(dtype=pb.FLOAT32))
    assert "parts' keys must be distinct" in refusal(request_of(), response).details
    result.parts[1].key = "1"
    check_answer(request_of(), response)
    result.structure = "list"
    assert refusal(request_of(), response).field == "results[0].structure"


def test_losses_may_not_declare_more_than_the_request_sent_and_the_slack():
    sent = 8 * 4 * 4 * 2  # pred and target
    check_answer(request_of(), answer_of(((sent + LOSS_SLACK_BYTES) // 4,)))
    refused = refusal(request_of(), answer_of(((sent + LOSS_SLACK_BYTES) // 4 + 1,)))
    assert refused.field == "results[0].loss" and "more bytes than the request sent" in refused.details


def test_two_shared_memory_answers_may_not_share_bytes():
    response = answer_of((), {"pred": [8, 4], "target": [8, 4]})
    for key, offset in (("pred", 0), ("target", 64)):
        ref = response.results[0].gradients[key].shm
        ref.region, ref.offset, ref.byte_size = "r", offset, 128
    with pytest.raises(RemoteLossError) as refused:
        check_shared_answer(response)
    assert refused.value.code == grpc.StatusCode.DATA_LOSS and refused.value.field == "results[0].gradients[target]"
    assert "overlaps" in refused.value.details and "two answers cannot share bytes" in refused.value.details
    response.results[0].gradients["target"].shm.offset = 128
    check_shared_answer(response)
