"""An answer is bytes from the wire too: a faulty or hostile server cannot make the client allocate
what it declares, hand autograd a gradient of another shape, or fail with a bare Python error.

Through the wire: a hostile server stands between the client and a real losswire server (``Tampering``:
every call goes to the real one, and its answer is altered on the way back). Then the rules of
``client.answers.check_answer`` one by one, on hand-made answers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
import torch
from google.protobuf import struct_pb2

from losswire.client import LossClient, RemoteLoss, RemoteLossError, evaluate_terms
from losswire.client.answers import LOSS_SLACK_BYTES, check_answer, check_shared_answer
from losswire.client.loss_shapes import Descriptions
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

    def SharedMemoryEndpoint(self, request, context):  # noqa: N802
        return self.real.SharedMemoryEndpoint(request, timeout=30)

    def RegisterSharedMemory(self, request, context):  # noqa: N802
        return self.real.RegisterSharedMemory(request, timeout=30)

    def UnregisterSharedMemory(self, request, context):  # noqa: N802
        return self.real.UnregisterSharedMemory(request, timeout=30)

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


# -- the loss's shape, as the request implies it ----------------------------------------------------------

SHARED_ROWS = 1 << 16  # a [65536, 4] float32 pred (1 MiB) and its target travel through shared memory
# each way an answer arrives: (rows of pred, client options)
TRANSPORTS = {
    "unary": (64, dict(shared_memory="off")),
    "stream": (STREAMED_ROWS, dict(shared_memory="off", stream_threshold=1)),
    "shared memory": (SHARED_ROWS, dict(shared_memory="on", stream_threshold=None)),
}


def loss_as(shape: list[int]) -> Tamper:
    """The first term's loss replaced by zeros of ``shape`` (float32, inline, its data of that size)."""

    def tamper(response: pb.EvaluateResponse) -> None:
        loss = response.results[0].loss
        loss.ClearField("shm")
        loss.dtype, loss.shape[:], loss.data = pb.FLOAT32, shape, bytes(4 * math.prod(shape))

    return tamper


def shaped_call(server, transport: str, cfg: dict, kwargs: dict, tamper: Tamper | None = None) -> torch.Tensor:
    """The loss of one forward of ``cfg`` (L1Loss on a [rows, 4] pred, CrossEntropyLoss on [rows, 5] logits)
    by ``transport``, its answer altered by ``tamper`` on the way (the streamed answer's response message)."""
    rows, options = TRANSPORTS[transport]
    stream = None
    if transport == "stream":
        altered = tamper or (lambda response: None)
        stream, tamper = lambda response: iter([altered(response) or pb.EvaluateChunk(response=response)]), None
    if cfg["type"] == "CrossEntropyLoss":
        inputs = (torch.randn(rows, 5, requires_grad=True), torch.randint(0, 5, (rows,)))
    else:
        inputs = (torch.randn(rows, 4, requires_grad=True), torch.randn(rows, 4))
    with hostile(server, tamper, stream) as target:
        client = LossClient(target, timeout=30, **options)
        try:
            return RemoteLoss(cfg, client=client)(*inputs, **kwargs)
        finally:
            # the answer came the way it was meant to: shared memory worked through the hostile server
            assert client.transports.shared_memory_usable == (transport == "shared memory")
            client.close()


# (config, forward keywords, the loss's shape for a pred of `rows` rows, a shape it cannot have, the refusal)
SHAPE_CASES = {
    "mean answered with a [rows, 4] loss": (
        dict(type="L1Loss"),
        {},
        lambda rows: [],
        lambda rows: [rows, 4],
        lambda rows: f"results[0].loss must have shape [] (reduction 'mean'), got [{rows}, 4]",
    ),
    "sum by reduction_override answered with a [1] loss": (
        dict(type="L1Loss", reduction="none"),
        dict(reduction_override="sum"),
        lambda rows: [],
        lambda rows: [1],
        lambda rows: "results[0].loss must have shape [] (reduction 'sum'), got [1]",
    ),
    "none answered with a scalar": (
        dict(type="L1Loss", reduction="none"),
        {},
        lambda rows: [rows, 4],
        lambda rows: [],
        lambda rows: f"results[0].loss must have pred's shape [{rows}, 4] (reduction 'none', output 'element'), got []",
    ),
    "none answered with a vector one row short": (
        dict(type="CrossEntropyLoss", reduction="none"),
        {},
        lambda rows: [rows],
        lambda rows: [rows - 1],
        lambda rows: (
            f"results[0].loss must have shape [{rows}] (pred's shape [{rows}, 5] without its axis 1; "
            f"reduction 'none', output 'sample'), got [{rows - 1}]"
        ),
    ),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_a_loss_of_another_shape_than_the_request_implies_is_refused_by_every_transport(server, case, transport):
    cfg, kwargs, _, tampered, words = SHAPE_CASES[case]
    rows = TRANSPORTS[transport][0]
    with pytest.raises(RemoteLossError) as refused:
        shaped_call(server, transport, cfg, kwargs, loss_as(tampered(rows)))
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    assert refused.value.field == "results[0].loss"
    assert "a malformed answer" in refused.value.details and words(rows) in refused.value.details


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_the_honest_answers_of_those_calls_pass_by_every_transport(server, case, transport):
    cfg, kwargs, shape, _, _ = SHAPE_CASES[case]
    assert list(shaped_call(server, transport, cfg, kwargs).shape) == shape(TRANSPORTS[transport][0])


def test_the_answers_of_sessions_on_two_replicas_are_checked_and_named_by_the_caller_s_term(server):
    """Terms of two sessions travel as one request per session, each to its session's replica: a loss of
    another shape in the second session's answer is refused naming the caller's results[1], not the
    results[0] of the request that carried it. SeesawLoss answers a dict of two 0-d losses under 'mean'."""
    armed = []

    def first_part_as_a_vector(response: pb.EvaluateResponse) -> None:
        for result in response.results:
            if armed and result.name == "b":
                loss = result.parts[0].loss
                loss.shape[:], loss.data = [16], bytes(64)

    cls_score, labels = torch.randn(16, 6, requires_grad=True), torch.randint(0, 5, (16,))
    with hostile(server, first_part_as_a_vector) as one, hostile(server, first_part_as_a_vector) as other:
        client = LossClient([one, other], timeout=30)
        try:
            modules = {
                name: RemoteLoss(dict(type="SeesawLoss", num_classes=4), client=client, session=f"hostile/{name}")
                for name in "ab"
            }
            honest = evaluate_terms({name: (module, (cls_score, labels)) for name, module in modules.items()})
            assert [list(part.shape) for part in honest["b"].values()] == [[], []]
            armed.append(True)
            with pytest.raises(RemoteLossError) as refused:
                evaluate_terms({name: (module, (cls_score, labels)) for name, module in modules.items()})
        finally:
            client.close()
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    assert refused.value.field == "results[1].parts[0].loss"
    assert "results[1].parts[0].loss must have shape [] (reduction 'mean'), got [16]" in refused.value.details


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


def described(
    output: str = "element", sample_axis: int = 1, variants: dict[str, str] | None = None, reduction: bool = True
) -> Descriptions:
    """The description of a loss "L": mmdet's reduction (default 'mean'; with ``reduction=False`` a
    ``reduction: str`` without choices, as a plugin may take and ignore), a ``use_sigmoid`` flag."""
    info = pb.LossInfo(name="L", output=output, sample_axis=sample_axis, output_variants=variants or {})
    param = info.params.add(name="reduction", type="str")
    param.default.string_value = "mean"
    if reduction:
        param.choices.extend(struct_pb2.Value(string_value=r) for r in ("none", "mean", "sum"))
    info.params.add(name="use_sigmoid", type="bool").default.bool_value = False
    info.params.add(name="gamma", type="float").default.number_value = 2.0
    descriptions = Descriptions()
    descriptions.note(info)
    return descriptions


def term_of(pred_shape=(8, 4), override: str | None = None, weight: bool = False, **config) -> pb.EvaluateRequest:
    request = request_of(pred_shape=pred_shape)
    term = request.terms[0]
    term.config.update({"type": "L", **config})
    if override is not None:
        term.reduction_override = override
    if weight:
        term.weight.dtype, term.weight.shape[:] = pb.FLOAT32, list(pred_shape)
    return request


def parts_of(*shapes: list[int]) -> pb.EvaluateResponse:
    response = answer_of()
    result = response.results[0]
    result.ClearField("loss")
    result.structure = "dict"
    for key, shape in zip("ab", shapes, strict=False):
        result.parts.add(key=key).loss.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=shape))
    return response


def shape_refusal(request, response, descriptions) -> str:
    with pytest.raises(RemoteLossError) as refused:
        check_answer(request, response, descriptions)
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    return f"{refused.value.field}: {refused.value.details}"


def test_a_reduced_loss_is_0_d_whichever_says_the_reduction():
    """The override, else the config's reduction, else the described default ('mean')."""
    element = described()
    for request in (term_of(), term_of(reduction="sum"), term_of(reduction="none", override="mean")):
        check_answer(request, answer_of(()), element)
        for shape in ((1,), (8, 4)):
            refused = shape_refusal(request, answer_of(shape), element)
            assert refused.startswith("results[0].loss: ") and "must have shape [] (reduction '" in refused
    assert "(reduction 'sum'), got [1]" in shape_refusal(term_of(override="sum"), answer_of((1,)), element)
    check_answer(term_of(override="none"), answer_of((8, 4)), element)
    check_answer(term_of(override=""), answer_of(()), element)  # mmdet: an empty override is no override


def test_an_element_wise_loss_has_pred_s_shape_or_is_0_d_only_where_a_weight_may_have_no_positive_entry():
    element = described()
    none = term_of(reduction="none")
    check_answer(none, answer_of((8, 4)), element)
    for shape in ((), (8,), (4, 8), (8, 4, 1)):
        refused = shape_refusal(none, answer_of(shape), element)
        assert f"must have pred's shape [8, 4] (reduction 'none', output 'element'), got {list(shape)}" in refused
    # mmdet's L1 and box losses answer (pred * weight).sum() when no weight is positive, also under 'none'
    check_answer(term_of(reduction="none", weight=True), answer_of(()), element)
    check_answer(term_of(reduction="none", sampler={"type": "RandomSampler"}), answer_of(()), element)
    check_answer(term_of((0, 4), reduction="none"), answer_of(()), element)  # an empty pred
    assert "pred's shape [8, 4] or []" in shape_refusal(
        term_of(reduction="none", weight=True), answer_of((8,)), element
    )


def test_a_per_sample_loss_has_pred_s_shape_without_the_sample_axis_or_a_leading_part_of_it():
    sample = described("sample")
    masks = term_of((8, 5, 3), reduction="none")
    for shape in ((8, 3), (8,)):  # CrossEntropyLoss of [N, C, W] logits; DiceLoss of [N, H, W] masks
        check_answer(masks, answer_of(shape), sample)
    for shape in ((), (7,), (9,), (8, 5), (5, 3), (8, 3, 1)):
        refused = shape_refusal(masks, answer_of(shape), sample)
        assert "must have shape [8, 3] or a leading part of it (pred's shape [8, 5, 3] without its axis 1" in refused
    boxes = described("sample", sample_axis=-1)
    check_answer(term_of(reduction="none"), answer_of((8,)), boxes)
    assert "shape [8] (pred's shape [8, 4] without its axis 1;" in shape_refusal(
        term_of(reduction="none"), answer_of((8, 4)), boxes
    )
    check_answer(term_of(reduction="none", weight=True), answer_of(()), boxes)  # the zero-weight shortcut
    check_answer(term_of((4,), reduction="none"), answer_of(()), boxes)  # one box: one loss
    check_answer(term_of((8,), reduction="none"), answer_of((3,)), sample)  # pred has no axis 1: not known


def test_a_part_of_several_may_hold_fewer_rows_or_none():
    """SeesawLoss under 'none': the objectness part has a loss per row, the classes part one per
    foreground row only (a 0-d zero without any)."""
    sample = described("sample")
    none = term_of((8, 6), reduction="none")
    for shapes in (([8], [5]), ([8], [8]), ([8], [])):
        check_answer(none, parts_of(*shapes), sample)
    refused = shape_refusal(none, parts_of([8], [9]), sample)
    assert refused.startswith("results[0].parts[1].loss: ") and "shape [8], or fewer rows or []" in refused
    assert "results[0].parts[0].loss: " in shape_refusal(term_of((8, 6)), parts_of([8], []), sample)


def test_a_scalar_loss_is_one_value_whatever_the_reduction():
    """TripletLoss, EQLV2Loss, AssociativeEmbeddingLoss: 0-d; CrossEntropyLoss(use_mask=True): mmdet's [1]."""
    scalar = described("scalar")
    for request in (term_of(), term_of(reduction="none")):
        for shape in ((), (1,)):
            check_answer(request, answer_of(shape), scalar)
        assert "must have shape [] or [1] (L's output is 'scalar'), got [8]" in shape_refusal(
            request, answer_of((8,)), scalar
        )
    without_reduction = described("scalar", reduction=False)
    assert "or [1]" in shape_refusal(term_of(), answer_of((2,)), without_reduction)


def test_the_output_variant_the_config_matches_decides_the_shape():
    variants = described("sample", variants={"use_sigmoid=True": "element"})
    check_answer(term_of(reduction="none"), answer_of((8,)), variants)
    check_answer(term_of(reduction="none", use_sigmoid=True), answer_of((8, 4)), variants)
    assert "output 'element'" in shape_refusal(term_of(reduction="none", use_sigmoid=True), answer_of((8,)), variants)


def test_where_the_client_cannot_know_the_shape_any_shape_passes():
    """No description of the loss; a reduction the loss may ignore (not mmdet's choices); a variant of a number
    the client cannot compare; a reduction the server refuses; another loss's description."""
    any_shape = [answer_of(shape) for shape in ((), (1,), (8, 4), (3, 3, 3))]
    cases = [
        (term_of(reduction="mean"), None),
        (term_of(reduction="mean"), described(reduction=False)),
        (term_of(reduction="mean", gamma=1.0), described(variants={"gamma=2.0": "sample"})),
        (term_of(reduction="max"), described()),
        (term_of(reduction="mean", type="M"), described()),
    ]
    for request, descriptions in cases:
        for response in any_shape:
            check_answer(request, response, descriptions)
