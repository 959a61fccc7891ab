"""A streamed call computed while it arrives (``EvaluateRequest.early_gradients``): FocalLoss's and
QualityFocalLoss's blocks of rows are computed as every input holds them, and pred's gradient rows come
back before the response.

The answer must be the whole-call answer bit for bit, whatever the order the caller sends its rows in;
a late block that needs the general path voids the early rows; a caller that leaves mid-stream leaves
nothing held. Small block sizes (patched into the in-process server's kernels) give many blocks to
small tensors.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.calls import evaluate_stream, plain_channel
from support.in_process import DEVICE, nothing_held

from losswire.client import LossClient, RemoteLossError
from losswire.server.losses import fused
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec

# a GPU server computes a streamed call whole (row blocks are CPU kernels): tests/service/test_streaming.py
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="computing while the chunks arrive is the CPU's path")

GRADIENT = "results[0].gradients[pred]"
N, C = 4096, 80  # 1.25 MiB of pred: 86 blocks of 48 rows with the block sizes below


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(fused, "BLOCKED_MIN_ELEMENTS", 1 << 13)
    assert len(fused.row_blocks(N, C, torch.device("cpu"))) > 80


@pytest.fixture(scope="module")
def streaming(target) -> Iterator[LossClient]:
    client = LossClient(target, timeout=60, stream_threshold=64 << 10, shared_memory="off")
    yield client
    client.close()


@pytest.fixture(scope="module")
def unary(target) -> Iterator[LossClient]:
    client = LossClient(target, timeout=60, stream_threshold=None, shared_memory="off")
    yield client
    client.close()


def _inputs(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=generator), torch.randint(0, C + 1, (n,), generator=generator)


def _request(cfg: dict, pred: torch.Tensor, labels: torch.Tensor, **fields) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(cfg), gradients=["pred"])
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(labels, term.target)
    if fields.get("weight") is not None:
        codec.encode_tensor(fields["weight"], term.weight)
    if fields.get("avg_factor") is not None:
        term.avg_factor = fields["avg_factor"]
    return request


def _answer(response: pb.EvaluateResponse, streamed: dict) -> tuple[torch.Tensor, torch.Tensor]:
    result = response.results[0]
    loss = codec.decode_tensor(result.loss, "results[0].loss", streamed=streamed)
    return loss, codec.decode_tensor(result.gradients["pred"], GRADIENT, streamed=streamed)


def _unary_answer(unary: LossClient, request: pb.EvaluateRequest) -> tuple[torch.Tensor, torch.Tensor]:
    response, streamed = unary.evaluate_tensors(request)
    assert not streamed and not response.early
    return _answer(response, {})


CASES = {
    "mean": (dict(type="FocalLoss"), {}),
    "none": (dict(type="FocalLoss", reduction="none"), {}),
    "gamma_1.5_avg_factor": (dict(type="FocalLoss", gamma=1.5, alpha=0.4, loss_weight=2.0), {"avg_factor": 37.0}),
    "weight_N": (dict(type="FocalLoss"), {"weight": "N"}),
    "weight_NC_sum": (dict(type="FocalLoss", reduction="sum"), {"weight": "NC"}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_overlapped_answer_is_the_whole_call_answer_bit_for_bit(streaming, unary, case):
    cfg, fields = CASES[case]
    pred, labels = _inputs()
    weight = {"N": torch.rand(N), "NC": torch.rand(N, C)}.get(fields.get("weight"))
    request = _request(cfg, pred, labels, weight=weight, avg_factor=fields.get("avg_factor"))
    before = fused.CALLS["FocalLoss"]
    response, streamed = streaming.evaluate_tensors(request)
    assert list(response.early) == [GRADIENT]  # computed while it arrived, its gradient sent ahead
    assert GRADIENT in streamed and fused.CALLS["FocalLoss"] == before + 1
    loss, gradient = _answer(response, streamed)
    expected_loss, expected_gradient = _unary_answer(unary, request)
    assert torch.equal(loss, expected_loss) and torch.equal(gradient, expected_gradient)


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_quality_focal_loss_is_overlapped_too(streaming, unary, beta):
    """QualityFocalLoss's target is a (label, score) pair: both of its tensors' rows are waited for."""
    n = 16384  # labels of 128 KiB: both target tensors are streamed, in rows beside pred's
    pred, labels = _inputs(9, n=n)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(10))
    request = _request(dict(type="QualityFocalLoss", beta=beta), pred, (labels - 1, scores))
    streamed_inputs = {path for path, tensor in codec.tensors_of(request) if tensor.ByteSize() >= 64 << 10}
    assert {"terms[0].target.tensors.items[0]", "terms[0].target.tensors.items[1]"} <= streamed_inputs
    response, streamed = streaming.evaluate_tensors(request)
    assert list(response.early) == [GRADIENT]
    expected = _unary_answer(unary, request)
    assert all(torch.equal(a, b) for a, b in zip(_answer(response, streamed), expected, strict=True))


def _stream(target: str, messages: Iterator, received: queue.Queue) -> threading.Thread:
    """Send ``messages`` on an EvaluateStream in a thread; each answer message, then None (or the
    error), goes to ``received`` as it arrives."""

    def run() -> None:
        with plain_channel(target) as channel:
            method = evaluate_stream(channel)
            try:
                for message in method(messages, timeout=60):
                    received.put(message)
                received.put(None)
            except grpc.RpcError as error:
                received.put(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _header(pred: torch.Tensor, labels: torch.Tensor, early: bool = True) -> pb.EvaluateChunk:
    request = pb.EvaluateRequest(early_gradients=early)
    term = request.terms.add(config=codec.encode_config(dict(type="FocalLoss")), gradients=["pred"])
    term.pred.dtype, term.pred.shape[:] = pb.FLOAT32, list(pred.shape)
    term.target.tensor.dtype, term.target.tensor.shape[:] = pb.INT64, list(labels.shape)
    return pb.EvaluateChunk(request=request)


def _rows(pred: torch.Tensor, labels: torch.Tensor, first: int, last: int) -> list[bytes]:
    """The chunks of rows [first, last) of pred and of the labels."""
    return [
        chunks.chunk_wire_bytes("terms[0].pred", first * C * 4, pred[first:last].numpy().tobytes()),
        chunks.chunk_wire_bytes("terms[0].target", first * 8, labels[first:last].numpy().tobytes()),
    ]


def _assembled(messages: list[pb.EvaluateChunk]) -> tuple[pb.EvaluateResponse, dict, int]:
    """The response, its tensors (early ones included), and how many chunks came before it."""
    early = chunks.StreamAssembler(
        pb.EvaluateResponse(results=[pb.TermResult(gradients={"pred": pb.Tensor(dtype=pb.FLOAT32, shape=[N, C])})])
    )
    count = next(i for i, m in enumerate(messages) if m.WhichOneof("kind") == "response")
    for message in messages[:count]:
        early.add(message.chunk)
    response = messages[count].response
    flat = {path: early.tensors[path].reshape(-1).view(torch.uint8) for path in response.early}
    assembler = chunks.StreamAssembler(response, early=flat)
    for message in messages[count + 1 :]:
        assembler.add(message.chunk)
    return response, assembler.finish(), count


def _drain(received: queue.Queue) -> list[pb.EvaluateChunk]:
    messages = []
    while (message := received.get(timeout=60)) is not None:
        if isinstance(message, grpc.RpcError):
            raise RemoteLossError.from_rpc_error(message)
        messages.append(message)
    return messages


def test_gradient_rows_come_back_while_the_caller_is_still_sending(target, unary):
    pred, labels = _inputs(1)
    half = N // 2
    received: queue.Queue = queue.Queue()
    rest_sent = threading.Event()

    def messages() -> Iterator:
        yield _header(pred, labels)
        yield from _rows(pred, labels, 0, half)
        # the rest only once a gradient chunk has come back: the server computed what it had
        early = received.get(timeout=30)
        received.put(early)  # for the reader below
        rest_sent.set()
        yield from _rows(pred, labels, half, N)

    sender = _stream(target, messages(), received)
    assert rest_sent.wait(40), "no gradient chunk came back while half of the rows were still to be sent"
    sender.join(60)
    response, streamed, ahead = _assembled(_drain(received))
    assert list(response.early) == [GRADIENT] and ahead >= 1
    request = _request(dict(type="FocalLoss"), pred, labels)
    assert all(
        torch.equal(a, b) for a, b in zip(_answer(response, streamed), _unary_answer(unary, request), strict=True)
    )


def test_inputs_sent_one_after_the_other_get_the_same_answer(target, unary):
    """pred whole, then the labels: no block is complete before the last chunk, the answer is the same."""
    pred, labels = _inputs(2)
    received: queue.Queue = queue.Queue()
    flat_pred, flat_labels = pred.numpy().tobytes(), labels.numpy().tobytes()
    sent = [
        _header(pred, labels),
        *(
            chunks.chunk_wire_bytes("terms[0].pred", o, flat_pred[o : o + 300_000])
            for o in range(0, len(flat_pred), 300_000)
        ),
        chunks.chunk_wire_bytes("terms[0].target", 0, flat_labels),
    ]
    _stream(target, iter(sent), received).join(60)
    response, streamed, _ = _assembled(_drain(received))
    assert list(response.early) == [GRADIENT]
    request = _request(dict(type="FocalLoss"), pred, labels)
    assert all(
        torch.equal(a, b) for a, b in zip(_answer(response, streamed), _unary_answer(unary, request), strict=True)
    )


def test_a_late_non_finite_input_voids_the_early_rows(streaming, unary):
    pred, labels = _inputs(3)
    pred[N - 2, 5] = float("inf")  # the last block needs autograd's path, as the whole call does
    request = _request(dict(type="FocalLoss", reduction="none"), pred, labels)
    response, streamed = streaming.evaluate_tensors(request)
    assert not response.early and GRADIENT in streamed  # sent again, after the response
    loss, gradient = _answer(response, streamed)
    expected_loss, expected_gradient = _unary_answer(unary, request)
    assert torch.equal(loss.nan_to_num(), expected_loss.nan_to_num())
    assert torch.equal(gradient.nan_to_num(), expected_gradient.nan_to_num())
    assert not torch.isfinite(gradient[N - 2]).all() and torch.isfinite(gradient[: N - 2]).all()


def test_a_late_label_out_of_range_is_the_whole_call_error(streaming, unary):
    pred, labels = _inputs(4)
    labels[N - 1] = C + 3
    request = _request(dict(type="FocalLoss"), pred, labels)
    errors = []
    for client in (streaming, unary):
        with pytest.raises(RemoteLossError) as caught:
            client.evaluate_tensors(request)
        errors.append(caught.value)
    assert [e.code for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert errors[0].field == errors[1].field and errors[0].details == errors[1].details


def test_a_caller_that_leaves_mid_stream_leaves_nothing_held(target, server):
    pred, labels = _inputs(5)
    leave = threading.Event()

    def messages() -> Iterator:
        yield _header(pred, labels)
        yield from _rows(pred, labels, 0, N // 2)
        leave.wait(30)  # never sends the rest: the call is cancelled meanwhile

    with plain_channel(target) as channel:
        method = evaluate_stream(channel)
        call = method(messages(), timeout=60)
        first = next(call)  # an early gradient chunk: the overlap is running
        assert first.WhichOneof("kind") == "chunk" and first.chunk.tensor == GRADIENT
        assert server.dataplane.budget.held > 0 and server.dataplane.slots.in_use == 1
        call.cancel()
        leave.set()
    assert nothing_held(server)
    # and the next call is answered
    received_again: queue.Queue = queue.Queue()
    _stream(target, iter([_header(pred, labels), *_rows(pred, labels, 0, N)]), received_again).join(60)
    response, _, _ = _assembled(_drain(received_again))
    assert list(response.early) == [GRADIENT]


def test_callers_that_leave_mid_stream_leave_no_task_pending(target, server):
    """The overlap's wait for the next chunk ends with its call: a cancelled call leaves no task pending
    (asyncio would log 'Task was destroyed but it is pending!' when it is collected)."""
    pred, labels = _inputs(14)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        for _ in range(3):
            leave = threading.Event()

            def messages(leave: threading.Event = leave) -> Iterator:
                yield _header(pred, labels)
                yield from _rows(pred, labels, 0, N // 2)
                leave.wait(30)  # never sends the rest: the call is cancelled while the server waits for it

            with plain_channel(target) as channel:
                call = evaluate_stream(channel)(messages(), timeout=60)
                assert next(call).chunk.tensor == GRADIENT  # the overlap is running, waiting for rows
                call.cancel()
                leave.set()
            assert nothing_held(server)
        # a call's coroutines are over once its call is: what they left behind is collected now
        for _ in range(3):
            gc.collect()
    finally:
        logger.removeHandler(handler)
    pending = [record.getMessage() for record in records if "destroyed but it is pending" in record.getMessage()]
    assert not pending, pending


SHAPES = {  # pred's declared shape, the labels' shape
    "0-d": ([], [1]),
    "0-d_target_0-d": ([], []),
    "rank_1": ([64], [64]),
    "no_rows": ([0, C], [0]),
    "no_columns": ([64, 0], [64]),
    "rank_3": ([64, 4, 3], [64]),
}


@pytest.mark.parametrize("loss", ["FocalLoss", "QualityFocalLoss"])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_pred_without_rows_to_overlap_gets_the_status_it_gets_without_early_gradients(target, server, loss, shape):
    """A streamed pred that has no rows to compute block by block (0-d, empty, or not [N, C]) asked for
    early gradients: the same answer or refusal as the call that does not ask, never an internal error."""
    pred_shape, label_shape = SHAPES[shape]
    numel = 1
    for size in pred_shape:
        numel *= size
    outcomes = []
    for early in (False, True):
        request = pb.EvaluateRequest(early_gradients=early)
        term = request.terms.add(config=codec.encode_config(dict(type=loss)))
        term.pred.dtype, term.pred.shape[:] = pb.FLOAT32, pred_shape
        labels = torch.ones(label_shape, dtype=torch.int64)
        if loss == "FocalLoss":  # as tensors, even 0-d ones: class indices
            codec.encode_tensor(labels, term.target.tensor)
        else:
            codec.encode_tensor(labels, term.target.tensors.items.add())
            codec.encode_tensor(torch.full(label_shape, 0.5), term.target.tensors.items.add())
        messages = [pb.EvaluateChunk(request=request)]
        if numel:  # else nothing is streamed: pred's data is empty as declared
            messages.append(chunks.chunk_wire_bytes("terms[0].pred", 0, bytes(4 * numel)))
        received: queue.Queue = queue.Queue()
        _stream(target, iter(messages), received).join(60)
        try:
            answer = _drain(received)
        except RemoteLossError as error:
            outcomes.append((error.code, error.field, error.details))
        else:
            response = next(m.response for m in answer if m.WhichOneof("kind") == "response")
            assert not response.early
            outcomes.append((grpc.StatusCode.OK, list(response.results[0].loss.shape), response.results[0].loss.data))
    assert outcomes[0][0] not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), outcomes[0]
    assert outcomes[1] == outcomes[0]
    assert nothing_held(server)


def test_a_caller_that_does_not_ask_gets_the_response_first(target):
    pred, labels = _inputs(6)
    received: queue.Queue = queue.Queue()
    _stream(target, iter([_header(pred, labels, early=False), *_rows(pred, labels, 0, N)]), received).join(60)
    messages = _drain(received)
    assert messages[0].WhichOneof("kind") == "response" and not messages[0].response.early


@pytest.mark.parametrize(
    "cfg",
    [dict(type="FocalLoss", gamma="two"), dict(type="FocalLos"), dict(type="FocalLoss", reduction="median")],
    ids=["ill_typed", "unknown", "bad_reduction"],
)
def test_a_bad_config_is_refused_as_the_whole_call_refuses_it(streaming, unary, cfg):
    """The overlap's first step decodes and checks the term: its refusal is the whole-call path's."""
    pred, labels = _inputs(7)
    request = _request(cfg, pred, labels)
    errors = []
    for client in (streaming, unary):
        with pytest.raises(RemoteLossError) as caught:
            client.evaluate_tensors(request)
        errors.append(caught.value)
    assert errors[0].code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert (errors[0].code, errors[0].field, errors[0].details) == (errors[1].code, errors[1].field, errors[1].details)


def test_a_server_with_overlap_off_answers_after_every_chunk(unary):
    """``--overlap-transfer off``: a caller that asks gets the same answer, every
    gradient chunk after the response, nothing listed early."""
    from losswire.server.app import LosswireServer
    from losswire.server.config import ServerConfig

    server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, max_workers=2, overlap_transfer=False))
    server.start()
    try:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=60, stream_threshold=64 << 10, shared_memory="off")
        pred, labels = _inputs(8)
        request = _request(dict(type="FocalLoss"), pred, labels)
        response, streamed = client.evaluate_tensors(request)
        client.close()
    finally:
        server.stop(grace=1)
    assert not response.early and GRADIENT in streamed
    assert all(
        torch.equal(a, b) for a, b in zip(_answer(response, streamed), _unary_answer(unary, request), strict=True)
    )


@pytest.mark.parametrize("fault", ["gap", "overlap", "past_the_end", "unknown_tensor", "ends_early"])
def test_a_malformed_stream_midway_is_refused_and_leaves_nothing_held(target, server, fault):
    """Rows already computed do not save a stream that turns malformed: INVALID_ARGUMENT naming the field,
    as without early gradients, and the call's buffers, budget and slot are given back."""
    pred, labels = _inputs(11)
    half = N // 2
    first_half = _rows(pred, labels, 0, half)
    rest = pred[half:].numpy().tobytes()
    at = half * C * 4
    bad = {
        "gap": [chunks.chunk_wire_bytes("terms[0].pred", at + 8, rest[8:])],
        "overlap": [chunks.chunk_wire_bytes("terms[0].pred", at - 8, rest)],
        "past_the_end": [chunks.chunk_wire_bytes("terms[0].pred", at, rest + b"1234")],
        "unknown_tensor": [chunks.chunk_wire_bytes("terms[0].weight", 0, rest[:64])],
        "ends_early": [],
    }[fault]
    received: queue.Queue = queue.Queue()
    _stream(target, iter([_header(pred, labels), *first_half, *bad]), received).join(60)
    with pytest.raises(RemoteLossError) as caught:
        _drain(received)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field in ("terms[0].pred.data", "chunk.tensor"), caught.value.field
    assert nothing_held(server)


def test_streams_refused_while_their_chunks_still_come_leave_nothing_held(target, server):
    """The overlap's first step refuses a bad config while the caller is still sending: the chunk reader
    stops before the call's memory and slot are given back, so no chunk read after the end takes either
    again. Many calls in a row, each with many small chunks still in flight when it is refused."""
    pred, labels = _inputs(12)
    header = _header(pred, labels)
    header.request.terms[0].config.CopyFrom(codec.encode_config(dict(type="FocalLoss", gamma="two")))
    flat_pred, flat_labels = pred.numpy().tobytes(), labels.numpy().tobytes()
    piece = 8192
    pieces = [
        chunks.chunk_wire_bytes("terms[0].pred", o, flat_pred[o : o + piece]) for o in range(0, len(flat_pred), piece)
    ]
    messages = [header, *pieces, chunks.chunk_wire_bytes("terms[0].target", 0, flat_labels)]
    for _ in range(20):
        received: queue.Queue = queue.Queue()
        _stream(target, iter(messages), received).join(60)
        with pytest.raises(RemoteLossError) as caught:
            _drain(received)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert nothing_held(server)


def test_a_loss_without_a_row_kernel_is_streamed_as_before(streaming, unary):
    """GIoULoss (a fused kernel, not a row kernel): asked for early gradients, the server answers after every
    chunk, the same bits as a unary call."""
    generator = torch.Generator().manual_seed(13)
    xy = torch.rand(N * 4, 2, generator=generator) * 100
    pred = torch.cat([xy, xy + 1 + torch.rand(N * 4, 2, generator=generator) * 50], dim=1)
    target = pred + torch.rand(pred.shape, generator=generator)
    request = _request(dict(type="GIoULoss"), pred, target)
    response, streamed = streaming.evaluate_tensors(request)
    assert not response.early and GRADIENT in streamed
    expected = _unary_answer(unary, request)
    assert all(torch.equal(a, b) for a, b in zip(_answer(response, streamed), expected, strict=True))
